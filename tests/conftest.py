"""pytest fixtures shared by the tests (the helpers they use live in tests/helpers.py), and the
grouping that runs them on two CPUs (pytest-xdist, pyproject's addopts)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# The groups that take longest, handed out first: xdist gives each worker the next group in
# collection order when it runs dry (--no-loadscope-reorder), so a long one started last would
# keep one CPU busy alone at the end.  In the order of their time in serial runs (2026-12-06):
# the KASLR guest's group ~5 min and its readback dumps' (a guest of their own) ~3.5, the
# other guests' 1.5-3 min, then the modules of crash, Volatility and drgn sessions and of many
# dumps (1-4 min).
LONGEST_FIRST = (
    "guest:kaslr", "guest:kaslr-readback", "guest:nokaslr", "guest:big", "consumers/test_kdump.py",
    "guest:kaslr-6.12", "integrations/test_volatility.py", "guest:onefile-6.12",
    "guest:onefile-6.1", "test_critical.py", "commands/test_dump.py",
    "integrations/test_drgn.py", "sources/test_short_reads.py", "consumers/test_dump.py",
    "destinations/test_destinations.py", "arch/test_arm64_commands.py",
)


def _group(item: pytest.Item) -> str:
    """The xdist group of a test item (tests/vm/conftest.py names the guests')."""
    mark = item.get_closest_marker("xdist_group")
    return mark.args[0] if mark is not None else item.nodeid


@pytest.hookimpl(tryfirst=True)
def pytest_itemcollected(item: pytest.Item) -> None:
    """A test outside tests/vm runs on the xdist worker of its module: its module fixtures
    (dumps of the captures, mostly) are made once, not once per worker."""
    path = Path(str(item.fspath))
    if not path.is_relative_to(HERE / "vm"):
        item.add_marker(pytest.mark.xdist_group(str(path.relative_to(HERE))))


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config: pytest.Config,
                                  items: list[pytest.Item]) -> Iterator[None]:
    """Under xdist, the longest groups first, after every other hook has ordered the items (a
    stable sort: the order within groups, tests/vm/conftest.py's, stays)."""
    yield
    if hasattr(config, "workerinput"):  # an xdist worker (whose dist option reads "no")
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(_group(item), len(rank)))


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs mounted for one test (a disk that fills up), or skip."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)
