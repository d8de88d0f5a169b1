"""kcore.wire.lime against Volatility 3's LimeLayer, the reader forensic tools use.

The ranges are a real kernel's memory (the bytes its /proc/kcore gave for the first RAM range
and 2 MiB of kernel text, at their physical addresses); Volatility must find each byte where
the kernel had it, and unpack_header must read the headers Volatility accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kcore.wire import LayoutError, lime
from tests.helpers import FIXTURE_NAMES, shared_fixture

NOKASLR = FIXTURE_NAMES[0]


def real_ranges(name: str) -> list[tuple[int, bytes]]:
    """(physical address, bytes) of the capture's direct-map and text reads of /proc/kcore
    (without the text where it lies inside the 8 MiB read, as without KASLR)."""
    folder = shared_fixture(name) / "expected"
    reads = json.loads((folder / "kcore.json").read_text())["reads"]
    out: list[tuple[int, bytes]] = []
    for r in sorted(reads, key=lambda r: (r["paddr"], -r["length"])):
        if not out or out[-1][0] + len(out[-1][1]) <= r["paddr"]:
            out.append((r["paddr"], (folder / r["file"]).read_bytes()))
    return out


def volatility_layer(path: Path, cls_name: str) -> object:
    """Volatility 3's layer `cls_name` (LimeLayer, AVMLLayer) stacked on the file at path."""
    pytest.importorskip("volatility3", reason="volatility3 is not installed (the test extra)")
    from volatility3.framework import contexts
    from volatility3.framework.layers import avml, physical
    from volatility3.framework.layers import lime as vol_lime

    ctx = contexts.Context()
    ctx.config["base.location"] = path.resolve().as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    ctx.config["mem.base_layer"] = "base"
    cls = {"LimeLayer": vol_lime.LimeLayer, "AVMLLayer": avml.AVMLLayer}[cls_name]
    return cls(ctx, "mem", "mem")


def test_the_layout_is_volatilitys() -> None:
    """Magic, version and the 32-byte header are LiME's as Volatility 3 defines them."""
    pytest.importorskip("volatility3", reason="volatility3 is not installed (the test extra)")
    from volatility3.framework.layers.lime import LimeLayer

    assert (lime.LIME_MAGIC, lime.LIME_VERSION) == (LimeLayer.MAGIC, LimeLayer.VERSION)
    assert lime.HEADER.size == LimeLayer._header_struct.size == 32
    assert lime.pack_header(0x1000, 0x9E000)[:4] == b"EMiL"


def test_volatility_reads_real_memory_where_the_kernel_had_it(tmp_path: Path) -> None:
    """A LiME image of real ranges (pack_header per range): Volatility's LimeLayer maps each
    range at its address and reads the kernel's bytes there; outside them, nothing."""
    ranges = real_ranges(NOKASLR)
    path = tmp_path / "real.lime"
    with open(path, "wb") as f:
        for paddr, data in ranges:
            f.write(lime.pack_header(paddr, len(data)) + data)
    layer = volatility_layer(path, "LimeLayer")
    mapping = list(layer.mapping(0, 1 << 32, ignore_errors=True))  # type: ignore[attr-defined]
    assert [(m[0], m[1]) for m in mapping] == [(pa, len(d)) for pa, d in ranges]
    for paddr, data in ranges:
        for at in (0, len(data) // 2, len(data) - 4096):
            assert layer.read(paddr + at, 4096) == data[at:at + 4096]  # type: ignore[attr-defined]
    # and unpack_header reads each header back where Volatility found it
    with open(path, "rb") as f:
        for (paddr, data), (_va, _len, offset, _mlen, _layer) in zip(ranges, mapping,
                                                                      strict=True):
            f.seek(offset - lime.HEADER.size)
            h = lime.unpack_header(f.read(lime.HEADER.size))
            assert h == lime.RangeHeader(lime.LIME_MAGIC, lime.LIME_VERSION, paddr,
                                         paddr + len(data) - 1)


def test_volatility_refuses_what_unpack_header_marks_foreign() -> None:
    """A header with AVML's magic or another version is no LiME range for Volatility either."""
    pytest.importorskip("volatility3", reason="volatility3 is not installed (the test extra)")
    from volatility3.framework.layers.lime import LimeLayer

    good = lime.pack_header(0x100000, 4096)
    for bad in (lime.HEADER.pack(lime.AVML_MAGIC, 1, 0x100000, 0x100FFF, bytes(8)),
                lime.HEADER.pack(lime.LIME_MAGIC, 2, 0x100000, 0x100FFF, bytes(8))):
        h = lime.unpack_header(bad)
        assert (h.magic, h.version) != (LimeLayer.MAGIC, LimeLayer.VERSION)
    h = lime.unpack_header(good)
    assert (h.magic, h.version) == (LimeLayer.MAGIC, LimeLayer.VERSION)


def test_walk_finds_the_ranges_volatility_maps_and_names_a_bad_field(tmp_path: Path) -> None:
    """walk() of a LiME image of real ranges gives the (address, length, data offset) that
    Volatility's LimeLayer maps; a damaged header is a LayoutError at its offset and field."""
    ranges = real_ranges(NOKASLR)
    path = tmp_path / "real.lime"
    with open(path, "wb") as f:
        for paddr, data in ranges:
            f.write(lime.pack_header(paddr, len(data)) + data)
    image = bytearray(path.read_bytes())

    def read(offset: int, length: int) -> bytes:
        return bytes(image[offset:offset + length])

    layer = volatility_layer(path, "LimeLayer")
    mapping = list(layer.mapping(0, 1 << 32, ignore_errors=True))  # type: ignore[attr-defined]
    assert lime.walk(read, len(image)) == [(m[0], m[1], m[2]) for m in mapping]
    second = mapping[1][2] - lime.HEADER.size  # the second range's header
    for at, value, field in ((second, 0x41, "magic"), (second + 4, 2, "version")):
        saved = image[at]
        image[at] = value
        with pytest.raises(LayoutError) as exc:
            lime.walk(read, len(image))
        image[at] = saved
        assert (exc.value.offset, exc.value.field) == (at, field), exc.value
        assert f"at offset {second:#x}" in str(exc.value)
