"""The symbol files a dump keeps (kcore.symbols), on the real-kernel captures: what is kept is
the captured kernel's own files, where each format keeps it, what reads it back (pyelftools,
drgn, `kcore verify`), and hostile notes and sidecars (one line, exit 2).

The captures have no BTF (their roots hold no sys/kernel/btf): the ISF built from a real BTF
is checked in QEMU guests (tests/vm/test_vm_symbols.py)."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pytest

from kcore import symbols
from kcore.wire.elf import KCORE_NAME, NT_KCORE_FILE, note
from tests.helpers import FIXTURE_NAMES, fixture_memory, run_kcore, scratch_dir, shared_fixture

NOKASLR, KASLR = FIXTURE_NAMES
TEXT_LINK_ADDRESS = 0xFFFFFFFF81000000  # x86-64's _text before KASLR (CONFIG_PHYSICAL_START)


def root(name: str) -> Path:
    """A capture's root folder."""
    return shared_fixture(name) / "root"


def spec(name: str) -> str:
    """A capture's memory as a --source."""
    mem = fixture_memory(name)
    return f"raw:{mem}" if name == NOKASLR else f"elf:{mem}"


@pytest.fixture(scope="module")
def dumps(request: pytest.FixtureRequest) -> dict[str, Path]:
    """The KASLR capture dumped as elf, lime and kdump (symbols kept), and elf --no-symbols."""
    d = scratch_dir(request, "symbols")
    out = {}
    for fmt, extra in (("elf", ()), ("lime", ()), ("kdump", ()), ("bare", ("--no-symbols",))):
        path = d / f"mem.{fmt}"
        r = run_kcore("dump", "-q", "--no-digest", "--root", str(root(KASLR)), "--source",
                      spec(KASLR), "--format", "elf" if fmt == "bare" else fmt, *extra,
                      "-o", str(path))
        assert r.returncode == 0, r.stderr.decode()
        out[fmt] = path
    return out


def test_elf_keeps_the_kernels_files_as_notes(dumps: dict[str, Path]) -> None:
    """pyelftools reads KCORE notes after the kernel's own (VMCOREINFO unchanged) whose files
    are byte for byte the captured kallsyms and modules; --no-symbols leaves none."""
    from elftools.elf.elffile import ELFFile

    with open(dumps["elf"], "rb") as f:
        notes = [n for s in ELFFile(f).iter_segments("PT_NOTE") for n in s.iter_notes()]
    names = [n["n_name"] for n in notes]
    assert names[:4] == ["CORE", "CORE", "CORE", "VMCOREINFO"]
    assert set(names[4:]) == {"KCORE"}
    kept = {}
    for n in notes[4:]:
        assert n["n_type"] == NT_KCORE_FILE
        path, _, packed = n["n_desc"].partition(b"\0")
        kept[path.decode()] = zlib.decompress(packed)
    assert kept["proc/kallsyms"] == (root(KASLR) / "proc/kallsyms").read_bytes()
    assert kept["proc/modules"] == (root(KASLR) / "proc/modules").read_bytes()
    with open(dumps["bare"], "rb") as f:
        bare = [n["n_name"] for s in ELFFile(f).iter_segments("PT_NOTE") for n in s.iter_notes()]
    assert bare == ["CORE", "CORE", "CORE", "VMCOREINFO"]
    assert not dumps["bare"].with_name("mem.bare.symbols").exists()


@pytest.mark.parametrize("fmt", ["elf", "lime", "kdump"])
def test_read_back_from_each_format(dumps: dict[str, Path], fmt: str) -> None:
    """read_dump finds the files in the ELF notes, the kdump sub header blocks (past
    size_note: readers skip them) and LiME's sidecar, with the dump's VMCOREINFO."""
    found = symbols.read_dump(str(dumps[fmt]))
    assert found is not None
    files, where = found
    assert where == str(dumps[fmt]) + (".symbols" if fmt == "lime" else "")
    assert files.get("proc/kallsyms") == (root(KASLR) / "proc/kallsyms").read_bytes()
    assert b"KERNELOFFSET=" in files.get("sys/kernel/vmcoreinfo")
    assert files.machine == 62
    assert files.btf is None  # the captures hold no BTF
    manifest = json.loads(Path(str(dumps[fmt]) + ".json").read_text())
    assert "sys/kernel/btf/vmlinux: not there" in manifest["symbols"]["missing"]
    assert symbols.read_dump(str(dumps["bare"])) is None


def test_link_time_addresses() -> None:
    """kallsyms minus VMCOREINFO's KERNELOFFSET puts the KASLR capture's _text back at its
    link address (and the nokaslr one stays there); per-CPU offsets below _text do not move."""
    from kcore import isf

    for name in FIXTURE_NAMES:
        notes = json.loads((shared_fixture(name) / "expected/kcore.json").read_text())["notes"]
        files = symbols.SymbolFiles({
            "proc/kallsyms": (root(name) / "proc/kallsyms").read_bytes(),
            "sys/kernel/vmcoreinfo": next(  # the real kcore's VMCOREINFO note
                n["text"] for n in notes if n["name"] == "VMCOREINFO").encode()})
        syms = isf.link_time_symbols(files)
        assert syms["_text"] == TEXT_LINK_ADDRESS, name
        assert syms["fixed_percpu_data"] == 0


