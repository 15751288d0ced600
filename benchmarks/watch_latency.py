"""`python -m benchmarks.watch_latency`: drop-to-report latency of the watcher.

Starts `batchcxr watch` as a subprocess on a fresh drop folder, then measures
(1) one one-image study: seconds from the file's rename into the drop folder to its
study page on disk, and (2) a burst of N files dropped at once: seconds until every file
is archived. Run with the default timings (file quiet 2 s, study quiet 5 s) and with
--fast (0.3 s / 0.6 s) to see the pipeline's own share. Needs ../shared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batchcxr.paths import PROJECT_ROOT
from benchmarks.inputs import build


def _wait(predicate, timeout: float, step: float = 0.05) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if predicate():
            return time.perf_counter() - start
        time.sleep(step)
    raise TimeoutError("condition not met")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--fast", action="store_true", help="short quiet periods (0.3 s file, 0.6 s study)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "batchcxr-bench")
    args = ap.parse_args(argv)
    source = build("jpeg", args.burst + 1, args.work)
    files = sorted(p for p in source.rglob("*.jpeg"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        drop, archive = tmp / "drop", tmp / "archive"
        drop.mkdir()
        timings = ("file_quiet_seconds = 0.3\nstudy_quiet_seconds = 0.6\nbatch_wait_seconds = 0.2\n"
                   if args.fast else "")
        cfg = tmp / "c.toml"
        cfg.write_text(f'[batchcxr]\ndb_url = "{tmp}/r.sqlite"\nreports_dir = "{tmp}/reports"\n'
                       f'[batchcxr.watch]\narchive_dir = "{archive}"\nquarantine_dir = "{tmp}/q"\n{timings}')
        proc = subprocess.Popen([sys.executable, "-m", "batchcxr.cli", "watch", str(drop), "--config", str(cfg)],
                                cwd=PROJECT_ROOT, stderr=subprocess.DEVNULL)
        try:
            _wait(lambda: (tmp / "r.sqlite").exists(), 60)
            time.sleep(2.0)  # models loaded
            one = drop / "one" / files[0].name
            one.parent.mkdir()
            part = one.with_suffix(".part")
            part.write_bytes(files[0].read_bytes())
            start = time.perf_counter()
            part.rename(one)
            _wait(lambda: (archive / "one" / one.name).exists(), 120)
            single = time.perf_counter() - start
            burst_dir = drop / "burst"
            burst_dir.mkdir()
            start = time.perf_counter()
            for i, f in enumerate(files[1 : args.burst + 1]):
                target = burst_dir / f"{i // 50:03d}" / f.name
                target.parent.mkdir(exist_ok=True)
                target.write_bytes(f.read_bytes())
            copied = time.perf_counter() - start
            _wait(lambda: sum(1 for _ in (archive / "burst").rglob("*.jpeg")) >= args.burst
                  if (archive / "burst").exists() else False, 3600, step=0.5)
            burst = time.perf_counter() - start
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    result = {"fast": args.fast, "one_image_study_seconds": single, "burst_files": args.burst,
              "burst_copy_seconds": copied, "burst_seconds": burst, "burst_images_per_s": args.burst / burst}
    print(json.dumps(result, indent=2))
    out = PROJECT_ROOT / "benchmarks" / "results" / f"watch{'-fast' if args.fast else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
