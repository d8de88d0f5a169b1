"""Shared bench helpers: timing the comparison side, and recording ratios in bench/RESULTS.md."""

from __future__ import annotations

import datetime
import importlib.util
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"


def load_module(name: str, path: Path):
    """A helper module by path, under its own name (bench/ and tests/ both have a conftest)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod



_recorded: dict[str, list[str]] = {}
_notes: dict[str, list[str]] = {}
_load_at_start: list[float] = []


def best_time(fn: Callable[[], object], rounds: int = 3,
              setup: Callable[[], object] | None = None) -> float:
    """The best wall time of fn over rounds (setup, if given, runs untimed before each)."""
    best = float("inf")
    for _ in range(rounds):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def best_times(fns: list[Callable[[], object]], rounds: int = 3) -> list[float]:
    """Best wall time of each fn, run interleaved round by round so they share the noise."""
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


@pytest.fixture
def record(request) -> Callable[[str, str, str, bool], None]:
    """record(what, measured, target, ok): print one result line and keep it for RESULTS.md."""
    section = Path(request.node.fspath).stem

    def _record(what: str, measured: str, target: str, ok: bool) -> None:
        line = f"| {what} | {measured} | {target} | {'yes' if ok else 'NO'} |"
        print("\n" + line)
        _recorded.setdefault(section, []).append(line)

    return _record


@pytest.fixture
def note(request) -> Callable[[str], None]:
    """note(paragraph): a paragraph printed under this file's table in RESULTS.md."""
    section = Path(request.node.fspath).stem

    def _note(text: str) -> None:
        print("\n" + text)
        _notes.setdefault(section, []).append(text)

    return _note


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """No xdist workers for benchmarks (pyproject's `-n auto` is for the tests): a ratio is
    measured with nothing else running beside it."""
    return 0


def pytest_sessionstart(session) -> None:
    _load_at_start.append(os.getloadavg()[0])


def pytest_sessionfinish(session, exitstatus) -> None:
    """Replace this run's sections of bench/RESULTS.md, keeping the others."""
    if not _recorded:
        return
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = (f"load average {_load_at_start[0]:.2f} at the start, "
            f"{os.getloadavg()[0]:.2f} at the end") if _load_at_start else "load not measured"
    for section, lines in _recorded.items():
        notes = "".join(f"\n{n}\n" for n in _notes.get(section, []))
        body = (f"## {section}\n\nMeasured {when} (`python3 -m pytest bench --benchmark-only`; "
                f"2-core shared machine, {load}, page-cached inputs, best of the rounds).\n\n"
                "| what | measured | target | met |\n|---|---|---|---|\n"
                + "\n".join(lines) + "\n" + notes)
        pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
        if pattern.search(text):
            text = pattern.sub(lambda m, body=body: body + "\n", text)
        else:
            text = text.rstrip("\n") + "\n\n" + body
    RESULTS.write_text(text.rstrip("\n") + "\n")
