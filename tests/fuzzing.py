"""Structure-aware fuzzing of kcore's parsers of untrusted input: seeds, mutators, harnesses.

Each parser has a harness taking bytes; it may succeed or raise a KcoreError (kcore's one-line
errors); anything else is a bug. Seeds come from the real-kernel captures (tests/data/fuzz/
seeds: a real /proc/kcore header with its notes, VMCOREINFO, iomem, kallsyms) and from kcore's
own writers (LiME, kdump, AVML, flattened). Mutations know where each format's fields are
(ELF header, program headers, note headers, LiME range headers, text lines) and write
values at their edges there.

The long run (no pytest): python -m tests.fuzzing [PARSER ...] --count N [--seconds S]
reports executions, failures (kept under tests/data/fuzz/crashes/PARSER/), the slowest input
and the peak RSS.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from kcore.errors import KcoreError

HERE = Path(__file__).resolve().parent

SEEDS = HERE / "data" / "fuzz" / "seeds"
CRASHES = HERE / "data" / "fuzz" / "crashes"
U64 = (1 << 64) - 1
EDGES = (0, 1, 2, 3, 4, 7, 8, 0x38, 0x40, 0xFF, 0x100, 0xFFF, 0x1000, 0xFFFF, 0x10000,
         0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 47, 1 << 52, 1 << 63, U64,
         U64 - 0xFFF, 0xFFFF888000000000, 0xFFFFFFFF81000000)
LIME_HDR = struct.Struct("<IIQQ8s")


# ---- where the fields are ---------------------------------------------------------------------


def elf_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the ELF header's, program headers' and note headers' fields."""
    fields = [(16, 2), (18, 2), (20, 4), (24, 8), (32, 8), (40, 8), (48, 4), (52, 2), (54, 2),
              (56, 2), (58, 2), (60, 2), (62, 2)]
    if len(data) < 64:
        return fields
    phoff, = struct.unpack_from("<Q", data, 32)
    phnum, = struct.unpack_from("<H", data, 56)
    for i in range(min(phnum, 512)):
        at = phoff + 56 * i
        if at + 56 > len(data):
            break
        fields += [(at, 4), (at + 4, 4), (at + 8, 8), (at + 16, 8), (at + 24, 8),
                   (at + 32, 8), (at + 40, 8), (at + 48, 8)]
        p_type, _f, p_off, _va, _pa, p_filesz = struct.unpack_from("<IIQQQQ", data, at)
        if p_type == 4:  # PT_NOTE: each note's namesz, descsz, type and name's last byte
            pos = p_off
            while pos + 12 <= min(len(data), p_off + p_filesz):
                namesz, descsz, _t = struct.unpack_from("<III", data, pos)
                fields += [(pos, 4), (pos + 4, 4), (pos + 8, 4)]
                if namesz:
                    fields.append((pos + 12 + namesz - 1, 1))
                pos += 12 + (namesz + 3 & ~3) + (descsz + 3 & ~3)
    return fields


def lime_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of each LiME range header's fields."""
    fields, pos = [], 0
    while pos + LIME_HDR.size <= len(data):
        magic, _v, s, e, _r = LIME_HDR.unpack_from(data, pos)
        fields += [(pos, 4), (pos + 4, 4), (pos + 8, 8), (pos + 16, 8)]
        if e < s or e - s > len(data):
            break
        pos += LIME_HDR.size + e - s + 1
    return fields


