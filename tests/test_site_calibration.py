"""`batchcxr calibrate --from-reviews`: a site refits a model's calibration on its reviewed studies
(SQLite and a real PostgreSQL)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from batchcxr.domain import FileKind, ImageInfo, ModelOutput, PreparedImage, SourceFile, StudyInfo
from batchcxr.evaluation.calibration import apply, fit_platt
from batchcxr.evaluation.site_calibration import recalibrate_from_reviews, review_pairs, weights_prefix
from batchcxr.infer.runtime import load_scoring_model
from batchcxr.modelcard import read_card
from batchcxr.paths import MODELS_DIR
from batchcxr.store.repo import ScoredImage, Store

TRUE_A, TRUE_B = 0.5, -1.0
"""How this imagined site's outcomes follow the model's raw probability: far from the shipped
calibration (a ~1, b ~0.46), as on a site whose normals score high."""


def _image(k: int, study: str, outputs: list[ModelOutput], view: str = "PA") -> ScoredImage:
    source = SourceFile(Path(f"/in/{k}.dcm"), FileKind.DICOM, f"{k:064x}", 100 + k, 1, 1000 + k, 10**18 + k)
    prepared = PreparedImage(source, StudyInfo(study), ImageInfo(sop_instance_uid=f"1.2.3.{k}", modality="DX",
                                                                 view_position=view),
                             None, np.zeros((224, 224, 1), np.uint8), [], display_file=f"images/{k}.jpg")
    return ScoredImage(prepared, outputs, f"images/{k}.jpg", {o.model_name: f"images/{k}-{o.model_name}.png"
                                                              for o in outputs})


def _output(card: dict, version: str, raw: float) -> ModelOutput:
    cal = card["calibration"]
    return ModelOutput(card["name"], version, raw, card["threshold"]["value"], np.zeros((7, 7), np.float32),
                       float(apply(raw, cal["a"], cal["b"])))


def _site(store: Store, card: dict, studies: int, seed: int = 0) -> dict[str, tuple[int, float]]:
    """Studies of a frontal image each (some with a lateral that scores higher, some also scored
    by other weights), verdicts drawn from TRUE_A / TRUE_B, three uncertain ones; returns each
    judged study's (verdict, frontal raw probability) by study key."""
    rng = np.random.default_rng(seed)
    other = f"{card['name']}-{'0' * 12}-cabcd"  # another training's weights: not these raw probabilities
    items, newer, truth = [], [], {}
    for k in range(studies):
        key, raw = f"1.2.826.{k}", float(rng.uniform(0.02, 0.98))
        items.append(_image(2 * k, key, [_output(card, card["version"], raw)]))
        if k % 3 == 0:
            items.append(_image(2 * k + 1, key, [_output(card, card["version"], 0.999)], view="LL"))
        if k % 2 == 0:  # a later run of other weights: the image's newest result, but not these weights'
            newer.append(_image(2 * k, key, [_output(card, other, 0.999)]))
        truth[key] = (int(rng.random() < apply(raw, TRUE_A, TRUE_B)), raw)
    assert store.record_scored(store.start_run("score", "/in", [card["version"]]), items) == []
    assert store.record_scored(store.start_run("score", "/in", [other]), newer) == []
    ids = {s.study_key: s.id for s in store.studies()}
    for n, (key, (y, _)) in enumerate(truth.items()):
        store.add_verdict(ids[key], "reader", "uncertain" if n < 3 else ("yes" if y else "no"))
    return {key: t for n, (key, t) in enumerate(truth.items()) if n >= 3}


@pytest.fixture
def store(db_url):
    s = Store.open(db_url)
    yield s
    s.close()


@pytest.fixture
def shipped(tmp_path) -> Path:
    """A copy of the shipped MobileNetV2 folder (its scoring graph and card)."""
    folder = tmp_path / "models" / "mobilenetv2"
    shutil.copytree(MODELS_DIR / "mobilenetv2", folder, ignore=shutil.ignore_patterns("*.keras"))
    return folder


