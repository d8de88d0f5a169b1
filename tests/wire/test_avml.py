"""kcore.wire.avml against Volatility 3's AVMLLayer (the reader AVML's images are made for).

Blocks of a real kernel's memory (the bytes its /proc/kcore gave, at their physical
addresses), each a block_header, the stream identifier, snappy frames and the TRAILER: Volatility
must decompress each block to the kernel's bytes at the block's address.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kcore import codecs
from kcore.wire import LayoutError, avml, lime
from tests.helpers import FIXTURE_NAMES
from tests.wire.test_lime import real_ranges, volatility_layer

KASLR = FIXTURE_NAMES[1]


def test_the_layout_is_avmls() -> None:
    """AVML's magic and version 2 (what Volatility's AVMLLayer accepts), LiME's header shape,
    and snappy's framing-format stream identifier."""
    avml_mod = pytest.importorskip("volatility3.framework.layers.avml",
                                   reason="volatility3 is not installed (the test extra)")
    src = Path(avml_mod.__file__).read_text()
    assert "0x4C4D5641" in src.upper().replace("0X", "0x") and avml.AVML_MAGIC == 0x4C4D5641
    assert avml.AVML_MAGIC == lime.AVML_MAGIC and avml.AVML_VERSION == 2
    assert avml.HEADER.size == lime.HEADER.size == 32 and avml.TRAILER.size == 8
    # framing_format.txt: chunk type 0xff, length 6 (3 bytes, little-endian), "sNaPpY"
    assert avml.STREAM_IDENTIFIER == bytes([0xFF, 6, 0, 0]) + b"sNaPpY"


def test_volatility_reads_real_memory_from_avml_blocks(tmp_path: Path) -> None:
    """An AVML image of real ranges: AVMLLayer maps each block at its address and gives the
    kernel's bytes."""
    if not codecs.available("snappy"):
        pytest.skip("libsnappy.so.1 is not installed (apt-get install libsnappy1v5)")
    ranges = real_ranges(KASLR)
    path = tmp_path / "real.avml"
    with open(path, "wb") as f:
        for paddr, data in ranges:
            frames = bytearray(codecs.snappy_frame_bound(len(data)))
            n = codecs.snappy_frame(data, frames)
            stream = avml.STREAM_IDENTIFIER + bytes(frames[:n])
            f.write(avml.block_header(paddr, len(data)) + stream + avml.TRAILER.pack(len(stream)))
    layer = volatility_layer(path, "AVMLLayer")
    for paddr, data in ranges:
        for at in (0, len(data) // 2, len(data) - 4096):
            assert layer.read(paddr + at, 4096) == data[at:at + 4096]  # type: ignore[attr-defined]
    head = avml.HEADER.unpack(avml.block_header(ranges[0][0], len(ranges[0][1])))
    assert head[:4] == (avml.AVML_MAGIC, avml.AVML_VERSION, ranges[0][0],
                        ranges[0][0] + len(ranges[0][1]) - 1)


def test_walk_unpacks_real_memory_and_names_a_damaged_stream(tmp_path: Path) -> None:
    """walk() of an AVML image of real ranges hands on the kernel's bytes, block after block,
    and finds a damaged chunk (its CRC-32C) inside the block that holds it."""
    if not codecs.available("snappy"):
        pytest.skip("libsnappy.so.1 is not installed (apt-get install libsnappy1v5)")
    ranges = real_ranges(KASLR)
    image = bytearray()
    streams = []  # (start, end) of each block's snappy stream in the file
    for paddr, data in ranges:
        frames = bytearray(codecs.snappy_frame_bound(len(data)))
        n = codecs.snappy_frame(data, frames)
        stream = avml.STREAM_IDENTIFIER + bytes(frames[:n])
        image += avml.block_header(paddr, len(data))
        streams.append((len(image), len(image) + len(stream)))
        image += stream + avml.TRAILER.pack(len(stream))
    got = bytearray()

    def read(offset: int, length: int) -> bytes:
        return bytes(image[offset:offset + length])

    def sink(data: memoryview, at: int) -> None:
        assert at == len(got)
        got.extend(data)

    blocks = avml.walk(read, len(image), sink)
    assert [(b[0], b[1]) for b in blocks] == [(pa, len(d)) for pa, d in ranges]
    assert bytes(got) == b"".join(d for _pa, d in ranges)
    lo, hi = streams[1]
    image[(lo + hi) // 2] ^= 0xFF
    with pytest.raises(LayoutError) as exc:
        avml.walk(read, len(image), lambda data, at: None)
    assert exc.value.field == "snappy stream" and lo <= exc.value.offset < hi, exc.value
