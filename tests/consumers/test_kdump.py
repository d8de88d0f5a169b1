"""Compressed dumps opened by real tools: crash, drgn, libkdumpfile, makedumpfile, Volatility.

On both fixtures and for every codec: crash (with the fixtures' debug vmlinux) prints the
release, the log and the tasks; drgn reads linux_banner (and walks the tasks with debug
info); libkdumpfile's Python bindings read every dumped page, compared with the fixture's
memory; makedumpfile reads the file (--dump-dmesg) and rebuilds the flattened stream (-R).
Volatility 3 finds the banner in the AVML output. Every file here keeps the kernel's symbols
(test_the_kdump_files_carry_symbols), and makedumpfile reads one as it reads the same dump made
with --no-symbols (issue 22).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kcore import codecs, symbols
from kcore.sources import open_source
from tests.commands.test_dump import dump, source_spec
from tests.consumers.test_dump import banner_address
from tests.helpers import (
    FIXTURE_NAMES,
    debug_vmlinux,
    kept_symbol_files,
    run_kcore,
    scratch_dir,
    shared_fixture,
    volatility_cmd,
)

pytestmark = pytest.mark.consumers

NOKASLR, KASLR = FIXTURE_NAMES
CODECS = list(codecs.CODECS)  # zstd, lzo, snappy, zlib, none
PAGE = 4096
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-libkdumpfile is built for Debian's interpreter
# libkdumpfile, run by the system python: the dumped PFN runs and the SHA-256 of their pages.
LIBKDUMPFILE_READ = r"""
import hashlib, json, sys
import kdumpfile
k = kdumpfile.kdumpfile(sys.argv[1])
bm = k.attr["file.pagemap"]
runs, h, pfn = [], hashlib.sha256(), 0
while True:
    try:
        pfn = bm.find_set(pfn)
    except kdumpfile.exceptions.NoDataException:
        break
    end = bm.find_clear(pfn)
    runs.append([pfn, end - pfn])
    for p in range(pfn, end, 256):
        n = min(256, end - p)
        h.update(k.read(kdumpfile.KDUMP_MACHPHYSADDR, p * 4096, n * 4096))
    pfn = end
print(json.dumps({"format": k.attr["file.format"], "arch": k.attr["arch.name"],
                  "release": k.attr["linux.uts.release"], "runs": runs,
                  "sha256": h.hexdigest()}))
"""


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (.ci/run installs it)")
    return path


def need_codec(name: str) -> None:
    if not codecs.available(name):
        pytest.skip(codecs.missing(codecs.CODECS[name]))


def kernel_ram_runs(name: str) -> list[list[int]]:
    """The RAM PT_LOADs of the real /proc/kcore (direct map: vaddr - PAGE_OFFSET == paddr)."""
    exp = json.loads((shared_fixture(name) / "expected" / "kcore.json").read_text())
    base = int(exp["values_read_through_kcore"]["page_offset_base"], 16)
    runs = sorted([p["p_paddr"] // PAGE, p["p_filesz"] // PAGE] for p in exp["phdrs"]
                  if p["type"] == "PT_LOAD" and p["p_vaddr"] - base == p["p_paddr"])
    assert runs
    return runs


def pages_sha256(name: str, runs: list[list[int]]) -> str:
    """SHA-256 of the fixture memory's pages in those PFN runs (read as a raw/ELF source); every
    codec's dump is held against the same runs: hashed once per fixture."""
    return _pages_sha256(name, tuple(tuple(r) for r in runs))


@functools.cache
def _pages_sha256(name: str, runs: tuple[tuple[int, ...], ...]) -> str:
    h = hashlib.sha256()
    with open_source(source_spec(name)) as src:
        for pfn, n in runs:
            for p in range(pfn, pfn + n, 4096):
                k = min(4096, pfn + n - p)
                h.update(src.read_phys(p * PAGE, k * PAGE)[0])
    return h.hexdigest()


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def dumps(request):
    """Per fixture: a kdump file and a flattened stream for each available codec, an AVML."""
    name = request.param
    folder = scratch_dir(request, "kdump")
    root = shared_fixture(name) / "root"
    for codec in CODECS:
        if not codecs.available(codec):
            continue
        dump(name, folder / f"mem-{codec}.kdump", "--format", "kdump", "--compress", codec)
        with open(folder / f"mem-{codec}.flat", "wb") as f:
            r = run_kcore("dump", "--root", str(root), "--source", source_spec(name),
                          "--format", "kdump", "--compress", codec, "-o", "-", stdout=f,
                          stderr=subprocess.PIPE, capture_output=False)
        assert r.returncode == 0, r.stderr.decode()
    if codecs.available("lzo"):  # the same without the kept symbols (test_symbols_skipped)
        dump(name, folder / "bare-lzo.kdump", "--format", "kdump", "--compress", "lzo",
             "--no-symbols")
    if codecs.available("snappy"):
        dump(name, folder / "mem.avml", "--format", "avml")
        # a file takes each block's frames in place, the header last; a stream, all in order
        with open(folder / "mem-stream.avml", "wb") as f:
            r = run_kcore("dump", "--root", str(root), "--source", source_spec(name),
                          "--format", "avml", "-o", "-", stdout=f, stderr=subprocess.PIPE,
                          capture_output=False)
        assert r.returncode == 0, r.stderr.decode()
    return name, folder


