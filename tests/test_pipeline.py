"""`batchcxr score` end to end on real files: idempotency, bad input, reports."""

from __future__ import annotations

import dataclasses
import os
import re
import time
import shutil
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest

from batchcxr.dicomwrite import base_dataset, write_dicom
from batchcxr.infer.runtime import load_scoring_model
from batchcxr.paths import DEMO_DIR, MODELS_DIR
from batchcxr.pipeline import Scorer
from batchcxr.settings import Settings
from batchcxr.store.repo import Store

from tests.dicoms import chest_like, dicom_file, jpeg_file


@pytest.fixture(scope="module")
def models():
    return [load_scoring_model(MODELS_DIR / "cnn"), load_scoring_model(MODELS_DIR / "mobilenetv2")]


@pytest.fixture
def make_scorer(tmp_path, models, db_url):
    """Scorers on the test's database: every test using it runs on SQLite and on PostgreSQL."""
    stores = []

    def make(**overrides) -> Scorer:
        settings = Settings(**{"db_url": db_url, "reports_dir": tmp_path / "reports", **overrides})
        store = Store.open(settings.sqlalchemy_url)
        stores.append(store)
        return Scorer(settings, store, models)

    yield make
    for store in stores:
        store.close()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self.scripts += 1
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.refs.append(value)


def _links(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text())
    return parser


def test_demo_scored_reports_link_to_existing_files(tmp_path, make_scorer):
    scorer = make_scorer()
    summary = scorer.score_tree(DEMO_DIR)
    assert summary.scored == 7 and not summary.failed
    assert summary.skipped == {"lateral view (ViewPosition LL)": 1}  # demo/README.md is not looked at (ignore)
    index = summary.index_path
    pages = [index] + sorted((index.parent / "studies").glob("*.html"))
    assert len(pages) == 1 + 7  # 3 JPEG/PNG folders + 4 DICOM studies (one holding two views)
    for page in pages + sorted((index.parent / "runs").glob("*.html")):
        for ref in _links(page).refs:
            assert (page.parent / ref).resolve().is_file(), f"{page.name} links missing {ref}"
    text = index.read_text()
    assert "Demo, Pneumonia TwoViews" in text and "Demo^" not in text  # DICOM PN formatted for people
    assert "lateral view (ViewPosition LL)" in text


def test_gradcam_layer_blends_like_a_full_size_overlay():
    """The PNG layer, stretched and alpha-blended as a browser does, equals blending the
    map over the image at full size: (1 - w) * image + w * JET(heat), w = heat * alpha."""
    import cv2

    from batchcxr.report.overlay import encode_layer, heatmap_layer

    rng = np.random.default_rng(0)
    heat = rng.random((7, 7)).astype(np.float32)
    heat[0, 0] = 0.0
    gray = cv2.GaussianBlur(rng.integers(0, 256, (415, 512), dtype=np.uint8), (0, 0), 5)
    layer = cv2.imdecode(np.frombuffer(encode_layer(heatmap_layer(heat, gray.shape, 0.45)), np.uint8),
                         cv2.IMREAD_UNCHANGED)
    assert layer.shape == (52, 64, 4)  # the image's aspect, 64 px on the long side
    assert layer[0, 0, 3] == 0  # a zero map cell leaves the image untouched
    h, w = gray.shape
    up = cv2.resize(layer, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    weight = up[..., 3:] / 255
    shown = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR) * (1 - weight) + up[..., :3] * weight
    full = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.rint(full * 255).astype(np.uint8), cv2.COLORMAP_JET).astype(np.float32)
    expected = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR) * (1 - full[..., None] * 0.45) + colour * full[..., None] * 0.45
    diff = np.abs(shown - expected)
    assert np.median(diff) < 3 and np.percentile(diff, 99) < 25  # JET's steep ramps, interpolated twice


def test_gradcam_layer_colours_are_opencvs_jet():
    import cv2

    from batchcxr.report.overlay import heatmap_layer

    heat = np.random.default_rng(3).random((28, 28)).astype(np.float32)
    layer = heatmap_layer(heat, (1400, 1700), 0.5)
    stretched = cv2.resize(heat, (layer.shape[1], layer.shape[0]), interpolation=cv2.INTER_LINEAR)
    level = cv2.convertScaleAbs(stretched, alpha=255.0)
    assert np.array_equal(layer[..., :3], cv2.applyColorMap(level, cv2.COLORMAP_JET))
    assert np.array_equal(layer[..., 3], cv2.convertScaleAbs(stretched, alpha=127.5))


