"""kcore.recheck against a real kernel: the bytes its /proc/kcore gave (kernel text, the first RAM
range) laid out as a dump, re-read from the memory image taken after them.

The kernel's code did not change between the kcore reads and the pause (the captures' README),
so recheck finds no changed page; a page changed in the dump is found at its physical address.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kcore.formats.plan import Copy, Plan, Zeros
from kcore.recheck import recheck
from kcore.sources import open_source
from tests.commands.test_dump import source_spec
from tests.helpers import FIXTURE_NAMES, shared_fixture

PAGE = 4096


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_recheck_of_the_kernels_own_reads(name: str, tmp_path: Path) -> None:
    """No changed page where the output holds what the kernel gave; one changed page, at its
    physical address and inside the kernel code, when the output differs there."""
    folder = shared_fixture(name)
    reads = {r["file"]: r for r in json.loads((folder / "expected/kcore.json").read_text())
             ["reads"]}
    parts = [reads["kcore-text-2M.bin"], reads["kcore-ram0.bin"]]
    out = tmp_path / "dump"
    with open_source(source_spec(name)) as src, open(out, "w+b") as f:
        items: list[Copy | Zeros] = []
        ranges = []
        dst = 0
        for r in parts:
            ext = next(e for e in src.extents if e.paddr <= r["paddr"] < e.paddr + e.length)
            items.append(Copy(dst, ext.offset + r["paddr"] - ext.paddr, r["length"]))
            ranges.append({"kind": r["segment_kind"], "paddr": hex(r["paddr"]), "offset": dst,
                           "size": r["length"]})
            os.pwrite(f.fileno(), (folder / "expected" / r["file"]).read_bytes(), dst)
            dst += r["length"]
        plan = Plan(items, dst, ranges)
        code = (parts[0]["paddr"], parts[0]["paddr"] + parts[0]["length"])
        seen: list[int] = []
        same = recheck(f.fileno(), src, plan, code=code, progress=seen.append)
        assert (same["pages"], same["changed"], same["share"]) == (dst // PAGE, 0, 0.0)
        assert sum(seen) == dst
        assert same["kernel_code"] == {"paddr": hex(code[0]), "size": code[1] - code[0],
                                       "pages": (code[1] - code[0]) // PAGE, "changed": 0}
        assert [(r["pages"], r["changed"]) for r in same["ranges"]] == \
            [(r["length"] // PAGE, 0) for r in parts]

        at = 5 * PAGE + 123  # one byte of the text's sixth page
        byte = os.pread(f.fileno(), 1, at)
        os.pwrite(f.fileno(), bytes([byte[0] ^ 0xFF]), at)
        moved = recheck(f.fileno(), src, plan, code=code)
    assert (moved["changed"], moved["kernel_code"]["changed"]) == (1, 1)
    assert moved["ranges"][0]["changed_at"] == [hex(parts[0]["paddr"] + 5 * PAGE)]
    assert moved["ranges"][0]["share"] == round(1 / (parts[0]["length"] // PAGE), 6)
    assert moved["ranges"][1]["changed"] == 0
