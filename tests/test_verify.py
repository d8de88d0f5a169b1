"""`kcore verify` on dumps of the real-kernel captures: clean, then damaged in each place.

The clean verdicts are held against the captures themselves (the kernel's VMCOREINFO, the zero
pages of the RAM the real /proc/kcore showed), Volatility's own ELF layer judges the rewritten
core, and fuzzed files must give one line and exit 1 or 2.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from kcore.cli import main
from tests.helpers import FIXTURE_NAMES, fixture_memory, run_kcore, scratch_dir, shared_fixture

NOKASLR, KASLR = FIXTURE_NAMES
CHUNK = 64 << 20
PAGE = 4096
PHDR = struct.Struct("<IIQQQQQQ")
START_KERNEL_MAP = 0xFFFFFFFF80000000
FORMATS = ("elf", "lime", "raw", "padded", "kcore", "kdump", "avml")


def _dump_dir(request: pytest.FixtureRequest, fmt: str) -> Path:
    if fmt != "kcore":
        return scratch_dir(request, fmt)
    # the kcore image is a 128 TiB sparse file: tmpfs holds it, ext4 does not
    shm = Path("/dev/shm")
    if not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm for the 128 TiB sparse kcore image")
    d = shm / f"kcore-verify-test-{os.getpid()}-{fmt}"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="module", params=[(n, f) for n in FIXTURE_NAMES for f in FORMATS],
                ids=lambda p: f"{p[0].split('-')[3]}-{p[1]}")
def dumped(request: pytest.FixtureRequest):
    """A dump of a capture in a format, with its .sha256 and manifest."""
    name, fmt = request.param
    mem = fixture_memory(name)
    spec = f"raw:{mem}" if name == NOKASLR else f"elf:{mem}"
    d = _dump_dir(request, fmt)
    out = d / f"mem.{fmt}"
    r = run_kcore("dump", "-q", "--root", str(shared_fixture(name) / "root"), "--source", spec,
                  "--format", fmt, "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    yield name, fmt, out
    if fmt == "kcore":
        shutil.rmtree(d, ignore_errors=True)


def verify(path: Path, capsys: pytest.CaptureFixture) -> tuple[int, dict, str]:
    """Run `kcore verify --json` in this process: exit status, findings, stderr."""
    capsys.readouterr()
    rc = main(["verify", "--json", str(path)])
    cap = capsys.readouterr()
    return rc, json.loads(cap.out) if cap.out else {}, cap.err


def real_ram(name: str) -> list[tuple[int, int]]:
    """(paddr, size) of the RAM segments the capture's real /proc/kcore showed."""
    kc = json.loads((shared_fixture(name) / "expected" / "kcore.json").read_text())
    return [(p["p_paddr"], p["p_filesz"]) for p in kc["phdrs"]
            if p["p_type"] == 1 and p["p_paddr"] != (1 << 64) - 1
            and p["p_vaddr"] < START_KERNEL_MAP]


def test_clean(dumped, capsys) -> None:
    """Intact dumps: structure, digests and ranges check out; facts match the real kernel."""
    name, fmt, path = dumped
    rc, res, err = verify(path, capsys)
    assert rc == 0, (err, res["problems"])
    assert res["format"] == fmt and res["ok"]
    ram = real_ram(name)
    assert res["ranges"]["memory_bytes"] == sum(n for _p, n in ram)
    if fmt != "kcore":
        assert res["digest"] == {f"{path.name}.sha256": "match", "the manifest": "match"}
        assert res["chunks"]["count"] == -(-path.stat().st_size // CHUNK)
        assert not res["chunks"]["differ"]
    if fmt in ("elf", "lime"):
        assert res["ranges"]["manifest"] == "match"
    if fmt in ("elf", "kcore", "kdump"):
        release = (shared_fixture(name) / "root/proc/sys/kernel/osrelease").read_text().strip()
        assert res["vmcoreinfo"]["osrelease"] == release
        assert all(c["ok"] for k, c in res["consumers"].items() if k != "volatility"
                   or fmt == "elf")
    if name == NOKASLR:
        # The zero pages of the RAM the kernel showed, counted in the captured RAM itself.
        mem = fixture_memory(name).read_bytes()
        zero_page = bytes(PAGE)
        zero = sum(mem[a:a + PAGE] == zero_page for p, n in ram for a in range(p, p + n, PAGE))
        assert res["pages"]["memory"] == sum(n for _p, n in ram) // PAGE
        assert res["pages"]["zero"] == zero
        assert res["pages"]["unreadable"] == 0


def _flip(path: Path, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ 0x20]), offset)
    finally:
        os.close(fd)


