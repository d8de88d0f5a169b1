"""Page codecs of compressed dumps (zstd, lzo, snappy, zlib): libraries loaded at run time."""

from __future__ import annotations

from dataclasses import dataclass

from kcore._native import ffi, lib
from kcore.errors import InputError

PAGE_DESC_SIZE = 24  # makedumpfile's struct page_desc


@dataclass(frozen=True)
class Codec:
    """One page codec: its C id, the library it loads and where that comes from."""

    name: str
    cid: int
    soname: str | None
    debian: str | None  # the Debian package that ships soname
    level: int = 1  # zstd, zlib: the fastest level (makedumpfile -c and -z use it too)


CODECS = {
    "zstd": Codec("zstd", lib.KC_CODEC_ZSTD, "libzstd.so.1", "libzstd1"),
    "lzo": Codec("lzo", lib.KC_CODEC_LZO, "liblzo2.so.2", "liblzo2-2"),
    "snappy": Codec("snappy", lib.KC_CODEC_SNAPPY, "libsnappy.so.1", "libsnappy1v5"),
    "zlib": Codec("zlib", lib.KC_CODEC_ZLIB, "libz.so.1", "zlib1g"),
    "none": Codec("none", lib.KC_CODEC_NONE, None, None),
}
DEFAULT = "zstd"
BY_FLAG = {lib.kc_codec_flag(c.cid): c for c in CODECS.values() if c.cid != lib.KC_CODEC_NONE}


def available(name: str) -> bool:
    """Whether a codec's library loads here."""
    return int(lib.kc_codec_load(CODECS[name].cid)) == 0


def get(name: str) -> Codec:
    """The codec called name, its library loaded; InputError naming the choices otherwise."""
    codec = CODECS.get(name)
    if codec is None:
        usable = ", ".join(n for n in CODECS if available(n))
        raise InputError(f"unknown codec {name!r}: choose one of {usable}")
    if not available(name):
        raise InputError(missing(codec))
    return codec


def missing(codec: Codec) -> str:
    """Why a codec is unavailable, and what to install."""
    usable = ", ".join(n for n in CODECS if available(n))
    return (f"codec {codec.name} is unavailable: {codec.soname} does not load "
            f"(apt-get install {codec.debian}); available: {usable}")


def library(codec: Codec) -> str | None:
    """The library that compresses for codec: libdeflate's zlib streams where it loads."""
    if codec.cid == lib.KC_CODEC_ZLIB and lib.kc_zlib_fast():
        return "libdeflate.so.0"
    return codec.soname


def flag(codec: Codec) -> int:
    """The DUMP_DH_COMPRESSED_* flag of a codec (0 for none)."""
    return int(lib.kc_codec_flag(codec.cid))


def compress_bound(npages: int, page_size: int) -> int:
    """Bytes a batch of npages pages may take compressed."""
    return npages * int(lib.kc_compress_bound(0, page_size))


def compress_pages(codec: Codec, src: memoryview | bytes | bytearray, npages: int,
                   page_size: int, dst: bytearray, descs: bytearray) -> int:
    """Compress npages pages of src into dst, their page descriptors into descs; bytes used.

    Descriptor offsets are relative to dst; rebase() turns them into file offsets. The C call
    runs without the GIL.
    """
    written = ffi.new("uint64_t *")
    rc = lib.kc_compress_pages(codec.cid, codec.level, ffi.from_buffer(src), npages, page_size,
                               ffi.from_buffer(dst, require_writable=True), len(dst),
                               ffi.cast("struct kc_page_desc *",
                                        ffi.from_buffer(descs, require_writable=True)),
                               written)
    if rc:
        raise OSError(-rc, f"compressing pages with {codec.name} failed")
    return int(written[0])


def rebase(descs: bytearray, npages: int, base: int, zero_offset: int) -> None:
    """Page descriptors from compress_pages: data at file offset base, zero pages at zero_offset."""
    lib.kc_rebase_descs(ffi.cast("struct kc_page_desc *",
                                 ffi.from_buffer(descs, require_writable=True)),
                        npages, base, zero_offset)


def kdump_unpack(fd: int, descs: bytes | bytearray, npages: int, page_size: int,
                 window: bytearray, dst: bytearray, out_fd: int, out_off: int) -> tuple[int, int]:
    """Decompress npages pages described by descs from fd; write the non-zero ones to out_fd.

    Returns (0, 0), or (-errno, index of the failing page; npages when the output failed).
    The C call runs without the GIL.
    """
    bad = ffi.new("size_t *")
    rc = lib.kc_kdump_unpack(fd, ffi.cast("struct kc_page_desc *", ffi.from_buffer(descs)),
                             npages, page_size, ffi.from_buffer(window, require_writable=True),
                             len(window), ffi.from_buffer(dst, require_writable=True), out_fd,
                             out_off, bad)
    return int(rc), int(bad[0])


def snappy_frame(src: bytes | bytearray | memoryview, dst: bytearray) -> int:
    """snappy's framing of src (no stream identifier) into dst; bytes written."""
    written = ffi.new("uint64_t *")
    rc = lib.kc_snappy_frame(ffi.from_buffer(src), len(src),
                             ffi.from_buffer(dst, require_writable=True), len(dst), written)
    if rc:
        raise OSError(-rc, "snappy framing failed")
    return int(written[0])


def snappy_frame_bound(n: int) -> int:
    """Bytes snappy_frame may need for n bytes."""
    return int(lib.kc_snappy_frame_bound(n))


def snappy_unframe(src: bytes | bytearray | memoryview, dst: bytearray | memoryview) -> tuple[
        int, int, int]:
    """Decode a framed snappy stream into dst: (rc, bytes out, offset of the failing chunk)."""
    written = ffi.new("uint64_t *")
    consumed = ffi.new("uint64_t *")
    rc = lib.kc_snappy_unframe(ffi.from_buffer(src), len(src),
                               ffi.from_buffer(dst, require_writable=True), len(dst), written,
                               consumed)
    return int(rc), int(written[0]), int(consumed[0])


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C (Castagnoli) of data."""
    return int(lib.kc_crc32c(crc, ffi.from_buffer(data), len(data)))
