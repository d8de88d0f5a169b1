"""The second round's fuzz targets: whole commands on a real kernel's root files and memory.

- dl-vmcoreinfo: `dump -d N` (classification, the level table) with a hostile VMCOREINFO
- dl-iomem: `dump -d 31` with a hostile proc/iomem (classification, kdump's bitmaps, a plan)
- rootfiles: discovery, -d 31, the manifest's facts and kdump's utsname from root files with
  NUL, non-UTF-8 and line-breaking bytes
- check: `kcore check` with every root file malformed
- verify-manifest: `kcore verify` of kcore's own elf and lime dumps beside hostile manifests
- rebuild: `kcore rebuild` of kcore's own flattened kdump streams (zstd, snappy) with hostile
  records

Each works on the nokaslr capture (../shared/fixtures, or the same capture made in QEMU) and its
RAM; without them there are no seeds and the targets are skipped. Inputs are bytes (a root is
packed as name/content pairs); each target has its own structure-aware mutator. fuzzing.py
wraps them in its Parser.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SEEDS = HERE / "data" / "fuzz" / "seeds"
FIXTURE = "linux-6.1.0-56-nokaslr-512M"
U64 = (1 << 64) - 1
_STATE: dict[str, Any] = {}


# ---- the real kernel: its root, its RAM, a System discovered once -----------------------------


def _ram() -> Path | None:
    """The capture's RAM image (decompressed once into the test cache), or None."""
    if "ram" not in _STATE:
        import pytest

        from tests.helpers import fixture_memory

        try:  # the shared capture, or the same one made in QEMU (helpers.shared_fixture)
            ram = fixture_memory(FIXTURE)
        except pytest.skip.Exception:
            ram = None
        _STATE["ram"] = ram
    return _STATE["ram"]


def _fixture_root() -> Path:
    from tests.helpers import shared_fixture

    return shared_fixture(FIXTURE) / "root"


def _system() -> Any:
    """The capture's System (kept open for the process)."""
    if "system" not in _STATE:
        from kcore.discover import discover

        _STATE["system"] = discover(_fixture_root(), f"raw:{_ram()}")
    return _STATE["system"]


def _cache() -> Path:
    from tests.helpers import CACHE

    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


# ---- dl-vmcoreinfo ----------------------------------------------------------------------------

# The VMCOREINFO keys the mem_map walk and the page rules read.
_DL_KEYS = ("page.", "page)", "mem_section", "folio.", "PG_", "PAGE_", "SECTION_SIZE_BITS",
            "MAX_PHYSMEM_BITS", "zone.free_area", "list_head", "HUGETLB", "pgtable_l5",
            "OSRELEASE", "free_huge_page")
NUMBERS = (b"0", b"1", b"-1", b"7", b"8", b"16", b"31", b"32", b"63", b"64", b"255", b"256",
           b"257", b"4096", b"65536", b"2147483647", b"2147483648", b"4294967295",
           b"4294967296", b"9223372036854775807", b"-9223372036854775808",
           b"18446744073709551615", b"18446744073709551616", b"ffffffffffffffff",
           b"0x7fffffff", b"-2147483649", b"", b"zz", b"1e3", b"99999999999999999999999")


def _dl_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the values of the keys -d reads."""
    out, pos = [], 0
    for line in data.split(b"\n"):
        key, sep, value = line.partition(b"=")
        if sep and any(k.encode() in key for k in _DL_KEYS):
            out.append((pos + len(key) + 1, max(1, len(value))))
        pos += len(line) + 1
    return out


def _dl_mutate(seed: bytes, rnd: random.Random) -> bytes:
    data = bytearray(seed)
    for _ in range(rnd.randint(1, 4)):
        fields = _dl_fields(bytes(data))
        op = rnd.random()
        if fields and op < 0.8:
            at, size = rnd.choice(fields)
            data[at:at + size] = rnd.choice(NUMBERS)
        elif fields and op < 0.9:  # a line gone
            at, _size = rnd.choice(fields)
            start = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at)
            del data[start:end + 1 if end >= 0 else len(data)]
        else:  # a key the kernel may lack, added
            key = rnd.choice(("NUMBER(PG_buddy)", "OFFSET(folio._folio_order)",
                              "OFFSET(folio._folio_dtor)", "NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)",
                              "NUMBER(pgtable_l5_enabled)", "NUMBER(PG_hugetlb)"))
            data += f"{key}=".encode() + rnd.choice(NUMBERS) + b"\n"
    return bytes(data)


def _dl_seeds() -> list[bytes]:
    return [(SEEDS / "vmcoreinfo.txt").read_bytes()] if _ram() else []


def run_dl_vmcoreinfo(data: bytes, _scratch: Any) -> None:
    """-d N's classification and level table with this VMCOREINFO."""
    from kcore import dumplevel
    from kcore.vmcoreinfo import VmcoreInfo

    system = dataclasses.replace(_system(), vmcoreinfo=VmcoreInfo.parse(data))
    level = (31, 30, 16, 2, 8, 1)[len(data) % 6]
    filtered = dumplevel.apply(system, system.source, level)
    filtered.report(None, filtered.held_pages())
    dumplevel.level_table(system, level, filtered)


