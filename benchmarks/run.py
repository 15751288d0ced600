"""`python -m benchmarks.run`: model-only ceiling, end-to-end pipeline and the reference notebook's
way, measured in one run on this machine; prints a table and writes JSON.

    python -m benchmarks.run                  # N = 2000, all input kinds
    python -m benchmarks.run --n 20 --quick   # smoke run (what the test runs)

Needs ../shared (full-resolution images). Big input sets are built once under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from batchcxr.paths import MODELS_DIR, PROJECT_ROOT
from benchmarks.inputs import KINDS, build, source_images

MODELS = ("cnn", "mobilenetv2")


def _prepared_batch(n: int) -> np.ndarray:
    import cv2

    from batchcxr.normalize.contract import to_model_input

    paths = source_images()
    return np.stack([to_model_input(cv2.imread(str(paths[i % len(paths)]), cv2.IMREAD_GRAYSCALE)) for i in range(n)])


def _throughput(models: list, batch: np.ndarray, seconds: float, side_by_side: bool) -> float:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(models)) as pool:
        def step() -> None:
            if side_by_side:
                list(pool.map(lambda m: m.run(batch), models))
            else:
                for m in models:
                    m.run(batch)

        step()  # warm-up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            done += len(batch)
        return done / (time.perf_counter() - start)


def model_ceiling(seconds: float, batch_size: int = 32) -> dict:
    """Both ONNX scoring graphs (probability + exact Grad-CAM) on a preloaded batch, no I/O.

    The best of two ways to use the cores: one model after the other with all cores each
    (ONNX Runtime's default), or both models side by side with an equal share each (as the
    pipeline runs them). The ceiling is the higher, so the pipeline is never measured against
    a handicapped model run.
    """
    from batchcxr.infer.runtime import load_scoring_model

    cores = os.cpu_count() or 1
    batch = _prepared_batch(batch_size)
    ways = {}
    for way, threads in (("sequential, all cores per model", cores),
                         ("side by side, cores shared", max(1, cores // len(MODELS)))):
        models = [load_scoring_model(MODELS_DIR / m, threads) for m in MODELS]
        ways[way] = _throughput(models, batch, seconds / 2, side_by_side=way.startswith("side"))
    best = max(ways, key=ways.get)
    return {"images_per_s": ways[best], "batch_size": batch_size, "way": best, "ways": ways}


def reference_way(n: int) -> dict:
    """The reference notebook's way: per image, decode + resize, model.predict per model, and an
    eager GradientTape Grad-CAM per model."""
    import cv2
    import keras
    import tensorflow as tf

    from batchcxr.infer.models import load_model
    from batchcxr.normalize.contract import equalize_of, finish_batch, to_model_input
    from batchcxr.training.architectures import CAM_LAYER, OUTPUT_LAYER

    models = [load_model(MODELS_DIR / m) for m in MODELS]
    grad_models = [keras.Model(m.keras_model.inputs, [m.keras_model.get_layer(CAM_LAYER[m.card["model"]]).output,
                                                      m.keras_model.get_layer(OUTPUT_LAYER).output])
                   for m in models]
    paths = source_images()
    start = time.perf_counter()
    for i in range(n):
        raw = to_model_input(cv2.imread(str(paths[i % len(paths)]), cv2.IMREAD_GRAYSCALE))[None]
        for m, g in zip(models, grad_models):
            x = finish_batch(raw, equalize_of(m.card))
            m.keras_model.predict(x, verbose=0)
            with tf.GradientTape() as tape:
                acts, out = g(x)
            grads = tape.gradient(out, acts)
            _ = tf.nn.relu(tf.reduce_sum(acts * tf.reduce_mean(grads, axis=(1, 2), keepdims=True), -1)).numpy()
    return {"images_per_s": n / (time.perf_counter() - start), "n": n}


def _group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in a process group (the scorer and its decode workers)."""
    total = 0
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:  # field 5 of /proc/PID/stat: the process group
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24: rss in pages
        except (OSError, IndexError, ValueError):
            continue
    return total / 2**20


