"""CUDA: the same checks on the GPU machine (`./dev test -m cuda`); skipped, with the reason, elsewhere."""

import cases
import peft
import pytest
import torch
from helpers import build, clone, copy_blocks, input_ids, model_output, randomize_blocks

from miss_compile import apply_miss, make_backend
from miss_compile.peft_compat import named_miss_layers

pytestmark = [pytest.mark.cuda, pytest.mark.slow]

CONFIGS = {variant: cases.CONFIGS[variant] for variant in ("balance", "bat")}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_half_model_fp32_adapters_train_step(variant, dtype):
    base = build("llama", dtype).cuda()
    ours = apply_miss(clone(base), CONFIGS[variant])
    randomize_blocks(ours)
    theirs = peft.get_peft_model(clone(base), CONFIGS[variant].to_peft())
    copy_blocks(ours, theirs)
    eager = clone(theirs)
    backend = make_backend()
    compiled = torch.compile(theirs, backend=backend, fullgraph=True)
    ids = input_ids().cuda()
    loss = compiled(input_ids=ids, labels=ids).loss
    expected = eager(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, expected, atol=2e-2, rtol=2e-2)
    loss.backward()
    expected.backward()
    for name, layer in named_miss_layers(eager).items():
        got = named_miss_layers(theirs)[name].miss_block["default"].grad
        torch.testing.assert_close(got, layer.miss_block["default"].grad, atol=2e-2, rtol=5e-2)
    assert len(backend.graph_pass.reports[0].rewritten) == 14


def test_fp32_inference_matches_tightly():
    base = build("llama").cuda()
    ours = apply_miss(clone(base), CONFIGS["balance"])
    randomize_blocks(ours)
    ids = input_ids().cuda()
    with torch.no_grad():
        out = model_output(torch.compile(ours, backend=make_backend(), fullgraph=True), ids)
        torch.testing.assert_close(out, model_output(ours, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("merge", [False, True])
def test_reduce_overhead_replays_cuda_graphs_with_the_pass(merge):
    from torch._dynamo.utils import counters

    base = build("llama").cuda()
    ours = apply_miss(clone(base), CONFIGS["balance"]).requires_grad_(not merge)
    randomize_blocks(ours)
    backend = make_backend(merge=merge)
    compiled = torch.compile(ours, backend=backend, mode="reduce-overhead", fullgraph=True)
    counters.clear()
    with torch.no_grad(), torch._inductor.config.patch(freezing=merge):
        for seed in (1, 2, 3, 4):  # warm-up, record, then replays: each with new inputs
            ids = input_ids(seed=seed).cuda()
            out = model_output(compiled, ids).clone()  # a replay overwrites the previous output
            torch.testing.assert_close(out, model_output(ours, ids), atol=1e-4, rtol=1e-4)
    assert counters["inductor"]["cudagraph_skips"] == 0
    rewritten = backend.graph_pass.reports[0].rewritten
    assert len(rewritten) == 14 and all(item.merged == merge for item in rewritten)
