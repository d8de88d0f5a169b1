"""`kcore dump --order critical`: the pages analysis follows, found through the kernel's own data.

The set (after Pagani, Fedorov and Balzarotti's "smart" acquisition, ACM TOPS 2019): the
kernel's global data (.data and .bss: the variables everything hangs from) and page tables
(every table page under init_top_pgt), every task_struct on init_task.tasks and its threads,
and from each task its mm_struct and page-table tree (user half), its VMAs (the maple tree
of 6.1+, else the mmap list) with their files and dentries, its files_struct, fdtable and
open files, its credentials (the task_structs', signal_structs' and creds' slabs whole, and the
slabs each CPU allocates the next ones from: a task forked while the walk runs is likely
there); then the module list. Structure offsets come from the kernel's
BTF (ROOT/sys/kernel/btf/vmlinux, else the BTF section between __start_BTF and __stop_BTF
read from memory); addresses from kallsyms. Nothing here writes; the walk is bounded (a
hostile image cannot make it loop or grow without end).
"""

from __future__ import annotations

import bisect
import os
import struct
import sys
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kcore.addrmap import AddressMap
from kcore.errors import InputError
from kcore.kallsyms import parse_kallsyms

PAGE = 4096
MAX_TASKS = 1 << 16  # tasks walked at most (a list that loops stops here)
MAX_VMAS = 1 << 16  # VMAs per process at most
MAX_FDS = 1024  # open files per task looked at
MAX_PAGES = 1 << 16  # critical pages kept at most (256 MiB); the rest go in address order
MAX_BTF = 64 << 20  # a BTF blob larger than this is not a kernel's
SYMBOLS = ("init_task", "init_top_pgt", "modules", "__start_BTF", "__stop_BTF", "_sdata",
           "_edata", "__bss_start", "_end", "task_struct_cachep", "signal_cachep", "cred_jar",
           "__per_cpu_offset", "nr_cpu_ids")
MAX_SLAB_ORDER = 4  # a slab of more than 16 pages (64 KiB) is not believed
MAX_CPU_PARTIAL = 64  # a CPU's partial slabs followed at most
MAX_CPUS = 8192
MAX_KERNEL_DATA = 256 << 20  # a kernel's .data and .bss larger than this are not believed

# BTF (Documentation/bpf/btf.rst): kinds and the bytes each adds after its 12-byte header
BTF_MAGIC = 0xEB9F
_STRUCT, _UNION, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG = 4, 5, 8, 9, 10, 11, 18
_EXTRA_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
_EXTRA_PER_MEMBER = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}
_QUALIFIERS = (_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG)


