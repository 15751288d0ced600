"""The Store on SQLite and on a real PostgreSQL: migrations, idempotent upserts, values that do not
fit, claims, file records."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from batchcxr.domain import FileKind, ImageInfo, ImageStatus, ModelOutput, PreparedImage, SourceFile, StudyInfo
from batchcxr.store.repo import ScoredImage, Store


def _item(k: int, study: str = "1.2.3", **image) -> ScoredImage:
    source = SourceFile(Path(f"/in/{k}.dcm"), FileKind.DICOM, f"{k:064x}", 100 + k, 1, 1000 + k, 10**18 + k)
    prepared = PreparedImage(source, StudyInfo(study, patient_name="Doe^Jane", patient_id="P1"),
                             ImageInfo(**{"sop_instance_uid": f"1.2.3.{k}", "modality": "DX", **image}),
                             None, np.zeros((224, 224, 1), np.uint8), ["note"], display_file=f"images/{k}.jpg")
    outputs = [ModelOutput(m, f"{m}-v1", 0.1 * k % 1, 0.5, np.zeros((7, 7), np.float32)) for m in ("cnn", "mnv2")]
    return ScoredImage(prepared, outputs, f"images/{k}.jpg", {o.model_name: f"images/{k}-{o.model_name}.png"
                                                               for o in outputs})


@pytest.fixture
def store(db_url):
    s = Store.open(db_url)
    yield s
    s.close()


def test_head_revision_is_alembics_and_an_up_to_date_start_skips_alembic(tmp_path):
    """The file-name rule head_revision() reads agrees with Alembic; a second process opening an
    up-to-date database does not import Alembic at all (~0.13 s of every start)."""
    import subprocess
    import sys

    from alembic.script import ScriptDirectory

    from batchcxr.store.db import alembic_config, head_revision

    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    assert head_revision() == ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    Store.open(url).close()
    probe = ("import sys; from batchcxr.store.repo import Store; Store.open(sys.argv[1]).close(); "
             "print('alembic' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, url], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_migrations_build_the_schema_the_code_declares(db_url):
    """Alembic's upgrade on an empty database gives exactly the tables, columns and indexes of
    store/schema.py (what autogenerate would compare), on SQLite and PostgreSQL."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from batchcxr.store.schema import Base

    store = Store.open(db_url)
    try:
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        meaningful = [d for d in diff if not (isinstance(d, list) and d and d[0][0] == "modify_default")]
        assert meaningful == [], meaningful
    finally:
        store.close()


def test_writing_a_batch_twice_leaves_one_row_of_each(store):
    items = [_item(k) for k in range(1, 6)]
    assert store.record_scored(store.start_run("t", "/in", ["cnn-v1", "mnv2-v1"]), items) == []
    run = store.start_run("t", "/in", ["cnn-v1", "mnv2-v1"])
    assert store.record_scored(run, items) == []  # a rerun after a crash, or a second process
    rows = store.prediction_rows()
    assert len(rows) == 10 and len({(r["content_sha256"], r["model_version"]) for r in rows}) == 10
    (study,) = store.studies()
    assert study.n_images == 5 and study.max_score == pytest.approx(0.5) and study.results["cnn"][1] == "PNEUMONIA"