def _places(fmt: str, path: Path) -> dict[str, int]:
    """File offsets of a data byte, a header byte, a note byte and a last-page byte."""
    data = path.read_bytes()[:1 << 20] if fmt != "kcore" else open(path, "rb").read(1 << 20)
    manifest = json.loads(Path(f"{path}.json").read_text())
    size = path.stat().st_size
    biggest = max((r for r in manifest["ranges"] if r.get("kind") == "ram"),
                  key=lambda r: r["size"], default=None)
    places = {"last page": size - 2000}
    if fmt == "kdump":
        places["header"] = 12 + 65 + 3  # disk_dump_header's utsname
        places["note"] = data.index(b"OSRELEASE=") + len("OSRELEASE=") + 1
        places["data"] = size // 2
    if fmt == "avml":
        places["header"] = 8 + 1  # the first block header's start
        places["data"] = size // 2
    if fmt in ("elf", "kcore"):
        phoff = struct.unpack_from("<Q", data, 32)[0]
        places["header"] = phoff + PHDR.size + 16 + 3  # the 2nd program header's p_vaddr
        places["note"] = data.index(b"OSRELEASE=") + len("OSRELEASE=") + 1
    if fmt == "lime":
        places["header"] = 8 + 2  # the first range header's s_addr
    if biggest is not None and fmt not in ("kdump", "avml"):
        places["data"] = int(biggest["offset"]) + biggest["size"] // 2 + 123
    return places


def test_damage_is_found(dumped, capsys) -> None:
    """One byte flipped in the data, a header, a note, the last page; then truncated."""
    name, fmt, path = dumped
    for what, offset in _places(fmt, path).items():
        _flip(path, offset)
        try:
            rc, res, err = verify(path, capsys)
        finally:
            _flip(path, offset)
        assert rc == 1, (what, res)
        assert len(err.strip().splitlines()) == 1 and "is damaged" in err
        located = [p for p in res["problems"] if p["offset"] is not None
                   and int(p["offset"], 16) <= offset < int(p["offset"], 16) + CHUNK]
        assert located, (what, offset, res["problems"])
    assert verify(path, capsys)[0] == 0  # restored
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(size - 3 * PAGE - 5)
        tail_was_zeros = not any(f.read())
    os.truncate(path, size - 3 * PAGE - 5)
    rc, res, err = verify(path, capsys)
    assert rc == 1
    assert any(p["offset"] is not None and int(p["offset"], 16) <= size - 3 * PAGE
               for p in res["problems"]), res["problems"]
    assert "is damaged" in err
    os.truncate(path, size)  # the sparse tail reads as zeros: found (digest, chunks) unless
    # the memory there was zeros already (the kcore image's last page is a hole; a capture's
    # last RAM pages may be free)
    assert verify(path, capsys)[0] == (0 if tail_was_zeros else 1)


