"""Volatility 3 reading the fixtures through kcore's layer (kcore.integrations.volatility),
loaded the way Volatility loads plugins (`vol -p DIR`), no patching of Volatility.

linux.pslist needs an ISF of the kernel. dwarf2json (the usual maker, from the debug vmlinux)
is a Go program that no Debian or PyPI package provides, and CI fetches no tool sources; so
the ISF is made by pakunoda (PyPI) from the kernel's own BTF and kallsyms in the nokaslr
capture's RAM file (not read through kcore), and cached. pslist through kcore's layer must
list what Volatility lists reading the same memory with its own layers.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.commands.test_dump import dump, expected, expected_bytes
from tests.helpers import (
    FIXTURE_NAMES,
    REPO,
    fixture_memory,
    make_isf,
    pid1_comm,
    run_kcore,
    scratch_dir,
    shared_cache,
    shared_fixture,
    volatility_cmd,
)

pytestmark = pytest.mark.consumers
pytest.importorskip("volatility3", reason="volatility3 is not installed (pip install "
                    "'kcore[volatility]')")
NOKASLR, KASLR = FIXTURE_NAMES
STACKED = "Stacked KcoreLayer using KcoreStacker"


def banner_paddr(name: str) -> int:
    """linux_banner's physical address: kallsyms, through the real kcore's TEXT segment."""
    for line in (shared_fixture(name) / "root/proc/kallsyms").open():
        addr, _t, sym = line.split()[:3]
        if sym == "linux_banner":
            text = next(p for p in expected(name)["phdrs"] if p["type"] == "PT_LOAD")
            return int(addr, 16) - text["p_vaddr"] + text["p_paddr"]
    raise AssertionError("no linux_banner in kallsyms")


@pytest.fixture(scope="module")
def images(request) -> dict[str, tuple[str, str]]:
    """Image kind -> (fixture name, path): a LiME dump, kcore's ELF dump (zero runs as
    PT_LOADs without file bytes), a raw RAM file, QEMU's ELF core."""
    folder = scratch_dir(request, "vol")
    dump(NOKASLR, folder / "mem.lime", "--format", "lime")
    dump(NOKASLR, folder / "mem.elf")
    out = {"lime": (NOKASLR, str(folder / "mem.lime")),
           "kcore-elf": (NOKASLR, str(folder / "mem.elf")),
           "raw": (NOKASLR, str(fixture_memory(NOKASLR))),
           "qemu-elf": (KASLR, str(fixture_memory(KASLR)))}
    if has_kdump():  # kdump-compressed: a format Volatility does not read itself
        dump(NOKASLR, folder / "mem.kdump", "--format", "kdump")
        out["kdump"] = (NOKASLR, str(folder / "mem.kdump"))
        with open(folder / "mem.flat", "wb") as flat:  # -o -: makedumpfile's flattened format
            r = run_kcore("dump", "--root", str(shared_fixture(NOKASLR) / "root"), "--source",
                          f"raw:{fixture_memory(NOKASLR)}", "--format", "kdump", "--quiet",
                          "-o", "-", stdout=flat, stderr=subprocess.PIPE, capture_output=False)
        assert r.returncode == 0, r.stderr
        out["flattened"] = (NOKASLR, str(folder / "mem.flat"))
    return out


def has_kdump() -> bool:
    """Whether kcore writes and reads kdump-compressed files (yet)."""
    from kcore import sources
    from kcore.formats import FORMATS

    return "kdump" in FORMATS and "kdump" in getattr(sources, "BY_KIND", {})


def image(images, kind: str) -> tuple[str, str]:
    """(fixture name, path) of an image kind, or skip."""
    if kind not in images:
        pytest.skip(f"kcore has no {kind} format here")
    return images[kind]