def test_study_results_carry_the_calibrated_probability_and_revision_0009_fills_it_in(db_url):
    """A study's stored result per model is [probability, label, calibrated] of its highest frontal
    image, what worklists show, and they sort by the highest calibrated value (max_score); a database
    whose rows were written before revision 0009 ([probability, label], max_score raw) gets each
    result's calibrated value from the prediction it came from, and max_score from those, on upgrade,
    on SQLite and PostgreSQL; the worklist reads rows of either form."""
    import json

    from sqlalchemy import text

    from batchcxr.report.render import study_row
    from batchcxr.store.lists import WorklistFilter

    def item(k: int, study: str, p: float, calibrated: float | None) -> ScoredImage:
        base = _item(k, study)
        outputs = [dataclasses.replace(o, probability=p, calibrated=calibrated if o.model_name == "cnn" else None)
                   for o in base.outputs]  # mnv2 without a calibration: its raw score is what is shown
        return dataclasses.replace(base, outputs=outputs)

    store = Store.open(db_url)
    run = store.start_run("t", "/in", ["cnn-v1", "mnv2-v1"])
    items = [item(1, "1.2.3", 0.30, 0.21), item(2, "1.2.3", 0.70, 0.64), item(3, "1.2.4", 0.55, 0.47),
             item(4, "1.2.5", 0.60, 0.95)]
    items[3] = dataclasses.replace(items[3], outputs=items[3].outputs[:1])  # scored by the CNN alone
    assert store.record_scored(run, items) == []
    want = {"1.2.3": {"cnn": [0.70, "PNEUMONIA", 0.64], "mnv2": [0.70, "PNEUMONIA", None]},
            "1.2.4": {"cnn": [0.55, "PNEUMONIA", 0.47], "mnv2": [0.55, "PNEUMONIA", None]},
            "1.2.5": {"cnn": [0.60, "PNEUMONIA", 0.95]}}
    order = ["1.2.5", "1.2.3", "1.2.4"]  # 0.95 calibrated above raw 0.70 and 0.55
    assert {st.study_key: st.results for st in store.studies()} == want
    assert [st.study_key for st in store.worklist(WorklistFilter(), 0, 10)] == order
    with store.engine.begin() as conn:  # as an 0008 database left them: raw results, raw max_score
        for st in store.studies():
            old = {name: r[:2] for name, r in st.results.items()}
            conn.execute(text("UPDATE studies SET results = :r, max_score = :m WHERE id = :id"),
                         dict(r=json.dumps(old), m=max(r[0] for r in old.values()), id=st.id))
        conn.execute(text("UPDATE alembic_version SET version_num = '0008'"))
    assert [st.study_key for st in store.worklist(WorklistFilter(), 0, 10)] == ["1.2.3", "1.2.5", "1.2.4"]
    old_rows = {st.study_key: study_row(st) for st in store.studies()}
    assert old_rows["1.2.3"].calibrated == {"cnn": None, "mnv2": None} and old_rows["1.2.3"].scores["cnn"] == 0.70
    before = {st.id: st.updated_at for st in store.studies()}
    store.close()
    store = Store.open(db_url)  # upgrades to head
    try:
        studies = store.studies()
        assert {st.study_key: st.results for st in studies} == want
        assert {st.id: st.updated_at for st in studies} == before  # nothing new to send anywhere
        assert {st.study_key: study_row(st).calibrated for st in studies} == {
            "1.2.3": {"cnn": 0.64, "mnv2": None}, "1.2.4": {"cnn": 0.47, "mnv2": None}, "1.2.5": {"cnn": 0.95}}
        assert [st.study_key for st in store.worklist(WorklistFilter(), 0, 10)] == order
    finally:
        store.close()


def test_a_page_written_from_an_old_state_leaves_its_study_stale(store):
    """clear_stale clears the studies whose page was written from their current state, in one
    statement; a study that changed after its page was rendered stays stale for the next writer."""
    run = store.start_run("t", "/in", ["cnn-v1", "mnv2-v1"])
    assert store.record_scored(run, [_item(1, "1.2.3"), _item(2, "1.2.4"), _item(3, "1.2.5")]) == []
    stale = store.stale_studies()
    assert len(stale) == 3
    store.record_scored(run, [_item(4, stale[1].study_key)])  # changes after its page was rendered
    store.clear_stale([(s.id, s.updated_at) for s in stale])
    assert [s.id for s in store.stale_studies()] == [stale[1].id]
    store.clear_stale([(s.id, s.updated_at) for s in store.stale_studies()])
    assert store.stale_studies() == []


def test_values_too_long_for_their_columns_are_cut_with_a_note(store):
    run = store.start_run("t", "/in", ["cnn-v1", "mnv2-v1"])
    long_uid = "1.2." + "9" * 300
    bad = _item(7, study=long_uid, view_position="A" * 22, modality="DX-WITH-A-VERY-LONG-NAME",
                sop_instance_uid="1." * 150)
    good = _item(8)
    assert store.record_scored(run, [bad, good]) == []
    images = {i.content_sha256: i for s in store.studies() for i in s.images}
    cut = images[f"{7:064x}"]
    assert len(cut.view_position) == 16 and len(cut.modality) == 16 and len(cut.sop_instance_uid) <= 128
    assert "view_position cut to 16 of 22 characters" in cut.qc_notes
    keys = {s.study_key for s in store.studies()}
    assert any(len(k) <= 255 and k.startswith("1.2.999") for k in keys)  # same long UID -> same study
    assert store.record_scored(run, [_item(9, study=long_uid)]) == []
    assert len(store.studies()) == 2


