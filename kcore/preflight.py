"""`kcore check`'s facts: which live sources work on a system and why the others do not.

Nothing here writes or changes anything: files under the root are read, the live sources are
opened read-only and one page of RAM is read from each.

What the kernel does (Linux 6.1, security/lockdown, fs/proc/kcore.c, drivers/char/mem.c):
- `/sys/kernel/security/lockdown` reads like "none [integrity] confidentiality". `integrity`
  refuses opening /dev/mem (LOCKDOWN_DEV_MEM); `confidentiality` also refuses /proc/kcore
  (LOCKDOWN_KCORE). Both give EPERM. Lockdown can be raised at run time, never lowered.
- /proc/kcore also needs CAP_SYS_RAWIO (EPERM otherwise), /dev/mem CAP_SYS_RAWIO and, with
  CONFIG_STRICT_DEVMEM, reads of System RAM above 1 MiB fail with EPERM (iomem=relaxed lifts
  it for I/O memory only, not RAM).
- A container masks /proc/kcore by bind-mounting /dev/null over it: a character device (1:3)
  where a regular 0400 file of ~128 TiB should be; reads give nothing.
- kptr_restrict (/proc/sys/kernel/kptr_restrict) 1 hides kallsyms addresses from readers
  without CAP_SYSLOG, 2 from everybody: they read as zeros.
- Secure Boot: the EFI variable SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c under
  /sys/firmware/efi/efivars, 4 attribute bytes then one byte, 1 when enabled. Distribution
  kernels enter lockdown=integrity by themselves when it is on.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kcore.errors import KcoreError
from kcore.sources.live import (
    AUTO_ORDER,
    SourceProbe,
    kcore_mask,
    lockdown_mode,
    probe,
    probe_all,
)
from kcore.symbols import banner_in_memory

SECURE_BOOT_VAR = "sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"
DEFAULT_TEXT_BASE = 0xFFFFFFFF81000000  # _text without KASLR (x86-64)


@dataclass
class Report:
    """What `kcore check` found."""

    root: str
    euid: int
    source: str = "auto"
    release: str | None = None
    arch: str | None = None
    paging: str | None = None
    kaslr: str | None = None
    ram_bytes: int | None = None
    lockdown: str | None = None
    secure_boot: str | None = None
    kptr_restrict: str | None = None
    kallsyms: str | None = None
    strict_devmem: str | None = None
    kcore_masked: str | None = None
    sources: list[SourceProbe] = field(default_factory=list)
    verdict: bool = False
    chosen: str | None = None
    problem: str | None = None
    advice: str | None = None
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)
    output_dir: str | None = None
    free_bytes: int | None = None
    command: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return asdict(self)


def _read(root: Path, rel: str, limit: int = 1 << 22) -> str | None:
    """A small text file under root, or None when it cannot be read."""
    try:
        with open(root / rel, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except (OSError, ValueError):  # ValueError: a NUL byte in the root's path
        return None


def _word(root: Path, rel: str) -> str | None:
    """A one-line value (osrelease, arch, kptr_restrict); None when missing or not one line of
    printable text (discovery then says what is wrong with it)."""
    text = (_read(root, rel) or "").strip()
    return text if text and text.isprintable() and text.isascii() else None


def secure_boot(root: Path) -> str:
    """Secure Boot state from the EFI variable: enabled, disabled, or why unknown."""
    if not (root / "sys/firmware/efi").is_dir():
        return "no (not an EFI boot)"
    try:
        data = (root / SECURE_BOOT_VAR).read_bytes()
    except FileNotFoundError:
        if not (root / "sys/firmware/efi/efivars").is_dir() or \
                not os.listdir(root / "sys/firmware/efi/efivars"):
            return "unknown (efivarfs is not mounted at sys/firmware/efi/efivars)"
        return "no (no SecureBoot variable)"
    except OSError as exc:
        return f"unknown ({exc.strerror})"
    if len(data) < 5:
        return "unknown (SecureBoot variable too short)"
    return "enabled" if data[4] == 1 else "disabled"


def _kallsyms_state(root: Path) -> tuple[str, int | None]:
    """Whether kallsyms gives addresses, and _text's address when it does."""
    text = _read(root, "proc/kallsyms", limit=1 << 26)
    if text is None:
        return "unreadable", None
    addr = None
    nonzero = False
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        try:
            value = int(parts[0], 16)
        except ValueError:
            continue
        nonzero = nonzero or value != 0
        if parts[2] == "_text" and len(parts) == 3:
            addr = value
            break
    if not nonzero:
        return "addresses hidden (read as zeros: kptr_restrict, or not root)", None
    return "addresses visible", addr