def text_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of the values in key=value, 'ADDR T NAME' and 'START-END : NAME' lines."""
    fields, pos = [], 0
    for line in data.split(b"\n"):
        for sep in (b"=", b" ", b"-"):
            at = line.find(sep)
            if at >= 0:
                end = line.find(b" ", at + 1)
                end = len(line) if end < 0 else end
                fields.append((pos + at + 1, max(1, end - at - 1)))
                fields.append((pos, max(1, at)))
                break
        pos += len(line) + 1
    return fields


# ---- mutations --------------------------------------------------------------------------------


TEXT_VALUES = (b"", b"0", b"-1", b"zz", b"0x40", b"08", b"1_0", b" 1", b"18446744073709551616",
               b"ffffffffffffffffff", b"99999999999999999999999", b"\xff", b"=", b"\n",
               b"SYMBOL(", b"NUMBER(x)=1", b"System RAM", b"-", b" : ")


def mutate(seed: bytes, rnd: random.Random, fields: Callable[[bytes], list[tuple[int, int]]],
           text: bool = False) -> bytes:
    """One to four structure-aware mutations of seed."""
    data = bytearray(seed)
    for _ in range(rnd.randint(1, 4)):
        where = fields(bytes(data))
        op = rnd.random()
        if where and op < 0.55:
            at, size = rnd.choice(where)
            if at >= len(data):
                continue
            if text:
                data[at:at + size] = rnd.choice(TEXT_VALUES)
            else:
                v = rnd.choice(EDGES) if rnd.random() < 0.7 else rnd.getrandbits(8 * size)
                if rnd.random() < 0.3:  # near the current value
                    cur = int.from_bytes(data[at:at + size], "little")
                    v = cur + rnd.choice((-1, 1, 4096, -4096, len(data)))
                data[at:at + size] = (v % (1 << 8 * size)).to_bytes(size, "little")
        elif op < 0.70 and data:
            data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        elif op < 0.80 and data:
            del data[rnd.randrange(len(data)):]  # truncated
        elif op < 0.90 and data:
            at, n = rnd.randrange(len(data)), rnd.randint(1, 64)
            data[at:at] = data[at:at + n]  # a repeated piece
        elif data:
            at = rnd.randrange(len(data))
            data[at:at + rnd.randint(1, 16)] = rnd.randbytes(rnd.randint(0, 16))
    return bytes(data)


# ---- seeds ------------------------------------------------------------------------------------


def _lime_seed() -> bytes:
    """A LiME image of three ranges, as LiME writes them (32-byte header, then the bytes)."""
    out = b""
    for start, n in ((0x1000, 0x2000), (0x100000, 0x1000), (0x200000, 0x3000)):
        out += LIME_HDR.pack(0x4C694D45, 1, start, start + n - 1, bytes(8))
        out += bytes(range(256)) * (n // 256)
    return out


def _pagetable_seed() -> bytes:
    """Eight pages of x86-64 page tables: PGD -> PUD -> PMD -> PT, a 2 MiB and a 1 GiB leaf."""
    mem = bytearray(8 * 4096)

    def put(table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", mem, table * 4096 + 8 * index, value)

    put(0, 511, 1 * 4096 | 0x63)  # PGD[511] -> PUD
    put(1, 510, 2 * 4096 | 0x63)  # PUD[510] -> PMD
    put(1, 0, 0x40000000 | 0xE3)  # PUD[0]: a 1 GiB leaf
    put(2, 0, 3 * 4096 | 0x63)  # PMD[0] -> PT
    put(2, 1, 0x200000 | 0xE3)  # PMD[1]: a 2 MiB leaf
    for i in range(16):
        put(3, i, (4 + i % 4) * 4096 | 0x63)
    return bytes(mem)


_GENERATED: dict[str, bytes] = {}


def _dumped_seed(fmt: str) -> bytes | None:
    """The first 64 KiB of a kcore dump of the nokaslr capture in fmt (None without it)."""
    if fmt in _GENERATED:
        return _GENERATED[fmt]
    import pytest

    from tests.helpers import fixture_memory, locked, shared_fixture

    cache = Path(os.environ.get("KCORE_TEST_CACHE", "/tmp/kcore-test-cache"))
    try:  # the nokaslr capture: shared, or made in QEMU and cached
        fx = shared_fixture("linux-6.1.0-56-nokaslr-512M")
        ram = fixture_memory(fx.name)
    except pytest.skip.Exception:
        return None
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"fuzz-seed-{fmt}"
    with locked(cache / f"fuzz-seed-{fmt}.lock"):  # the other xdist worker: wait, then reuse
        if not out.exists():
            _make_seed(fmt, fx, ram, out)
    _GENERATED[fmt] = out.read_bytes()
    return _GENERATED[fmt]


def _make_seed(fmt: str, fx: Path, ram: Path, out: Path) -> None:
    """Write the first 64 KiB of a kcore dump of capture fx (RAM file ram) in fmt to out."""
    import subprocess

    args = ["--format", "kdump", "-d", "31"] if fmt != "avml" else ["--format", "avml"]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    tmp = out.with_name(f"{out.name}.{os.getpid()}")
    cmd = [sys.executable, "-m", "kcore", "dump", "--root", str(fx / "root"), "--source",
           f"raw:{ram}", *args, "-q", "--no-digest"]
    if fmt == "flattened":
        with open(tmp, "wb") as f:
            subprocess.run([*cmd, "-o", "-"], stdout=f, check=True, env=env)
    else:
        subprocess.run([*cmd, "-o", str(tmp)], check=True, env=env)
        Path(str(tmp) + ".json").unlink(missing_ok=True)
    os.truncate(tmp, min(tmp.stat().st_size, 64 << 10))
    os.replace(tmp, out)


# ---- harnesses --------------------------------------------------------------------------------


class Scratch:
    """A file on tmpfs that each execution rewrites (file parsers read from a path)."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self.path = tempfile.mkstemp(prefix="kcore-fuzz-", dir=base)
        os.close(fd)

    def write(self, data: bytes) -> str:
        with open(self.path, "wb") as f:
            f.write(data)
        return self.path

    def close(self) -> None:
        os.unlink(self.path)