def test_nul_and_control_characters_are_stored_cleaned(store):
    run = store.start_run("t", "/in", ["cnn-v1", "mnv2-v1"])
    item = _item(3)
    p = item.prepared
    evil = dataclasses.replace(p, study=dataclasses.replace(p.study, patient_name="Doe\x00^Jane\x1b[31m",
                                                            study_description="line1\nline2"))
    assert store.record_scored(run, [dataclasses.replace(item, prepared=evil)]) == []
    (study,) = store.studies()
    assert study.patient_name == "Doe^Jane[31m" and study.study_description == "line1\nline2"


def test_claims_keep_two_processes_off_the_same_file(store):
    paths = [f"/drop/{k}.dcm" for k in range(4)]
    assert store.claim(paths[:3], "hostA:1") == set(paths[:3])
    assert store.claim(paths, "hostB:2") == {paths[3]}  # the others are held by A
    assert store.claim_owners(paths[:1]) == {paths[0]: "hostA:1"}
    store.release(paths[:1], "hostA:1")
    assert store.claim(paths[:1], "hostB:2") == {paths[0]}
    assert store.claim(paths[1:2], "hostB:2", ttl_s=0) == set()  # A's claim has not expired
    store.claim(paths[1:2], "hostA:1", ttl_s=-1)  # A renews with an expiry in the past
    assert store.claim(paths[1:2], "hostB:2") == {paths[1]}  # an expired claim can be taken over
    assert store.release_dead_claims("hostA", lambda pid: False) == [paths[2]]  # A's last claim


def test_file_records_know_a_file_by_its_identity(store):
    from batchcxr.ingest.files import FileIdentity

    run = store.start_run("t", "/in", ["cnn-v1", "mnv2-v1"])
    item = _item(4)
    store.record_scored(run, [item])
    src = item.prepared.source
    same = FileIdentity(src.device, src.inode, src.size, src.mtime_ns)
    assert store.known_paths([(str(src.path), same)])[str(src.path)].status == "scored"
    touched = dataclasses.replace(same, mtime_ns=same.mtime_ns + 1)
    assert store.known_paths([(str(src.path), touched)]) == {}
    store.record_moves([(str(src.path), "/archive/4.dcm")])
    assert store.known_paths([("/archive/4.dcm", same)])["/archive/4.dcm"].sha256 == src.sha256


def test_the_worklist_filters_pages_and_caps_its_counts_in_sql(store):
    from batchcxr.store.lists import WorklistFilter

    run = store.start_run("t", "/in", ["cnn-v1", "mnv2-v1"])
    assert store.record_scored(run, [_item(k, study=f"1.2.{k}") for k in range(1, 10)]) == []
    everything, positive = WorklistFilter(), WorklistFilter(label="PNEUMONIA")
    scores = [s.max_score for s in store.worklist(everything, 0, 100)]
    assert len(scores) == 9 and scores == sorted(scores, reverse=True)
    assert [s.id for s in store.worklist(everything, 3, 3)] == [s.id for s in store.worklist(everything, 0, 9)][3:6]
    n = store.count_studies(positive)
    assert 0 < n < 9 and all(s.positive for s in store.worklist(positive, 0, 100))
    assert store.count_studies(positive, cap=2) == min(n, 3)  # stops counting after cap + 1
    assert store.count_studies(everything, cap=100) == store.count_studies() == 9


