"""The hypothesis fuzzer the fuzz tests share: a fixed, derandomized set of examples in CI (the "ci"
profile), or, under `pytest --soak=SECONDS`, fresh seeds for a share of that time, reporting what
it tried and every failure (the release check)."""

from __future__ import annotations

import time
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

settings.register_profile(
    "ci", derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "soak", derandomize=False, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")


class Fuzzer:
    def __init__(self, request: pytest.FixtureRequest) -> None:
        self.soak = request.config.getoption("--soak")
        self.name = request.node.name
        self.reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        self.capture = request.config.pluginmanager.get_plugin("capturemanager")
        if self.soak is not None:
            fuzz_tests = sum("fuzz" in item.fixturenames for item in request.session.items)
            self.budget = self.soak / max(fuzz_tests, 1)
        self.tried = 0

    def run(self, strategy: st.SearchStrategy, check: object, examples: int) -> None:
        def body(case: object) -> None:
            self.tried += 1
            check(case)

        if self.soak is None:
            settings(max_examples=examples)(given(strategy)(body))()
            assert self.tried >= examples, f"hypothesis ran {self.tried} of {examples} examples"
            return
        failures, end = [], time.monotonic() + self.budget
        while time.monotonic() < end:
            try:
                settings(settings.get_profile("soak"), max_examples=examples)(given(strategy)(body))()
            except Exception as error:  # hypothesis re-raises the shrunk failure with the example in its notes
                notes = "\n".join(getattr(error, "__notes__", []))
                failures.append(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}\n{notes}")
        summary = f"soak {self.name}: {self.tried} examples tried in {self.budget:.0f}s, {len(failures)} failure(s)"
        if self.reporter is None or self.capture is None:  # a pytest-xdist worker: its warnings reach the summary
            warnings.warn(summary, stacklevel=1)
        else:
            with self.capture.global_and_fixture_disabled():  # shown without -s
                self.reporter.write_line("\n" + summary)
                for failure in failures:
                    self.reporter.write_line(failure)
        assert not failures, f"{len(failures)} failure(s) in {self.tried} examples; first:\n{failures[0]}"
