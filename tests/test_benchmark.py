"""The benchmark harness works end to end on a small N (timings are not asserted)."""

import json
import subprocess
import sys

from batchcxr.paths import PROJECT_ROOT


def test_benchmark_smoke_run(tmp_path, shared_data):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--n", "20", "--quick", "--kinds",
         "jpeg,dicom-uncompressed,dicom-jpeg-baseline,dicom-j2k-lossless", "--work", str(tmp_path / "work"),
         "--out", str(out)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ceiling"]["images_per_s"] > 0 and result["reference"]["images_per_s"] > 0
    for kind in ("jpeg", "dicom-uncompressed", "dicom-jpeg-baseline", "dicom-j2k-lossless"):
        e2e = result["e2e"][kind]
        assert e2e["scored"] == 20 and e2e["failed"] == 0, kind
        assert set(e2e["stages"]) >= {"prepare", "infer", "images", "store", "report"}
    assert "images/s" in proc.stdout and result["one_image_seconds"] > 0