def _ram_bytes(root: Path) -> int | None:
    """Bytes of System RAM in proc/iomem (MemTotal when iomem hides addresses)."""
    from kcore.iomem import parse_iomem

    text = _read(root, "proc/iomem")
    if text is not None:
        try:
            ram = parse_iomem(text).system_ram()
        except KcoreError:
            ram = []
        total = sum(end + 1 - start for start, end in ram) if any(e for _s, e in ram) else 0
        if total:
            return total
    meminfo = _read(root, "proc/meminfo") or ""
    for line in meminfo.splitlines():
        words = line.split()
        if words[:1] == ["MemTotal:"]:  # "MemTotal:  16307612 kB"
            kib = words[1] if len(words) > 1 else ""
            return int(kib) * 1024 if kib.isascii() and kib.isdigit() and len(kib) < 16 \
                else None
    return None


def _paging(root: Path, info: Any) -> str:
    if info is not None and info.get("NUMBER(pgtable_l5_enabled)") is not None:
        return "5-level" if info.number("pgtable_l5_enabled") else "4-level"
    cpuinfo = _read(root, "proc/cpuinfo") or ""
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if flags is not None and " la57" not in flags + " ":
        return "4-level (the CPU has no la57)"
    return "unknown (4-level unless the kernel enabled la57)"


def _kaslr(root: Path, info: Any, text_addr: int | None) -> str:
    if info is not None and info.get("KERNELOFFSET") is not None:
        off = info.kerneloffset
        return f"on (KERNELOFFSET {off:#x})" if off else "off (KERNELOFFSET 0)"
    if text_addr is not None:
        off = text_addr - DEFAULT_TEXT_BASE
        return f"on (_text {text_addr:#x})" if off else "off (_text at the default address)"
    if "nokaslr" in (_read(root, "proc/cmdline") or "").split():
        return "off (nokaslr on the command line)"
    return "unknown (kallsyms hidden and no VMCOREINFO readable)"


def _strict_devmem(root: Path, release: str | None, probes: list[SourceProbe]) -> str:
    mem = next((p for p in probes if p.name == "mem"), None)
    if mem is not None and "STRICT_DEVMEM" in mem.reason:
        return "on (reading RAM through /dev/mem fails with EPERM)"
    if mem is not None and mem.works:
        return "off (/dev/mem reads RAM)"
    sane = release and "/" not in release and release.isprintable()
    config = _read(root, f"boot/config-{release}") if sane else None
    if config is not None:
        on = "CONFIG_STRICT_DEVMEM=y" in config
        return ("on" if on else "off") + f" (boot/config-{release})"
    return "unknown (/dev/mem cannot be probed, no boot/config)"


