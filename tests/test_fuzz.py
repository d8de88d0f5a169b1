"""Fuzz every parser of untrusted input: one-line kcore errors or success, nothing else.

Brief by default (CI); KCORE_FUZZ_EXAMPLES=N runs N examples per parser. The long run with
execution counts, time and memory: python -m tests.fuzzing --count 100000. Inputs that once
broke a parser are kept in tests/data/fuzz/crashes/ and replayed here.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import PARSERS, Scratch, crash_inputs

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("KCORE_FUZZ_EXAMPLES", "0"))
# Slow parsers (each input decompresses pages) get fewer examples in the brief run.
BRIEF = {"kdump": 40, "flattened": 40, "avml": 25, "rebuild": 40, "dl-iomem": 80}


@pytest.fixture(scope="module")
def scratch():
    s = Scratch()
    yield s
    s.close()


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_parser_takes_mutated_seeds_without_a_traceback(name: str, scratch: Scratch) -> None:
    """Structure-aware mutations of the seeds: success or one of kcore's one-line errors."""
    parser = PARSERS[name]
    seeds = parser.seeds()
    if not seeds:
        pytest.skip(f"no seeds for {name} here (the fixtures are missing)")
    for seed in seeds:  # the unmutated seeds parse
        parser.run(seed, scratch)

    @settings(max_examples=EXAMPLES or BRIEF.get(name, 150), deadline=10_000, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.randoms(use_true_random=False), st.integers(0, len(seeds) - 1))
    def fuzz(rnd: random.Random, which: int) -> None:
        parser.run(parser.mutate(seeds[which], rnd), scratch)

    fuzz()


@pytest.mark.parametrize("name,path", [(n, p) for n in sorted(PARSERS) for p in crash_inputs(n)]
                         or [pytest.param("-", None, marks=pytest.mark.skip("none kept yet"))])
def test_inputs_that_once_broke_a_parser_give_one_line_errors(name, path, scratch) -> None:
    """Every kept crashing input: now success or a one-line error."""
    PARSERS[name].run(path.read_bytes(), scratch)
