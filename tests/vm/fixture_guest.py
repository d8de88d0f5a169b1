"""Run in the guest: capture one real-kernel fixture in the layout of ../shared/fixtures/<name>/.

Usage: fixture_guest.py OUTDIR.  Writes OUTDIR/root/ (the /proc and /sys files kcore reads, with
real pointers) and OUTDIR/expected/ (what the real /proc/kcore gives: its first 64 KiB, its program
headers and notes as kcore.json and kcore-phdrs.txt, 2 MiB of kernel text, the whole first RAM
segment and 8 MiB at the direct map of physical 16 MiB).  The host takes memory/ once this
returns.  Standard library only (the guest runs the host's Python over 9p).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys

from tests.vm.guest_capture import copy_root, parse_kcore, pread_all, real_pointers

KCORE = "/proc/kcore"
# The files of a shared fixture's root/ (the shared captures have exactly these).
ROOT_FILES = (
    "proc/iomem", "proc/kallsyms", "proc/cmdline", "proc/meminfo", "proc/modules",
    "proc/vmallocinfo", "proc/sys/kernel/osrelease", "proc/sys/kernel/arch",
    "sys/kernel/vmcoreinfo", "proc/1/comm",
)
ALL_ONES = (1 << 64) - 1
START_KERNEL_MAP = 0xFFFFFFFF80000000
MiB = 1 << 20
EHDR_FIELDS = ("e_ident", "e_type", "e_machine", "e_version", "e_entry", "e_phoff", "e_shoff",
               "e_flags", "e_ehsize", "e_phentsize", "e_phnum", "e_shentsize", "e_shnum",
               "e_shstrndx")
PHDR_FIELDS = ("p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr", "p_filesz", "p_memsz",
               "p_align")
BASES = ("page_offset_base", "vmalloc_base", "vmemmap_base", "phys_base")


def header(fd: int) -> tuple[dict, list[dict], list[dict]]:
    """The ELF header, program headers (with the kclist kind) and notes of the open kcore."""
    values = struct.unpack("<16sHHIQQQIHHHHHH", pread_all(fd, 0, 64))
    ehdr = dict(zip(EHDR_FIELDS, values, strict=True))
    ehdr["e_ident"] = ehdr["e_ident"].hex()
    ehdr["e_entry"] = hex(ehdr["e_entry"])
    parsed = parse_kcore(fd)  # program headers, and notes with their descriptors in hex
    phdrs: list[dict] = []
    for p in parsed["phdrs"]:
        p = {"p_type": p["p_type"], "type": {1: "PT_LOAD", 4: "PT_NOTE"}.get(p["p_type"], "?"),
             **{k: p[k] for k in PHDR_FIELDS[1:]}}
        if p["p_type"] == 1:
            if p["p_paddr"] != ALL_ONES:
                p["kind"] = "KCORE_TEXT" if p["p_vaddr"] >= START_KERNEL_MAP else "KCORE_RAM"
            elif phdrs and phdrs[-1].get("kind") == "KCORE_RAM":
                p["kind"] = "KCORE_VMEMMAP"  # fs/proc/kcore.c adds one after each RAM entry
            elif p["p_vaddr"] >= START_KERNEL_MAP:
                p["kind"] = "KCORE_VMALLOC(modules area)"
            else:
                p["kind"] = "KCORE_VMALLOC(vmalloc area)"
        phdrs.append(p)
    notes = []
    for n in parsed["notes"]:
        desc = bytes.fromhex(n["desc"])
        note = dict(name=n["name"], namesz=len(n["name"]) + 1, type=n["type"],
                    descsz=n["descsz"], desc_sha256=hashlib.sha256(desc).hexdigest())
        if n["name"] == "CORE" and n["type"] == 3:  # elf_prpsinfo: pr_fname at 40, psargs at 56
            note["pr_fname"] = desc[40:56].split(b"\0")[0].decode(errors="replace")
            note["pr_psargs"] = desc[56:136].split(b"\0")[0].decode(errors="replace")
        if n["name"] == "VMCOREINFO":
            note["text"] = desc.split(b"\0")[0].decode(errors="replace")
        notes.append(note)
    return ehdr, phdrs, notes


def kallsyms(names: tuple[str, ...]) -> dict[str, int]:
    """The addresses of names in /proc/kallsyms (read with real pointers)."""
    out = {}
    with real_pointers(), open("/proc/kallsyms") as f:
        for line in f:
            addr, _kind, name = line.split()[:3]
            if name in names and name not in out:
                out[name] = int(addr, 16)
    return out


def offset_of(phdrs: list[dict], vaddr: int) -> int:
    """The kcore file offset of a kernel virtual address (through its PT_LOAD)."""
    for p in phdrs:
        if p["p_type"] == 1 and p["p_vaddr"] <= vaddr < p["p_vaddr"] + p["p_memsz"]:
            return p["p_offset"] + vaddr - p["p_vaddr"]
    raise SystemExit(f"no PT_LOAD holds {vaddr:#x}")


def main() -> None:
    """Capture into sys.argv[1]."""
    out = sys.argv[1]
    expected = os.path.join(out, "expected")
    os.makedirs(expected, exist_ok=True)
    copy_root(out, ROOT_FILES, memory_blocks=False)
    fd = os.open(KCORE, os.O_RDONLY)
    st_size = os.fstat(fd).st_size
    ehdr, phdrs, notes = header(fd)
    loads = [p for p in phdrs if p["p_type"] == 1]
    syms = kallsyms(BASES)
    values = {name: hex(struct.unpack("<Q", pread_all(fd, offset_of(phdrs, syms[name]), 8))[0])
              for name in BASES}
    with open(os.path.join(expected, "kcore-head-64k.bin"), "wb") as f:
        f.write(pread_all(fd, 0, 64 << 10))
    text = next(p for p in loads if p["kind"] == "KCORE_TEXT")
    ram = [p for p in loads if p["kind"] == "KCORE_RAM"]
    ram16 = next(p for p in ram if p["p_paddr"] <= 16 * MiB < p["p_paddr"] + p["p_filesz"])
    # (file, segment, offset in it, length); text last, closest to the host's pause
    plan = [("kcore-ram0.bin", ram[0], 0, ram[0]["p_filesz"]),
            ("kcore-ram-16M-8M.bin", ram16, 16 * MiB - ram16["p_paddr"], 8 * MiB),
            ("kcore-text-2M.bin", text, 0, 2 * MiB)]
    reads = []
    for name, seg, at, length in plan:
        data = pread_all(fd, seg["p_offset"] + at, length)
        with open(os.path.join(expected, name), "wb") as f:
            f.write(data)
        reads.append(dict(file=name, kcore_offset=seg["p_offset"] + at, vaddr=seg["p_vaddr"] + at,
                          paddr=seg["p_paddr"] + at, length=length,
                          sha256=hashlib.sha256(data).hexdigest(), segment_kind=seg["kind"]))
    os.close(fd)
    reads.insert(0, reads.pop())  # listed as the shared fixtures list them: text first
    info = dict(kcore_st_size=st_size, data_offset=min(p["p_offset"] for p in loads), ehdr=ehdr,
                phdrs=phdrs, notes=notes, values_read_through_kcore=values, reads=reads)
    with open(os.path.join(expected, "kcore.json"), "w") as f:
        json.dump(info, f, indent=1)
    lines = [f"st_size={st_size:#x}  e_machine={ehdr['e_machine']}  e_type={ehdr['e_type']}  "
             f"e_phnum={ehdr['e_phnum']}  e_phoff={ehdr['e_phoff']}  "
             f"data_offset(min PT_LOAD p_offset)={info['data_offset']:#x}",
             f"{'type':<8} {'kind':<28} " + " ".join(f"{k:>18}" for k in PHDR_FIELDS[2:7])
             + " flags align"]
    for p in phdrs:
        lines.append(f"{p['type']:<8} {p.get('kind', ''):<28} "
                     + " ".join(f"{p[k]:>#18x}" for k in PHDR_FIELDS[2:7])
                     + f" {p['p_flags']:>6} {p['p_align']:#x}")
    lines += ["", "notes:"] + [f"  name='{n['name']}' namesz={n['namesz']} type={n['type']} "
                               f"descsz={n['descsz']}" for n in notes]
    with open(os.path.join(expected, "kcore-phdrs.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