def test_lung_outline_is_an_svg_tracing_the_mask_over_the_whole_image():
    """Each lung is one closed path whose vertices all lie on the mask's edge (stretched to the
    image's aspect); the crop box is a dashed rectangle; the drawing stretches over the image."""
    import cv2

    from batchcxr.report.overlay import lung_outline_svg

    mask = np.zeros((224, 224), np.uint8)
    cv2.ellipse(mask, (70, 110), (35, 80), 0, 0, 360, 1, -1)
    cv2.ellipse(mask, (154, 110), (35, 80), 0, 0, 360, 1, -1)
    shape = (1400, 1150)
    ns = {"s": "http://www.w3.org/2000/svg"}
    svg = ElementTree.fromstring(lung_outline_svg(mask, shape, (0.1, 0.2, 0.9, 0.8)))
    assert svg.get("preserveAspectRatio") == "none"
    vw, vh = map(int, svg.get("viewBox").split()[2:])
    assert (vw / 2, vh / 2) == (210, 256)  # the image's aspect, 256 on the long side
    d = svg.find("s:path", ns).get("d")
    assert d.count("M") == 2 and d.count("Z") == 2
    grid = cv2.resize(mask.astype(np.float32), (vw // 2, vh // 2), interpolation=cv2.INTER_LINEAR) >= 0.5
    inner = cv2.erode(grid.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    for sub in d.replace("Z", "").split("M")[1:]:
        xy = (np.array(sub.split(), int).reshape(-1, 2) - 1) // 2
        assert len(xy) > 10 and grid[xy[:, 1], xy[:, 0]].all() and not inner[xy[:, 1], xy[:, 0]].any()
    rect = svg.find("s:rect", ns)
    assert rect.get("stroke-dasharray") and int(rect.get("x")) == round(2 * 0.2 * 210)
    assert int(rect.get("height")) == round(2 * 0.9 * 256) - round(2 * 0.1 * 256)
    assert ElementTree.fromstring(lung_outline_svg(mask, shape)).find("s:rect", ns) is None
    assert ElementTree.fromstring(lung_outline_svg(np.zeros((224, 224), np.uint8), shape)).find("s:path", ns) is None


@pytest.mark.parametrize("shape", [(688, 1136), (1557, 1680), (2500, 2048), (300, 400), (1023, 1024)])
def test_display_image_keeps_the_aspect_and_looks_like_an_area_resize(shape):
    import cv2

    from batchcxr.normalize.contract import display_image

    rng = np.random.default_rng(0)
    gray = cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (0, 0), 1)  # fine detail
    shown = display_image(gray, 512)
    scale = min(1.0, 512 / max(shape))
    assert shown.shape == (round(shape[0] * scale), round(shape[1] * scale))
    reference = cv2.resize(gray, shown.shape[::-1], interpolation=cv2.INTER_AREA)
    # a plain bilinear shrink aliases (9.4 at 2500 x 2048), nearest neighbour 11-17
    assert np.abs(shown.astype(int) - reference).mean() < 5


def test_report_stacks_each_models_layer_over_the_image(tmp_path, make_scorer):
    import cv2

    summary = make_scorer().score_tree(DEMO_DIR / "jpeg")
    page = next((summary.index_path.parent / "studies").glob("*.html"))
    refs = _links(page).refs
    layers = [r for r in refs if re.search(r"-(cnn|mobilenetv2)\.png$", r)]
    assert len(layers) == 2
    assert [r for r in refs if r.endswith(".png") and r not in layers] == []
    outlines = [r for r in refs if r.endswith("-lungs.svg")]
    assert len(outlines) == 2  # the lung outline over each model's map
    image = next(r for r in refs if r.endswith(".jpg"))
    assert refs.count(image) == 3  # shown alone, then under each model's layer
    for ref in layers:
        layer = cv2.imread(str(page.parent / ref), cv2.IMREAD_UNCHANGED)
        assert layer.ndim == 3 and layer.shape[2] == 4 and layer[..., 3].max() > 0
    outline = ElementTree.parse(page.parent / outlines[0]).getroot()
    assert outline.tag.endswith("svg") and outline.find("{http://www.w3.org/2000/svg}path").get("d").startswith("M")


def test_a_model_with_no_evidence_anywhere_gets_no_layer_and_its_report_says_so(tmp_path, make_scorer, monkeypatch):
    """An empty Grad-CAM map (the stop-29 CNN answered so for films on which no unit of its head's
    hidden layer fired) gets no layer file and no heatmap path; the study page says that no region
    backs the probability instead of showing a transparent layer, and the other model's layer stays."""
    from sqlalchemy import select

    from batchcxr import pipeline
    from batchcxr.store.schema import Prediction

    real = pipeline.infer_batch

    def cnn_without_evidence(*args, **kwargs):
        kept, outputs, masks, rejected = real(*args, **kwargs)
        outputs = [[dataclasses.replace(o, heatmap=np.zeros_like(o.heatmap)) if o.model_name == "cnn" else o
                    for o in per_image] for per_image in outputs]
        return kept, outputs, masks, rejected

    monkeypatch.setattr(pipeline, "infer_batch", cnn_without_evidence)
    scorer = make_scorer()
    summary = scorer.score_tree(DEMO_DIR / "jpeg")
    assert summary.scored > 0
    for page in (summary.index_path.parent / "studies").glob("*.html"):
        refs = _links(page).refs
        assert [r for r in refs if r.endswith("-cnn.png")] == []
        assert [r for r in refs if r.endswith("-mobilenetv2.png")]
        assert "No evidence for pneumonia anywhere in the image" in page.read_text()
    assert not list((tmp_path / "reports" / "images").glob("*-cnn.png"))
    with scorer.store.read_session() as s:
        rows = s.execute(select(Prediction.model_name, Prediction.heatmap_path)).all()
    assert {(name, path == "") for name, path in rows} == {("cnn", True), ("mobilenetv2", False)}


def test_second_run_scores_nothing_and_rescore_forces(tmp_path, make_scorer):
    folder = tmp_path / "in"
    dicom_file(folder / "a.dcm")
    jpeg_file(folder / "b" / "b.jpg")
    scorer = make_scorer()
    first = scorer.score_tree(folder)
    assert first.scored == 2
    again = scorer.score_tree(folder)
    assert again.scored == 0 and again.unchanged == 2
    forced = scorer.score_tree(folder, rescore=True)
    assert forced.scored == 2
    rows = scorer.store.prediction_rows()
    assert len(rows) == 4  # 2 images x 2 models, updated in place, not duplicated


def test_new_model_version_rescores(tmp_path, make_scorer, models):
    folder = tmp_path / "in"
    dicom_file(folder / "a.dcm")
    scorer = make_scorer()
    scorer.score_tree(folder)
    cnn = models[0]
    newer = dataclasses.replace(cnn, version=cnn.version + "-new")
    rescorer = Scorer(scorer.settings, scorer.store, [newer, models[1]])
    summary = rescorer.score_tree(folder)
    assert summary.scored == 1
    versions = {r["model_version"] for r in rescorer.store.prediction_rows()}
    assert cnn.version + "-new" in versions and cnn.version in versions


def _bad_inputs(folder: Path) -> dict[str, str]:
    """Write real broken files; return name -> expected reason fragment."""
    folder.mkdir(parents=True)
    good = dicom_file(folder / "good.dcm")
    (folder / "empty.dcm").write_bytes(b"")
    data = good.read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (folder / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 8)
    jpeg = jpeg_file(folder / "j" / "ok.jpg").read_bytes()
    (folder / "j" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "j" / "corrupt.jpg").write_bytes(jpeg[:20] + b"\x00garbage" * 50 + b"\xff\xd9")
    (folder / "notes.txt").write_text("not an image")
    ds = base_dataset(chest_like())
    ds.Rows, ds.Columns = 50000, 50000
    write_dicom(folder / "huge.dcm", ds)
    ds = base_dataset(chest_like())
    write_dicom(folder / "unknown-ts.dcm", ds)
    raw = (folder / "unknown-ts.dcm").read_bytes()
    ts = str(ds.file_meta.TransferSyntaxUID).encode()
    fake = b"1.2.3.4.5.6.7.8.9"
    fake = fake + b"\0" * (len(ts) - len(fake)) if len(fake) < len(ts) else fake[: len(ts)]
    (folder / "unknown-ts.dcm").write_bytes(raw.replace(ts, fake, 1))
    evil = "<script>alert(1)</script>"
    dicom_file(folder / "evil.dcm", PatientName=evil, StudyDescription='"><img src=x onerror=alert(2)>',
               PatientID="../../../../tmp/owned", StudyInstanceUID="1.2.3.999")
    an_hour_ago = time.time() - 3600  # broken files in an archive are old (recent ones may still be written)
    for p in folder.rglob("*"):
        os.utime(p, (an_hour_ago, an_hour_ago))
    return {
        "empty.dcm": "empty file",
        "truncated.dcm": "",
        "garbage.dcm": "corrupt DICOM",
        "truncated.jpg": "truncated JPEG",
        "corrupt.jpg": "corrupt JPEG",
        "notes.txt": "not a DICOM, JPEG or PNG file",
        "huge.dcm": "declared pixel data too large",
        "unknown-ts.dcm": "",
    }


def test_bad_input_is_recorded_kept_and_the_run_goes_on(tmp_path, make_scorer):
    folder = tmp_path / "in"
    expected = _bad_inputs(folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    scorer = make_scorer()
    paths = sorted(before) + [folder / "vanished.dcm"]  # listed, then gone before reading
    summary = scorer.score_paths(folder, paths)
    assert summary.scored == 3  # good.dcm, ok.jpg, evil.dcm
    errors = {Path(e.path).name: e for e in scorer.store.errors(summary.run_id)}
    for name, fragment in expected.items():
        assert name in errors, f"{name} not recorded"
        assert fragment in errors[name].reason
        assert errors[name].reason
    assert "vanished.dcm" not in errors and summary.vanished == 1  # gone before it was read: not a failure
    assert errors["notes.txt"].status == "skipped"
    for name in ("empty.dcm", "truncated.dcm", "garbage.dcm", "truncated.jpg", "corrupt.jpg", "huge.dcm", "unknown-ts.dcm"):
        assert errors[name].status == "failed", name
    for path, data in before.items():  # nothing deleted, nothing changed
        assert path.read_bytes() == data


def test_decode_worker_process_gives_the_inline_results(tmp_path, make_scorer):
    """Enough files for the decode worker (tasks of several files, a bounded look-ahead), bad
    files among them: the same outcomes and scores as preparing every file in this process."""
    folder = tmp_path / "in"
    _bad_inputs(folder)
    for k in range(14):
        dicom_file(folder / "more" / f"m{k:02d}.dcm", chest_like(seed=k), StudyInstanceUID=f"1.2.3.{k}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    assert len(paths) >= 2 * 4  # over twice batch_size: the worker path
    runs = {}
    for workers in (0, 1):
        scorer = make_scorer(batch_size=4, decode_workers=workers, db_url=str(tmp_path / f"w{workers}.sqlite"),
                             reports_dir=tmp_path / f"reports{workers}")
        summary = scorer.score_paths(folder, paths)
        scores = {(r["path"], r["model_name"]): r["probability"] for r in scorer.store.prediction_rows()}
        runs[workers] = summary, scores
    (inline, inline_scores), (pooled, pooled_scores) = runs[0], runs[1]
    assert pooled.scored == inline.scored == 17 and pooled.failed == inline.failed
    assert {p: (f.status, f.reason) for p, f in pooled.files.items()} == \
        {p: (f.status, f.reason) for p, f in inline.files.items()}
    assert pooled_scores.keys() == inline_scores.keys()
    assert all(abs(pooled_scores[k] - inline_scores[k]) < 1e-6 for k in inline_scores)


def test_idle_infer_threads_take_a_batch_before_a_whole_one_is_read(tmp_path, make_scorer, monkeypatch):
    """At a run's start no batch is in flight: the first starts once each infer thread can have a
    full ONNX Runtime chunk (2 x 8 images), not after batch_size files; the rest as before."""
    folder = tmp_path / "in"
    for k in range(21):
        jpeg_file(folder / f"s{k:02d}" / "a.jpg", chest_like(seed=k))
    scorer = make_scorer(batch_size=32, decode_workers=0, infer_threads=2)
    sizes = []
    start = Scorer._start_batch

    def record(self, batch):
        sizes.append(len(batch))
        return start(self, batch)

    monkeypatch.setattr(Scorer, "_start_batch", record)
    summary = scorer.score_tree(folder)
    assert summary.scored == 21 and sizes == [16, 5]


def test_markup_in_dicom_fields_is_inert_and_chooses_no_path(tmp_path, make_scorer):
    folder = tmp_path / "in"
    dicom_file(folder / "evil.dcm", PatientName="<script>alert(1)</script>",
               StudyDescription='"><img src=x onerror=alert(2)>', PatientID="../../../../tmp/owned",
               AccessionNumber="<b>bold</b>", StudyInstanceUID="1.2.3.999")
    scorer = make_scorer()
    summary = scorer.score_tree(folder)
    out = summary.index_path.parent
    for page in [summary.index_path, *(out / "studies").glob("*.html")]:
        text = page.read_text()
        assert "<script>" not in text and "onerror=alert" not in text.replace("onerror=alert(2)&gt;", "")
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        assert _links(page).scripts == 0
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    names = (r"(index\.html|style\.css|favicon\.svg|runs/run-\d+\.html|studies/[0-9a-f]{16}\.html|lists/studies-\d+\.html"
             r"|failures/(page-\d+\.html|version\.json)|images/[0-9a-f]{24}(\.jpg|-\w+\.png|-lungs\.svg))")
    assert all(re.fullmatch(names, w) for w in written), written
    assert not Path("/tmp/owned").exists()


def test_study_grouping_and_frontal_max(tmp_path, make_scorer):
    folder = tmp_path / "in"
    study = "1.2.826.0.1.3680043.8.498.1"
    dicom_file(folder / "one.dcm", chest_like(seed=1), StudyInstanceUID=study)
    dicom_file(folder / "two.dcm", chest_like(seed=2), StudyInstanceUID=study)
    jpeg_file(folder / "j1" / "x.jpg", chest_like(seed=3))
    jpeg_file(folder / "j1" / "y.jpg", chest_like(seed=4))
    scorer = make_scorer()
    scorer.score_tree(folder)
    studies = {s.study_key: s for s in scorer.store.studies()}
    assert len(studies) == 2
    assert len(studies[study].images) == 2
    rows = scorer.store.prediction_rows()
    from batchcxr.report.render import study_view

    view = study_view(studies[study], ("LL",))
    for model in ("cnn", "mobilenetv2"):
        expected = max((r["probability"], r["calibrated_probability"]) for r in rows
                       if r["study_key"] == study and r["model_name"] == model)
        assert view.scores[model] == pytest.approx(expected[0])
        assert view.calibrated[model] == pytest.approx(expected[1])  # what the page shows as P(pneumonia)
    page = (scorer.settings.reports_dir / "studies" / f"{view.slug}.html").read_text()
    for model in ("cnn", "mobilenetv2"):
        assert (f"<strong>{model}</strong>: P(pneumonia) {view.calibrated[model]:.2f} <small>(calibrated; model score "
                f"{view.scores[model]:.3f})</small>") in page
    from batchcxr.report.render import study_row

    row = study_row(studies[study])  # the worklists' row: the study's stored results, the same values
    assert row.scores == pytest.approx(view.scores) and row.calibrated == pytest.approx(view.calibrated)
    index = (scorer.settings.reports_dir / "index.html").read_text()
    for model in ("cnn", "mobilenetv2"):
        assert (f'title="P(pneumonia), calibrated; model score {view.scores[model]:.3f}">'
                f"{view.calibrated[model]:.2f} {view.labels[model]}</span>") in index


def test_demo_copy_survives_without_shared(tmp_path, make_scorer):
    # the product runs on what ships in the repo: models + demo, no ../shared needed
    copy = tmp_path / "demo"
    shutil.copytree(DEMO_DIR, copy)
    summary = make_scorer().score_tree(copy)
    assert summary.scored == 7
    assert np.isfinite(summary.seconds)


def test_score_with_decode_workers_never_imports_the_decoders_in_its_own_process(tmp_path):
    """`batchcxr score` starts its decode workers before loading the rest and leaves every file to
    them: its own process never imports pydicom (~0.3 s of every start), whatever it scores."""
    import subprocess
    import sys

    from tests.helpers import write_config

    folder = tmp_path / "in"
    for k in range(6):
        dicom_file(folder / "d" / f"{k}.dcm", chest_like(seed=k), StudyInstanceUID=f"1.2.3.{k}")
        jpeg_file(folder / "j" / f"{k}.jpg", chest_like(seed=10 + k))
    cfg = write_config(tmp_path, top={"decode_workers": 1, "batch_size": 4})
    probe = ("import sys\nfrom batchcxr.cli import main\ntry:\n"
             "    main.main(['score', sys.argv[1], '--config', sys.argv[2], '--no-progress'], standalone_mode=False)\n"
             "except SystemExit as exc:\n    print('exit', exc.code)\nprint('pydicom', 'pydicom' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(folder), str(cfg)], capture_output=True, text=True,
                         timeout=300)
    assert re.search(r"scored +12 ", out.stdout) and "exit 0" in out.stdout, out.stdout + out.stderr
    assert "pydicom False" in out.stdout