# ---- dl-iomem ---------------------------------------------------------------------------------


def _iomem_mutate(seed: bytes, rnd: random.Random) -> bytes:
    """Addresses of System RAM lines at their edges, lines repeated, reordered or dropped."""
    lines = seed.split(b"\n")
    for _ in range(rnd.randint(1, 4)):
        i = rnd.randrange(len(lines))
        line = lines[i]
        op = rnd.random()
        if op < 0.6 and b"-" in line:
            lo, _, rest = line.partition(b"-")
            hi, sep, name = rest.partition(b" : ")
            edge = rnd.choice((b"0", b"fff", b"1000", b"ffffffff", b"100000000",
                               b"fffffffffffff", b"10000000000000", b"ffffffffffffffff",
                               b"1" + b"0" * 16, b"7fffffffffff", b"3fffffffffff",
                               b"%x" % rnd.getrandbits(rnd.choice((12, 32, 46, 52, 64)))))
            if rnd.random() < 0.5:
                lo = lo[:len(lo) - len(lo.lstrip())] + edge
            else:
                hi = edge
            if rnd.random() < 0.4:
                name = b"System RAM"
            lines[i] = lo + b"-" + hi + sep + name
        elif op < 0.75:
            lines.insert(rnd.randrange(len(lines) + 1), line)
        elif op < 0.85 and len(lines) > 1:
            del lines[i]
        else:
            j = rnd.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines)


def _iomem_seeds() -> list[bytes]:
    return [(SEEDS / "iomem.txt").read_bytes()] if _ram() else []


def run_dl_iomem(data: bytes, _scratch: Any) -> None:
    """-d 31 with this iomem: the classes, kdump's two bitmaps, a LiME plan."""
    from kcore import dumplevel
    from kcore.formats import FORMATS
    from kcore.formats import kdump as kdump_format
    from kcore.formats.plan import Request
    from kcore.iomem import parse_iomem
    from kcore.kclist import KcoreList, ram_ranges_from_resources
    from kcore.wire import diskdump

    base = _system()
    page = base.addrmap.page_size
    ram = ram_ranges_from_resources(
        parse_iomem(data.decode("utf-8", "surrogateescape"), "proc/iomem").system_ram(), page)
    system = dataclasses.replace(base, kclist=KcoreList(base.addrmap, lambda: ram))
    filtered = dumplevel.apply(system, system.source, 31)
    filtered.report(None, filtered.held_pages())
    req = Request(system, filtered.source, dump_level=31)
    present, keep = kdump_format.ram_runs(req), kdump_format.keep_runs(req)
    if keep:  # what kdump's writer sizes before the first page
        geo = diskdump.Geometry.of(page, max(a + n for a, n in present), 0,
                                   sum(n for _a, n in keep))
        diskdump.bitmap_of(present, geo.bitmap_len)
        diskdump.bitmap_of(keep, geo.bitmap_len)
    FORMATS["lime"].plan(Request(system, filtered.source))


# ---- rootfiles and check: a root packed as (name, content) pairs ------------------------------