def test_the_kdump_files_carry_symbols(dumps):
    """Every kdump file the consumers here open keeps the kernel's symbols in its own sub
    header blocks (after the notes its size_note counts), the AVML in its sidecar; the
    --no-symbols file none."""
    _name, folder = dumps
    files = sorted(folder.glob("mem-*.kdump"))
    assert files
    for path in files:
        found = symbols.read_dump(str(path))
        assert found is not None and found[1] == str(path), path
        assert {"proc/kallsyms", "proc/modules"} <= set(found[0].files), path
    if (folder / "mem.avml").exists():
        assert "proc/kallsyms" in kept_symbol_files(folder / "mem.avml.symbols")
    if (folder / "bare-lzo.kdump").exists():
        assert symbols.read_dump(str(folder / "bare-lzo.kdump")) is None


def test_makedumpfile_skips_the_symbols(dumps, tmp_path):
    """makedumpfile reads a kdump file with symbols as one without: the same kernel log
    (--dump-dmesg) and the same file out of -d 31 (it copies only the notes size_note
    counts), but for the header's timestamp."""
    makedumpfile = need("makedumpfile")
    need_codec("lzo")
    _name, folder = dumps
    logs, filtered = [], []
    for file in ("mem-lzo.kdump", "bare-lzo.kdump"):
        log, out = tmp_path / f"{file}.txt", tmp_path / f"{file}.d31"
        for args in (["--dump-dmesg"], ["-d", "31"]):
            r = subprocess.run([makedumpfile, *args, str(folder / file),
                                str(log if args[0] == "--dump-dmesg" else out)],
                               capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        logs.append(log.read_text())
        data = out.read_bytes()
        filtered.append(data[:408] + data[424:])  # disk_dump_header.timestamp left out
        out.unlink()
    assert logs[0].startswith("[    0.000000] Linux version 6.1.0-56-amd64")
    assert logs[0] == logs[1]
    assert filtered[0][:8] == b"KDUMP   " and filtered[0] == filtered[1]


@pytest.mark.parametrize("codec", CODECS)
def test_crash_opens_the_kdump_file(dumps, codec):
    """crash with the kernel's debug info: release, kernel log, task list."""
    crash = need("crash")
    need_codec(codec)
    name, folder = dumps
    if name != KASLR and codec != codecs.DEFAULT:
        pytest.skip("a crash session costs ~20 s: the KASLR fixture runs every codec, this "
                    "one the default")
    vmlinux = debug_vmlinux()
    r = subprocess.run([crash, "-s", str(vmlinux), str(folder / f"mem-{codec}.kdump")],
                       input="sys\nlog\nps\nquit\n", capture_output=True, text=True,
                       timeout=600)
    out = r.stdout
    assert "RELEASE: 6.1.0-56-amd64" in out, out[-3000:] + r.stderr[-3000:]
    assert "Linux version 6.1.0-56-amd64" in out  # the kernel log, from its ring buffer
    assert "swapper/0" in out  # the task list


@pytest.mark.parametrize("codec", CODECS)
def test_drgn_reads_the_banner(dumps, codec):
    drgn = pytest.importorskip("drgn", reason="drgn is not installed (.ci/run installs it)")
    need_codec(codec)
    name, folder = dumps
    prog = drgn.Program()
    prog.set_core_dump(str(folder / f"mem-{codec}.kdump"))
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL  # VMCOREINFO found
    assert prog.read(banner_address(name), 64).startswith(b"Linux version 6.1.0-56-amd64")


def test_drgn_walks_the_task_list(dumps):
    drgn = pytest.importorskip("drgn", reason="drgn is not installed (.ci/run installs it)")
    from drgn.helpers.linux.pid import for_each_task

    _name, folder = dumps
    prog = drgn.Program()
    prog.set_core_dump(str(folder / "mem-zstd.kdump"))
    prog.load_debug_info([str(debug_vmlinux())])
    comms = {t.comm.string_() for t in for_each_task(prog)}
    assert {b"kthreadd", b"kworker/0:0"} & comms and len(comms) > 10, comms


@pytest.mark.parametrize("codec", CODECS)
def test_libkdumpfile_reads_every_page(dumps, codec):
    """python3-libkdumpfile: the dumped pages are the kernel's RAM, byte for byte."""
    need_codec(codec)
    if not Path(SYSTEM_PYTHON).exists():
        pytest.skip("no /usr/bin/python3 for python3-libkdumpfile")
    name, folder = dumps
    r = subprocess.run([SYSTEM_PYTHON, "-c", LIBKDUMPFILE_READ,
                        str(folder / f"mem-{codec}.kdump")], capture_output=True, text=True,
                       timeout=600)
    if "No module named 'kdumpfile'" in r.stderr:
        pytest.skip("python3-libkdumpfile is not installed (.ci/run installs it)")
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert (got["format"], got["arch"], got["release"]) == ("diskdump", "x86_64",
                                                             "6.1.0-56-amd64")
    assert got["runs"] == kernel_ram_runs(name)
    assert got["sha256"] == pages_sha256(name, got["runs"])


@pytest.mark.parametrize("codec", ["lzo", "zlib", "none"])  # Debian's makedumpfile: no zstd
def test_makedumpfile_reads_the_kernel_log(dumps, codec, tmp_path):
    makedumpfile = need("makedumpfile")
    need_codec(codec)
    _name, folder = dumps
    out = tmp_path / "dmesg.txt"
    r = subprocess.run([makedumpfile, "--dump-dmesg", str(folder / f"mem-{codec}.kdump"),
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert out.read_text().startswith("[    0.000000] Linux version 6.1.0-56-amd64")


def test_makedumpfile_rebuilds_the_flattened_stream(dumps, tmp_path):
    """makedumpfile -R turns `kcore dump -o -` into the file kcore writes, which crash opens."""
    makedumpfile = need("makedumpfile")
    _name, folder = dumps
    out = tmp_path / "rebuilt.kdump"
    with open(folder / "mem-zstd.flat", "rb") as stream:
        r = subprocess.run([makedumpfile, "-R", str(out)], stdin=stream, capture_output=True,
                           text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ours = (folder / "mem-zstd.kdump").read_bytes()
    theirs = out.read_bytes()
    # the same file but for the header's timestamp (disk_dump_header.timestamp, 408..424)
    assert len(theirs) == len(ours) and theirs[:408] == ours[:408]
    assert theirs[424:] == ours[424:]
    crash = need("crash")
    r = subprocess.run([crash, "-s", str(debug_vmlinux()), str(out)], input="sys\nquit\n",
                       capture_output=True, text=True, timeout=600)
    assert "RELEASE: 6.1.0-56-amd64" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_kcore_rebuild_matches_makedumpfile(dumps, tmp_path):
    makedumpfile = need("makedumpfile")
    _name, folder = dumps
    theirs = tmp_path / "theirs.kdump"
    with open(folder / "mem-lzo.flat", "rb") as stream:
        subprocess.run([makedumpfile, "-R", str(theirs)], stdin=stream, check=True,
                       capture_output=True, timeout=300)
    r = run_kcore("rebuild", str(folder / "mem-lzo.flat"), str(tmp_path / "ours.kdump"))
    assert r.returncode == 0, r.stderr.decode()
    assert (tmp_path / "ours.kdump").read_bytes() == theirs.read_bytes()
    assert oct((tmp_path / "ours.kdump").stat().st_mode & 0o777) == "0o600"


def test_volatility_finds_the_banner_in_avml(dumps, tmp_path):
    cmd = volatility_cmd()
    need_codec("snappy")
    _name, folder = dumps
    r = subprocess.run([*cmd, "-q", "--cache-path", str(tmp_path), "-f",
                        str(folder / "mem.avml"), "banners.Banners"],
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path)))
    assert "Linux version 6.1.0-56-amd64" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.parametrize("kind", ["kdump", "flat", "avml"])
def test_kcore_reads_its_dumps_back(dumps, kind):
    """Round trip: the kdump/flattened/AVML sources give the fixture's pages, every codec."""
    name, folder = dumps
    files = ([folder / "mem.avml", folder / "mem-stream.avml"] if kind == "avml"
             else sorted(folder.glob(f"mem-*.{kind}")))
    if not all(f.exists() for f in files) or not files:
        pytest.skip(f"no {kind} dump (a codec library is missing)")
    if kind == "avml":  # written in order, or each piece in its place: the same bytes
        assert files[0].read_bytes() == files[1].read_bytes()
    for path in files:
        with open_source(str(path)) as src:  # detected by magic, flattened included
            assert src.kind == ("avml" if kind == "avml" else "kdump"), path
            runs = [[e.paddr // PAGE, e.length // PAGE] for e in src.extents]
            h = hashlib.sha256()
            for pfn, n in runs:
                for p in range(pfn, pfn + n, 4096):
                    k = min(4096, pfn + n - p)
                    h.update(src.read_phys(p * PAGE, k * PAGE)[0])
        if kind != "avml":  # AVML leaves zero runs out; kdump keeps every RAM page
            assert runs == kernel_ram_runs(name), path
        assert h.hexdigest() == pages_sha256(name, runs), path


def test_any_dump_converts_to_elf_for_crash(dumps, tmp_path):
    """kcore dump --source kdump:FILE --format elf: the ELF crash opens, from a kdump."""
    name, folder = dumps
    if name != KASLR:
        pytest.skip("one crash session for the conversion: the KASLR fixture's")
    root = shared_fixture(name) / "root"
    out = tmp_path / "from-kdump.elf"
    r = run_kcore("dump", "--root", str(root), "--source", f"kdump:{folder / 'mem-lzo.flat'}",
                  "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    crash = need("crash")
    r = subprocess.run([crash, "-s", str(debug_vmlinux()), str(out)], input="sys\nquit\n",
                       capture_output=True, text=True, timeout=600)
    assert "RELEASE: 6.1.0-56-amd64" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]