def test_a_study_pages_neighbours_are_its_worklist_neighbours_ties_included(store):
    from batchcxr.store.lists import WorklistFilter

    run = store.start_run("t", "/in", ["cnn-v1", "mnv2-v1"])
    scores = [0.9, 0.5, 0.5, 0.5, 0.2, 0.9, 0.7, 0.5, 0.2, 0.3]  # ties: the id breaks them, as in the list

    def scored(k: int, p: float) -> ScoredImage:
        item = _item(k, study=f"1.2.{k}")
        return dataclasses.replace(item, outputs=[dataclasses.replace(o, probability=p) for o in item.outputs])

    assert store.record_scored(run, [scored(k, p) for k, p in enumerate(scores, 1)]) == []
    for f in (WorklistFilter(), WorklistFilter(label="PNEUMONIA"), WorklistFilter(label="NORMAL")):
        order = [s.id for s in store.worklist(f, 0, 100)]
        assert len(order) > 2
        for i, sid in enumerate(order):
            expected = (order[i - 1] if i else None, order[i + 1] if i + 1 < len(order) else None)
            assert store.neighbours(store.study(sid), f) == expected, (f, sid)


def test_the_report_index_totals_match_the_rows(store):
    from batchcxr.store.lists import WorklistFilter

    run = store.start_run("t", "/in", ["cnn-v1", "mnv2-v1"])
    items = [_item(k, study=f"1.2.{k % 6}") for k in range(1, 10)]  # 6 studies, 9 images
    items[0] = dataclasses.replace(items[0], outputs=[dataclasses.replace(items[0].outputs[0], probability=0.9),
                                                      dataclasses.replace(items[0].outputs[1], probability=0.1)])
    assert store.record_scored(run, items) == []
    studies = store.worklist(WorklistFilter(), 0, 100)
    counts = store.archive_counts()
    assert counts["studies"] == len(studies) == 6 and counts["images"] == 9 and counts["failed_files"] == 0
    assert counts["scored_studies"] == sum(s.max_score >= 0 for s in studies) == 6
    assert counts["positive"] == sum(bool(s.positive) for s in studies) > 0
    assert counts["disagree"] == sum(bool(s.disagree) for s in studies) > 0


def test_the_outbox_counts_what_it_adds_and_sums_up_only_what_waits(store):
    def objects(*uids: str, dest: str = "pacs") -> list[dict]:
        return [dict(destination=dest, kind="sr", study_key="1.2.3", sop_instance_uid=u, path=f"/out/{u}.dcm")
                for u in uids]

    assert store.enqueue_outbox(objects("1", "2", "3")) == 3
    assert store.enqueue_outbox(objects("2", "3", "4")) == 1  # an object already recorded stays as it is
    assert store.enqueue_outbox(objects("1", dest="stow")) == 1
    summary = store.outbox_summary()
    assert {d: v["pending"] for d, v in summary.items()} == {"pacs": 4, "stow": 1} and store.outbox_pending() == 5
    assert all(v["oldest_pending"] is not None and v["last_error"] == "" for v in summary.values())
    due = store.outbox_due(100)
    store.outbox_sent([i.id for i in due if i.destination == "stow"])
    store.outbox_retry([i.id for i in due if i.sop_instance_uid == "4"], "association refused", 60.0)
    summary = store.outbox_summary()
    assert list(summary) == ["pacs"] and summary["pacs"]["pending"] == 4  # sent objects are not summed up
    assert store.outbox_pending() == 4
    assert summary["pacs"]["last_error"] == "association refused"


def test_the_studies_a_run_touched_are_found_by_their_update_time(store):
    import datetime as dt

    from batchcxr.store.schema import utcnow

    run = store.start_run("t", "/in", ["cnn-v1", "mnv2-v1"])
    assert store.record_scored(run, [_item(k, study=f"1.2.{k}") for k in (1, 2)]) == []
    since = utcnow()
    folder = dataclasses.replace(_item(4), prepared=dataclasses.replace(
        _item(4).prepared, study=StudyInfo("folder:/in/a", patient_name="Doe^Jane", patient_id="P1")))
    assert store.record_scored(run, [_item(3, study="1.2.3"), _item(5, study="1.2.1"), folder]) == []
    touched = store.dicom_study_ids_touched_since(since)
    keys = {s.study_key for s in store.studies_by_id(touched)}
    assert keys == {"1.2.3", "1.2.1"}  # a new study and one given a new image; not the folder study
    assert touched == sorted(touched) and store.dicom_study_ids_touched_since(utcnow() + dt.timedelta(seconds=1)) == []
