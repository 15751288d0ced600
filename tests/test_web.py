"""The review app in a real browser: Playwright for Python driving Debian's Chromium."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import pytest
from playwright.sync_api import expect
from werkzeug.security import generate_password_hash
from werkzeug.serving import make_server

from batchcxr.infer.runtime import load_scoring_model
from batchcxr.paths import DEMO_DIR, MODELS_DIR, PROJECT_ROOT
from batchcxr.pipeline import Scorer
from batchcxr.settings import Settings, WebSettings
from batchcxr.store.lists import WorklistFilter
from batchcxr.store.repo import Store
from batchcxr.web.app import create_app

from tests.conftest import need
from tests.dicoms import chest_like, dicom_file

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = PROJECT_ROOT / "test-output" / "screenshots"
PAYLOAD = "<script>alert(1)</script><img src=x onerror=alert(2)>"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def site(request, tmp_path_factory):
    """The review app over the demo (and a hostile study), on SQLite and on PostgreSQL."""
    tmp = tmp_path_factory.mktemp("web")
    if request.param == "sqlite":
        db = str(tmp / "r.sqlite")
    else:
        from tests.conftest import new_pg_database

        db = new_pg_database(request.getfixturevalue("postgres_server"))
    inputs = tmp / "inputs"
    shutil.copytree(DEMO_DIR, inputs / "demo")
    dicom_file(inputs / "evil.dcm", chest_like(seed=9), PatientName=PAYLOAD, StudyDescription=PAYLOAD,
               PatientID="EVIL-1")
    settings = Settings(db_url=db, reports_dir=tmp / "reports",
                        web=WebSettings(users={"alice": generate_password_hash("correct horse")},
                                        secret_key="t" * 40, session_minutes=5))
    store = Store.open(settings.sqlalchemy_url)
    scorer = Scorer(settings, store, [load_scoring_model(MODELS_DIR / m) for m in ("cnn", "mobilenetv2")])
    scorer.score_tree(inputs)
    app = create_app(settings, store)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_port}", "store": store, "scorer": scorer, "inputs": inputs,
           "app": app}
    server.shutdown()
    thread.join(timeout=10)
    store.close()


@pytest.fixture(scope="module")
def browser():
    need(CHROMIUM, "Debian's chromium (apt-get install chromium) for the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    dialogs: list[str] = []
    pg.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    pg.dialogs = dialogs
    yield pg
    context.close()


def _login(page, url: str) -> None:
    page.goto(url + "/")
    assert "/login" in page.url
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "correct horse")
    page.click("button[type=submit]")
    page.wait_for_selector("#worklist")


def test_review_flow_in_a_real_browser(site, page):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    _login(page, site["url"])
    page.screenshot(path=str(SCREENSHOTS / "worklist.png"), full_page=True)
    rows = page.locator("#worklist tbody tr")
    assert rows.count() == 8  # 7 demo studies + the evil one
    page.locator("a.study-link").first.click()
    page.wait_for_selector("#verdict-form")
    page.wait_for_load_state("load")  # app.js (end of body) has run: its handlers are attached
    study_url = page.url
    # both models' Grad-CAM overlays beside the plain image; the opacity slider changes them all
    section = page.locator(".viewer-section").first
    overlays = section.locator("img.overlay")
    expect(overlays).to_have_count(2)
    for k in range(2):
        expect(overlays.nth(k)).to_have_attribute("src", re.compile(r"/overlay/\d+$"))
        assert overlays.nth(k).evaluate("el => el.complete && el.naturalWidth") > 0  # the layer really loaded
    section.locator(".opacity").fill("40")
    assert overlays.nth(1).evaluate("el => getComputedStyle(el).opacity") == "0.4"
    page.screenshot(path=str(SCREENSHOTS / "study.png"), full_page=True)
    # record a verdict with a note; it is kept after a reload
    page.fill("#note", "right lower lobe consolidation")
    with page.expect_navigation():  # the POST and its redirect complete before we reload
        page.click("#verdict-yes")
    page.goto(study_url)
    assert "Current: yes by alice" in page.inner_text("#current-verdict")
    assert "right lower lobe consolidation" in page.inner_text("#current-verdict")
    # keyboard: 2 = no, recorded as a new row (append-only), latest counts
    with page.expect_navigation():
        page.keyboard.press("2")
    page.goto(study_url)
    assert "Current: no by alice" in page.inner_text("#current-verdict")
    assert [r["verdict"] for r in site["store"].verdict_rows()][-2:] == ["yes", "no"]
    # log out and be refused
    page.click("#logout")
    page.goto(study_url)
    assert "/login" in page.url
    assert page.dialogs == []


def test_script_payload_in_patient_name_stays_inert(site, page):
    _login(page, site["url"])
    assert PAYLOAD in page.inner_text("#worklist")  # shown as text
    page.click("text=EVIL-1 >> xpath=ancestor::tr >> a.study-link")
    page.wait_for_selector("#patient-name")
    assert page.inner_text("#patient-name") == PAYLOAD
    assert page.evaluate("document.querySelectorAll('script').length") == 1  # only /static/app.js
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
    assert page.dialogs == []


def test_unauthenticated_and_cross_site_requests_are_refused(site):
    client = site["app"].test_client()
    assert client.get("/").status_code == 302
    assert client.get("/image/1").status_code == 302
    assert client.get("/verdicts.csv").status_code == 302
    assert client.post("/study/1/verdict", data={"verdict": "yes"}).status_code in (400, 401)
    # logged in, but a forged form without the CSRF token (what a cross-site page can send)
    page = client.get("/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert client.post("/login", data={"username": "alice", "password": "correct horse",
                                       "csrf_token": token}).status_code == 302
    before = len(site["store"].verdict_rows())
    forged = client.post("/study/1/verdict", data={"verdict": "yes"}, headers={"Origin": "https://evil.example"})
    assert forged.status_code == 400
    assert len(site["store"].verdict_rows()) == before
    # only registered images are served: an id, never a path
    assert client.get("/image/999999").status_code == 404
    assert client.get("/image/../../etc/passwd").status_code == 404
    response = client.get("/")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in response.headers["Content-Security-Policy"]
    assert response.headers["Cache-Control"] == "no-store"
    fresh = site["app"].test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"', fresh.get("/login").text).group(1)
    assert fresh.post("/login", data={"username": "alice", "password": "wrong", "csrf_token": token}).status_code == 401
    assert fresh.get("/").status_code == 302


def test_new_studies_appear_without_restart(site):
    client = site["app"].test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    client.post("/login", data={"username": "alice", "password": "correct horse", "csrf_token": token})
    before = client.get("/").text.count('class="study-link"')
    late = site["inputs"].parent / "late"
    dicom_file(late / "new.dcm", chest_like(seed=77), PatientID="LATE-1")
    site["scorer"].score_tree(late)
    text = client.get("/").text
    assert text.count('class="study-link"') == before + 1 and "LATE-1" in text


def test_verdicts_csv_and_evaluate_against_reviews(site, monkeypatch):
    """Only the studies with a yes / no verdict are read (never the whole archive), and the
    probabilities checked against the verdicts are the calibrated ones readers see."""
    from batchcxr.evaluation.reviews import against_reviews

    store = site["store"]
    scored = [s for s in store.studies() if any(i.status == "scored" for i in s.images)]
    assert len(scored) >= 6
    for study, verdict in zip(scored, ["yes", "yes", "yes", "no", "no", "uncertain"]):
        store.add_verdict(study.id, "bob", verdict)
    judged = {sid: v.verdict == "yes" for sid, v in store.latest_verdicts().items() if v.verdict != "uncertain"}
    expected = {}
    versions = {m.name: m.version for m in site["scorer"].models}
    for model in ("cnn", "mobilenetv2"):
        pairs = []
        for study in store.studies_by_id(sorted(judged)):
            shown = [p.calibrated for i in study.images if i.status == "scored" and i.view_position.upper() != "LL"
                     for p in i.predictions if p.model_name == model]
            pairs.append((judged[study.id], max(shown)))
        expected[model] = pairs

    requested: list[int] = []
    by_id = store.studies_by_id
    monkeypatch.setattr(store, "studies", lambda *a, **k: pytest.fail("read every study"))
    monkeypatch.setattr(store, "studies_by_id", lambda ids, *a, **k: requested.extend(ids) or by_id(ids, *a, **k))
    result = against_reviews(store, ("LL",))
    assert sorted(requested) == sorted(judged)
    assert [(m["model"], m["version"]) for m in result["models"]] == sorted(versions.items())
    for model, pairs in expected.items():
        m = next(m for m in result["models"] if m["model"] == model)
        y = [float(t) for t, _ in pairs]
        p = [shown for _, shown in pairs]
        assert m["n"] == len(pairs) and m["tp"] + m["fn"] == sum(y) and m["raw_only"] == 0
        assert m["sensitivity"] == m["tp"] / (m["tp"] + m["fn"])
        assert m["observed"] == pytest.approx(sum(y) / len(y))
        assert m["mean_probability"] == pytest.approx(sum(p) / len(p))
        assert m["brier"] == pytest.approx(sum((a - b) ** 2 for a, b in zip(p, y)) / len(y))
        assert m["auc"] is not None and 0.0 <= m["ece"] <= 1.0
    assert result["uncertain_left_out"] >= 1
    with pytest.raises(ValueError, match="verdict must be one of"):
        store.add_verdict(1, "bob", "maybe")


def test_what_a_new_user_sees_in_a_real_browser(site, browser, tmp_path):
    """Failed files still listed after a later run; JPEG studies named by their folder; both
    models' overlays beside the plain image at 1280 px; the keys work after the slider."""
    import os

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    scorer = site["scorer"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 100)
    old = 1_700_000_000
    os.utime(broken / "cut.jpg", (old, old))
    scorer.score_tree(broken)  # a run with a failure ...
    later = tmp_path / "later"
    dicom_file(later / "ok.dcm", chest_like(seed=88))
    summary = scorer.score_tree(later)  # ... then a later run without one
    page.goto(summary.index_path.resolve().as_uri())
    failures = page.locator("table.failures").first.inner_text()
    assert "cut.jpg" in failures and "truncated JPEG" in failures
    _login(page, site["url"])
    worklist = page.inner_text("#worklist")
    assert "demo/jpeg/study-normal-1" in worklist  # a JPEG study has a name: its folder
    page.locator("a.study-link", has_text="study-pneumonia-1").click()
    page.wait_for_selector("#verdict-form")
    page.wait_for_load_state("load")
    figures = page.locator(".viewer-section").first.locator("figure")
    expect(figures).to_have_count(3)
    boxes = [figures.nth(k).bounding_box() for k in range(3)]
    assert len({round(b["y"]) for b in boxes}) == 1  # one row: image, cnn, mobilenetv2
    assert max(b["x"] + b["width"] for b in boxes) <= 1280
    assert page.locator(".legend").first.is_visible()
    page.screenshot(path=str(SCREENSHOTS / "study-1280.png"), full_page=True)
    study_url = page.url
    slider = page.locator(".opacity").first
    slider.focus()
    page.keyboard.press("ArrowLeft")  # the slider has the keyboard ...
    with page.expect_navigation():
        page.keyboard.press("2")  # ... and the verdict key still works (and moves on to the next study)
    page.goto(study_url)
    assert "Current: no by alice" in page.inner_text("#current-verdict")
    page.locator(".zoom").first.focus()
    page.keyboard.press("Escape")
    assert page.evaluate("document.activeElement === document.body")
    context.close()


