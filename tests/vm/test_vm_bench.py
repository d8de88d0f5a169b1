"""kcore bench in the guest: dd on the real /proc/kcore against kcore, as ratios."""

from __future__ import annotations

import json
import math

from kcore.kclist import ALL_ONES
from tests.vm.guests import Guest
from tests.vm.test_vm_harness import loads


def test_bench_against_real_kcore(kaslr_guest: Guest) -> None:
    """Five runs over all RAM segments, speedups over dd with 1 MiB and 4 KiB blocks."""
    small_guest = kaslr_guest
    out = small_guest.vm.kcore("bench", "--against", "/proc/kcore", "--json",
                                    "--rounds", "1").check().stdout
    result = json.loads(out)
    ram = [p for p in loads(small_guest)
           if p["p_paddr"] != ALL_ONES and p["p_vaddr"] < 0xFFFFFFFF80000000]
    assert result["bytes"] == sum(p["p_filesz"] for p in ram)
    assert result["segments"] == len(ram)
    # the KASLR guest has 2 CPUs: the threaded engine run is there
    names = ["dd-1M", "dd-4k", "kcore-engine", "kcore-engine-threads", "kcore-dump",
             "kcore-startup"]
    assert [r["name"] for r in result["runs"]] == names
    for r in result["runs"]:
        assert r["bytes"] == (0 if r["name"] == "kcore-startup" else result["bytes"])
        assert r["seconds"] > 0
    ours = {"kcore-engine", "kcore-engine-threads", "kcore-dump", "kcore-dump-copy"}
    assert {f"{a}/{b}" for a in ours - {"kcore-dump-copy"} for b in ("dd-1M", "dd-4k")} <= set(
        result["speedup"]) <= {f"{a}/{b}" for a in ours for b in ("dd-1M", "dd-4k")}
    assert all(0 < v and math.isfinite(v) for v in result["speedup"].values())
    print(json.dumps(result, indent=1))