def _warm_page_cache(folder: Path) -> None:
    """Read every input file once, so a run measures the pipeline, not this VM's disk (a cold
    2,000-file DICOM set measured 64 images/s here, the same set warm 83)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                while f.read(1 << 20):
                    pass


def end_to_end(folder: Path, decode_workers: int) -> dict:
    """One `score` run in a fresh process group (inputs in the page cache, earlier runs' writes
    flushed); samples the group's total RSS while it runs."""
    _warm_page_cache(folder)
    os.sync()  # the previous run's report files are written back now, not during this run
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.e2e", str(folder), str(decode_workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT,
                            start_new_session=True)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, _group_rss_mb(proc.pid))
        time.sleep(0.25)  # ~1.5 ms a sample: 0.6 % of a core
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"e2e run on {folder} failed: {err[-2000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_total_mb"] = peak
    return result


def one_image_wall(work: Path) -> float:
    """Wall seconds of `batchcxr score` on a one-image folder (warm disk: second of two runs)."""
    folder = work / "one-image"
    folder.mkdir(parents=True, exist_ok=True)
    src = source_images()[0]
    (folder / src.name).write_bytes(src.read_bytes())
    times = []
    for _ in range(2):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "batchcxr.cli", "score", str(folder), "--db", f"{tmp}/r.sqlite",
                            "--reports", f"{tmp}/reports", "--no-progress"], check=True, capture_output=True,
                           cwd=PROJECT_ROOT)
            times.append(time.perf_counter() - start)
    return times[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="images per input kind")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--rss-n", default="500,5000", help="JPEG set sizes for the memory check ('' to skip)")
    ap.add_argument("--baseline-n", type=int, default=40, help="images for the reference notebook's way")
    ap.add_argument("--ceiling-seconds", type=float, default=20.0)
    ap.add_argument("--decode-workers", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "batchcxr-bench")
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "latest.json")
    ap.add_argument("--quick", action="store_true", help="smoke run: short ceiling, small baseline, no RSS sweep")
    args = ap.parse_args(argv)
    if args.quick:
        args.ceiling_seconds, args.baseline_n, args.rss_n = 2.0, 3, ""

    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()},
                    "n": args.n, "decode_workers": args.decode_workers}
    result["ceiling"] = model_ceiling(args.ceiling_seconds)
    result["reference"] = reference_way(args.baseline_n)
    result["e2e"] = {}
    for kind in [k for k in args.kinds.split(",") if k]:
        folder = build(kind, args.n, args.work)
        result["e2e"][kind] = end_to_end(folder, args.decode_workers)
    result["rss"] = {}
    for n in [int(v) for v in args.rss_n.split(",") if v]:
        result["rss"][n] = end_to_end(build("jpeg", n, args.work), args.decode_workers)
    result["one_image_seconds"] = one_image_wall(args.work)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"wrote {args.out}")
    return 0


def format_table(r: dict) -> str:
    ceiling = r["ceiling"]["images_per_s"]
    ref = r["reference"]["images_per_s"]
    lines = [
        f"machine: {r['machine']['cpus']} CPUs, {r['machine']['platform']}; N = {r['n']}, "
        f"decode workers {r['decode_workers']}",
        f"model-only ceiling (both models + exact Grad-CAM, ONNX Runtime): {ceiling:.1f} images/s "
        f"({r['ceiling'].get('way', 'sequential')})",
        f"reference notebook's way (per-image predict + eager Grad-CAM):      {ref:.2f} images/s",
        "",
        f"{'input':<22} {'images/s':>9} {'% ceiling':>10} {'x reference':>12} {'peak RSS MB':>12}  stages (s)",
        f"{'':<22} {'':>9} {'':>10} {'':>12} {'(all procs)':>12}",
    ]
    for kind, e in r["e2e"].items():
        stages = ", ".join(f"{k} {v:.1f}" for k, v in e["stages"].items())
        lines.append(f"{kind:<22} {e['images_per_s']:>9.1f} {100 * e['images_per_s'] / ceiling:>9.0f}% "
                     f"{e['images_per_s'] / ref:>11.1f}x {e['peak_rss_total_mb']:>12.0f}  {stages}")
    for n, e in r.get("rss", {}).items():
        lines.append(f"jpeg, N = {n:<12} {e['images_per_s']:>9.1f} {100 * e['images_per_s'] / ceiling:>9.0f}% "
                     f"{e['images_per_s'] / ref:>11.1f}x {e['peak_rss_total_mb']:>12.0f}  (scorer alone {e['peak_rss_mb']:.0f})")
    lines.append(f"`batchcxr score` on a one-image folder: {r['one_image_seconds']:.2f} s wall")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