# What a Linux 6.1 guest of 512 MiB shows beside the capture's own files (memory blocks of
# 128 MiB, no lockdown, kptr_restrict 0).
_SYNTHETIC = {
    "sys/devices/system/memory/block_size_bytes": b"8000000\n",
    **{f"sys/devices/system/memory/memory{i}/state": b"online\n" for i in range(4)},
    "proc/sys/kernel/kptr_restrict": b"0\n",
    "sys/kernel/security/lockdown": b"[none] integrity confidentiality\n",
    "proc/version": b"Linux version 6.1.0-56-amd64 (debian-kernel@lists.debian.org) (gcc-12 "
                    b"(Debian 12.2.0-14+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) "
                    b"2.40) #1 SMP PREEMPT_DYNAMIC Debian 6.1.153-1 (2025-09-20)\n",
    "proc/sys/kernel/random/boot_id": b"5e4bd9c6-8f7c-4a5e-9b0e-3f1c2a7d9e10\n",
    "proc/sys/kernel/hostname": b"guest\n",
    "proc/cpuinfo": b"processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae mce cx8 apic\n",
}
# Files only check reads (the rest are discovery's, fuzzed by rootfiles as well).
_CHECK_ONLY = ("proc/meminfo", "proc/sys/kernel/kptr_restrict", "sys/kernel/security/lockdown",
               "proc/cpuinfo", "proc/version", "proc/modules", "proc/sys/kernel/random/boot_id")
_INSERTS = (b"\0", b"\xff", b"\xfe\xff", b"\x80", b"\xc3\x28", b"\xed\xa0\x80", b"\n", b"\r\n",
            b"\n\n", b" ", b"\t", b":", b"=", b"-", b"0x", b"[", b"]", b"\x1b[2J")
_WORDS = (b"", b"0", b"-1", b"zz", b"0x40", b"99999999999999999999999", b"kB", b"MemTotal:",
          b"online", b"offline", b"[integrity]", b"x86_64", b"aarch64", b"6.1.0-56-amd64\n2",
          b"\0", b"\xff\xfe")


def pack_root(files: list[tuple[str, bytes]]) -> bytes:
    """A root as one input: for each file a 2-byte name length, the name, a 4-byte length, the
    content."""
    out = bytearray()
    for name, data in files:
        raw = name.encode()
        out += struct.pack(">H", len(raw)) + raw + struct.pack(">I", len(data)) + data
    return bytes(out)


def unpack_root(data: bytes) -> list[tuple[str, bytes]]:
    """The (name, content) pairs of a packed root (a truncated tail is dropped)."""
    files, pos = [], 0
    while pos + 2 <= len(data):
        (n,) = struct.unpack_from(">H", data, pos)
        name = data[pos + 2:pos + 2 + n]
        pos += 2 + n
        if pos + 4 > len(data):
            break
        (size,) = struct.unpack_from(">I", data, pos)
        files.append((name.decode("utf-8", "replace"), data[pos + 4:pos + 4 + size]))
        pos += 4 + size
    return files


def _root_seeds() -> list[bytes]:
    if not _ram():
        return []
    root = _fixture_root()
    files = sorted((str(p.relative_to(root)), p.read_bytes())
                   for p in root.rglob("*") if p.is_file())
    files = [(n, (SEEDS / "kallsyms.txt").read_bytes() if n == "proc/kallsyms" else d)
             for n, d in files]  # the real kallsyms, cut to the symbols kcore reads (fast)
    return [pack_root(files + sorted(_SYNTHETIC.items()))]


def _root_mutator(check_share: float) -> Callable[[bytes, random.Random], bytes]:
    """Mutations of one to three root files (check's own files check_share of the time)."""
    def mutate_root(seed: bytes, rnd: random.Random) -> bytes:
        files = [[n, bytearray(d)] for n, d in unpack_root(seed)]
        for _ in range(rnd.randint(1, 3)):
            own = [f for f in files if f[0] in _CHECK_ONLY]
            pool = own if own and rnd.random() < check_share else files
            if not pool:
                break
            f = rnd.choice(pool)
            data: bytearray = f[1]
            op = rnd.random()
            at = rnd.randrange(len(data) + 1)
            if op < 0.35:
                data[at:at] = rnd.choice(_INSERTS)
            elif op < 0.55:
                end = data.find(b" ", at)
                nl = data.find(b"\n", at)
                end = min(x for x in (end, nl, len(data)) if x >= 0)
                data[at:end] = rnd.choice(_WORDS)
            elif op < 0.65:
                del data[at:]
            elif op < 0.70:
                f[1] = bytearray()
            elif op < 0.76:
                files.remove(f)
            elif op < 0.84 and data:
                data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
            elif op < 0.92:
                start = data.rfind(b"\n", 0, at) + 1
                end = data.find(b"\n", at)
                line = data[start:end + 1 if end >= 0 else len(data)]
                data[start:start] = line * rnd.randint(1, 3)
            else:
                data[at:at + rnd.randint(1, 32)] = rnd.randbytes(rnd.randint(0, 32))
        return pack_root([(n, bytes(d)) for n, d in files])
    return mutate_root


