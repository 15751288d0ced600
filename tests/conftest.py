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

def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bind to port 0 and let the kernel pick)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_binary(name: str) -> str | None:
    import glob
    import shutil

    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL (Debian's postgresql) on a free loopback port, for the whole session.

    initdb refuses root, so as root it runs as the postgres user (runuser), in a folder every
    parent of which postgres can read (a mkdtemp under /tmp, not pytest's 0700 tmp folders).
    """
    import shutil
    import subprocess
    import tempfile

    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not initdb or not pg_ctl:
        _missing("PostgreSQL server binaries not found (apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="batchcxr-pg-", dir="/tmp"))
    base.chmod(0o755)
    as_user: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            _missing("no postgres user to run PostgreSQL as (apt-get install postgresql)")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = base / "data"
    port = free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True)
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off -c full_page_writes=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield {"host": "127.0.0.1", "port": port, "user": "postgres"}
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


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
