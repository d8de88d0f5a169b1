"""`kcore verify`: is a dump intact, and will drgn, crash and Volatility open it?

A dump is checked end to end without trusting it: its structure (ELF headers, program headers
and notes; LiME and AVML range headers; makedumpfile's flattened records), its SHA-256 against
DUMP.sha256 and the manifest (DUMP.json, with a digest per 64 MiB chunk that says where a
damaged file breaks), its ranges against the manifest's, its VMCOREINFO, and the rules each
consumer applies:

- Volatility 3's ELF layer (framework/layers/elf.py) maps only PT_LOADs with
  p_filesz == p_memsz > 0 (by p_paddr); any other load's memory is missing to it.
- drgn takes an ELF core as a kernel core only when it carries a VMCOREINFO note, and refuses
  makedumpfile's flattened format (`makedumpfile -R` rearranges it first).
- crash needs, for a KASLR kernel, KERNELOFFSET from VMCOREINFO, and phys_base: VMCOREINFO's
  NUMBER(phys_base) or a PT_LOAD of the kernel text (x86_64_calc_phys_base).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import Any

from kcore.errors import InputError, KcoreError
from kcore.manifest import CHUNK, ManifestError, sidecar_path
from kcore.manifest import load as load_manifest
from kcore.manifest import ranges as manifest_ranges
from kcore.sources import SOURCES, detect_kind
from kcore.sources.base import PROBE_BYTES, Probe
from kcore.sources.checks import PAGE, ZERO_PAGE, Region, Result
from kcore.sources.files import pread_full
from kcore.wire import LayoutError

__all__ = ["Region", "Result", "check_symbols", "data_extents", "sparse_chunk_digests",
           "verify"]

BLOCK = 4 << 20
ZERO_BLOCK = bytes(BLOCK)


def check_symbols(path: str, res: Result, release: str | None) -> None:
    """Whether the dump keeps the kernel's symbol files (kcore.symbols), and whether they are
    this kernel's: the release they name and VMCOREINFO's OSRELEASE (or the manifest's), and
    kallsyms' address of every SYMBOL() VMCOREINFO lists (which carry KERNELOFFSET)."""
    from kcore import isf, symbols
    from kcore.vmcoreinfo import VmcoreInfo

    try:
        found = symbols.read_dump(path)
    except KcoreError as exc:
        res.symbols = {"present": False}
        res.problem(None, f"the kept symbols cannot be read: {exc}")
        return
    if found is None:
        res.symbols = {"present": False}
        return
    files, where = found
    info = None
    data = files.get(symbols.VMCOREINFO)
    try:
        info = VmcoreInfo.parse(data) if data else None
    except KcoreError:
        info = None
    words = (files.text(symbols.UNAME) or files.text(symbols.VERSION) or "").split()
    named = words[2] if len(words) > 2 else None
    noted = res.vmcoreinfo.get("osrelease") or (info.osrelease if info else None) or release
    checked, differ = 0, []
    kallsyms = files.text(symbols.KALLSYMS)
    if kallsyms is not None and info is not None:
        # VMCOREINFO_SYMBOL_ARRAY(mem_section) gives the array's address: with
        # SPARSEMEM_EXTREME that is the pointer's value, not the symbol's
        wanted = {k[len("SYMBOL("):-1]: v for k, v in info.values.items()
                  if k.startswith("SYMBOL(") and k != "SYMBOL(mem_section)"}
        from kcore.kallsyms import parse_kallsyms

        try:
            found_at = parse_kallsyms(kallsyms, wanted, required=())
        except KcoreError:
            found_at = {}
        for name, addr in found_at.items():
            checked += 1
            if addr != int(wanted[name], 16):
                differ.append(name)
    match = (named is None or noted is None or named == noted) and not differ
    res.symbols = {
        "present": True, "where": where, "files": files.summary()["files"],
        "release": named, "kerneloffset": info.get("KERNELOFFSET") if info else None,
        "symbols_checked": checked, "match": match,
        "isf": isf.file_name(files) if files.btf is not None else None,
    }
    if named and noted and named != noted:
        res.problem(None, f"the kept symbols are of release {named}, the dump of {noted}")
    if differ:
        res.problem(None, f"the kept kallsyms disagree with VMCOREINFO on {len(differ)} of "
                          f"{checked} symbols ({', '.join(differ[:3])}): another boot's")


# ---- the data pass -----------------------------------------------------------------------

def _data_pass(fd: int, size: int, regions: list[Region], hashing: bool
               ) -> tuple[str | None, list[str], int, int]:
    """SHA-256, per-chunk SHA-256s and (zero pages, pages) of the regions, in one read."""
    total = hashlib.sha256() if hashing else None
    chunk = hashlib.sha256() if hashing else None
    chunk_left = CHUNK
    chunks: list[str] = []
    zero = pages = 0
    cuts = sorted({0, size, *(p for r in regions for p in (r.offset, r.offset + r.filesz)
                              if 0 <= p <= size and r.kind != "text")})
    # kernel text repeats RAM: its pages are counted once, as RAM
    inside = [(r.offset, r.offset + r.filesz) for r in regions if r.filesz and r.kind != "text"]
    counted = 0  # regions are counted once even where they share file bytes
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        counting = any(a <= lo and hi <= b for a, b in inside) and lo >= counted
        if counting:
            counted = hi
        if not hashing and not counting:
            continue
        pos = lo
        while pos < hi:
            hole = _hole_until(fd, pos, hi)
            if hole - pos >= BLOCK and not hashing:
                skip = (hole - pos) // PAGE * PAGE
                zero += skip // PAGE
                pages += skip // PAGE
                pos += skip
                continue
            n = min(BLOCK, hi - pos)
            block = _read_block(fd, pos, n, hole)
            if hashing:
                assert total is not None and chunk is not None
                total.update(block)
                view = memoryview(block)
                while view:
                    take = min(chunk_left, len(view))
                    chunk.update(view[:take])
                    chunk_left -= take
                    view = view[take:]
                    if chunk_left == 0:
                        chunks.append(chunk.hexdigest())
                        chunk, chunk_left = hashlib.sha256(), CHUNK
            if counting:
                if n == BLOCK and block == ZERO_BLOCK:
                    zero += n // PAGE
                    pages += n // PAGE
                else:
                    for i in range(0, n, PAGE):
                        pages += 1
                        zero += block[i:i + PAGE] == ZERO_PAGE[:min(PAGE, n - i)]
            pos += n
    if hashing:
        assert total is not None and chunk is not None
        if chunk_left != CHUNK:
            chunks.append(chunk.hexdigest())
        return total.hexdigest(), chunks, zero, pages
    return None, chunks, zero, pages


def _hole_until(fd: int, pos: int, hi: int) -> int:
    """Where data starts again at or after pos (hi at most): pos when pos holds data."""
    try:
        return min(os.lseek(fd, pos, os.SEEK_DATA), hi)
    except OSError as exc:
        return hi if exc.errno == errno.ENXIO else pos


def _read_block(fd: int, pos: int, n: int, hole_end: int) -> bytes:
    """n bytes at pos; a hole is not read (zeros)."""
    if hole_end >= pos + n:
        return ZERO_BLOCK[:n] if n <= BLOCK else bytes(n)
    data = pread_full(fd, n, pos)
    if len(data) < n:
        raise LayoutError(pos + len(data), "size", "shrank", "the file shrank while it was read")
    return data


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, end) extents of a sparse file that hold data (SEEK_DATA/SEEK_HOLE)."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break
            return [(0, size)]  # the filesystem cannot say: all of it
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, end))
        pos = end
    return out


