"""The command line as an administrator uses it: real subprocesses, real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from batchcxr.modelcard import read_card, sha256_file
from batchcxr.paths import DEMO_DIR, MODELS_DIR

from tests.dicoms import chest_like, dicom_file


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchcxr.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_score_demo_then_export(tmp_path):
    shutil.copytree(DEMO_DIR, tmp_path / "demo")
    first = _run("score", "demo", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "scored     7" in first.stdout and "lateral view (ViewPosition LL)" in first.stdout
    report = Path(first.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert report.is_file() and report.parent == tmp_path / "batchcxr-reports"
    again = _run("score", "demo", cwd=tmp_path)
    assert "scored     0" in again.stdout and "unchanged  7" in again.stdout
    assert "skipped earlier 1" in again.stdout and "lateral view" in again.stdout  # never counted as scored
    assert again.stderr == ""  # quiet by default: no library INFO lines
    exported = _run("export", "--format", "json", cwd=tmp_path)
    rows = json.loads(exported.stdout)
    assert len(rows) == 14 and {r["model_name"] for r in rows} == {"cnn", "mobilenetv2"}
    assert all(0 <= r["probability"] <= 1 and r["label"] in ("NORMAL", "PNEUMONIA") for r in rows)
    # both shipped models are calibrated: the export carries the probability the reports show, and
    # the label is the raw probability against the raw threshold, i.e. the calibrated one against its own
    cards = {name: read_card(MODELS_DIR / name) for name in ("cnn", "mobilenetv2")}
    for r in rows:
        cal = cards[r["model_name"]]["calibration"]
        assert 0 <= r["calibrated_probability"] <= 1
        assert (r["calibrated_probability"] >= cal["threshold_calibrated"]) == (r["label"] == "PNEUMONIA")
    csv_out = _run("export", "--format", "csv", "--out", "x.csv", cwd=tmp_path)
    assert csv_out.returncode == 0 and (tmp_path / "x.csv").read_text().count("\n") == 15


def test_exit_code_one_when_a_file_failed(tmp_path):
    folder = tmp_path / "in"
    dicom_file(folder / "ok.dcm")
    (folder / "empty.dcm").write_bytes(b"")
    out = _run("score", str(folder), "--db", str(tmp_path / "r.sqlite"), "--reports", str(tmp_path / "rep"),
               cwd=tmp_path)
    assert out.returncode == 1
    assert "failed     1" in out.stdout and "empty file (0 bytes)" in out.stdout


def test_bad_settings_exit_two_and_missing_models_exit_three(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[batchcxr]\nbatch_size = 0\n")
    (tmp_path / "in").mkdir()
    assert _run("score", "in", "--config", str(cfg), cwd=tmp_path).returncode == 2
    cfg.write_text(f'[batchcxr]\nmodels = ["{tmp_path / "nope"}"]\n')
    out = _run("score", "in", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 3 and "model card not found" in out.stderr
    for i in range(4):  # twice a batch: the decode workers start before the models load, and stop with the run
        (tmp_path / "in" / f"{i}.dcm").write_bytes(b"")
    cfg.write_text(f'[batchcxr]\nbatch_size = 2\ndecode_workers = 1\nmodels = ["{tmp_path / "nope"}"]\n')
    out = _run("score", "in", "--config", str(cfg), cwd=tmp_path)
    assert out.returncode == 3 and "model card not found" in out.stderr


def test_a_graph_onnx_runtime_cannot_open_stops_the_run_at_its_start(tmp_path):
    """The sessions are made while the first files are read (Scorer.from_settings): a graph that
    passes its card's hash but that ONNX Runtime cannot open still ends the run as 'cannot start'
    (exit 3, the file named), and the run releases what it claimed."""
    import sqlite3

    models = tmp_path / "models"
    for name in ("cnn", "mobilenetv2"):
        shutil.copytree(MODELS_DIR / name, models / name, ignore=shutil.ignore_patterns("*.keras"))
    broken = models / "mobilenetv2" / "scoring.onnx"
    broken.write_bytes(b"not an ONNX graph" * 100)
    card_file = models / "mobilenetv2" / "card.json"
    card = json.loads(card_file.read_text())
    card["scoring"]["sha256"] = sha256_file(broken)
    card_file.write_text(json.dumps(card))
    folder = tmp_path / "in"
    for i in range(4):
        dicom_file(folder / f"{i}.dcm", chest_like(seed=i))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[batchcxr]\nbatch_size = 2\ndecode_workers = 1\n'
                   f'models = ["{models / "cnn"}", "{models / "mobilenetv2"}"]\n')
    db = tmp_path / "r.sqlite"
    out = _run("score", "in", "--config", str(cfg), "--db", str(db), "--reports", str(tmp_path / "rep"), cwd=tmp_path)
    assert out.returncode == 3, out.stderr
    assert "cannot start" in out.stderr and f"{broken}: ONNX Runtime cannot open it" in out.stderr
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT status FROM runs").fetchall() == [("interrupted",)]
        assert con.execute("SELECT count(*) FROM claims").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM predictions").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM errors").fetchone() == (0,)  # not the files' fault
    # the daemon waits for its sessions before it watches: it says so at start
    (tmp_path / "drop").mkdir()
    watch = _run("watch", str(tmp_path / "drop"), "--config", str(cfg), "--db", str(db), "--reports",
                 str(tmp_path / "rep"), cwd=tmp_path)
    assert watch.returncode == 3 and f"{broken}: ONNX Runtime cannot open it" in watch.stderr


def test_train_refuses_outside_swap_without_a_lung_contract(tmp_path):
    """--outside swaps what lies outside the lung fields: without --lungs there are none, so the
    options are refused (exit 2) before any data is read."""
    out = _run("train", "--model", "cnn", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--outside", "0.5",
               cwd=tmp_path)
    assert out.returncode == 2 and "--outside needs a lung contract" in out.stderr
    assert not (tmp_path / "m").exists()


def test_train_refuses_lung_guidance_without_a_lung_contract(tmp_path):
    """--lung-guidance charges evidence outside the lung fields: refused (exit 2) without --lungs."""
    out = _run("train", "--model", "cnn", "--data", str(tmp_path), "--out", str(tmp_path / "m"),
               "--lung-guidance", "1", cwd=tmp_path)
    assert out.returncode == 2 and "--lung-guidance needs a lung contract" in out.stderr
    assert not (tmp_path / "m").exists()


def test_apply_calibration_gives_the_archive_a_new_calibration_without_scoring_again(tmp_path):
    """Score the demo, make a copy of the MobileNetV2 folder with another calibration (as
    `calibrate --from-reviews` would), apply it: the report pages show its probabilities, the
    export carries its version beside the old one, and a run that names it meets every demo
    film as unchanged (nothing decoded or scored again)."""
    from batchcxr.evaluation.calibration import apply
    from batchcxr.modelcard import model_version, write_card

    shutil.copytree(DEMO_DIR, tmp_path / "demo")
    assert _run("score", "demo", cwd=tmp_path).returncode == 0
    site = tmp_path / "mobilenetv2-site"
    shutil.copytree(MODELS_DIR / "mobilenetv2", site, ignore=shutil.ignore_patterns("*.keras"))
    card = read_card(site)
    card["calibration"] = dict(card["calibration"], a=0.5, b=-2.0, fitted_on="a test")
    card["version"] = model_version(card["name"], card["weights"]["sha256"], card["calibration"])
    write_card(site, card)

    done = _run("apply-calibration", "--model", str(site), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{card['version']}: 7 predictions written without scoring again" in done.stdout
    assert f"name {site} in the settings' models" in done.stdout
    rows = json.loads(_run("export", "--format", "json", cwd=tmp_path).stdout)
    new = [r for r in rows if r["model_version"] == card["version"]]
    assert len(new) == 7 and len(rows) == 21
    old = {r["path"]: r for r in rows if r["model_name"] == "mobilenetv2" and r["model_version"] != card["version"]}
    for r in new:
        assert r["probability"] == old[r["path"]]["probability"] and r["label"] == old[r["path"]]["label"]
        assert abs(r["calibrated_probability"] - float(apply(r["probability"], 0.5, -2.0))) < 1e-9
    pages = list((tmp_path / "batchcxr-reports" / "studies").rglob("*.html"))
    shown = [p.read_text() for p in pages if f"P(pneumonia) {new[0]['calibrated_probability']:.2f} <small>(calibrated"
             in p.read_text()]
    assert shown and all(card["version"] in text for text in shown)  # its page was written again with it

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[batchcxr]\nmodels = ["{MODELS_DIR / "cnn"}", "{site}"]\n')
    again = _run("score", "demo", "--config", str(cfg), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "scored     0" in again.stdout and "unchanged  7" in again.stdout
