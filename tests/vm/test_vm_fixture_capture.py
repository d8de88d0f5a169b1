"""The captures a clone makes for itself (fixture_capture.py) have the shared captures' shape.

Where ../shared/fixtures is present the suite reads it, so the generator would never run: this
makes each capture (once, cached in KCORE_VM_CACHE/fixtures) and checks it against the shared
one of the same name: the same files, kcore.json's keys, the same kernel and kclist shape, and
the reads of its real /proc/kcore equal to its memory image where the kernel does not write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kcore.sources import open_source
from tests.helpers import FIXTURE_NAMES, SHARED_FIXTURES
from tests.vm import fixture_capture


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for sub in ("root", "expected")
            for p in (folder / sub).rglob("*") if p.is_file()}


def _keys(value: object, path: str = "") -> set[str]:
    """Every key path of a JSON value (list items merged)."""
    if isinstance(value, dict):
        return {f"{path}.{k}" for k in value} | set().union(
            *(_keys(v, f"{path}.{k}") for k, v in value.items()))
    if isinstance(value, list):
        return set().union(set(), *(_keys(v, f"{path}[]") for v in value))
    return set()


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def pair(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(the shared capture, the one made here) of one name."""
    name = request.param
    shared = SHARED_FIXTURES / name
    if not shared.is_dir():
        pytest.skip(f"{shared} is not here: nothing to compare the made capture with")
    why = fixture_capture.unavailable_reason(name)
    if why:
        pytest.skip(why)
    return shared, fixture_capture.capture(name)


def test_made_capture_has_the_shared_layout(pair: tuple[Path, Path]) -> None:
    """The same root/ and expected/ files, kcore.json with the same keys, the same kernel."""
    shared, made = pair
    # a made capture also records PID 1's name (its PID 1 is the harness's, not /init)
    assert _files(made) - {"root/proc/1/comm"} == _files(shared)
    assert (made / "root/proc/1/comm").read_text().strip()
    want = json.loads((shared / "expected/kcore.json").read_text())
    got = json.loads((made / "expected/kcore.json").read_text())
    assert _keys(got) == _keys(want)
    for rel in ("root/proc/sys/kernel/osrelease", "root/proc/sys/kernel/arch"):
        assert (made / rel).read_text() == (shared / rel).read_text()
    assert got["ehdr"] == want["ehdr"] and got["kcore_st_size"] == want["kcore_st_size"]
    # the same kclist: kinds, RAM and vmemmap sizes (the addresses move with KASLR)
    assert [(p["type"], p.get("kind"), p["p_filesz"]) for p in got["phdrs"]] == \
        [(p["type"], p.get("kind"), p["p_filesz"]) for p in want["phdrs"]]
    assert [(n["name"], n["type"]) for n in got["notes"]] == \
        [(n["name"], n["type"]) for n in want["notes"]]
    assert [n["descsz"] for n in got["notes"][:3]] == [n["descsz"] for n in want["notes"][:3]]
    assert [(r["file"], r["length"], r["segment_kind"]) for r in got["reads"]] == \
        [(r["file"], r["length"], r["segment_kind"]) for r in want["reads"]]
    for r in got["reads"]:
        assert (made / "expected" / r["file"]).stat().st_size == r["length"]
    kinds = {p.name.removesuffix(".zst") for p in (shared / "memory").iterdir()}
    assert {p.name for p in (made / "memory").iterdir()} == kinds
    assert (made / fixture_capture.DONE).exists()


def test_made_capture_reads_equal_its_memory(pair: tuple[Path, Path]) -> None:
    """The real kcore's text and first RAM range equal the memory image taken after them (as
    the shared captures' README says of theirs)."""
    _shared, made = pair
    meta = json.loads((made / "expected/kcore.json").read_text())
    memory = next((made / "memory").iterdir())
    kind = "raw" if memory.name == "guestram.bin" else "elf"
    with open_source(f"{kind}:{memory}") as src:
        for r in meta["reads"]:
            if r["file"] == "kcore-ram-16M-8M.bin":
                continue  # the kernel keeps writing there between the reads and the pause
            data, _stats = src.read_phys(r["paddr"], r["length"])
            assert data == (made / "expected" / r["file"]).read_bytes(), r["file"]
