"""Shared fixtures. Tests needing ../shared fail in CI (BATCHCXR_CI=1) and skip elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IN_CI = os.environ.get("BATCHCXR_CI") == "1"


def need(path: Path, why: str) -> Path:
    """Return path if it exists; else fail in CI and skip elsewhere, naming the reason."""
    if path.exists():
        return path
    _missing(f"{path} is missing: {why}")
    return path


def _missing(message: str) -> None:
    if IN_CI:
        pytest.fail(message + " (BATCHCXR_CI=1: this test must run in CI)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def openjpeg() -> None:
    """The system's libopenjp2 under glymur, for reduced-resolution JPEG 2000 decoding."""
    from batchcxr.normalize import j2k

    if not j2k.available():
        _missing("libopenjp2 >= 2.3 is missing (apt-get install libopenjp2-7)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return need(SHARED / "data", "the real chest X-ray data in ../shared")


@pytest.fixture(scope="session")
def imagenet_tflite() -> Path:
    return need(SHARED / "weights" / "mobilenet_v2_1.0_224_quant.tflite", "the ImageNet MobileNetV2 TFLite file")


# --- real servers: PostgreSQL ---------------------------------------------------------------

from benchmarks.servers import free_port, pg_binary  # noqa: E402


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL (Debian's postgresql) on a free loopback port, for the whole session
    (benchmarks.servers.Postgres: initdb as the postgres user when root, in a folder under /tmp that
    postgres can read, not pytest's 0700 tmp folders)."""
    import tempfile

    from benchmarks.servers import Postgres

    if not pg_binary("initdb") or not pg_binary("pg_ctl"):
        _missing("PostgreSQL server binaries not found (apt-get install postgresql)")
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            _missing("no postgres user to run PostgreSQL as (apt-get install postgresql)")
    server = Postgres(Path(tempfile.mkdtemp(prefix="batchcxr-pg-", dir="/tmp")))
    try:
        yield {"host": "127.0.0.1", "port": server.port, "user": "postgres"}
    finally:
        server.stop()


_PG_DATABASES = iter(range(1, 1_000_000))


def new_pg_database(server) -> str:
    """A fresh, empty database on the session's server; its SQLAlchemy URL."""
    import psycopg

    name = f"batchcxr_{os.getpid()}_{next(_PG_DATABASES)}"
    with psycopg.connect(host=server["host"], port=server["port"], user=server["user"], dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{server['user']}@{server['host']}:{server['port']}/{name}"


@pytest.fixture
def pg_url(postgres_server) -> str:
    return new_pg_database(postgres_server)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """The results database of a test, once on SQLite and once on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.sqlite'}"
    return new_pg_database(request.getfixturevalue("postgres_server"))


# --- real servers: Orthanc (PACS), dcmtk and dicom3tools ------------------------------------

def need_tool(name: str, package: str) -> str:
    """The path of a command-line tool; fail in CI and skip elsewhere when it is missing."""
    import shutil

    found = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if not found:
        _missing(f"{name} not found (apt-get install {package})")
    return found


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """Debian's Orthanc with the DICOMweb plugin, on free loopback ports (benchmarks.servers.Orthanc)."""
    from benchmarks.servers import ORTHANC_DICOMWEB, Orthanc

    binary = need_tool("Orthanc", "orthanc")
    if not ORTHANC_DICOMWEB.exists():
        _missing("the Orthanc DICOMweb plugin is missing (apt-get install orthanc-dicomweb)")
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), binary)
    try:
        yield server.as_dict()
    finally:
        server.stop()