class Btf:
    """Struct sizes and member offsets from a BTF blob (the kernel's type information)."""

    def __init__(self, data: bytes, where: str) -> None:
        if len(data) < 24:
            raise InputError(f"{where}: BTF too short ({len(data)} bytes)")
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            "<HBBIIIII", data)
        if magic != BTF_MAGIC:
            raise InputError(f"{where}: not BTF (magic {magic:#x}, expected {BTF_MAGIC:#x})")
        t0, s0 = hdr_len + type_off, hdr_len + str_off
        if t0 + type_len > len(data) or s0 + str_len > len(data):
            raise InputError(f"{where}: BTF sections run past its {len(data)} bytes")
        self._strings = data[s0:s0 + str_len]
        self._data = data
        self._offsets: dict[tuple[str, str], int | None] = {}  # _member()'s answers
        # One record a type: 12 bytes, then what its kind adds (all multiples of 4 bytes). A
        # tight loop over 32-bit words: a 6.1 kernel has ~130k types.
        words = array("I")
        words.frombytes(data[t0:t0 + type_len // 4 * 4])
        if sys.byteorder != "little":
            words.byteswap()
        fixed = [_EXTRA_FIXED.get(k, 0) // 4 for k in range(32)]
        per = [_EXTRA_PER_MEMBER.get(k, 0) // 4 for k in range(32)]
        infos, sizes, ats = [0], [0], [0]
        by_off: dict[int, int] = {}
        i, n = 0, len(words)
        while i + 3 <= n:
            info = words[i + 1]
            kind = (info >> 24) & 0x1F
            if not 1 <= kind <= 19:  # a kind whose size is unknown: the rest cannot be read
                raise InputError(f"{where}: BTF type {len(infos)} has unknown kind {kind} "
                                 f"(at byte {t0 + 4 * i:#x})")
            infos.append(info)
            sizes.append(words[i + 2])
            ats.append(t0 + 4 * i + 12)
            if (kind == _STRUCT or kind == _UNION) and words[i]:
                by_off.setdefault(words[i], len(infos) - 1)
            i += 3 + fixed[kind] + (info & 0xFFFF) * per[kind]
        if i > n or 4 * n != type_len:
            raise InputError(f"{where}: BTF type section truncated")
        self._infos, self._sizes, self._ats, self._by_off = infos, sizes, ats, by_off
        self._tids: dict[str, int | None] = {}

    def _tid(self, struct_name: str) -> int | None:
        """The type id of struct (or union) NAME."""
        if struct_name not in self._tids:
            at = self._strings.find(b"\0" + struct_name.encode() + b"\0")
            self._tids[struct_name] = None if at < 0 else self._by_off.get(at + 1)
        return self._tids[struct_name]

    def _name(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end if end >= 0 else None].decode("ascii", "replace")

    def _resolve(self, tid: int) -> int:
        for _ in range(32):
            kind = (self._infos[tid] >> 24) & 0x1F if tid < len(self._infos) else 0
            if kind not in _QUALIFIERS:
                return tid
            tid = self._sizes[tid]  # size_or_type: the type a qualifier or typedef names
        return 0

    def size(self, struct_name: str) -> int:
        """sizeof(struct NAME); InputError when the BTF lacks it."""
        tid = self._tid(struct_name)
        if tid is None:
            raise InputError(f"BTF has no struct {struct_name}")
        return self._sizes[tid]

    def _member(self, struct_name: str, member: str) -> int | None:
        """offsetof(struct NAME, member), or None; each answer found once (asked often)."""
        key = (struct_name, member)
        if key not in self._offsets:
            tid = self._tid(struct_name)
            self._offsets[key] = None if tid is None else self._find(tid, member, 0)
        return self._offsets[key]

    def has(self, struct_name: str, member: str) -> bool:
        """Whether struct NAME has a member (through anonymous structs and unions)."""
        return self._member(struct_name, member) is not None

    def offset(self, struct_name: str, member: str) -> int:
        """offsetof(struct NAME, member), through anonymous structs and unions."""
        got = self._member(struct_name, member)
        if got is None:
            raise InputError(f"BTF has no member {member} in struct {struct_name}")
        return got

    def _find(self, tid: int, member: str, depth: int) -> int | None:
        if not 0 < tid < len(self._infos):
            return None
        info, at = self._infos[tid], self._ats[tid]
        if depth > 8 or (info >> 24) & 0x1F not in (_STRUCT, _UNION):
            return None
        vlen = info & 0xFFFF
        bitfields = bool(info & 0x80000000)
        for i in range(vlen):
            fields: tuple[int, int, int] = struct.unpack_from("<III", self._data, at + 12 * i)
            name_off, mtype, off = fields
            bits = off & 0xFFFFFF if bitfields else off
            if name_off and self._name(name_off) == member:
                return bits // 8
            if not name_off:  # an anonymous struct or union: its members are the parent's
                inner = self._find(self._resolve(mtype), member, depth + 1)
                if inner is not None:
                    return bits // 8 + inner
        return None


@dataclass
class CriticalSet:
    """The physical pages analysis follows (sorted page addresses) and what they hold."""

    pages: list[int]
    counts: dict[str, int]  # pages per kind (a page counts once, under its first kind)
    tasks: list[tuple[int, str]]  # (pid, comm) of every task walked, in list order
    seconds: float  # the walk's time
    warnings: list[str] = field(default_factory=list)


class _Walk:
    """Reads kernel objects through the system's address map and page tables."""

    btf: Btf  # set once loaded (it may itself be read through the walk)

    def __init__(self, system: Any, source: Any) -> None:
        from kcore.arch import walker_for

        self.amap: AddressMap = system.addrmap
        self.source = source
        self.walker = walker_for(system, source)
        self.kinds: dict[int, str] = {}
        self.warnings: list[str] = []
        self.followed: set[int] = set()  # files, dentries, mounts already walked

    def phys(self, vaddr: int) -> int | None:
        """The physical address of a kernel virtual address, or None if unmapped."""
        amap = self.amap
        if amap.in_direct_map(vaddr):
            return amap.pa(vaddr)
        if amap.text_start <= vaddr < amap.text_end:
            return amap.pa_symbol(vaddr)
        if self.walker is None:
            return None
        got = self.walker.translate(vaddr)
        return None if got is None else got[0]

    def read(self, vaddr: int, n: int) -> bytes | None:
        """n bytes at a kernel virtual address, or None where a page of them is unmapped."""
        parts = []
        while n > 0:
            pa = self.phys(vaddr)
            if pa is None or not self.source.contains(pa):
                return None
            k = min(n, PAGE - vaddr % PAGE)
            parts.append(self.source.read_phys(pa, k)[0])
            vaddr += k
            n -= k
        return b"".join(parts)

    def ptr(self, vaddr: int) -> int:
        """The 64-bit value at vaddr (0 when unreadable)."""
        data = self.read(vaddr, 8)
        return int.from_bytes(data, "little") if data else 0

    def add(self, vaddr: int, size: int, kind: str) -> bool:
        """Mark the pages of the object [vaddr, vaddr + size); False when it is unmapped."""
        if not vaddr or size <= 0:
            return False
        ok = True
        for va in range(vaddr & ~(PAGE - 1), vaddr + size, PAGE):
            pa = self.phys(va)
            if pa is None or not self.source.contains(pa):
                ok = False
                continue
            self.kinds.setdefault(pa & ~(PAGE - 1), kind)
        return ok

    def add_nonzero(self, vaddr: int, size: int, kind: str) -> None:
        """Mark the pages of [vaddr, vaddr + size) that hold a non-zero byte now: a page of
        zeros holds no pointer to follow (most of a 6.1 kernel's .bss, 12 of its 17 MiB the
        AMD microcode buffers), and reading it first would only widen the critical window."""
        first, end = vaddr & ~(PAGE - 1), vaddr + size
        pas = [self.phys(va) for va in range(first, end, PAGE)]
        zero = bytes(PAGE)
        i = 0
        while i < len(pas):
            pa, j = pas[i], i + 1
            if pa is None or not self.source.contains(pa, PAGE):
                i = j
                continue
            # the kernel image is physically contiguous: one read a run of adjacent pages
            while j < len(pas) and pas[j] == pa + (j - i) * PAGE and self.source.contains(
                    pa, (j - i + 1) * PAGE):
                j += 1
            data = memoryview(self.source.read_phys(pa, (j - i) * PAGE)[0])
            for k in range(j - i):
                if data[k * PAGE:(k + 1) * PAGE] != zero:
                    self.kinds.setdefault(pa + k * PAGE, kind)
            i = j

    def add_slab(self, vaddr: int, order: int, kind: str) -> None:
        """Mark the slab holding the object at vaddr: its 2^order pages (the buddy allocator
        aligns them so). A task forked while the walk runs likely lands in one of them."""
        pa = self.phys(vaddr) if order and self.amap.in_direct_map(vaddr) else None
        if pa is not None:
            span = PAGE << order
            self.add_pages(pa & ~(span - 1), span, kind)

    def add_pages(self, pa: int, n: int, kind: str) -> None:
        """Mark the physical pages [pa, pa + n) that the source holds."""
        for p in range(pa, pa + n, PAGE):
            if self.source.contains(p, PAGE):
                self.kinds.setdefault(p, kind)

    def slab_order(self, cachep: int | None) -> int:
        """The page order of the slabs of the kmem_cache a kernel pointer at cachep names
        (SLUB's oo, SLAB's gfporder); 0 when it cannot be read."""
        btf = self.btf
        cache = self.ptr(cachep) if cachep else 0
        if not cache:
            return 0
        if btf.has("kmem_cache", "oo"):
            order = (self.ptr(cache + btf.offset("kmem_cache", "oo")) & 0xFFFFFFFF) >> 16
        elif btf.has("kmem_cache", "gfporder"):
            order = self.ptr(cache + btf.offset("kmem_cache", "gfporder")) & 0xFFFFFFFF
        else:
            return 0
        return order if order <= MAX_SLAB_ORDER else 0

    def add_cpu_slabs(self, cachep: int | None, per_cpu: list[int], kind: str) -> None:
        """Mark the slabs each CPU allocates the cache's next objects from (SLUB's
        kmem_cache_cpu: its slab and partial list), whole: a task forked during the walk is
        most likely in one of them."""
        btf, amap = self.btf, self.amap
        cache = self.ptr(cachep) if cachep else 0
        if not cache or not (btf.has("kmem_cache", "cpu_slab") and btf.has("kmem_cache_cpu",
                                                                            "slab")):
            return
        order = self.slab_order(cachep)
        cpu_slab = self.ptr(cache + btf.offset("kmem_cache", "cpu_slab"))
        partial = (btf.offset("kmem_cache_cpu", "partial")
                   if btf.has("kmem_cache_cpu", "partial") and btf.has("slab", "next") else None)
        for base in per_cpu:
            kcc = (cpu_slab + base) & 0xFFFFFFFFFFFFFFFF
            slabs = [self.ptr(kcc + btf.offset("kmem_cache_cpu", "slab"))]
            nxt = self.ptr(kcc + partial) if partial is not None else 0
            while nxt and nxt not in slabs and len(slabs) <= MAX_CPU_PARTIAL:
                slabs.append(nxt)
                nxt = self.ptr(nxt + btf.offset("slab", "next"))
            for slab in slabs:
                pfn, rest = divmod(slab - amap.vmemmap_start, amap.struct_page_size)
                # a struct slab of this cache (the pointers are the kernel's, maybe stale)
                if (slab and not rest and 0 <= pfn < 1 << 40 and self.ptr(
                        slab + btf.offset("slab", "slab_cache")) == cache):
                    self.add_pages(pfn * PAGE, PAGE << order, kind)

    def list_entries(self, head: int, member_off: int, limit: int) -> list[int]:
        """The objects on a list_head at head (their addresses: entry - member_off)."""
        out: list[int] = []
        seen = {head}
        node = self.ptr(head)
        while node and node not in seen and len(out) < limit:
            seen.add(node)
            out.append(node - member_off)
            node = self.ptr(node)
        if len(out) >= limit:
            self.warnings.append(f"the list at {head:#x} has more than {limit} entries: cut")
        return out

    def table_pages(self, table_pa: int, level: int, first: int, last: int,
                    kind: str, budget: list[int]) -> None:
        """Mark an x86-64 page-table page and the tables under entries [first, last]."""
        if budget[0] <= 0 or not self.source.contains(table_pa, PAGE):
            return
        budget[0] -= 1
        self.kinds.setdefault(table_pa, kind)
        if level == 1:
            return
        entries = struct.unpack("<512Q", self.source.read_phys(table_pa, PAGE)[0])
        for i in range(first, last + 1):
            e = entries[i]
            if not e & 1 or (level <= 3 and e & 0x80):  # not present, or a 1 GiB / 2 MiB leaf
                continue
            self.table_pages(e & 0x000FFFFFFFFFF000, level - 1, 0, 511, kind, budget)


def load_btf(root: Path, walk_read: Any, symbols: dict[str, int]) -> Btf:
    """The kernel's BTF: ROOT/sys/kernel/btf/vmlinux, else its section in memory."""
    path = root / "sys/kernel/btf/vmlinux"
    try:
        return Btf(path.read_bytes()[:MAX_BTF], str(path))
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror}") from None
    lo, hi = symbols.get("__start_BTF"), symbols.get("__stop_BTF")
    if not lo or not hi or not 24 <= hi - lo <= MAX_BTF:
        raise InputError(f"{root}: no BTF ({path} missing, and kallsyms has no __start_BTF "
                         f"and __stop_BTF): --order critical needs a kernel built with "
                         f"CONFIG_DEBUG_INFO_BTF")
    data = walk_read(lo, hi - lo)
    if data is None:
        raise InputError(f"the kernel's BTF at {lo:#x} is not in the memory source")
    return Btf(data, f"BTF in memory at {lo:#x}")


def find(system: Any, source: Any = None, max_pages: int = MAX_PAGES) -> CriticalSet:
    """The critical page set of a discovered system (InputError when it cannot be found)."""
    t0 = time.perf_counter()
    source = source if source is not None else system.source
    if getattr(system.addrmap, "arch", "x86_64") != "x86_64":
        raise InputError("--order critical walks x86-64 kernels only (this one is "
                         f"{system.addrmap.arch})")
    from kcore.rootfiles import read_root_text

    root = Path(system.root)
    symbols = parse_kallsyms(read_root_text(root, "proc/kallsyms"), SYMBOLS,
                             where=str(root / "proc/kallsyms"), required=("init_task",))
    walk = _Walk(system, source)
    walk.btf = btf = load_btf(root, walk.read, symbols)
    tasks = _walk_tasks(walk, btf, symbols)
    _walk_kernel(walk, symbols)
    _walk_cpu_slabs(walk, symbols)
    pages = sorted(walk.kinds)
    if len(pages) > max_pages:
        walk.warnings.append(f"the critical set has {len(pages)} pages: the first {max_pages} "
                             f"in walk order are read first, the rest in address order")
        order = list(walk.kinds)[:max_pages]
        keep = set(order)
        walk.kinds = {p: k for p, k in walk.kinds.items() if p in keep}
        pages = sorted(keep)
    counts: dict[str, int] = {}
    for kind in walk.kinds.values():
        counts[kind] = counts.get(kind, 0) + 1
    return CriticalSet(pages, counts, tasks, time.perf_counter() - t0, walk.warnings)


def _walk_kernel(walk: _Walk, symbols: dict[str, int]) -> None:
    """The kernel's global data (.data, .bss: the variables every structure hangs from), its
    page tables (kernel half of init_top_pgt) and the module list."""
    for lo, hi in (("_sdata", "_edata"), ("__bss_start", "_end")):
        a, b = symbols.get(lo), symbols.get(hi)
        if a and b and 0 < b - a <= MAX_KERNEL_DATA:
            walk.add_nonzero(a, b - a, "kernel_data")
    amap = walk.amap
    if amap.pgd_paddr is not None:
        levels = getattr(amap, "pgtable_levels", 4)
        walk.table_pages(amap.pgd_paddr, levels, 256, 511, "page_tables", [1 << 20])
    head = symbols.get("modules")
    btf = walk.btf
    if head and btf.has("module", "list"):
        size = btf.size("module")
        for mod in walk.list_entries(head, btf.offset("module", "list"), 4096):
            walk.add(mod, size, "modules")


def _task_groups(walk: _Walk, btf: Btf, symbols: dict[str, int]) -> list[list[int]]:
    """Every thread group: init_task.tasks' tasks, each with its threads (its signal_struct
    marked). The threads: task->signal->thread_head linked by thread_node (6.7, and stable
    kernels it was backported to, such as Debian's 6.1: Volatility follows it where it
    exists), and the older thread_group list."""
    tasks_off = btf.offset("task_struct", "tasks")
    init = symbols["init_task"]
    leaders = [init] + walk.list_entries(init + tasks_off, tasks_off, MAX_TASKS)
    thread = (btf.offset("task_struct", "thread_group")
              if btf.has("task_struct", "thread_group") else None)
    signal = btf.offset("task_struct", "signal") if btf.has("task_struct", "signal") else None
    by_signal = (signal is not None and btf.has("signal_struct", "thread_head")
                 and btf.has("task_struct", "thread_node"))
    sig_size = btf.size("signal_struct") if signal is not None else 0
    sig_order = walk.slab_order(symbols.get("signal_cachep"))
    node = btf.offset("task_struct", "thread_node") if by_signal else 0
    head = btf.offset("signal_struct", "thread_head") if by_signal else 0
    groups = []
    for leader in leaders:
        group = [leader]
        if thread is not None:
            group += walk.list_entries(leader + thread, thread, MAX_TASKS)
        if signal is not None:
            sig = walk.ptr(leader + signal)
            if walk.add(sig, sig_size, "task_struct"):
                walk.add_slab(sig, sig_order, "task_struct")
                if by_signal:
                    group += walk.list_entries(sig + head, node, MAX_TASKS)
        groups.append(group)
    return groups


def _walk_tasks(walk: _Walk, btf: Btf, symbols: dict[str, int]) -> list[tuple[int, str]]:
    """Every task on init_task.tasks and its threads, and what hangs from each."""
    o = {m: btf.offset("task_struct", m) for m in ("tasks", "mm", "pid", "comm", "files",
                                                    "cred", "real_cred")}
    if btf.has("task_struct", "fs"):
        o["fs"] = btf.offset("task_struct", "fs")
    tsize = btf.size("task_struct")
    # whole slabs of tasks and credentials: those forked during the walk are likely in them
    task_order = walk.slab_order(symbols.get("task_struct_cachep"))
    cred_order = walk.slab_order(symbols.get("cred_jar"))
    out: list[tuple[int, str]] = []
    seen: set[int] = set()
    mms: set[int] = set()
    for group in _task_groups(walk, btf, symbols):
        leader = group[0]
        for task in group:
            if task in seen or len(seen) >= MAX_TASKS:
                continue
            seen.add(task)
            if not walk.add(task, tsize, "task_struct"):
                continue
            walk.add_slab(task, task_order, "task_struct")
            raw = walk.read(task, tsize) or b""
            if len(raw) < tsize:
                continue
            pid = int.from_bytes(raw[o["pid"]:o["pid"] + 4], "little", signed=True)
            comm = raw[o["comm"]:o["comm"] + 16].split(b"\0")[0].decode("utf-8", "replace")
            if task == leader:
                out.append((pid, comm))

            def field_ptr(name: str, raw: bytes = raw) -> int:
                return int.from_bytes(raw[o[name]:o[name] + 8], "little")

            for name in ("cred", "real_cred"):
                if walk.add(field_ptr(name), btf.size("cred"), "cred"):
                    walk.add_slab(field_ptr(name), cred_order, "cred")
            if "fs" in o:
                _walk_fs(walk, btf, field_ptr("fs"))
            _walk_files(walk, btf, field_ptr("files"))
            mm = field_ptr("mm")
            if mm and mm not in mms:
                mms.add(mm)
                _walk_mm(walk, btf, mm)
    return out


def _walk_cpu_slabs(walk: _Walk, symbols: dict[str, int]) -> None:
    """The slabs each CPU hands out the next task_struct, signal_struct and cred from: the
    walk takes seconds on a busy machine, and the tasks forked meanwhile are likely there.
    Walked last, so as close to the read as can be."""
    at, nr = symbols.get("__per_cpu_offset"), symbols.get("nr_cpu_ids")
    n = min(walk.ptr(nr) & 0xFFFFFFFF, MAX_CPUS) if nr else 0
    raw = walk.read(at, 8 * n) if at and n else None
    per_cpu = [v for (v,) in struct.iter_unpack("<Q", raw)] if raw else []
    for cachep, kind in (("task_struct_cachep", "task_struct"), ("signal_cachep", "task_struct"),
                         ("cred_jar", "cred")):
        walk.add_cpu_slabs(symbols.get(cachep), per_cpu, kind)


def _walk_files(walk: _Walk, btf: Btf, files: int) -> None:
    """A files_struct, its fdtable, fd array and open files."""
    if not walk.add(files, btf.size("files_struct"), "files"):
        return
    fdt = walk.ptr(files + btf.offset("files_struct", "fdt"))
    if not walk.add(fdt, btf.size("fdtable"), "files"):
        return
    max_fds = walk.ptr(fdt + btf.offset("fdtable", "max_fds")) & 0xFFFFFFFF
    fd = walk.ptr(fdt + btf.offset("fdtable", "fd"))
    n = min(max_fds, MAX_FDS)
    if not n or not walk.add(fd, 8 * n, "files"):
        return
    table = walk.read(fd, 8 * n) or b""
    for (f,) in struct.iter_unpack("<Q", table):
        if f:
            _walk_file(walk, btf, f, "files")


MAX_DEPTH = 64  # path components (dentries) or mounts followed up from one file at most


def _walk_fs(walk: _Walk, btf: Btf, fs: int) -> None:
    """A task's fs_struct and its root and working directory (a file's path is said
    relative to the task's root)."""
    if not walk.add(fs, btf.size("fs_struct"), "files"):
        return
    for member in ("root", "pwd"):
        if btf.has("fs_struct", member):
            at = fs + btf.offset("fs_struct", member)
            _walk_path(walk, btf, walk.ptr(at + btf.offset("path", "mnt")),
                       walk.ptr(at + btf.offset("path", "dentry")), "files")


def _walk_file(walk: _Walk, btf: Btf, f: int, kind: str) -> None:
    """An open file and what naming it follows: its inode and superblock, its path's
    dentries up to the root and the mounts it crosses (Volatility's path_for_file)."""
    if f in walk.followed or not walk.add(f, btf.size("file"), kind):
        return
    walk.followed.add(f)
    if btf.has("file", "f_inode"):
        inode = walk.ptr(f + btf.offset("file", "f_inode"))
        if walk.add(inode, btf.size("inode"), kind) and btf.has("inode", "i_sb"):
            walk.add(walk.ptr(inode + btf.offset("inode", "i_sb")), btf.size("super_block"),
                     kind)
    at = f + btf.offset("file", "f_path")
    _walk_path(walk, btf, walk.ptr(at + btf.offset("path", "mnt")),
               walk.ptr(at + btf.offset("path", "dentry")), kind)


def _walk_path(walk: _Walk, btf: Btf, mnt: int, dentry: int, kind: str) -> None:
    """A path's dentries (each with its name and operations) up to their root, and its mount
    and the mounts above it, with the dentries they are mounted on."""
    _walk_dentries(walk, btf, dentry, kind)
    if not mnt or not btf.has("mount", "mnt"):
        return
    mnt_off = btf.offset("mount", "mnt")
    mount = mnt - mnt_off
    for _ in range(MAX_DEPTH):
        if mount in walk.followed or not walk.add(mount, btf.size("mount"), kind):
            return
        walk.followed.add(mount)
        _walk_dentries(walk, btf, walk.ptr(mount + btf.offset("mount", "mnt_mountpoint")),
                       kind)
        parent = walk.ptr(mount + btf.offset("mount", "mnt_parent"))
        if not parent or parent == mount:
            return
        mount = parent


def _walk_dentries(walk: _Walk, btf: Btf, dentry: int, kind: str) -> None:
    """A dentry and its parents up to the root: each one's name and operations."""
    size = btf.size("dentry")
    parent_off = btf.offset("dentry", "d_parent")
    name_off = btf.offset("dentry", "d_name") + btf.offset("qstr", "name")
    op_off = (btf.offset("dentry", "d_op")
              if btf.has("dentry", "d_op") and btf.has("dentry_operations", "d_dname")
              else None)
    for _ in range(MAX_DEPTH):
        if not dentry or dentry in walk.followed or not walk.add(dentry, size, kind):
            return
        walk.followed.add(dentry)
        name = walk.ptr(dentry + name_off)
        if not dentry <= name < dentry + size:  # a long name, outside the dentry
            walk.add(name, 256, kind)  # NAME_MAX + 1: where a component's name ends
        if op_off is not None:
            walk.add(walk.ptr(dentry + op_off), btf.size("dentry_operations"), kind)
        parent = walk.ptr(dentry + parent_off)
        if parent == dentry:
            return
        dentry = parent


def _walk_mm(walk: _Walk, btf: Btf, mm: int) -> None:
    """An mm_struct, its page-table tree (user half) and its VMAs."""
    if not walk.add(mm, btf.size("mm_struct"), "mm_struct"):
        return
    pgd = walk.ptr(mm + btf.offset("mm_struct", "pgd"))
    pa = walk.phys(pgd) if pgd else None
    if pa is not None:
        levels = getattr(walk.amap, "pgtable_levels", 4)
        walk.table_pages(pa & ~(PAGE - 1), levels, 0, 255, "page_tables", [1 << 16])
    vsize = btf.size("vm_area_struct")
    if btf.has("mm_struct", "mm_mt"):
        vmas = _maple_entries(walk, mm + btf.offset("mm_struct", "mm_mt")
                              + btf.offset("maple_tree", "ma_root"))
    else:
        vmas = _vma_list(walk, btf, mm)
    file_off = btf.offset("vm_area_struct", "vm_file")
    ops_off = (btf.offset("vm_area_struct", "vm_ops")
               if btf.has("vm_area_struct", "vm_ops") else None)
    for vma in vmas:
        if not walk.add(vma, vsize, "vma"):
            continue
        if ops_off is not None:  # a special mapping ([vdso]...) is named through its ops
            walk.add(walk.ptr(vma + ops_off), btf.size("vm_operations_struct"), "vma")
        f = walk.ptr(vma + file_off)
        if f:
            _walk_file(walk, btf, f, "vma")


def _vma_list(walk: _Walk, btf: Btf, mm: int) -> list[int]:
    """Before 6.1: mm->mmap, linked by vm_next."""
    nxt = btf.offset("vm_area_struct", "vm_next")
    out: list[int] = []
    seen: set[int] = set()
    vma = walk.ptr(mm + btf.offset("mm_struct", "mmap"))
    while vma and len(out) < MAX_VMAS and vma not in seen:
        seen.add(vma)
        out.append(vma)
        vma = walk.ptr(vma + nxt)
    return out


# lib/maple_tree.c: the tree's root, if a node, is an encoded node with bit 1 set (xa_is_node);
# a node's child slots hold encoded nodes without it: node address | type << 3 | 4
# (mt_mk_node: MAPLE_ENODE_TYPE_SHIFT, MAPLE_ENODE_NULL); nodes are 256 bytes. A leaf's slots
# hold the entries (VMAs, 8-byte aligned); a slot below 4096 is empty or the node's metadata.
_MAPLE_LEAF_64, _MAPLE_RANGE_64, _MAPLE_ARANGE_64 = 1, 2, 3
_MAPLE_SLOTS = {_MAPLE_LEAF_64: (128, 16), _MAPLE_RANGE_64: (128, 16), _MAPLE_ARANGE_64: (80, 10)}


def _maple_entries(walk: _Walk, root_at: int) -> list[int]:
    """The entries (VMAs) of a maple tree whose ma_root is at root_at."""
    root = walk.ptr(root_at)
    if root < 4096:
        return []
    if root & 3 != 2:  # the root is the tree's one entry
        return [root] if root & 7 == 0 else []
    out: list[int] = []
    stack = [root]
    nodes = 0
    while stack and len(out) < MAX_VMAS and nodes < MAX_VMAS:
        enode = stack.pop()
        node = enode & ~0xFF
        kind = (enode >> 3) & 0xF
        slots = _MAPLE_SLOTS.get(kind)
        if slots is None or not walk.add(node, 256, "vma"):
            continue
        nodes += 1
        raw = walk.read(node + slots[0], 8 * slots[1]) or b""
        children = [v for (v,) in struct.iter_unpack("<Q", raw) if v >= 4096]
        if kind == _MAPLE_LEAF_64:
            out.extend(v for v in children if v & 7 == 0)
        else:
            stack.extend(reversed(children))
    return out


@dataclass
class Snapshot:
    """The critical pages as read first, by source file offset, to stand in the output for
    what the copy in address order reads of them later."""

    runs: list[tuple[int, bytes]]  # (source offset, bytes), sorted and disjoint
    seconds: float = 0.0  # from the first read's start to the last read's end
    pages_unreadable: int = 0
    found: CriticalSet | None = None  # the set these pages came from
    realtime: bool = False  # read at SCHED_FIFO priority (no other task preempted it)
    _placed: set[int] = field(default_factory=set)  # run indexes written into the output

    def __post_init__(self) -> None:
        self._starts = [o for o, _d in self.runs]

    @property
    def pages(self) -> int:
        """Pages held."""
        return sum(len(d) for _o, d in self.runs) // PAGE

    @property
    def pages_not_placed(self) -> int:
        """Pages held that no copy of the output covers (left out as zeros meanwhile)."""
        return sum(len(d) for i, (_o, d) in enumerate(self.runs) if i not in self._placed) // PAGE

    def within(self, src: int, n: int) -> list[tuple[int, memoryview]]:
        """The held bytes in source offsets [src, src + n): (offset, bytes), in order."""
        i = max(bisect.bisect_right(self._starts, src) - 1, 0)
        out = []
        while i < len(self.runs) and self.runs[i][0] < src + n:
            off, data = self.runs[i]
            lo, hi = max(src, off), min(src + n, off + len(data))
            if lo < hi:
                out.append((lo, memoryview(data)[lo - off:hi - off]))
                self._placed.add(i)
            i += 1
        return out

    def rewrite(self, fd: int, items: list[Any]) -> None:
        """Put the held pages over what the copies of items wrote of them (pwrite)."""
        from kcore.formats.plan import Copy
        from kcore.formats.write import write_all

        for item in items:
            if isinstance(item, Copy):
                for off, data in self.within(item.src, item.length):
                    write_all(fd, data, item.dst + off - item.src)

    def overlay(self, buf: Any, src: int, n: int, fd: int, dst: int) -> None:
        """Patch a copied block (buf holds source [src, src + n), written at dst) and the
        output with the held pages: the hash then sees what the file holds."""
        from kcore.formats.write import write_all

        view = memoryview(buf).cast("B")
        for off, data in self.within(src, n):
            view[off - src:off - src + len(data)] = data
            write_all(fd, data, dst + off - src)


def read_first(source: Any, cset: CriticalSet, times: Any = None) -> Snapshot:
    """Read the critical pages now, as runs of adjacent pages in one C call (nothing else
    between two reads), and keep them (and when)."""
    from kcore import engine
    from kcore.pagetimes import CRITICAL

    extents = sorted(source.extents, key=lambda e: e.paddr)
    starts = [e.paddr for e in extents]
    offsets: list[int] = []
    for pa in cset.pages:
        i = bisect.bisect_right(starts, pa) - 1
        if i >= 0 and pa + PAGE <= extents[i].paddr + extents[i].length:
            offsets.append(extents[i].offset + pa - extents[i].paddr)
    offsets.sort()
    spans: list[list[int]] = []
    for off in offsets:
        if spans and spans[-1][0] + spans[-1][1] == off:
            spans[-1][1] += PAGE
        else:
            spans.append([off, PAGE])
    # one C call reads every span (no return to Python between two reads: a short window),
    # at real-time priority where the process may: no task of the load preempts it meanwhile
    with _realtime() as realtime:
        buf, stamps, st = engine.read_spans(source.fd, [(o, n) for o, n in spans])
    runs, at = [], 0
    for (off, n), r0, r1 in zip(spans, stamps, stamps[1:], strict=False):
        runs.append((off, bytes(buf[at:at + n])))
        at += n
        if times is not None:
            times.add(off, n, r0 - times.start, r1 - times.start, CRITICAL)
    return Snapshot(runs, (stamps[-1] - stamps[0]) / 1e9, st.pages_zero_filled, cset,
                    realtime=realtime)


@contextmanager
def _realtime() -> Iterator[bool]:
    """The calling thread at SCHED_FIFO priority 1 for the block, where it may (root's
    CAP_SYS_NICE), then back to its policy; yields whether it was. In a busy 6.1 guest the
    critical read took 18-47 ms so (6 reads) against 20-275 ms without (6, interleaved)."""
    try:
        old = (os.sched_getscheduler(0), os.sched_getparam(0))
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):  # not permitted, or not Linux
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, *old)