def check(root: str = "/", output_dir: str | None = None, source: str = "auto") -> Report:
    """Probe a system (read-only) and say whether and how a dump would work."""
    rootp = Path(root)
    euid = os.geteuid()
    rep = Report(root=root, euid=euid, source=source)
    rep.release = (_word(rootp, "proc/sys/kernel/osrelease")
                   or (os.uname().release if root == "/" else None))
    rep.arch = (_word(rootp, "proc/sys/kernel/arch")
                or (os.uname().machine if root == "/" else None))
    rep.ram_bytes = _ram_bytes(rootp)
    mode, how = lockdown_mode(rootp)
    rep.lockdown = f"{mode or 'unknown'} ({how})"
    rep.secure_boot = secure_boot(rootp)
    kptr = _word(rootp, "proc/sys/kernel/kptr_restrict")
    rep.kptr_restrict = kptr or "unknown"
    rep.kallsyms, text_addr = _kallsyms_state(rootp)
    rep.kcore_masked = kcore_mask(rootp) or "no"
    rep.sources = probe_all(rootp, mode, euid)
    rep.strict_devmem = _strict_devmem(rootp, rep.release, rep.sources)

    # The verdict: what `kcore dump` itself does (discover over the auto source).
    system = None
    try:
        from kcore.discover import discover

        system = discover(rootp, source)
    except KcoreError as exc:
        rep.problem = str(exc)
    except OSError as exc:
        rep.problem = f"{exc.strerror or exc}: {exc.filename}"
    info = None
    try:
        if system is not None:
            info = system.vmcoreinfo
            rep.verdict = True
            rep.chosen = getattr(system.source, "path", None)
            rep.sizes = estimate_sizes(system)
        rep.paging = _paging(rootp, info)
        rep.kaslr = _kaslr(rootp, info, text_addr)
    finally:
        if system is not None:
            system.close()
    rep.output_dir = os.path.abspath(output_dir or os.getcwd())
    try:
        rep.free_bytes = shutil.disk_usage(rep.output_dir).free
    except OSError:
        rep.free_bytes = None
    if rep.verdict:
        rep.command = _command(rep, root, output_dir)
    else:
        rep.advice = _advice(rep, mode, euid)
    return rep


def estimate_sizes(system: Any) -> dict[str, dict[str, int]]:
    """Per format: the output's size and the disk space it may take.

    elf and elf -d 31 (classified from the mem_map, as dump --estimate does) are estimates
    of the core then written, zero granules and zero pages left out as the dump leaves them
    (kcore.formats.elf.estimate_size: a sample of the memory); the other formats' sizes are
    without zero elision (upper bounds).
    """
    from kcore.formats import FORMATS
    from kcore.formats.plan import Request

    out: dict[str, dict[str, int]] = {}
    for name, fmt in FORMATS.items():
        if fmt.writes_itself:
            continue  # compressing formats (kdump, avml) write themselves: no plan to size
        req = Request(system, system.source, elide=False)
        try:
            plan = fmt.plan(req)
        except KcoreError:
            continue
        space = plan.size if not fmt.sparse else plan.space_needed  # zeros written
        out[name] = {"size": plan.size, "space": space}
    sampled = [f for f in FORMATS.values() if f.estimate is not None and f.name in out]
    for fmt in sampled:
        assert fmt.estimate is not None
        size, read = fmt.estimate(Request(system, system.source))
        out[fmt.name] = {"size": size, "space": size, "at_most": out[fmt.name]["size"],
                         "sampled_bytes": read * Request.granule}
    try:  # -d 31 (the kernel's own pages): classify the mem_map, as dump --estimate does
        from kcore import dumplevel

        filtered = dumplevel.apply(system, system.source, 31) if sampled else None
        for fmt in sampled:
            assert fmt.estimate is not None and filtered is not None
            page = filtered.classes.page_size
            size, read = fmt.estimate(Request(system, filtered.source, granule=page,
                                              dump_level=31))
            out[f"{fmt.name} -d 31"] = {"size": size, "space": size,
                                        "sampled_bytes": read * page}
    except (KcoreError, OSError, AttributeError, ValueError):
        pass  # a kernel whose VMCOREINFO lacks what -d needs: no estimate
    return out