def sparse_chunk_digests(fd: int, size: int) -> dict[str, str]:
    """The SHA-256 of each CHUNK of a sparse file that holds data, by chunk index (the kcore
    image's manifest: its other chunks are holes)."""
    chunks = sorted({i for a, b in data_extents(fd, size)
                     for i in range(a // CHUNK, (b - 1) // CHUNK + 1)})
    out = {}
    for i in chunks:
        h = hashlib.sha256()
        lo, hi = i * CHUNK, min((i + 1) * CHUNK, size)
        pos = lo
        while pos < hi:
            n = min(BLOCK, hi - pos)
            h.update(_read_block(fd, pos, n, _hole_until(fd, pos, pos + n)))
            pos += n
        out[str(i)] = h.hexdigest()
    return out


# ---- sidecars ----------------------------------------------------------------------------

def _times(path: str, res: Result, manifest: dict[str, Any] | None) -> None:
    """The read-time windows: the manifest's, checked against DUMP.times where it is."""
    from kcore.pagetimes import SUFFIX, PageTimes, windows_ok

    said = (manifest or {}).get("times")
    if isinstance(said, dict) and windows_ok(said):
        res.times = {k: said[k] for k in ("dump", "critical", "critical_share") if k in said}
    if not os.path.exists(path + SUFFIX):
        if isinstance(said, dict) and said.get("sidecar"):
            res.problem(None, f"{path}{SUFFIX} (the read times the manifest lists) is missing")
        return
    try:
        got = PageTimes.load(path + SUFFIX).summary()
    except InputError as exc:
        res.problem(None, str(exc))
        return
    res.times = {k: got[k] for k in ("dump", "critical", "critical_share") if k in got}
    res.times["records"] = got["records"]
    if isinstance(said, dict) and said.get("records") != got["records"]:
        res.problem(None, f"{path}{SUFFIX} holds {got['records']} records, the manifest says "
                          f"{said.get('records')}")


def _sidecars(path: str, res: Result) -> tuple[dict[str, Any] | None, str | None]:
    manifest = None
    try:
        manifest = load_manifest(sidecar_path(path), res.size)
    except ManifestError as exc:
        res.problem(None, f"{sidecar_path(path)} (the manifest) is unusable: {exc}")
    sidecar = None
    try:
        with open(path + ".sha256", "rb") as f:
            word = f.read(4096).split(maxsplit=1)
        sidecar = word[0].decode("ascii", "replace").lower() if word else ""
    except FileNotFoundError:
        sidecar = None
    except OSError as exc:
        res.problem(None, f"{path}.sha256 is unreadable: {exc.strerror}")
    return manifest, sidecar


def _compare_ranges(res: Result, manifest: dict[str, Any]) -> None:
    want = manifest.get("ranges")
    if not isinstance(want, list) or res.file_ranges is None:
        return
    listed = manifest_ranges(manifest)
    if any(r.offset is None for r in listed):
        res.problem(None, "the manifest's ranges have no file offsets")
        return
    expect = {(r.offset, r.size) for r in listed}
    have = res.file_ranges
    if expect == have:
        res.ranges["manifest"] = "match"
        return
    res.ranges["manifest"] = "differ"
    missing = sorted(expect - have)
    extra = sorted(have - expect)
    first = (f"the manifest's range at file offset {missing[0][0]:#x} ({missing[0][1]:#x} "
             f"bytes) is not in the file" if missing else
             f"the file's range at {extra[0][0]:#x} ({extra[0][1]:#x} bytes) is not in the "
             f"manifest")
    res.problem(missing[0][0] if missing else extra[0][0],
                f"ranges differ from the manifest: {first}")


# ---- the whole check -------------------------------------------------------------------

def verify(path: str) -> Result:
    """Check one dump file; problems are in the result (InputError when it is not a file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: not a regular file (verify checks dump files)")
        os.set_blocking(fd, True)  # O_NONBLOCK only kept a FIFO from hanging the open
        res = Result(path=path, size=st.st_size)
        return _verify(fd, path, res)
    finally:
        os.close(fd)


def _verify(fd: int, path: str, res: Result) -> Result:
    manifest, sidecar = _sidecars(path, res)
    if res.size == 0:
        raise InputError(f"{path}: empty file (no dump to verify)")
    head = pread_full(fd, PROBE_BYTES, 0)
    kind = detect_kind(Probe(path, fd, os.fstat(fd), head))
    regions: list[Region] | None = None
    try:
        if kind is not None:
            regions = kind.check(fd, path, res, manifest)
        if regions is None:
            magics = [m for cls in SOURCES for m in cls.signatures]
            raise InputError(f"{path}: not a dump kcore knows (no {', '.join(magics[:-1])} or "
                             f"{magics[-1]} signature at offset 0x0, and no {path}.json saying "
                             f"it is raw)")
    except LayoutError as exc:
        res.structure = "broken"
        res.problem(exc.offset, str(exc))
        regions = []
    if manifest is not None:
        mfmt = manifest.get("format")
        if mfmt and res.format != "unknown" and mfmt != res.format:
            res.problem(0, f"the manifest says format {mfmt}, the file is {res.format}")
        msize = manifest.get("size")
        if isinstance(msize, int) and msize != res.size:
            what = "truncated" if res.size < msize else "longer than written"
            res.problem(min(msize, res.size), f"the file is {res.size:#x} bytes, the manifest "
                                              f"says {msize:#x}: {what}")
        if res.structure != "broken":
            _compare_ranges(res, manifest)
        release, noted = manifest.get("kernel_release"), res.vmcoreinfo.get("osrelease")
        if release and noted and release != noted:
            res.problem(res.vmcoreinfo.get("offset"), f"VMCOREINFO says OSRELEASE={noted}, "
                                                      f"the manifest {release}")
    _times(path, res, manifest)
    # Hash only what can be compared: a digest beside the file or in the manifest.
    listed = (manifest or {}).get("chunks")
    hashing = res.whole_digest and (sidecar is not None or bool(
        (manifest or {}).get("sha256")) or isinstance(listed, dict) and isinstance(
        listed.get("sha256"), list))
    allocated = os.fstat(fd).st_blocks * 512
    if hashing and res.size > 1 << 40 and allocated < res.size // 16:
        hashing = False  # a sparse file of terabytes: its digest would take hours
        res.warnings.append(f"not hashed: {human_size(res.size)} apparent, "
                            f"{human_size(allocated)} allocated")
    try:
        digest, chunks, zero, pages = _data_pass(fd, res.size, regions if res.structure !=
                                                 "broken" else [], hashing)
    except LayoutError as exc:
        res.problem(exc.offset, str(exc))
        return res
    res.sha256 = digest
    unread = (manifest or {}).get("pages_zero_filled")
    if res.pages and res.pages.get("unreadable") is None and isinstance(unread, int):
        res.pages["unreadable"] = unread
        res.pages["unreadable_share"] = round(unread / res.pages["memory"], 6) \
            if res.pages.get("memory") else None
    _compare_digests(res, manifest, sidecar, digest, chunks)
    elided = sum(r.memsz - r.filesz for r in regions if r.kind != "text")
    left_out = (manifest or {}).get("bytes_elided")
    if res.elided_in_manifest and isinstance(left_out, int) and \
            "memory_bytes" in res.ranges:
        elided += left_out  # zero runs left out of the file, said by the manifest
        res.ranges["memory_bytes"] += left_out
        if res.pages.get("memory"):  # counted by the kind's check (AVML's decompression)
            res.pages["memory"] += left_out // PAGE
            res.pages["zero"] += left_out // PAGE
            res.pages["zero_share"] = round(res.pages["zero"] / res.pages["memory"], 4)
    if res.structure != "broken":
        check_symbols(path, res, (manifest or {}).get("kernel_release"))
    if res.structure != "broken" and regions:
        memory = pages + elided // PAGE
        unreadable = (manifest or {}).get("pages_zero_filled")
        res.pages = {
            "memory": memory,
            "zero": zero + elided // PAGE,
            "zero_share": round((zero + elided // PAGE) / memory, 4) if memory else None,
            "unreadable": unreadable,
            "unreadable_share": round(unreadable / memory, 6)
            if isinstance(unreadable, int) and memory else None,
        }
    return res


def human_size(n: int) -> str:
    """Bytes in binary units."""
    from kcore.output import human

    return human(n)


def _compare_sparse_chunks(res: Result, want: dict[str, Any]) -> None:
    """The kcore image's chunks that hold data against the manifest's digests of them."""
    fd = os.open(res.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        have = sparse_chunk_digests(fd, res.size)
    finally:
        os.close(fd)
    zeros: dict[int, str] = {}

    def zero_digest(i: int) -> str:  # a chunk of zeros is the same as a hole
        n = min(CHUNK, res.size - i * CHUNK)
        if n not in zeros:
            h = hashlib.sha256()
            for pos in range(0, n, BLOCK):
                h.update(ZERO_BLOCK[:min(BLOCK, n - pos)])
            zeros[n] = h.hexdigest()
        return zeros[n]

    bad = sorted({int(k) for k in set(have) | set(want)
                  if (have.get(k) or zero_digest(int(k))) != (want.get(k) or zero_digest(int(k)))})
    res.chunks = {"size": CHUNK, "count": len(have), "manifest": len(want), "differ": bad[:64]}
    if bad:
        i = bad[0]
        what = ("holds data where the manifest has a hole" if str(i) not in want else
                "is a hole where the manifest has data" if str(i) not in have else
                "differs from the manifest's digest")
        res.problem(i * CHUNK, f"chunk {i} (bytes {i * CHUNK:#x}-{(i + 1) * CHUNK:#x}) {what} "
                               f"({len(bad)} chunks differ)")


def _compare_digests(res: Result, manifest: dict[str, Any] | None, sidecar: str | None,
                     digest: str | None, chunks: list[str]) -> None:
    name = os.path.basename(res.path)
    listed = (manifest or {}).get("chunks") or {}
    if isinstance(listed, dict) and isinstance(listed.get("sha256"), dict):
        _compare_sparse_chunks(res, listed["sha256"])
    if digest is None:
        res.digest["sha256"] = ("not computed (the sparse kcore image has none)"
                                if not res.whole_digest else
                                "not computed (no DUMP.sha256 or manifest digest to compare)")
        return
    for label, want in ((f"{name}.sha256", sidecar),
                        ("the manifest", (manifest or {}).get("sha256"))):
        if want is None:
            res.digest[label] = "absent"
        elif want == digest:
            res.digest[label] = "match"
        else:
            res.digest[label] = "differs"
    listed = (manifest or {}).get("chunks") or {}
    want_chunks = listed.get("sha256") if isinstance(listed, dict) else None
    if isinstance(want_chunks, list) and listed.get("size") != CHUNK:
        res.warnings.append(f"the manifest's chunks are {listed.get('size')} bytes, not "
                            f"{CHUNK}: not compared")
    elif isinstance(want_chunks, list):
        bad = [i for i, (a, b) in enumerate(zip(want_chunks, chunks, strict=False)) if a != b]
        res.chunks = {"size": CHUNK, "count": len(chunks), "manifest": len(want_chunks),
                      "differ": bad[:64]}
        if bad:
            i = bad[0]
            res.problem(i * CHUNK, f"chunk {i} (bytes {i * CHUNK:#x}-"
                                   f"{min((i + 1) * CHUNK, res.size):#x}) differs from the "
                                   f"manifest's digest ({len(bad)} of {len(chunks)} chunks "
                                   f"differ)")
        elif len(want_chunks) != len(chunks):
            res.problem(min(len(want_chunks), len(chunks)) * CHUNK,
                        f"{len(chunks)} chunks of 64 MiB, the manifest lists "
                        f"{len(want_chunks)}")
    if "differs" in res.digest.values() and not any(
            p["what"].startswith("chunk") for p in res.problems):
        which = " and ".join(k for k, v in res.digest.items() if v == "differs")
        res.problem(None, f"the SHA-256 {digest} differs from {which}: the file changed "
                          f"after it was written")