def _write_root(data: bytes, scratch: Any) -> Path:
    """The packed root written under the scratch path (its previous tree removed)."""
    root = Path(scratch.path + ".root")
    if "roots" not in _STATE:
        _STATE["roots"] = set()
    if root not in _STATE["roots"]:
        _STATE["roots"].add(root)
        atexit.register(shutil.rmtree, root, True)
    shutil.rmtree(root, ignore_errors=True)
    for name, content in unpack_root(data):
        parts = Path(name).parts
        if not parts or ".." in parts or Path(name).is_absolute() or "\0" in name:
            continue
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def run_rootfiles(data: bytes, scratch: Any) -> None:
    """Discovery, -d 31, kdump's utsname and the manifest's facts from these root files."""
    from kcore import dumplevel
    from kcore.discover import discover
    from kcore.formats.kdump import utsname
    from kcore.manifest import dumps
    from kcore.preflight import manifest_facts

    root = _write_root(data, scratch)
    system = discover(root, f"raw:{_ram()}")
    try:
        system.kclist.entries  # noqa: B018 - builds the kclist (memory blocks' state)
        filtered = dumplevel.apply(system, system.source, 31)
        utsname(system)
        facts = manifest_facts(str(root), "raw:ram", system.source, system)
        dumps({"tool": "fuzz", "kernel_release": system.osrelease,
               "dump_level": filtered.report(None, filtered.held_pages()), **facts})
    finally:
        system.close()


_DISCOVERY_INPUTS = ("proc/iomem", "proc/kallsyms", "proc/cmdline", "sys/kernel/vmcoreinfo",
                     "proc/sys/kernel/osrelease", "proc/sys/kernel/arch")


def run_check(data: bytes, scratch: Any) -> None:
    """`kcore check` on these root files: its report, as text and as JSON."""
    from kcore import preflight
    from kcore.commands import check as check_cmd

    root = _write_root(data, scratch)
    # The size estimate is a function of the discovered system alone: computed once per set
    # of discovery's own files (it walks the page tables: ~60 ms), so the run stays fast.
    files = dict(unpack_root(data))
    key = tuple(files.get(n) for n in _DISCOVERY_INPUTS)
    memo = _STATE.setdefault("sizes", {})
    real = preflight.estimate_sizes

    def sizes(system: Any) -> dict[str, dict[str, int]]:
        if key not in memo:
            if len(memo) > 64:
                memo.clear()
            memo[key] = real(system)
        return memo[key]

    preflight.estimate_sizes = sizes
    try:
        rep = preflight.check(str(root), scratch.path + ".root", f"raw:{_ram()}")
    finally:
        preflight.estimate_sizes = real
    json.dumps(rep.as_dict())
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        check_cmd._print_human(rep)
    for line in (rep.problem, rep.advice):
        if line is not None and "\n" in line:
            raise AssertionError(f"check's report has a line of two: {line!r}")


# ---- small dumps of the capture: the verify and rebuild seeds ---------------------------------


def _sparse_ram() -> Path | None:
    """A sparse copy of the capture's RAM holding only the pages discovery and the notes read:
    dumps of it are small (zero pages left out), and kcore's own."""
    ram = _ram()
    if ram is None:
        return None
    out = _cache() / "fuzz-sparse-ram.bin"
    if out.exists():
        return out
    from kcore.discover import discover
    from kcore.elfcore import build_notes
    from kcore.sources.base import MemorySource

    touched: set[int] = set()
    real = MemorySource.readinto_phys

    def logged(self: Any, paddr: int, buf: Any, **kw: Any) -> Any:
        n = len(memoryview(buf).cast("B"))
        touched.update(range(paddr >> 12, (paddr + max(n, 1) - 1 >> 12) + 1))
        return real(self, paddr, buf, **kw)

    MemorySource.readinto_phys = logged  # type: ignore[method-assign]
    try:
        system = discover(_fixture_root(), f"raw:{ram}")
        build_notes(system, "modern")
        from kcore.formats.kdump import banner_version
        banner_version(system)
        system.close()
    finally:
        MemorySource.readinto_phys = real  # type: ignore[method-assign]
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with open(ram, "rb") as src, open(tmp, "wb") as dst:
        dst.truncate(os.fstat(src.fileno()).st_size)
        for pfn in sorted(touched):
            dst.seek(pfn << 12)
            dst.write(os.pread(src.fileno(), 4096, pfn << 12))
    os.replace(tmp, out)
    return out