def _open_and_read(spec: str) -> None:
    """Open a memory source, then read a page at its first, last and a missing address."""
    from kcore.sources import open_source

    with open_source(spec) as src:
        for e in src.extents[:2] + src.extents[-1:]:
            src.read_phys(e.paddr, min(e.length, 8192))
            src.read_phys(e.paddr + e.length - 1, 2)
        src.read_phys(0, 4096)
        if src.vmcoreinfo:
            _vmcoreinfo(src.vmcoreinfo)


def _vmcoreinfo(data: bytes) -> None:
    """Parse VMCOREINFO and read every value the way kcore reads its kind."""
    from kcore.vmcoreinfo import VmcoreInfo

    info = VmcoreInfo.parse(data)
    for key in list(info.values):
        kind, _, rest = key.partition("(")
        name = rest[:-1]
        getter = {"SYMBOL": info.symbol, "NUMBER": info.number, "SIZE": info.size,
                  "OFFSET": info.offset, "LENGTH": info.length}.get(kind)
        if getter is not None:
            getter(name)
    _ = info.kerneloffset, info.pagesize, info.osrelease


def _note(data: bytes) -> None:
    from kcore.vmcoreinfo import parse_note, parse_sysfs_vmcoreinfo

    parse_note(data, "note")
    parse_sysfs_vmcoreinfo(data[:64].decode("latin-1"), "sysfs")


def _iomem(data: bytes) -> None:
    from kcore.iomem import parse_iomem

    parse_iomem(data.decode("latin-1"), "iomem").system_ram()


def _kallsyms(data: bytes) -> None:
    from kcore.kallsyms import parse_kallsyms

    parse_kallsyms(data.decode("latin-1"), where="kallsyms")


def _pagetables(data: bytes) -> None:
    from kcore.vmem import PageWalker

    mem = data[:1 << 20]

    def read_phys(paddr: int, length: int) -> bytes:
        chunk = mem[paddr:paddr + length]
        return chunk + bytes(length - len(chunk))

    walker = PageWalker(read_phys, 0, 5 if data[-1:] == b"\x05" else 4)
    walker.max_mapped = max(len(mem), 1 << 30)  # as bound_by() sets them for a source
    walker.max_tables = 4096
    walker.runs(0xFFFF800000000000, 1 << 47)
    walker.translate(0xFFFFFFFF80000000)
    walker.read(0xFFFFFFFF80000000, 8192)


def _symbols_seed() -> bytes:
    """A sidecar (OUTPUT.symbols) holding the kallsyms seed and a modules line."""
    from kcore.symbols import SymbolFiles, sidecar

    return sidecar(SymbolFiles({"proc/kallsyms": (SEEDS / "kallsyms.txt").read_bytes(),
                                "proc/modules": b"9p 90112 0 - Live 0xffffffffc0a6c000\n"}), 62)


def _symbols(data: bytes, scratch: Scratch) -> None:
    """Read the symbol files a dump (here the sidecar ELF itself) keeps, and their summary."""
    from kcore.symbols import read_dump

    found = read_dump(scratch.write(data))
    if found is not None:
        found[0].summary()


class Parser:
    """A parser to fuzz: its seeds, where their fields are, and how to run one input."""

    def __init__(self, name: str, seeds: Callable[[], list[bytes]],
                 fields: Callable[[bytes], list[tuple[int, int]]],
                 run: Callable[[bytes, Scratch], None], text: bool = False,
                 mutator: Callable[[bytes, random.Random], bytes] | None = None) -> None:
        self.name, self._seeds, self.fields, self._run, self.text = name, seeds, fields, run, text
        self._mutator = mutator
        self._cached: list[bytes] | None = None

    def mutate(self, seed: bytes, rnd: random.Random) -> bytes:
        """One mutated input: the target's own mutator, else the field-aware one."""
        if self._mutator is not None:
            return self._mutator(seed, rnd)
        return mutate(seed, rnd, self.fields, self.text)

    def seeds(self) -> list[bytes]:
        """The seed inputs (empty when they cannot be made here)."""
        if self._cached is None:
            self._cached = [s for s in self._seeds() if s]
        return self._cached

    def run(self, data: bytes, scratch: Scratch) -> None:
        """Run one input: success or a KcoreError; anything else propagates."""
        try:
            self._run(data, scratch)
        except KcoreError as exc:
            msg = str(exc)
            if "\n" in msg.strip() or not msg:
                raise AssertionError(f"not a one-line error: {msg!r}") from exc


def _seed_file(name: str) -> Callable[[], list[bytes]]:
    return lambda: [(SEEDS / name).read_bytes()]


def _file(kind: str) -> Callable[[bytes, Scratch], None]:
    return lambda data, s: _open_and_read(f"{kind}:{s.write(data)}" if kind else s.write(data))


