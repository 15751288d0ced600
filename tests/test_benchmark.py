"""The benchmark harness works end to end on a small N (timings are not asserted)."""

import json
import subprocess
import sys

from batchcxr.paths import PROJECT_ROOT


def test_benchmark_smoke_run(tmp_path, shared_data):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--n", "20", "--quick", "--kinds",
         "jpeg,dicom-uncompressed,dicom-jpeg-baseline,dicom-j2k-lossless", "--populated", "300", "--repeat", "2", "--work", str(tmp_path / "work"), "--out", str(out)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ceiling"]["images_per_s"] > 0 and result["reference"]["images_per_s"] > 0
    assert set(result["ceiling"]["ways"]) == {"sequential, all cores per model", "side by side, cores shared",
                                              "batch split, one thread per core", "batch split, next batch queued"}
    cases = ("jpeg", "dicom-uncompressed", "dicom-jpeg-baseline", "dicom-j2k-lossless", "jpeg, cold cache",
             "jpeg, 300 studies stored")
    assert set(result["e2e"]) == set(cases)
    for case in cases:
        e2e = result["e2e"][case]
        assert e2e["scored"] == 20 and e2e["failed"] == 0, case
        assert set(e2e["stages"]) >= {"prepare", "infer", "images", "store", "report"}
        assert e2e["ceiling_before"] > 0 and e2e["ceiling_after"] > 0 and e2e["cpu_ms_per_image"] > 0, case
        assert e2e["wall_from_start_s"] > e2e["seconds"], case  # from process start: imports and loading too
        assert e2e["cpu_main_s"] > 0 and e2e["cpu_workers_s"] >= 0, case
        threads = e2e["cpu_threads_s"]  # the scorer's CPU by thread, each role there
        assert {"MainThread", "batchcxr-infer", "batchcxr-writer", "batchcxr-load", "other"} <= set(threads), case
        assert threads["batchcxr-infer"] > 0 and threads["MainThread"] > 0, case
        if case in ("jpeg", "dicom-uncompressed"):  # the roles hold most of it (openjpeg decodes on native threads)
            assert threads["other"] < 0.25 * e2e["cpu_main_s"], (case, threads)
        repeated = not case.startswith("jpeg,")  # each input kind twice (the median shown), not the other cases
        assert len(e2e.get("share_of_ceiling_runs", ())) == (2 if repeated else 0), case
    assert not (tmp_path / "work" / "runs").exists()  # each run's reports kept until the end, then removed
    assert "images/s" in proc.stdout and result["one_image_seconds"] > 0


def test_repeated_runs_report_the_median_share_with_every_run():
    from benchmarks.run import _share, median_run

    runs = [{"share_of_ceiling": v, "run": k} for k, v in enumerate([0.61, 0.55, 0.59])]
    chosen = median_run(runs)
    assert chosen["run"] == 2 and chosen["share_of_ceiling_runs"] == [0.61, 0.55, 0.59]
    assert _share(chosen) == "59 % (median of 61 / 55 / 59)"
    assert median_run(runs[:2])["run"] == 1  # even count: the lower middle one
    assert "share_of_ceiling_runs" not in median_run(runs[:1]) and _share(runs[0]) == "61 %"
