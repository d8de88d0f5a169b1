"""Volatility 3 on any kcore source: a physical-memory layer read through kcore, and its stacker.

Volatility loads it from a plugin folder: `vol -p "$(python3 -m kcore.integrations.volatility)"
-f IMAGE PLUGIN`. The folder's one module imports KcoreLayer and KcoreStacker from here;
Volatility's LayerStacker finds the stacker among StackerLayerInterface's subclasses and runs
it first (stack_order 5, before its own format stackers at 10): on a local file that kcore
opens (ELF cores such as QEMU's or kcore's dumps, LiME, a saved /proc/kcore, kdump's
formats, raw RAM) it stacks a KcoreLayer, whose physical memory is the source's, read by the
C engine. Volatility's own stackers (Intel paging, then the OS) stack on top as usual.

Files Volatility knows better are left to it: AVML, QEMU's savevm state, Windows crash dumps
and hibernation files, VMware state, Xen cores (kcore refuses or would take them as raw RAM).
"""

from __future__ import annotations

import bisect
import os
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kcore.errors import KcoreError
from kcore.integrations import require

require("volatility3", "volatility", "volatility3")

from volatility3.framework import constants, exceptions, interfaces  # noqa: E402
from volatility3.framework.configuration import requirements  # noqa: E402
from volatility3.framework.layers import physical  # noqa: E402

PLUGIN_DIR = Path(__file__).resolve().parent / "volplugin"
# First bytes of images kcore would open as raw RAM, but Volatility reads as what they are.
_VOLATILITY_MAGICS = (
    b"QEVM",  # QEMU savevm state
    b"PAGEDUMP", b"PAGEDU64",  # Windows crash dumps
    b"hibr", b"HIBR", b"wake", b"WAKE", b"RSTR", b"rstr",  # Windows hibernation files
    bytes.fromhex("d0bed2be"), bytes.fromhex("d1bad1ba"),  # VMware .vmss/.vmsn
    bytes.fromhex("d2bed2be"), bytes.fromhex("d3bed3be"),
)


# `kcore smear`: the physical pages the plugin read (not the stackers' scans), written to
# $KCORE_SMEAR_PAGES (one hex page address a line) when Volatility exits.
SMEAR_ENV = "KCORE_SMEAR_PAGES"
_touched: set[int] = set()
_scanning = [0]


def _save_touched() -> None:
    path = os.environ.get(SMEAR_ENV)
    if path:
        with open(path, "w", encoding="ascii") as f:
            f.write("".join(f"{p:x}\n" for p in sorted(_touched)))


_recording = bool(os.environ.get(SMEAR_ENV))
if _recording:
    import atexit

    atexit.register(_save_touched)

    def _not_while_stacking() -> None:
        """The stackers' probes (an AVML or LiME header looked for at some offset, the
        kernel's page tables found) come before the plugin runs: not what it follows."""
        from volatility3.framework.automagic import stacker

        stack_layer = stacker.LayerStacker.stack_layer.__func__

        def quiet(cls: Any, *args: Any, **kwargs: Any) -> Any:
            _scanning[0] += 1
            try:
                return stack_layer(cls, *args, **kwargs)
            finally:
                _scanning[0] -= 1

        stacker.LayerStacker.stack_layer = classmethod(quiet)

    _not_while_stacking()


def page_times(path: str) -> Any:
    """The read times kept beside a dump (DUMP.times, `kcore dump --times`), or None."""
    from kcore.pagetimes import SUFFIX, PageTimes

    return PageTimes.load(path + SUFFIX) if os.path.exists(path + SUFFIX) else None


# Sources opened by the stacker, reused by the layers Volatility builds from their config
# (a kdump file is unpacked once per process, not once per layer construction).
_opened: dict[tuple[str, int, int, int, int], Any] = {}


