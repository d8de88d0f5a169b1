"""kcore.wire.elf against real ELF cores: the /proc/kcore headers of Linux 6.1 (x86-64) and
6.1/6.12 (arm64) kernels, and QEMU's dump-guest-memory core.

Each layout of the module is checked byte for byte against what a kernel or QEMU wrote: the
ELF header and program headers repacked from their fields, the notes split and repacked, the
prpsinfo note rebuilt from the kernel command line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from kcore.errors import ElfFormatError
from kcore.wire import elf
from tests.helpers import DATA, FIXTURE_NAMES, fixture_memory, shared_fixture

ARM64 = ("arm64-6.1", "arm64-6.12", "arm64-6.12-48")
NOKASLR, KASLR = FIXTURE_NAMES


class RealHeader:
    """A real /proc/kcore's first bytes and its description (the capture's kcore.json)."""

    def __init__(self, name: str) -> None:
        if name in ARM64:
            self.head = (DATA / name / "kcore-head.bin").read_bytes()
            meta = json.loads((DATA / name / "kcore.json").read_text())
            self.phnum = meta["e_phnum"]
            self.machine = meta["e_machine"]
            self.descs = {(n["name"], n["type"]): hashlib.sha256(bytes.fromhex(n["desc"]))
                          .hexdigest() for n in meta["notes"]}
        else:
            folder = shared_fixture(name)
            self.head = (folder / "expected/kcore-head-64k.bin").read_bytes()
            meta = json.loads((folder / "expected/kcore.json").read_text())
            self.phnum = meta["ehdr"]["e_phnum"]
            self.machine = meta["ehdr"]["e_machine"]
            self.descs = {(n["name"], n["type"]): n["desc_sha256"] for n in meta["notes"]}
            self.psargs = next(n["pr_psargs"] for n in meta["notes"] if "pr_psargs" in n)
            self.cmdline = (folder / "root/proc/cmdline").read_text().rstrip("\n")
        self.meta = meta
        self.phdrs = meta["phdrs"]
        self.note_phdr = next(p for p in self.phdrs if p["p_type"] == elf.PT_NOTE)
        at = self.note_phdr["p_offset"]
        self.note_bytes = self.head[at:at + self.note_phdr["p_filesz"]]


@pytest.fixture(scope="module", params=[*FIXTURE_NAMES, *ARM64])
def real(request: pytest.FixtureRequest) -> RealHeader:
    """Each real kcore header: the two x86-64 captures and the three arm64 ones."""
    return RealHeader(request.param)


def test_ehdr_is_the_kernels_elf_header(real: RealHeader) -> None:
    """ehdr(machine, phnum) is the kernel's Elf64_Ehdr byte for byte."""
    assert elf.ehdr(real.machine, real.phnum) == real.head[:elf.EHDR.size]
    fields = elf.EHDR.unpack_from(real.head)
    assert fields[0] == elf.E_IDENT and fields[1] == elf.ET_CORE


def test_phdr_packs_each_program_header(real: RealHeader) -> None:
    """phdr(...) of each program header's fields is the kernel's bytes; PHDR unpacks them back."""
    for i, p in enumerate(real.phdrs):
        at = elf.EHDR.size + i * elf.PHDR.size
        want = real.head[at:at + elf.PHDR.size]
        fields = [p[k] for k in ("p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr",
                                 "p_filesz", "p_memsz", "p_align")]
        assert elf.phdr(*fields) == want
        assert list(elf.PHDR.unpack(want)) == fields
        assert p["p_type"] != elf.PT_LOAD or p["p_flags"] == elf.PF_RWX


def test_parse_notes_reads_the_kernels_notes(real: RealHeader) -> None:
    """The four notes, in the kernel's order, each descriptor exactly (by its SHA-256; the
    reading task's own task_struct by its size: each read of kcore gets its reader's)."""
    notes = elf.parse_notes(real.note_bytes, real.note_phdr["p_offset"], "kcore")
    assert [(n, t) for n, t, _ in notes] == [
        (elf.CORE_NAME, elf.NT_PRSTATUS), (elf.CORE_NAME, elf.NT_PRPSINFO),
        (elf.CORE_NAME, elf.NT_TASKSTRUCT), (elf.VMCOREINFO_NAME, 0)]
    for name, ntype, desc in notes:
        if ntype != elf.NT_TASKSTRUCT:
            assert hashlib.sha256(desc).hexdigest() == real.descs[(name.decode(), ntype)]
    sizes = {(n["name"], n["type"]): n["descsz"] for n in real.meta["notes"]}
    assert len(notes[2][2]) == sizes[("CORE", elf.NT_TASKSTRUCT)]
    arch = "x86_64" if real.machine == elf.EM_BY_ARCH["x86_64"] else "aarch64"
    assert len(notes[0][2]) == elf.PRSTATUS_SIZE[arch]
    assert len(notes[1][2]) == elf.PRPSINFO.size
    core = elf.ElfCore(real.machine, elf.EHDR.size, [], notes, len(real.head))
    assert elf.vmcoreinfo_of(core) == notes[3][2]
    assert elf.find_note(core, elf.CORE_NAME, elf.NT_TASKSTRUCT) == notes[2][2]
    assert elf.find_note(core, b"QEMU") is None