def test_a_filtered_worklist_of_a_big_archive_counts_up_to_a_cap_and_still_pages(tmp_path):
    """Past COUNT_CAP matching studies the worklist says "more than" and keeps a next page while
    pages are full, instead of counting a million rows on every page."""
    from benchmarks.archive import populate
    from batchcxr.store.lists import COUNT_CAP

    settings = Settings(db_url=str(tmp_path / "r.sqlite"), reports_dir=tmp_path / "reports",
                        web=WebSettings(users={"alice": generate_password_hash("pw")}, secret_key="t" * 40))
    store = Store.open(settings.sqlalchemy_url)
    populate(store, COUNT_CAP + 500, {"cnn": "cnn-v1", "mobilenetv2": "mobilenetv2-v1"})
    client = create_app(settings, store).test_client()
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    assert client.post("/login", data={"username": "alice", "password": "pw", "csrf_token": token}).status_code == 302
    everything = client.get("/").text
    assert f"{COUNT_CAP + 500} studies of {COUNT_CAP + 500} shown" in everything  # unfiltered: exact
    unreviewed = store.count_studies(WorklistFilter(review="unreviewed"))
    assert unreviewed > COUNT_CAP
    page = client.get("/?review=unreviewed&page=3").text
    assert f"More than {COUNT_CAP} studies of {COUNT_CAP + 500} shown" in page  # the archive's total: exact
    assert "Page 3\n" in page and "next →" in page
    store.close()