def _command(rep: Report, root: str, output_dir: str | None) -> str:
    chosen = next((p for p in rep.sources if p.works), None)
    words = ["kcore", "dump"] if rep.euid == 0 else ["sudo", "kcore", "dump"]
    if root != "/":
        words += ["--root", root]
    if rep.source != "auto":
        words += ["--source", rep.source]
    elif chosen is not None and chosen.name != "kcore":
        words += ["--source", f"devmem:{chosen.path}"]
    target = os.path.join(output_dir or ".", "mem.elf")
    fits = {k: rep.free_bytes is None or v["space"] * 21 // 20 <= rep.free_bytes
            for k, v in rep.sizes.items()}  # 5% to spare: the sizes are estimates
    if not fits.get("elf", True) and fits.get("elf -d 31"):
        words += ["-d", "31"]  # the kernel's own pages fit where the whole RAM does not
    words += ["-o", target]
    if not fits.get("elf", True) and not fits.get("elf -d 31"):
        words[-1] = "- | zstd -T0 > /elsewhere/mem.elf.zst"
    return " ".join(words)


def _advice(rep: Report, mode: str | None, euid: int) -> str:
    reasons = " ".join(p.reason for p in rep.sources)
    if euid != 0 and "run as root" in reasons:
        return "run kcore check (and the dump) as root: sudo kcore dump -o mem.elf"
    if mode == "confidentiality":
        return ("lockdown=confidentiality forbids /proc/kcore and /dev/mem until reboot: dump "
                "from the hypervisor (kcore dump --source pid:... or a QEMU core), or boot "
                "without lockdown (Secure Boot off, lockdown=none) or into kdump")
    if "masked" in (rep.kcore_masked or "") or "masked" in reasons:
        return ("/proc/kcore is masked here (a container): run kcore on the host, or in a "
                "container started with the host's /proc (--privileged, no mask)")
    if rep.problem and "kallsyms" in rep.problem:
        return ("kallsyms addresses are hidden: run as root, or set "
                "sysctl kernel.kptr_restrict=0 for the dump")
    if rep.source != "auto":
        return f"the source cannot be dumped: {rep.problem}"
    if all("missing" in p.reason for p in rep.sources):
        return ("this system shows no kernel memory (/proc/kcore, /dev/crash and /dev/mem are "
                "missing): dump a saved image instead (kcore dump --root DIR --source SPEC)")
    return f"fix one source above: {rep.problem}"


def manifest_facts(root: str, spec: str, chosen: Any, system: Any = None) -> dict[str, Any]:
    """What a dump's manifest records of the system beside the memory (read-only)."""
    rootp = Path(root)

    def lines(rel: str) -> list[str] | None:
        text = _read(rootp, rel)
        return None if text is None else text.splitlines()

    mode, how = lockdown_mode(rootp)
    version = _read(rootp, "proc/version")
    facts: dict[str, Any] = {
        "banner": version.strip() if version else (banner_in_memory(rootp, system)
                                                    if system is not None else None),
        "boot_id": (_read(rootp, "proc/sys/kernel/random/boot_id") or "").strip() or None,
        "lockdown": {"mode": mode, "how": how},
        "modules": lines("proc/modules"),
        "iomem": lines("proc/iomem"),
    }
    path = getattr(chosen, "path", None)
    choice: dict[str, Any] = {"spec": spec, "opened": getattr(chosen, "spec", None),
                              "path": path}
    if spec == "auto":
        euid = os.geteuid()
        order = [name for name, _rel in AUTO_ORDER]
        kind = os.path.basename(path or "")
        others = {}
        for name in order:
            if name == kind:
                choice["why"] = "the first live source in auto's order that works"
                continue
            p = probe(rootp, name, mode, euid)
            others[p.path] = (p.reason if not p.works or order.index(name) < order.index(kind)
                              else "works, but comes after the chosen one")
        choice["others"] = others
    else:
        choice["why"] = "given with --source"
    facts["source_choice"] = choice
    return facts