def test_refit_on_reviews_writes_a_new_model_folder(store, shipped, tmp_path):
    card = read_card(shipped)
    judged = _site(store, card, 400)
    pairs = review_pairs(store, card, ("LL",))
    # the frontal image's raw probability of these weights: not the lateral's, not other weights'
    assert sorted(zip(pairs.y.tolist(), pairs.raw.tolist())) == sorted(judged.values())
    out = tmp_path / "site" / "mobilenetv2"
    new = recalibrate_from_reviews(shipped, out, store, ("LL",))
    c = new["calibration"]
    assert (c["a"], c["b"]) == pytest.approx(fit_platt(pairs.y, pairs.raw))
    assert c["a"] == pytest.approx(TRUE_A, abs=0.2) and c["b"] == pytest.approx(TRUE_B, abs=0.3)
    held = c["site_heldout"]
    assert held["ece_refit"] < held["ece_in_use"] and held["brier_refit"] < held["brier_in_use"]
    assert c["previous"] == card["calibration"] and "397 reviewed studies" in c["fitted_on"]
    assert new["version"] != card["version"] and new["version"].startswith(weights_prefix(card) + "-c")
    assert read_card(shipped) == card  # the shipped folder is left as it is
    model = load_scoring_model(out)  # its graph still matches its card
    assert model.version == new["version"]
    assert model.calibrate(0.3) == pytest.approx(float(apply(0.3, c["a"], c["b"])))
    assert c["threshold_calibrated"] == pytest.approx(float(apply(card["threshold"]["value"], c["a"], c["b"])))
    with pytest.raises(FileExistsError, match="exists already"):
        recalibrate_from_reviews(shipped, out, store, ("LL",))
    warmer = recalibrate_from_reviews(shipped, tmp_path / "site" / "t", store, ("LL",), method="temperature")
    assert warmer["calibration"]["b"] == 0.0 and warmer["calibration"]["method"] == "temperature scaling"


def test_too_few_verdicts_refused(store, shipped, tmp_path):
    card = read_card(shipped)
    judged = _site(store, card, 60)
    yes = sum(y for y, _ in judged.values())
    with pytest.raises(ValueError, match=f"at least 50 pneumonia and 50 normal .* there are {yes} and {len(judged) - yes}"):
        recalibrate_from_reviews(shipped, tmp_path / "out", store, ("LL",))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="not a classifier's card"):
        recalibrate_from_reviews(MODELS_DIR / "lungs", tmp_path / "out", store, ("LL",))