def _dumped(fmt: str) -> Callable[[], list[bytes]]:
    return lambda: [d for d in (_dumped_seed(fmt),) if d]


from tests.fuzz_targets import TARGETS  # noqa: E402 - the whole-command targets (second round)

PARSERS: dict[str, Parser] = {p.name: p for p in (*(Parser(**t) for t in TARGETS),
    Parser("elf", _seed_file("kcore-head.bin"), elf_fields, _file("elf")),
    Parser("kcore", _seed_file("kcore-head.bin"), elf_fields, _file("kcore")),
    Parser("lime", lambda: [_lime_seed()], lime_fields, _file("lime")),
    Parser("detect", lambda: [(SEEDS / "kcore-head.bin").read_bytes(), _lime_seed()],
           lambda d: elf_fields(d) if d[:4] == b"\x7fELF" else lime_fields(d), _file("")),
    Parser("kdump", _dumped("kdump"), lambda d: [(i, 4) for i in range(0, min(len(d), 8192), 4)],
           _file("kdump")),
    Parser("flattened", _dumped("flattened"),
           lambda d: [(i, 8) for i in range(0, min(len(d), 8192), 8)], _file("")),
    Parser("avml", _dumped("avml"), lambda d: [(i, 8) for i in range(0, min(len(d), 4096), 8)],
           _file("avml")),
    Parser("vmcoreinfo", _seed_file("vmcoreinfo.txt"), text_fields,
           lambda d, _s: _vmcoreinfo(d), text=True),
    Parser("vmcoreinfo-note", lambda: [struct.pack("<III", 11, len(v), 0) + b"VMCOREINFO\0\0"
                                       + v for v in [(SEEDS / "vmcoreinfo.txt").read_bytes()]],
           lambda d: [(0, 4), (4, 4), (8, 4), (22, 1)], lambda d, _s: _note(d)),
    Parser("iomem", _seed_file("iomem.txt"), text_fields, lambda d, _s: _iomem(d), text=True),
    Parser("kallsyms", _seed_file("kallsyms.txt"), text_fields, lambda d, _s: _kallsyms(d),
           text=True),
    Parser("symbols", lambda: [_symbols_seed()], elf_fields, _symbols),
    Parser("pagetables", lambda: [_pagetable_seed()],
           lambda d: [(i, 8) for i in range(0, len(d), 8)], lambda d, _s: _pagetables(d)),
)}


def crash_inputs(name: str) -> list[Path]:
    """The kept inputs that once broke a parser (replayed as regression tests)."""
    folder = CRASHES / name
    return sorted(folder.iterdir()) if folder.is_dir() else []


def keep_crash(name: str, data: bytes) -> Path:
    """Save an input that broke a parser under tests/data/fuzz/crashes/NAME/."""
    import hashlib

    folder = CRASHES / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / hashlib.sha256(data).hexdigest()[:16]
    path.write_bytes(data)
    return path


# ---- the long run -----------------------------------------------------------------------------


def long_run(name: str, count: int, seconds: float, seed: int) -> dict[str, object]:
    """Fuzz one parser for count executions (or seconds); report what happened."""
    parser = PARSERS[name]
    seeds = parser.seeds()
    if not seeds:
        return {"parser": name, "skipped": "no seeds here (fixtures missing)"}
    rnd = random.Random(seed)
    scratch = Scratch()
    failures, slowest, done = [], (0.0, b""), 0
    start = time.monotonic()
    stop: list[int] = []  # SIGTERM or SIGINT: stop after this input and report what was done
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    try:
        while done < count and time.monotonic() - start < seconds and not stop:
            data = seeds[done % len(seeds)] if done < len(seeds) else \
                parser.mutate(rnd.choice(seeds), rnd)
            t0 = time.monotonic()
            try:
                parser.run(data, scratch)
            except Exception:  # noqa: BLE001 - a bug: keep the input
                failures.append((keep_crash(name, data), traceback.format_exc(limit=3)))
            took = time.monotonic() - t0
            if took > slowest[0]:
                slowest = (took, data)
            done += 1
    finally:
        scratch.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    if slowest[0] > 10:
        keep_crash(name + "-slow", slowest[1])
    return {"parser": name, "executions": done, "failures": len(failures),
            "first_failure": failures[0][1] if failures else None,
            "slowest_s": round(slowest[0], 3), "peak_rss_mib": rss,
            "seconds": round(time.monotonic() - start, 1)}


def main(argv: list[str]) -> int:
    """Fuzz the named parsers (all by default) at length; print one JSON line each."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parsers", nargs="*", default=list(PARSERS))
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=3600)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    bad = 0
    for name in args.parsers:
        result = long_run(name, args.count, args.seconds, args.seed)
        print(json.dumps(result), flush=True)
        bad += bool(result.get("failures"))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