def _kcore(*args: str, stdout: Any = None) -> None:
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    subprocess.run([sys.executable, "-m", "kcore", *args], check=True, env=env, stdout=stdout,
                   stderr=subprocess.DEVNULL)


def _small_dump(fmt: str) -> Path | None:
    """kcore's fmt dump of the sparse RAM (with its .sha256 and .json), or None."""
    sparse = _sparse_ram()
    if sparse is None:
        return None
    from tests.helpers import locked

    out = _cache() / f"fuzz-small.{fmt}"
    with locked(out.with_name(f"{out.name}.lock")):  # another run's or worker's: wait for it
        if not out.exists():
            _kcore("dump", "--root", str(_fixture_root()), "--source", f"raw:{sparse}",
                   "--format", fmt, "-q", "--force", "--threads", "1", "-o", str(out))
    return out


def _stream(codec: str) -> bytes | None:
    """kcore's flattened kdump stream of the sparse RAM with codec, or None."""
    sparse = _sparse_ram()
    if sparse is None:
        return None
    out = _cache() / f"fuzz-small-{codec}.flat"
    if not out.exists():
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            _kcore("dump", "--root", str(_fixture_root()), "--source", f"raw:{sparse}",
                   "--format", "kdump", "--compress", codec, "-q", "--threads", "1", "-o", "-",
                   stdout=f)
        os.replace(tmp, out)
    return out.read_bytes()


# ---- verify-manifest --------------------------------------------------------------------------

_KINDS = {b"e": "elf", b"l": "lime"}
_DEEP, _BIG = "@@deep@@", "@@big@@"
_JSON_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 4096, 1 << 63, 1 << 64, 1 << 80, -(1 << 70), 1.5, 1e308, "",
    "zz", "0x", "0xzz", "0x" + "f" * 17, "0xffffffffffffffff", "0" * 64, "g" * 64, [], {},
    [[]], {"size": 1}, {"size": 67108864, "sha256": ["0" * 64]}, {"size": 0, "sha256": {}},
    [{"paddr": "0x0", "size": 4096}], [{"paddr": 0, "size": "1"}], [1, 2], "a" * 5000,
    _DEEP, _BIG)


def _nodes(doc: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) of a JSON document."""
    if isinstance(doc, dict):
        for k in list(doc):
            out.append((doc, k))
            _nodes(doc[k], out)
    elif isinstance(doc, list):
        for i in range(len(doc)):
            out.append((doc, i))
            _nodes(doc[i], out)
    return out


def _manifest_mutate(seed: bytes, rnd: random.Random) -> bytes:
    kind, text = seed[:1], seed[1:]
    if rnd.random() < 0.15:  # bytes, not JSON
        from tests.fuzzing import mutate, text_fields

        return kind + mutate(text, rnd, text_fields, text=True)
    doc = json.loads(text)
    for _ in range(rnd.randint(1, 3)):
        nodes = _nodes(doc, [])
        op = rnd.random()
        if not nodes or op < 0.05:
            doc = copy.deepcopy(rnd.choice(_JSON_VALUES))
            break
        box, key = rnd.choice(nodes)
        if op < 0.75:
            box[key] = copy.deepcopy(rnd.choice(_JSON_VALUES))  # the shared [] and {} stay empty
        elif op < 0.9:
            del box[key]
        elif len(json.dumps(box[key])) < 1000:  # a list of copies, at most ~1 MiB
            box[key] = [box[key]] * rnd.randint(2, 1000)
    out = json.dumps(doc)
    out = out.replace(json.dumps(_DEEP), "[" * 5000 + "0" + "]" * 5000, 1)
    out = out.replace(json.dumps(_BIG), "9" * 5000, 1)
    return kind + out.encode()


def _manifest_seeds() -> list[bytes]:
    out = []
    for tag, fmt in _KINDS.items():
        dump = _small_dump(fmt)
        if dump is not None:
            out.append(tag + Path(str(dump) + ".json").read_bytes())
    return out


def run_verify_manifest(data: bytes, scratch: Any) -> None:
    """`kcore verify` (its findings, as --json prints them) with this manifest beside the dump."""
    from kcore.verify import verify

    fmt = _KINDS.get(data[:1], "elf")
    folder = Path(scratch.path + ".verify")
    dump = folder / f"dump.{fmt}"
    if not dump.exists():
        folder.mkdir(exist_ok=True)
        atexit.register(shutil.rmtree, folder, True)
        src = _small_dump(fmt)
        assert src is not None
        shutil.copyfile(src, dump)
        shutil.copyfile(str(src) + ".sha256", str(dump) + ".sha256")
    Path(str(dump) + ".json").write_bytes(data[1:])
    res = verify(str(dump))
    json.dumps(res.as_dict())
    for p in res.problems:
        if "\n" in p["what"]:
            raise AssertionError(f"a problem of two lines: {p['what']!r}")


# ---- rebuild ----------------------------------------------------------------------------------


def _records(data: bytes) -> list[int]:
    """File offsets of a flattened stream's record headers."""
    out, pos = [], 4096
    while pos + 16 <= len(data):
        out.append(pos)
        offset, size = struct.unpack_from(">qq", data, pos)
        if offset < 0 or size <= 0:
            break
        pos += 16 + size
    return out