def test_calibrate_from_reviews_on_the_command_line(shipped, tmp_path):
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    store = Store.open(url)
    _site(store, read_card(shipped), 200)
    store.close()
    out = tmp_path / "site-mobilenetv2"

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "batchcxr.cli", "calibrate", "--model", str(shipped),
                               "--from-reviews", str(out), "--db", url, *extra],
                              capture_output=True, text=True, timeout=120)

    check = subprocess.run([sys.executable, "-m", "batchcxr.cli", "evaluate", "--against-reviews", "--db", url],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "batchcxr calibrate --model MODEL_FOLDER --from-reviews NEW_FOLDER" in check.stdout
    refused = run("--min-per-class", "1000")
    assert refused.returncode == 1 and "needs at least 1000 pneumonia" in refused.stderr and not out.exists()
    done = run()
    assert done.returncode == 0, done.stderr
    new = read_card(out)
    assert f"wrote {out} (version {new['version']})" in done.stdout
    held = new["calibration"]["site_heldout"]
    assert f"ECE {held['ece_in_use']:.4f} with the calibration in use -> {held['ece_refit']:.4f}" in done.stdout
    assert f"ECE {held['ece_in_use']:.4f} with the calibration it replaced" in (out / "card.md").read_text()


def test_platt_fit_converges_far_from_the_identity():
    """Raw probabilities piled near 0 and 1 and outcomes that follow them loosely (a site's films):
    a full Newton step from (1, 0) overshot to a ~ 4,000 here; each step is now halved until the
    loss falls, so the fit lands at the minimum (the gradient vanishes there)."""
    rng = np.random.default_rng(0)
    raw = 1 / (1 + np.exp(-rng.normal(2.0, 6.0, 600)))
    y = (rng.random(600) < apply(raw, 0.25, -0.5)).astype(float)
    a, b = fit_platt(y, raw)
    assert 0.15 < a < 0.4 and -1.0 < b < 0.0
    z = np.log(np.clip(raw, 1e-7, 1 - 1e-7) / (1 - np.clip(raw, 1e-7, 1 - 1e-7)))
    r = apply(raw, a, b) - y
    ridge = 1e-3 * len(y)
    assert abs(np.sum(r * z) + ridge * (a - 1)) < 1e-6 and abs(np.sum(r) + ridge * b) < 1e-6


def _predictions(store: Store) -> dict[tuple[str, str], tuple]:
    from sqlalchemy import select

    from batchcxr.store.schema import Image, Prediction

    with store.read_session() as s:
        rows = s.execute(select(Image.content_sha256, Prediction.model_version, Prediction.probability,
                                Prediction.calibrated, Prediction.label, Prediction.heatmap_path, Prediction.run_id)
                         .join(Image, Image.id == Prediction.image_id)).all()
    return {(sha, version): rest for sha, version, *rest in rows}


def test_a_new_calibration_is_applied_to_the_archive_without_scoring_again(store, shipped, tmp_path):
    """apply_to_archive: each image whose newest result is of these weights (under the shipped
    calibration) gets a prediction of the new folder's version with the same raw probability and
    layer, the new calibrated probability and the label at the new threshold; images whose newest
    result is other weights' (scored again since) and images the new version scored already are
    left alone; the studies' pages go stale; a second pass writes nothing; a run that meets the
    restated files later finds them scored."""
    from batchcxr.evaluation.site_calibration import apply_to_archive

    card = read_card(shipped)
    _site(store, card, 400)
    new = recalibrate_from_reviews(shipped, tmp_path / "site", store, ("LL",))
    a, b = new["calibration"]["a"], new["calibration"]["b"]
    # an image the new version scored itself (a file that came in after the refit): left as it is
    store.record_scored(store.start_run("score", "/in", [new["version"]]),
                        [_image(10**6, "9.9", [_output(new, new["version"], 0.5)])])
    done_first = {f"{10**6:064x}"}
    store.clear_stale([(s.id, s.updated_at) for s in store.studies()])
    before = _predictions(store)
    run_id = store.start_run("apply-calibration", str(tmp_path / "site"), [new["version"]])

    written = apply_to_archive(tmp_path / "site", store, run_id)

    after = _predictions(store)
    other = f"{card['name']}-{'0' * 12}-cabcd"
    rescored = {sha for sha, version in before if version == other}  # their newest result: other weights'
    old = {sha: row for (sha, version), row in before.items() if version == card["version"] and sha not in rescored}
    assert len(rescored) == 200 and written == len(old) == 400 + 134 - 200
    for sha, (raw, _, label, layer, _) in old.items():
        p, cal, new_label, new_layer, run = after[sha, new["version"]]
        assert (p, new_layer, run) == (raw, layer, run_id) and layer.endswith("-mobilenetv2.png")
        assert cal == pytest.approx(float(apply(raw, a, b)))
        assert new_label == ("PNEUMONIA" if raw >= new["threshold"]["value"] else "NORMAL") == label
    assert {k: v for k, v in after.items() if k in before} == before  # nothing rewritten, nothing lost
    for sha in done_first:
        assert after[sha, new["version"]] == before[sha, new["version"]]
    assert not any((sha, new["version"]) in after for sha in rescored)
    assert {version for _, version in after} == {card["version"], new["version"], other}
    assert len(store.stale_studies(1000)) == 200 + 67  # the studies of those images: pages show the new probability
    assert apply_to_archive(tmp_path / "site", store, run_id) == 0
    known = store.already_done(list(old), [new["version"]])
    assert set(known) == set(old) and {k.status for k in known.values()} == {"scored"}
    with pytest.raises(ValueError, match="not a classifier's card"):
        apply_to_archive(MODELS_DIR / "lungs", store, run_id)
