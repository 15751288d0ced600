"""The CI-sized fuzzing run: 1,000 mutated real files through the prepare path."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchcxr.paths import PROJECT_ROOT
from benchmarks.fuzz import campaign

DATA = Path(__file__).parent / "data" / "fuzz"


def test_1000_mutants_raise_nothing_hang_nowhere_and_stay_under_the_memory_cap(tmp_path):
    result = campaign(1000, seed=1, work=tmp_path / "mutants")
    assert result["inputs"] == 1000 and sum(result["outcomes"].values()) == 1000
    assert result["uncaught_exceptions"] == 0, result["problems"]
    assert result["hangs_over_limit"] == 0 and result["crashes"] == 0, result["problems"]
    assert result["over_memory_cap"] == 0, result["problems"]
    assert set(result["mutations"]) >= {"flip", "truncate", "dicom_length", "dimensions"}
    assert result["outcomes"].get("failed", 0) > 100  # the mutants are really broken, and recorded as such


def test_mutants_that_crashed_gdcm_are_recorded_not_fatal(tmp_path):
    """Two mutants from the 20,000-input campaign on which pydicom's fall-back to GDCM ended the
    process (std::terminate, SIGSEGV). They must come back as a result in a process that lives."""
    import subprocess
    import sys

    pytest.importorskip("gdcm", reason="python-gdcm (a test extra) is what crashed")
    code = ("import sys, tempfile; from pathlib import Path; from batchcxr.pipeline import prepare_file; "
            "from batchcxr.settings import QualitySettings; p = Path(sys.argv[1]); "
            "r = prepare_file(p, p.parent, QualitySettings(), 512, Path(tempfile.mkdtemp())); "
            "print(type(r.result).__name__)")
    for name in ("gdcm-segfault.dcm", "gdcm-abort.dcm"):
        proc = subprocess.run([sys.executable, "-c", code, str(DATA / name)], capture_output=True, text=True,
                              timeout=120, cwd=PROJECT_ROOT)
        assert proc.returncode == 0, (name, proc.stderr[-2000:])
        assert proc.stdout.split()[-1] in ("PreparedImage", "Rejection"), name