def test_volatility_rule(tmp_path: Path, capsys) -> None:
    """A compact ELF whose PT_LOAD has p_filesz < p_memsz: verify names Volatility's rule, and
    Volatility's own ELF layer indeed leaves that memory out."""
    mem = fixture_memory(KASLR)
    out = tmp_path / "mem.elf"
    r = run_kcore("dump", "-q", "--no-digest", "--root", str(shared_fixture(KASLR) / "root"),
                  "--source", f"elf:{mem}", "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    data = bytearray(out.read_bytes()[:1 << 16])
    phoff, = struct.unpack_from("<Q", data, 32)
    phnum, = struct.unpack_from("<H", data, 56)
    i, ph = next((i, PHDR.unpack_from(data, phoff + i * PHDR.size)) for i in range(phnum)
                 if PHDR.unpack_from(data, phoff + i * PHDR.size)[0] == 1
                 and PHDR.unpack_from(data, phoff + i * PHDR.size)[5] > 2 * PAGE
                 and PHDR.unpack_from(data, phoff + i * PHDR.size)[3] < START_KERNEL_MAP)
    paddr, filesz = ph[4], ph[5]
    with open(out, "r+b") as f:
        f.seek(phoff + i * PHDR.size + 32)
        f.write(struct.pack("<Q", filesz - PAGE))
    rc, res, _err = verify(out, capsys)
    vol = res["consumers"]["volatility"]
    assert not vol["ok"] and "p_filesz == p_memsz" in vol["why"]
    assert f"{filesz - PAGE:#x} < {filesz:#x}" in vol["why"]

    from volatility3.framework import contexts
    from volatility3.framework.layers import elf, physical

    ctx = contexts.Context()
    ctx.config["base.location"] = out.as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    ctx.config["elf.base_layer"] = "base"
    layer = elf.Elf64Layer(ctx, "elf", "elf")
    assert not layer.is_valid(paddr + PAGE)  # that load's memory is gone to Volatility


def test_live_smear_is_counted_not_damage(tmp_path: Path, capsys) -> None:
    """The text load read at another moment than the RAM loads (a live kernel): pages where
    the two copies differ are smear in verify's findings, and the ELF source reads RAM's copy
    (the capture's memory) and converts the dump."""
    from kcore.sources import open_source

    mem = fixture_memory(KASLR)
    root = str(shared_fixture(KASLR) / "root")
    out = tmp_path / "live.elf"
    r = run_kcore("dump", "-q", "--no-digest", "--root", root, "--source", f"elf:{mem}",
                  "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    head = out.read_bytes()[:1 << 16]
    phoff, = struct.unpack_from("<Q", head, 32)
    phnum, = struct.unpack_from("<H", head, 56)
    texts = [ph for ph in (PHDR.unpack_from(head, phoff + i * PHDR.size) for i in range(phnum))
             if ph[0] == 1 and ph[3] >= START_KERNEL_MAP and ph[5]]  # split at zero runs
    offset, paddr, filesz = texts[0][2], texts[0][4], texts[0][5]
    changed = [paddr + k * PAGE for k in (1, 7, filesz // PAGE - 1)]
    for at in changed:
        _flip(out, offset + at - paddr + 100)  # a kernel variable written between the reads
    rc, res, err = verify(out, capsys)
    assert rc == 0 and res["ok"], (err, res["problems"])
    assert res["smear"] == {"overlap_pages": sum(ph[5] for ph in texts) // PAGE, "pages": 3,
                            "first": [hex(a) for a in changed]}
    assert main(["verify", str(out)]) == 0
    assert "smear       3 of the" in capsys.readouterr().out
    with open_source(f"elf:{out}") as dump, open_source(f"elf:{mem}") as real:
        assert dump.smear.pages == 3
        for at in changed:
            assert dump.read_phys(at, PAGE)[0] == real.read_phys(at, PAGE)[0]
    r = run_kcore("dump", "-q", "--no-digest", "--root", root, "--source", f"elf:{out}",
                  "--format", "lime", "-o", str(tmp_path / "again.lime"))
    assert r.returncode == 0, r.stderr.decode()


# ---- hostile input -------------------------------------------------------------------------

def _tiny_elf() -> bytes:
    """A small valid ELF core: a VMCOREINFO note and one 2-page PT_LOAD."""
    desc = b"OSRELEASE=6.1.0\nPAGESIZE=4096\nKERNELOFFSET=0\nNUMBER(phys_base)=0\n"
    note = struct.pack("<III", 11, len(desc), 0) + b"VMCOREINFO\0\0" + desc
    note += bytes(-len(note) % 4)
    phoff, notes_at, data_at = 64, 64 + 2 * 56, 4096
    eh = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 4, 62, 1, 0,
                     phoff, 0, 0, 64, 56, 2, 0, 0, 0)
    ph = PHDR.pack(4, 0, notes_at, 0, 0, len(note), len(note), 0)
    ph += PHDR.pack(1, 7, data_at, 0xFFFF888000100000, 0x100000, 2 * PAGE, 2 * PAGE, 0)
    head = eh + ph + note
    return head + bytes(data_at - len(head)) + b"\x5a" * PAGE + bytes(PAGE)


def _tiny_lime() -> bytes:
    return struct.pack("<IIQQ8s", 0x4C694D45, 1, 0x1000, 0x2FFF, bytes(8)) + b"\x11" * 8192


SEEDS = {"elf": _tiny_elf(), "lime": _tiny_lime(),
         "avml": struct.pack("<IIQQQ", 0x4C4D5641, 2, 0, 0x1000, 0) + b"\xff\x06\0\0sNaPpY",
         "flat": b"makedumpfile".ljust(16, b"\0") + struct.pack(">qq", 1, 1).ljust(4080, b"\0")
         + struct.pack(">qq", 0, 4) + b"abcd" + struct.pack(">qq", -1, -1),
         "kdump": b"KDUMP   " + bytes(100)}


def test_tiny_seeds_are_clean(tmp_path: Path, capsys) -> None:
    """The fuzzer's seeds themselves verify (so mutations start from valid files)."""
    for name in ("elf", "lime", "flat"):
        p = tmp_path / name
        p.write_bytes(SEEDS[name])
        rc, res, err = verify(p, capsys)
        assert rc == 0, (name, res, err)


@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_fuzzed_inputs(seed: str, tmp_path: Path, capsys) -> None:
    """Mutated and truncated files: one line on stderr, exit 1 or 2, never a traceback."""
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")
    path = tmp_path / "fuzz.bin"
    base = SEEDS[seed]

    @hypothesis.settings(max_examples=60, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)),
                               max_size=6),
                      st.integers(1, len(base)), st.binary(max_size=64))
    def run(flips, cut, tail) -> None:
        data = bytearray(base[:cut])
        for at, value in flips:
            if at < len(data):
                data[at] = value
        path.write_bytes(bytes(data) + tail)
        capsys.readouterr()
        rc = main(["verify", str(path)])
        err = capsys.readouterr().err
        if rc == 0:
            return
        assert rc in (1, 2), rc
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kcore: "), err
        assert "Traceback" not in err

    run()


