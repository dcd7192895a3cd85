"""Serving under load: one onnxruntime session shared by threads, and recompiles over many lengths."""

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from small_models import OneLinear, TwoLinears
from torch import nn

from miss_compile import MissConfig, apply_miss, miss_backend
from miss_compile.export import export_onnx, load_session, write_onnx_adapter
from miss_compile.peft_compat import named_miss_layers

pytestmark = pytest.mark.slow

THREADS, REQUESTS = 8, 200
# What the README promises: any number of sequence lengths costs at most three compiles with
# dynamic=None: the first length (static), a second length (one dynamic graph), and length 1
# (Dynamo specializes sizes 0 and 1).
MAX_COMPILES = 3


def adapted(seed: int) -> nn.Module:
    torch.manual_seed(0)  # same base weights for every adapter
    model = TwoLinears().eval()
    # 12 % 3 == 0, 16 % 3 != 0 (padded). One adapter name has one config (a checkpoint holds one r).
    apply_miss(model, MissConfig(r=3, target_modules=["up", "down"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in named_miss_layers(model).values():
            block = layer.miss_block["default"]
            block.copy_(torch.randn(block.shape, generator=generator) * 0.1)
    return model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One unmerged export, two swappable adapter files for it, and the models they come from."""
    folder = tmp_path_factory.mktemp("serving")
    model = adapted(seed=1)
    result = export_onnx(model, args=(torch.randn(2, 5, 12),), path=folder / "model.onnx")
    models, adapters = {None: model}, {None: None}
    for seed in (2, 3):
        models[seed] = adapted(seed)
        adapters[seed] = write_onnx_adapter(models[seed], folder / f"{seed}.onnx_adapter", result.path)
    return result.path, adapters, models


def test_threads_give_single_threaded_outputs_bit_for_bit(served):
    path, adapters, models = served
    session = load_session(path, device="cpu")
    rng = random.Random(0)
    requests = []
    for _ in range(THREADS * REQUESTS):
        batch, seq = rng.randint(1, 4), rng.randint(1, 9)
        requests.append((torch.randn(batch, seq, 12, generator=torch.Generator().manual_seed(rng.randrange(2**31))),
                         rng.choice(list(adapters))))
    single = [session.run({"x": x}, adapter=adapters[which])[0] for x, which in requests]
    for (x, which), out in list(zip(requests, single, strict=True))[:50]:  # the served numbers are right
        with torch.no_grad():
            torch.testing.assert_close(out, models[which](x), atol=1e-5, rtol=1e-5)
    assert {which for _, which in requests} == set(adapters)

    def serve(thread):
        chunk = range(thread * REQUESTS, (thread + 1) * REQUESTS)
        return [(i, session.run({"x": requests[i][0]}, adapter=adapters[requests[i][1]])[0]) for i in chunk]

    with ThreadPoolExecutor(THREADS) as pool:
        results = [item for chunk in pool.map(serve, range(THREADS)) for item in chunk]
    assert len(results) == THREADS * REQUESTS
    mismatched = [i for i, out in results if not torch.equal(out, single[i])]
    assert not mismatched, f"{len(mismatched)} of {len(results)} threaded outputs differ, first request {mismatched[0]}"


def test_fifty_sequence_lengths_compile_at_most_three_times():
    torch.manual_seed(0)
    model = apply_miss(OneLinear(12, 8).eval(), MissConfig(r=5, target_modules=["proj"]))  # 12 % 5 != 0
    with torch.no_grad():
        model.proj.miss_block["default"].normal_(std=0.1)
    compiled = torch.compile(model, backend=miss_backend)  # dynamic=None: automatic dynamic shapes
    reports_before = len(miss_backend.graph_pass.reports)
    lengths = list(range(2, 51))
    random.Random(0).shuffle(lengths)
    lengths.insert(10, 1)  # length 1 mid-way: Dynamo's 0/1 specialization
    assert len(set(lengths)) == 50
    with torch.no_grad():
        for seq in lengths:
            x = torch.randn(2, seq, 12)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    reports = miss_backend.graph_pass.reports[reports_before:]
    assert 2 <= len(reports) <= MAX_COMPILES
    assert all(len(report.rewritten) == 1 for report in reports)  # every graph has the layer as a miss op