def _flat_mutate(seed: bytes, rnd: random.Random) -> bytes:
    data = bytearray(seed)
    for _ in range(rnd.randint(1, 3)):
        recs = _records(bytes(data))
        op = rnd.random()
        if recs and op < 0.65:
            at = rnd.choice(recs) + rnd.choice((0, 8))
            (cur,) = struct.unpack_from(">q", data, at)
            v = rnd.choice((0, 1, -1, -2, 4095, 4096, 1 << 31, 1 << 32, 1 << 40, (1 << 52) - 1,
                            1 << 52, (1 << 63) - 1, -(1 << 63), cur + 1, cur - 1, cur + 4096,
                            cur * 2, cur << 20, len(data), rnd.getrandbits(48)))
            v = (v + (1 << 63)) % (1 << 64) - (1 << 63)
            struct.pack_into(">q", data, at, v)
        elif recs and op < 0.75:  # a record repeated
            i = rnd.randrange(len(recs))
            end = recs[i + 1] if i + 1 < len(recs) else len(data)
            data[end:end] = data[recs[i]:end]
        elif recs and op < 0.82:  # a record gone
            i = rnd.randrange(len(recs))
            end = recs[i + 1] if i + 1 < len(recs) else len(data)
            del data[recs[i]:end]
        elif op < 0.9 and data:
            del data[rnd.randrange(len(data)):]
        elif data:
            data[rnd.randrange(min(len(data), 4096))] ^= 1 << rnd.randrange(8)
    return bytes(data)


def _stream_seeds() -> list[bytes]:
    return [s for s in (_stream("zstd"), _stream("snappy")) if s]


def run_rebuild(data: bytes, scratch: Any) -> None:
    """`kcore rebuild` in-process: exit 0, or 1/2 with one line on stderr."""
    from kcore.cli import main

    out = scratch.path + ".rebuilt"
    if "rebuilt" not in _STATE:
        _STATE["rebuilt"] = True
        for suffix in ("", ".sha256", ".json"):
            atexit.register(lambda p=out + suffix: os.path.exists(p) and os.unlink(p))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["rebuild", scratch.write(data), out, "--force", "-q"])
    text = err.getvalue()
    if rc not in (0, 1, 2) or (rc and text.count("\n") != 1) or "Traceback" in text:
        raise AssertionError(f"rebuild: exit {rc}, stderr {text[:300]!r}")


TARGETS: list[dict[str, Any]] = [
    {"name": "dl-vmcoreinfo", "seeds": _dl_seeds, "fields": _dl_fields, "run": run_dl_vmcoreinfo,
     "mutator": _dl_mutate},
    {"name": "dl-iomem", "seeds": _iomem_seeds, "fields": lambda d: [], "run": run_dl_iomem,
     "mutator": _iomem_mutate},
    {"name": "rootfiles", "seeds": _root_seeds, "fields": lambda d: [], "run": run_rootfiles,
     "mutator": _root_mutator(0.3)},
    {"name": "check", "seeds": _root_seeds, "fields": lambda d: [], "run": run_check,
     "mutator": _root_mutator(0.9)},
    {"name": "verify-manifest", "seeds": _manifest_seeds, "fields": lambda d: [],
     "run": run_verify_manifest, "mutator": _manifest_mutate},
    {"name": "rebuild", "seeds": _stream_seeds, "fields": lambda d: [], "run": run_rebuild,
     "mutator": _flat_mutate},
]