@pytest.fixture(scope="module")
def makedumpfile_outputs(request: pytest.FixtureRequest) -> dict[str, Path]:
    """makedumpfile -c -d 31 (kdump-compressed) and -F (flattened) of kcore's ELF dump."""
    exe = shutil.which("makedumpfile")
    if exe is None:
        pytest.skip("makedumpfile is not installed (apt-get install makedumpfile)")
    import subprocess

    d = scratch_dir(request, "mdf")
    elf = d / "mem.elf"
    r = run_kcore("dump", "-q", "--no-digest", "--root", str(shared_fixture(KASLR) / "root"),
                  "--source", f"elf:{fixture_memory(KASLR)}", "-o", str(elf))
    assert r.returncode == 0, r.stderr.decode()
    subprocess.run([exe, "-c", "-d", "31", str(elf), str(d / "mem.kdump")], check=True,
                   capture_output=True)
    with open(d / "mem.flat", "wb") as f:
        subprocess.run([exe, "-F", "-c", "-d", "31", str(elf)], check=True, stdout=f,
                       stderr=subprocess.DEVNULL)
    return {"kdump": d / "mem.kdump", "flattened": d / "mem.flat"}


def test_makedumpfile_outputs(makedumpfile_outputs, capsys) -> None:
    """makedumpfile's own files verify; a damaged page descriptor and a truncation are found."""
    kd = makedumpfile_outputs["kdump"]
    rc, res, err = verify(kd, capsys)
    assert rc == 0, (err, res)
    assert res["format"] == "kdump" and res["vmcoreinfo"]["osrelease"] == "6.1.0-56-amd64"
    assert res["consumers"]["crash"]["ok"] and not res["consumers"]["volatility"]["ok"]
    rc, res, _err = verify(makedumpfile_outputs["flattened"], capsys)
    assert rc == 0 and res["format"] == "flattened"
    assert not res["consumers"]["drgn"]["ok"] and "flattened" in res["consumers"]["drgn"]["why"]
    head = kd.read_bytes()[:1 << 20]
    block = struct.unpack_from("<i", head, 8 + 4 + 6 * 65 + 6 + 16 + 4)[0]
    sub_hdr, bitmap_blocks = struct.unpack_from("<ii", head, 8 + 4 + 6 * 65 + 6 + 16 + 8)
    desc_at = (1 + sub_hdr + bitmap_blocks) * block
    _flip(kd, desc_at + 24 * 5 + 9)  # the 6th descriptor's size
    rc, res, err = verify(kd, capsys)
    _flip(kd, desc_at + 24 * 5 + 9)
    assert rc == 1 and int(res["problems"][0]["offset"], 16) == desc_at + 24 * 5, res["problems"]
    size = kd.stat().st_size
    os.truncate(kd, size - 5000)
    rc, res, err = verify(kd, capsys)
    assert rc == 1 and "is damaged" in err