def vol(tmp_path, image: str, *args: str, kcore: bool = True,
        cache: str | None = None) -> subprocess.CompletedProcess:
    """`vol -p <kcore's plugin folder> -f image ARGS` with this checkout's kcore
    (without kcore's plugin folder when not kcore)."""
    from kcore.integrations.volatility import plugin_dir

    env = dict(os.environ, HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    plugins = ["-p", plugin_dir()] if kcore else []
    return subprocess.run([*volatility_cmd(), "--cache-path", cache or str(tmp_path), *plugins,
                           "-f", image, *args], capture_output=True, text=True, timeout=900,
                          env=env)


@pytest.mark.parametrize("kind", ["lime", "raw", "qemu-elf", "kdump"])
def test_banners_through_kcores_layer(images, kind, tmp_path):
    """banners.Banners finds linux_banner at its physical address, read by kcore's layer."""
    name, path = image(images, kind)
    r = vol(tmp_path, path, "-vvvv", "banners.Banners")
    assert STACKED in r.stderr, r.stderr[-3000:]
    assert f"{banner_paddr(name):#x}\tLinux version 6.1.0-56-amd64" in r.stdout, \
        r.stdout[-2000:] + r.stderr[-2000:]


def stacked(image: str):
    """Volatility's context with kcore's stacker run on a FileLayer of image: (context, layer)."""
    from volatility3.framework import contexts
    from volatility3.framework.layers import physical

    from kcore.integrations.volatility import KcoreLayer, KcoreStacker

    ctx = contexts.Context()
    ctx.config["base.location"] = "file://" + image
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    layer = KcoreStacker.stack(ctx, "base")
    assert isinstance(layer, KcoreLayer)
    ctx.add_layer(layer)
    return ctx, layer


@pytest.mark.parametrize("kind", ["lime", "kcore-elf", "raw", "qemu-elf", "kdump", "flattened"])
def test_layer_reads_as_the_real_kcore(images, kind):
    """The layer's physical bytes: the first RAM range as the real /proc/kcore read it;
    holes are InvalidAddressException, or zeros with pad, as Volatility's layers do."""
    from volatility3.framework import exceptions

    name, path = image(images, kind)
    _ctx, layer = stacked(path)
    assert layer.source_spec.split(":")[0] == {"lime": "lime", "raw": "raw", "kcore-elf": "elf",
                                               "qemu-elf": "elf", "kdump": "kdump",
                                               "flattened": "kdump"}[kind]
    # kcore's LiME dumps leave zero runs out: there those are holes, read as zeros with pad
    pad = kind == "lime"
    real = expected_bytes(name, "kcore-ram0.bin")  # phys 0x1000, read through the real kcore
    assert layer.read(0x1000, len(real), pad=pad) == real
    assert layer.is_valid(0x1000, len(real)) is not pad
    text = next(p for p in expected(name)["phdrs"] if p["type"] == "PT_LOAD")
    assert layer.read(text["p_paddr"], 2 << 20, pad=pad) == \
        expected_bytes(name, "kcore-text-2M.bin")
    if kind == "raw":  # a raw file holds the holes too (as zeros)
        return
    # where the source's memory stops: after the first RAM range in the LiME dump (the VGA
    # hole), after the 512 MiB of RAM in QEMU's core (it holds 0-0xa0000 and the VGA hole)
    edge = 0x20000000 if kind == "qemu-elf" else 0x9F000
    assert not layer.is_valid(edge, 16)
    with pytest.raises(exceptions.InvalidAddressException):
        layer.read(edge - 0x1000, 0x2000)
    padded = layer.read(edge - 0x1000, 0x2000, pad=True)
    assert padded[0x1000:] == bytes(0x1000)
    if kind != "qemu-elf":
        assert padded[:0x1000] == real[-0x1000:]


def test_stacker_leaves_other_files_to_volatility(tmp_path):
    """A file kcore does not read as memory (QEMU savevm state, an empty file) is not claimed."""
    from volatility3.framework import contexts
    from volatility3.framework.layers import physical

    from kcore.integrations.volatility import KcoreStacker

    for body in (b"QEVM\0\0\0\3" + bytes(4096), b""):
        path = tmp_path / "image"
        path.write_bytes(body)
        ctx = contexts.Context()
        ctx.config["base.location"] = path.as_uri()
        ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
        assert KcoreStacker.stack(ctx, "base") is None


def test_plugin_folder_and_missing_volatility():
    """`python -m kcore.integrations.volatility` names the folder for `vol -p`; without
    volatility3, importing the layer says which extra to install."""
    from kcore.integrations.volatility import PLUGIN_DIR

    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "kcore.integrations.volatility"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout == f"{PLUGIN_DIR}\n", r.stderr
    assert (PLUGIN_DIR / "kcore_layer.py").is_file()
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['volatility3'] = None\n"
                        "from kcore.integrations import volatility"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "kcore.extras.MissingDependencyError: volatility3 is not installed: "
        "pip install 'kcore[volatility]' (or pip install volatility3)")
    import kcore.extras
    import kcore.integrations

    # the class lives in kcore.extras; embedders catch it by its old name too
    assert kcore.integrations.MissingDependencyError is kcore.extras.MissingDependencyError


@pytest.fixture(scope="module")
def isf() -> str:
    """A folder holding an ISF of the fixtures' kernel (pakunoda, from the nokaslr RAM file)."""
    return make_isf()


def pslist(r: subprocess.CompletedProcess) -> list[tuple[int, int, str]]:
    """linux.pslist's (PID, PPID, COMM) rows."""
    rows = []
    for line in r.stdout.splitlines():
        cols = line.split("\t")
        if len(cols) >= 5 and cols[1].isdigit():
            rows.append((int(cols[1]), int(cols[3]), cols[4]))
    return sorted(rows)


def test_pslist_through_kcores_layer(images, isf, tmp_path):
    """linux.pslist through kcore's layer on the LiME dump, the raw file and QEMU's core lists
    what Volatility's own layers list from the same memory (init and kthreadd among them)."""
    args = ("-s", isf, "linux.pslist")
    # Volatility's symbol index: built once (slow), then reused (with test_critical.py)
    with shared_cache("vol-cache") as cache:
        own = {NOKASLR: pslist(vol(tmp_path, images["raw"][1], *args, kcore=False,
                                   cache=str(cache))),
               KASLR: pslist(vol(tmp_path, images["qemu-elf"][1], *args, kcore=False,
                                 cache=str(cache)))}
        for fixture, rows in own.items():
            assert (1, 0, pid1_comm(fixture)) in rows and (2, 0, "kthreadd") in rows, rows
        for kind in ("lime", "raw", "qemu-elf", "kdump"):
            if kind not in images:
                continue
            name, path = images[kind]
            r = vol(tmp_path, path, "-vvvv", *args, cache=str(cache))
            assert STACKED in r.stderr, r.stderr[-3000:]
            assert pslist(r) == own[name], (kind, r.stdout[-2000:], r.stderr[-2000:])
