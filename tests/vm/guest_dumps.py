"""Run in a guest: dump its live memory in each format into a folder, verify each there.

`python guest_dumps.py FOLDER SHARE NAME:FORMAT[:ARGS]...` writes FOLDER/NAME with `kcore
dump --format FORMAT ARGS` (ARGS comma-separated), runs `kcore verify` on it where it lies
(tmpfs, or the 9p share whose reads come back short), and, when FOLDER is not SHARE, copies
it to SHARE/NAME for the host to read back and removes it (a guest's tmpfs holds one dump
at a time). SHARE/dumps.json gets each dump's exit status, seconds and verify findings.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

from kcore.cli import main
from kcore.verify import verify


def run(folder: str, share: str, jobs: list[str]) -> dict:
    """Dump, verify and (from tmpfs) hand over each job; the findings by name."""
    out = {}
    for job in jobs:
        name, fmt, *rest = job.split(":")
        args = rest[0].split(",") if rest and rest[0] else []
        path = os.path.join(folder, name)
        t0 = time.monotonic()
        rc = main(["dump", "-q", "--force", "--format", fmt, *args, "-o", path])
        took = time.monotonic() - t0
        found = verify(path).as_dict() if rc == 0 else {}
        out[name] = {"rc": rc, "seconds": round(took, 1), "verify": found}
        if folder != share:
            if rc == 0:
                shutil.copyfile(path, os.path.join(share, name))
            for p in (path, path + ".json", path + ".sha256"):
                if os.path.exists(p):
                    os.unlink(p)
    return out


if __name__ == "__main__":
    result = run(sys.argv[1], sys.argv[2], sys.argv[3:])
    with open(os.path.join(sys.argv[2], "dumps.json"), "w") as f:
        json.dump(result, f)
