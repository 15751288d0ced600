"""The CI-sized fuzzing run: 1,000 mutated real files through the prepare path."""

from __future__ import annotations

from benchmarks.fuzz import campaign


def test_1000_mutants_raise_nothing_hang_nowhere_and_stay_under_the_memory_cap(tmp_path):
    result = campaign(1000, seed=1, work=tmp_path / "mutants")
    assert result["inputs"] == 1000 and sum(result["outcomes"].values()) == 1000
    assert result["uncaught_exceptions"] == 0, result["problems"]
    assert result["hangs_over_limit"] == 0 and result["crashes"] == 0, result["problems"]
    assert result["over_memory_cap"] == 0, result["problems"]
    assert set(result["mutations"]) >= {"flip", "truncate", "dicom_length", "dimensions"}
    assert result["outcomes"].get("failed", 0) > 100  # the mutants are really broken, and recorded as such
