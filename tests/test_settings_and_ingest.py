from pathlib import Path

import pytest

from batchcxr.domain import FileKind
from batchcxr.errors import ConfigError
from batchcxr.ingest.files import sniff, walk
from batchcxr.settings import Settings, load_settings


def test_sniff_by_content_not_name():
    assert sniff(b"\0" * 128 + b"DICM" + b"rest") == FileKind.DICOM
    assert sniff(b"\xff\xd8\xff\xe0 jfif") == FileKind.JPEG
    assert sniff(b"\x89PNG\r\n\x1a\n....") == FileKind.PNG
    assert sniff(b"hello") == FileKind.OTHER


def test_walk_is_sorted_recursive_and_skips_hidden(tmp_path):
    for rel in ("b/2.dcm", "a/1.dcm", ".hidden/x.dcm", "a/.partial.tmp", "top.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in walk(tmp_path)] == ["top.jpg", "a/1.dcm", "b/2.dcm"]


def test_settings_layering(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[batchcxr]\nbatch_size = 8\ndb_url = "x.sqlite"\n[batchcxr.quality]\nmin_size = 100\n'
                   'modalities = ["CR"]\n')
    s = load_settings(cfg, {"batch_size": 4}, environ={"BATCHCXR_DB_URL": "postgresql://h/db"})
    assert s.batch_size == 4 and s.db_url == "postgresql://h/db"
    assert s.quality.min_size == 100 and s.quality.modalities == ("CR",)


def test_sqlite_path_becomes_url(tmp_path):
    assert Settings(db_url=str(tmp_path / "r.sqlite")).sqlalchemy_url == f"sqlite:///{tmp_path / 'r.sqlite'}"


@pytest.mark.parametrize("text, match", [
    ("[batchcxr]\nbatch_sise = 3\n", "unknown setting 'batch_sise'"),
    ("[batchcxr]\nbatch_size = 'many'\n", "batch_size"),
    ("[batchcxr]\nbatch_size = 0\n", "batch_size must be >= 1"),
])
def test_bad_settings_name_the_problem(tmp_path, text, match):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_settings(cfg, environ={})


def test_every_setting_is_documented_in_readme():
    from dataclasses import fields

    from batchcxr.settings import Destination, DicomSettings, QualitySettings, WatchSettings, WebSettings

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    tables = (Settings, QualitySettings, WatchSettings, WebSettings, DicomSettings, Destination)
    for f in [f for table in tables for f in fields(table)]:
        assert f"`{f.name}`" in readme, f"setting {f.name} is not documented in README.md"


def test_the_batch_is_split_across_one_infer_thread_per_core(monkeypatch):
    from batchcxr.pipeline import infer_threads, model_threads

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert (infer_threads(Settings()), model_threads(Settings())) == (16, 1)
    assert (infer_threads(Settings(infer_threads=4)), model_threads(Settings(infer_threads=4))) == (4, 4)
    assert model_threads(Settings(infer_threads=32)) == 1  # never zero (ONNX Runtime would take every core)
    assert model_threads(Settings(model_threads=3)) == 3