def test_drgn_resolves_the_kept_kallsyms(dumps: dict[str, Path]) -> None:
    """`kcore drgn DUMP` on the elf dump: init_task at the captured kallsyms' address, an
    address inside it named by it, linux_banner read at its symbol."""
    pytest.importorskip("drgn", reason="drgn is not installed (kcore[drgn])")
    want = {}
    for line in (root(KASLR) / "proc/kallsyms").read_text().splitlines():
        addr, _t, name = line.split()[:3]
        want.setdefault(name, int(addr, 16))
    code = ("s = prog.symbol('init_task'); print(hex(s.address)); "
            "print(prog.symbol(s.address + 8).name); "
            "print(prog.read(prog.symbol('linux_banner').address, 14).decode())")
    r = run_kcore("drgn", "-q", str(dumps["elf"]), "--", "-e", code, text=True)
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert int(words[0], 16) == want["init_task"] and words[1] == "init_task"
    assert r.stdout.rstrip().endswith("Linux version")


def test_verify_reports_and_matches(dumps: dict[str, Path], tmp_path: Path) -> None:
    """verify says the LiME dump keeps symbols that match its kernel; a sidecar of the other
    capture (another boot's kallsyms) is a problem, exit 1."""
    r = run_kcore("verify", "--json", str(dumps["lime"]), text=True)
    assert r.returncode == 0, r.stderr
    sym = json.loads(r.stdout)["symbols"]
    assert sym["present"] and sym["match"] and sym["symbols_checked"] >= 5, sym
    assert sym["release"] is None or sym["release"] == "6.1.0-56-amd64"
    other = symbols.gather(root(NOKASLR))
    lime = tmp_path / "mem.lime"
    os.link(dumps["lime"], lime)
    sidecar = symbols.to_notes(other) + note(b"KCORE", NT_KCORE_FILE, b"sys/kernel/vmcoreinfo\0"
                                              + zlib.compress(symbols.read_dump(str(
                                                  dumps["lime"]))[0].files[
                                                  "sys/kernel/vmcoreinfo"]))
    _write_sidecar(lime, sidecar)
    r = run_kcore("verify", str(lime), text=True)
    assert r.returncode == 1
    assert "the kept kallsyms disagree with VMCOREINFO" in r.stderr.strip().splitlines()[-1]


def _write_sidecar(dump: Path, notes: bytes) -> None:
    from kcore.wire.elf import EHDR, PHDR, PT_NOTE, ehdr, phdr

    at = EHDR.size + PHDR.size
    Path(str(dump) + ".symbols").write_bytes(ehdr(62, 1) + phdr(PT_NOTE, 0, at, 0, 0,
                                                                len(notes), 0, 0) + notes)


@pytest.mark.parametrize("bad", [
    note(KCORE_NAME, NT_KCORE_FILE, b"../../etc/passwd\0" + zlib.compress(b"x")),
    note(KCORE_NAME, NT_KCORE_FILE, b"proc/kallsyms\0" + b"not zlib at all"),
    note(KCORE_NAME, NT_KCORE_FILE, b"proc/kallsyms\0" + zlib.compress(b"x" * 100000)[:50]),
    note(KCORE_NAME, NT_KCORE_FILE, b"no-nul"),
])
def test_hostile_sidecars(bad: bytes, tmp_path: Path) -> None:
    """A sidecar whose KCORE note has a path out of the root, no zlib stream, a cut one or
    no path: `kcore symbols` and `kcore verify` say so in one line; symbols exits 2."""
    dump = tmp_path / "mem.lime"
    dump.write_bytes(b"")
    _write_sidecar(dump, bad)
    r = run_kcore("symbols", str(dump), "-o", str(tmp_path / "out"), text=True)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "KCORE note" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_symbols_without_btf_says_so(dumps: dict[str, Path], tmp_path: Path) -> None:
    """`kcore symbols` on a dump whose kernel had no BTF kept: one line naming it, exit 2;
    on a dump with none kept: one line saying so."""
    r = run_kcore("symbols", str(dumps["elf"]), "-o", str(tmp_path), text=True)
    assert r.returncode == 2
    assert "no sys/kernel/btf/vmlinux" in r.stderr and len(r.stderr.splitlines()) == 1
    r = run_kcore("symbols", str(dumps["bare"]), "-o", str(tmp_path), text=True)
    assert r.returncode == 2
    assert "no symbol files kept" in r.stderr and len(r.stderr.splitlines()) == 1


def test_live_root_files_read() -> None:
    """This machine's own sysctl files read through read_root (a read of 4 MiB or more of a
    sysctl file fails with ENOMEM), and gather() takes uname's line from them."""
    from kcore.rootfiles import read_root

    release = os.uname().release
    assert read_root(Path("/"), "proc/sys/kernel/osrelease") == f"{release}\n".encode()
    files = symbols.gather("/")
    assert files.text("uname").split()[2] == release