def test_note_repacks_the_kernels_notes(real: RealHeader) -> None:
    """note() of each (name, type, desc) rebuilds the PT_NOTE's bytes; note_size() their sizes."""
    notes = elf.parse_notes(real.note_bytes, 0, "kcore")
    packed = b"".join(elf.note(name, ntype, desc) for name, ntype, desc in notes)
    assert packed == real.note_bytes
    assert sum(elf.note_size(n, len(d)) for n, _t, d in notes) == len(real.note_bytes)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_prpsinfo_is_rebuilt_from_the_command_line(name: str) -> None:
    """The kernel's prpsinfo: pr_sname 'R', pr_fname "vmlinux", /proc/cmdline strscpy'd."""
    real = RealHeader(name)
    desc = elf.parse_notes(real.note_bytes, 0, "kcore")[1][2]
    assert elf.prpsinfo_psargs(desc).decode() == real.psargs
    psargs = real.cmdline.encode()[:elf.ELF_PRARGSZ - 1]  # strscpy: NUL within 80 bytes
    assert elf.pack_prpsinfo("R", b"vmlinux", psargs) == desc


def test_truncated_notes_name_the_offset(real: RealHeader) -> None:
    """A PT_NOTE cut inside the VMCOREINFO note, and a name without its NUL, are errors that
    say where."""
    notes = elf.parse_notes(real.note_bytes, 0, "kcore")
    last = len(real.note_bytes) - elf.note_size(b"VMCOREINFO", len(notes[3][2]))
    base = real.note_phdr["p_offset"]
    with pytest.raises(ElfFormatError, match=f"kcore: truncated note at offset {base + last:#x}"):
        elf.parse_notes(real.note_bytes[:-8], base, "kcore")
    bad = bytearray(real.note_bytes)
    bad[elf.NHDR.size + 4] = ord("!")  # "CORE\0" -> "CORE!"
    with pytest.raises(ElfFormatError, match=f"at offset {base:#x} has no NUL"):
        elf.parse_notes(bytes(bad), base, "kcore")


def test_machines_are_pyelftools_numbers() -> None:
    """EM_BY_ARCH holds the ELF machine numbers pyelftools knows by name."""
    from elftools.elf.enums import ENUM_E_MACHINE

    assert elf.EM_BY_ARCH["x86_64"] == ENUM_E_MACHINE["EM_X86_64"]
    assert elf.EM_BY_ARCH["aarch64"] == elf.EM_BY_ARCH["arm64"] == ENUM_E_MACHINE["EM_AARCH64"]
    assert elf.EM_BY_ARCH["riscv64"] == ENUM_E_MACHINE["EM_RISCV"]
    assert elf.EM_BY_ARCH["s390x"] == ENUM_E_MACHINE["EM_S390"]


def test_qemu_core_notes_and_headers() -> None:
    """QEMU's dump-guest-memory core: its notes split with parse_notes (CORE prstatus of
    336 bytes, QEMU's CPU state, the guest's VMCOREINFO), its PT_LOADs read with PHDR as
    pyelftools reads them."""
    path: Path = fixture_memory(KASLR)
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        ref = ELFFile(f)
        segs = [s.header for s in ref.iter_segments()]
    e = elf.EHDR.unpack_from(head)
    assert e[0][:4] == elf.ELF_MAGIC and e[2] == elf.EM_BY_ARCH["x86_64"] and e[10] == len(segs)
    for i, seg in enumerate(segs):
        fields = elf.PHDR.unpack_from(head, e[5] + i * elf.PHDR.size)
        assert fields == (seg["p_type"] if isinstance(seg["p_type"], int) else
                          {"PT_LOAD": 1, "PT_NOTE": 4}[seg["p_type"]], seg["p_flags"],
                          seg["p_offset"], seg["p_vaddr"], seg["p_paddr"], seg["p_filesz"],
                          seg["p_memsz"], seg["p_align"])
    note = next(s for s in segs if s["p_type"] == "PT_NOTE")
    with open(path, "rb") as f:
        f.seek(note["p_offset"])
        data = f.read(note["p_filesz"])
    notes = elf.parse_notes(data, note["p_offset"], str(path))
    names = [(n, t) for n, t, _ in notes]
    assert (elf.CORE_NAME, elf.NT_PRSTATUS) in names and (elf.VMCOREINFO_NAME, 0) in names
    assert any(n == b"QEMU" for n, _ in names)
    prstatus = next(d for n, t, d in notes if (n, t) == (elf.CORE_NAME, elf.NT_PRSTATUS))
    assert len(prstatus) == elf.PRSTATUS_SIZE["x86_64"]
    core = elf.ElfCore(e[2], e[5], [], notes, path.stat().st_size)
    info = elf.vmcoreinfo_of(core)
    assert info is not None
    release = (shared_fixture(KASLR) / "root/proc/sys/kernel/osrelease").read_text().strip()
    assert info.startswith(f"OSRELEASE={release}\n".encode())