def open_cached(spec: str, path: str, opened: Any = None) -> Any:
    """kcore's source for `spec` (over file `path`), opened once per version of the file
    (`opened`: that source, already open)."""
    from kcore.sources import open_source

    st = os.stat(path)
    key = (spec, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    src = _opened.get(key)
    if src is None or getattr(src, "fd", 0) < 0:
        src = _opened[key] = opened or open_source(spec)
    elif opened is not None and opened is not src:
        opened.close()
    return src


def plugin_dir() -> str:
    """The folder to pass to `vol -p`: its module makes Volatility load kcore's layer."""
    return str(PLUGIN_DIR)


def local_path(location: str) -> str | None:
    """The local file a Volatility location (file:///...) names, or None for other URLs."""
    url = urllib.parse.urlparse(location)
    if url.scheme != "file" or url.netloc not in ("", "localhost"):
        return None
    return urllib.request.url2pathname(url.path)


def valid_ranges(source: Any) -> list[tuple[int, int]]:
    """The physical [start, end) ranges a source describes, merged and sorted.

    An ELF core's PT_LOADs count with their whole p_memsz (the part past p_filesz reads as
    zeros: kcore's dumps leave zero runs out that way); other sources give their extents.
    """
    spans: list[tuple[int, int]] = []
    core = getattr(source, "core", None)
    if core is not None and hasattr(core, "phdrs"):
        spans = [(ph.p_paddr, ph.p_paddr + ph.p_memsz) for ph in core.phdrs
                 if ph.p_type == 1 and ph.p_memsz and ph.p_paddr != (1 << 64) - 1]
    spans += [(e.paddr, e.paddr + e.length) for e in source.extents]
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


class KcoreLayer(interfaces.layers.DataLayerInterface):
    """Physical memory of a kcore memory source (config "source": a kcore source spec)."""

    def __init__(self, context: interfaces.context.ContextInterface, config_path: str,
                 name: str, metadata: dict[str, Any] | None = None) -> None:
        super().__init__(context=context, config_path=config_path, name=name,
                         metadata=metadata)
        self._spec: str = self.config["source"]
        self._source_: Any = None
        source = self._source  # open now: a bad source fails here, not at the first read
        self._ranges = valid_ranges(source)
        if not self._ranges:
            raise exceptions.LayerException(name, f"{self._spec}: no physical memory in it")
        self._starts = [lo for lo, _ in self._ranges]
        self._ends = [hi for _, hi in self._ranges]
        self._times: Any = False  # the dump's read times, loaded on first use

    def page_time(self, offset: int) -> tuple[int, int] | None:
        """When the dump read the page at physical offset: (start, end) ns from the dump's
        start, from DUMP.times (`kcore dump --times`); None without it."""
        if self._times is False:
            self._times = page_times(self._spec.partition(":")[2])
        return None if self._times is None else self._times.when(offset)

    @property
    def _source(self) -> Any:
        """The kcore source, opened on first use (and again after unpickling)."""
        if self._source_ is None:
            path = self._spec.partition(":")[2]
            try:
                self._source_ = open_cached(self._spec, path)
            except KcoreError as exc:
                raise exceptions.LayerException(self.name, str(exc)) from None
            except OSError as exc:
                raise exceptions.LayerException(self.name, f"{path}: {exc.strerror}") from None
        return self._source_

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the open file descriptors (Volatility's multiprocessing scans)."""
        state = dict(self.__dict__)
        state["_source_"] = None
        return state

    @property
    def source_spec(self) -> str:
        """The kcore source spec this layer reads."""
        return self._spec

    @property
    def maximum_address(self) -> int:
        """The last physical address the source holds."""
        return self._ends[-1] - 1

    @property
    def minimum_address(self) -> int:
        """The first physical address the source holds."""
        return self._starts[0]

    def _first_invalid(self, offset: int, length: int) -> int | None:
        """The first address of [offset, offset + length) outside the source, or None."""
        pos, end = offset, offset + length
        i = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            if i < 0 or pos >= self._ends[i]:
                return pos
            pos = self._ends[i]
            i += 1
            if pos < end and (i >= len(self._starts) or self._starts[i] != pos):
                return pos
        return None

    def is_valid(self, offset: int, length: int = 1) -> bool:
        """Whether every address of [offset, offset + length) is in the source."""
        if length <= 0:
            raise ValueError("Length must be positive")
        return self._first_invalid(offset, length) is None

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        """The bytes at physical `offset` (zeros for holes with pad, else an exception)."""
        if length <= 0:
            return b""
        bad = self._first_invalid(offset, length)
        if bad is not None and not pad:
            raise exceptions.InvalidAddressException(
                self.name, bad, f"physical address {bad:#x} is not in {self._spec}")
        if _recording and not _scanning[0]:
            _touched.update(range(offset & ~4095, offset + length, 4096))
        try:
            data: bytes = self._source.read_phys(offset, length)[0]  # zeros in the holes
        except KcoreError as exc:
            raise exceptions.InvalidAddressException(self.name, offset, str(exc)) from None
        return data

    def write(self, offset: int, data: bytes) -> None:
        """kcore's sources are read-only."""
        raise exceptions.LayerException(self.name, "kcore sources are read-only")

    def destroy(self) -> None:
        """Let go of the source (it stays open for other layers over the same file)."""
        self._source_ = None

    def scan(self, context: interfaces.context.ContextInterface,
             scanner: interfaces.layers.ScannerInterface,
             progress_callback: constants.ProgressCallback = None,
             sections: Iterable[tuple[int, int]] | None = None) -> Iterable[Any]:
        """Scan the source's ranges (not the holes between them) unless told otherwise."""
        if sections is None:
            sections = [(lo, hi - lo) for lo, hi in self._ranges]
        found = super().scan(context, scanner, progress_callback, sections)
        _scanning[0] += 1  # a scan reads everything: not what a plugin follows
        try:
            yield from found
        finally:
            _scanning[0] -= 1

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        """The kcore source spec, and the layer it was stacked on (kept for the stack)."""
        return [
            requirements.StringRequirement(name="source", optional=False,
                                           description="kcore memory source spec"),
            requirements.TranslationLayerRequirement(name="base_layer", optional=True),
        ]

    @property
    def dependencies(self) -> list[str]:
        """The layer this one was stacked on, if any."""
        base = self.config.get("base_layer")
        return [base] if base else []


_registered: dict[str, str | None] = {}  # dump path -> the ISF folder added (None: none)


def isf_cache() -> Path:
    """Where ISFs built from dumps' own symbols are kept: Volatility's cache folder."""
    return Path(constants.CACHE_PATH) / "kcore-isf"


def register_symbols(path: str) -> str | None:
    """Make the ISF of the symbols a kcore dump keeps (in it, or in PATH.symbols) known to
    Volatility: built once into isf_cache(), that folder added to Volatility's symbol
    paths and the identifier cache updated, so its Linux stackers match the banner with no
    -s. Returns the ISF's path, or None when the dump keeps no symbols (or they fail)."""
    if path in _registered:
        return _registered[path]
    _registered[path] = None
    import logging

    from volatility3 import symbols as vol_symbols
    from volatility3.framework.automagic import symbol_cache

    from kcore import isf, symbols

    log = logging.getLogger(__name__)
    try:
        found = symbols.read_dump(path)
        if found is None or found[0].btf is None:
            return None
        folder = isf_cache()
        target = isf.cached(found[0], folder)
    except (KcoreError, OSError) as exc:
        log.warning("kcore: the symbols kept in %s give no ISF: %s", path, exc)
        return None
    if str(folder) not in vol_symbols.__path__:
        vol_symbols.__path__.append(str(folder))
    cache = symbol_cache.SqliteCache(os.path.join(constants.CACHE_PATH,
                                                  constants.IDENTIFIERS_FILENAME))
    cache.update()
    log.info("kcore: symbols of %s from its own BTF and kallsyms: %s", path, target)
    _registered[path] = str(target)
    return str(target)


class KcoreStacker(interfaces.automagic.StackerLayerInterface):
    """Stack a KcoreLayer on a local file that kcore can read as physical memory."""

    stack_order = 5  # before Volatility's format stackers (10): kcore reads those formats too

    @classmethod
    def stack(cls, context: interfaces.context.ContextInterface, layer_name: str,
              progress_callback: constants.ProgressCallback = None
              ) -> interfaces.layers.DataLayerInterface | None:
        """A KcoreLayer over layer_name's file, or None when kcore does not read it."""
        layer = context.layers[layer_name]
        if not isinstance(layer, physical.FileLayer):
            return None
        path = local_path(layer.location)
        if path is None or not os.path.isfile(path):
            return None
        register_symbols(path)
        try:
            with open(path, "rb") as f:
                head = f.read(8)
        except OSError:
            return None
        if head.startswith(_VOLATILITY_MAGICS):
            return None
        from kcore.sources import open_source

        try:
            src = open_source(path)
            spec = f"{src.kind}:{path}"
            open_cached(spec, path, src)
        except KcoreError:
            return None  # not a format kcore reads (or a damaged one): Volatility decides
        name = context.layers.free_layer_name("KcoreLayer")
        context.config[interfaces.configuration.path_join(name, "source")] = spec
        context.config[interfaces.configuration.path_join(name, "base_layer")] = layer_name
        return KcoreLayer(context, name, name)


if __name__ == "__main__":
    print(plugin_dir())
    sys.exit(0)

__all__ = ["PLUGIN_DIR", "SMEAR_ENV", "KcoreLayer", "KcoreStacker", "local_path", "page_times",
           "plugin_dir", "valid_ranges"]
