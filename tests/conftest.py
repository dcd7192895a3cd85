"""Fixtures and pytest hooks; the helpers the tests share are in helpers.py, the case tables in
cases.py, the tiny models in small_models.py."""

from __future__ import annotations

import os

# One compile thread: on a 2-core CI machine with one pytest-xdist worker per core, Inductor's
# pool of compile workers costs more in start-up than its parallel C++ builds save.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from fuzzing import Fuzzer  # noqa: E402  (registers and loads the hypothesis profiles)


@pytest.fixture
def fuzz(request):
    """The shared hypothesis fuzzer (tests/fuzzing.py): derandomized in CI, timed under --soak."""
    return Fuzzer(request)


def pytest_addoption(parser):
    parser.addoption(
        "--soak", type=float, default=None, metavar="SECONDS",
        help="run the hypothesis fuzz tests (tests/test_fuzz.py, tests/test_lookalike_fuzz.py) for about SECONDS in all, with fresh random "
             "seeds, and report examples tried and failures (release check; CI runs them derandomized)",
    )


# The longest files start first, so that under pytest-xdist (whole files per worker) no single
# long test runs alone at the end while the other worker idles.
LONGEST_FIRST = ("test_benchmarks.py", "test_distributed.py", "test_backend.py", "test_export.py",
                 "test_export_state.py")


def _start_order(item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_start_order)  # stable: the order inside a file is kept
    if torch.cuda.is_available():
        return
    reason = "needs a CUDA device: run `./dev test -m cuda` on the GPU machine (benchmarks/gpu_check.sh)"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _deterministic():
    # Every tiny Llama shares LlamaForCausalLM.forward: without a reset, Dynamo's per-code
    # recompile limit (8) is reached across tests, not within one.
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
