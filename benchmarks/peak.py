"""`python -m benchmarks.peak OUT MODULE [ARGS...]`: run MODULE as __main__ (like `python -m`),
then write this process's own peak RSS in MB (VmHWM) to OUT, whatever the exit.

Not the parent's ru_maxrss from wait4: Linux folds the forking process's peak into the child's
at exec, so a test or benchmark harness that is large itself would be measured instead."""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    out, module, *args = sys.argv[1:]
    atexit.register(lambda: Path(out).write_text(f"{vm_hwm_mb():.1f}\n"))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
