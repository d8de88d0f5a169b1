"""The page codecs (csrc/codec.c): what they write, decoded by the codecs' own libraries."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
import zlib

import pytest

from kcore import codecs
from kcore.errors import InputError
from kcore.wire import diskdump

PAGE = 4096


def pages() -> bytes:
    """Four pages: random (does not shrink), zeros, text (shrinks), one byte set."""
    return (os.urandom(PAGE) + bytes(PAGE) + b"kernel memory! " * (PAGE // 15) + b"x"
            + bytes(PAGE - 1) + b"\1")[:4 * PAGE]


def compress(name: str, data: bytes) -> tuple[bytearray, list[tuple[int, int, int, int]], int]:
    n = len(data) // PAGE
    dst = bytearray(codecs.compress_bound(n, PAGE))
    descs = bytearray(n * codecs.PAGE_DESC_SIZE)
    used = codecs.compress_pages(codecs.get(name), data, n, PAGE, dst, descs)
    return dst, [diskdump.PAGE_DESC.unpack_from(descs, i * 24) for i in range(n)], used


def test_crc32c_gives_the_catalogue_check_value():
    # CRC-32C/ISCSI's check value (the CRC of b"123456789") in the CRC catalogue
    assert codecs.crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("name", ["zstd", "zlib"])
def test_pages_decode_with_the_codecs_python_bindings(name):
    if not codecs.available(name):
        pytest.skip(codecs.missing(codecs.CODECS[name]))
    data = pages()
    dst, descs, used = compress(name, data)
    flag = diskdump.DH_ZSTD if name == "zstd" else diskdump.DH_ZLIB
    # random: stored raw, flag cleared; zeros: no data, the zero-page marker
    assert descs[0][1:3] == (PAGE, 0)
    assert descs[1][0] == 0xFFFFFFFFFFFFFFFF
    assert used == sum(d[1] for d in descs if d[0] != 0xFFFFFFFFFFFFFFFF)
    for i in (2, 3):
        off, size, flags, _pf = descs[i]
        assert flags == flag and size < PAGE
        blob = bytes(dst[off:off + size])
        if name == "zstd":
            zstandard = pytest.importorskip("zstandard")
            page = zstandard.ZstdDecompressor().decompress(blob, max_output_size=PAGE)
        else:
            page = zlib.decompress(blob)
        assert page == data[i * PAGE:(i + 1) * PAGE]
    assert dst[:PAGE] == data[:PAGE]


def test_zlib_pages_of_real_memory_are_zlibs_within_5_percent():
    """--compress zlib (libdeflate where it loads): every page of 16 MiB of the fixture's RAM
    inflates with zlib itself, and the whole is at most 1.05x zlib's own level-1 pages."""
    if not codecs.available("zlib"):
        pytest.skip(codecs.missing(codecs.CODECS["zlib"]))
    from tests.helpers import FIXTURE_NAMES, fixture_memory

    with open(fixture_memory(FIXTURE_NAMES[0]), "rb") as f:
        f.seek(64 << 20)
        data = f.read(16 << 20)
    dst, descs, _used = compress("zlib", data)
    ours = theirs = 0
    for i, (off, size, flags, _pf) in enumerate(descs):
        page = data[i * PAGE:(i + 1) * PAGE]
        if off == 0xFFFFFFFFFFFFFFFF:
            assert page == bytes(PAGE)
            continue
        blob = bytes(dst[off:off + size])
        assert (zlib.decompress(blob) if flags else blob) == page
        ours += size
        theirs += min(PAGE, len(zlib.compress(page, 1)))
    assert theirs and ours <= 1.05 * theirs, (ours, theirs)
    library = codecs.library(codecs.CODECS["zlib"])
    assert library in ("libdeflate.so.0", "libz.so.1")
    if ctypes.util.find_library("deflate"):  # installed: it is the one that compressed
        assert library == "libdeflate.so.0"


def test_rebase_places_data_and_points_zero_pages_at_the_shared_one():
    dst, _descs, _used = compress("none", pages())
    raw = bytearray(4 * codecs.PAGE_DESC_SIZE)
    codecs.compress_pages(codecs.get("none"), pages(), 4, PAGE, dst, raw)
    codecs.rebase(raw, 4, 0x10000, 0x8000)
    offs = [diskdump.PAGE_DESC.unpack_from(raw, i * 24)[0] for i in range(4)]
    assert offs == [0x10000, 0x8000, 0x10000 + PAGE, 0x10000 + 2 * PAGE]


def test_snappy_framing_decodes_with_libsnappy():
    """Each chunk: type, 24-bit length, masked CRC-32C, then libsnappy's raw block."""
    if not codecs.available("snappy"):
        pytest.skip(codecs.missing(codecs.CODECS["snappy"]))
    snappy = ctypes.CDLL("libsnappy.so.1")
    data = (b"A" * 65536) + os.urandom(65536) + bytes(70_000)
    out = bytearray(codecs.snappy_frame_bound(len(data)))
    n = codecs.snappy_frame(data, out)
    pos, got, types = 0, b"", []
    while pos < n:
        kind = out[pos]
        length = int.from_bytes(out[pos + 1:pos + 4], "little")
        (masked,) = struct.unpack_from("<I", out, pos + 4)
        body = bytes(out[pos + 8:pos + 4 + length])
        if kind == 0:
            ulen = ctypes.c_size_t(0)
            assert snappy.snappy_uncompressed_length(body, len(body), ctypes.byref(ulen)) == 0
            buf = ctypes.create_string_buffer(ulen.value)
            assert snappy.snappy_uncompress(body, len(body), buf, ctypes.byref(ulen)) == 0
            chunk = buf.raw[:ulen.value]
        else:
            chunk = body
        crc = codecs.crc32c(chunk)
        assert masked == ((crc >> 15 | crc << 17) + 0xA282EAD8) & 0xFFFFFFFF
        assert len(chunk) <= 65536
        types.append(kind)
        got += chunk
        pos += 4 + length
    assert got == data
    assert 0 in types and 1 in types  # the random part is stored, the rest compressed
    back = bytearray(len(data))
    assert codecs.snappy_unframe(out[:n], back) == (0, len(data), n)
    assert back == data


def test_an_unknown_codec_lists_the_available_ones():
    with pytest.raises(InputError, match="unknown codec 'brotli': choose one of .*none"):
        codecs.get("brotli")
