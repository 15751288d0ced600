"""Real servers for tests and benchmarks, on free loopback ports: PostgreSQL and Orthanc."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bind to port 0 and let the kernel pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class Postgres:
    """Debian's PostgreSQL in a temp folder. initdb refuses root, so as root it runs as the postgres
    user (runuser), in a folder every parent of which postgres can read."""

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.pg_ctl = pg_binary("pg_ctl")
        subprocess.run([*self.as_user, pg_binary("initdb"), "-D", str(self.base / "data"), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.base} -c fsync=off -c full_page_writes=off "
                "-c shared_buffers=256MB")
        subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.base / "data"), "-o", opts, "-l",
                        str(self.base / "log"), "-w", "start"], check=True, capture_output=True)

    def new_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.base / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


class Orthanc:
    """Debian's Orthanc with the DICOMweb plugin. Orthanc 1.10 cannot choose its bind address;
    RemoteAccessAllowed false keeps its REST API to this machine, and every request goes to
    127.0.0.1."""

    aet = "ORTHANC"
    host = "127.0.0.1"

    def __init__(self, base: Path, binary: str = "Orthanc") -> None:
        import requests

        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.http_port, self.port = free_port(), free_port()
        config = {
            "Name": "TESTPACS", "StorageDirectory": str(self.base / "db"), "IndexDirectory": str(self.base / "db"),
            "HttpPort": self.http_port, "DicomPort": self.port, "DicomAet": self.aet, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [str(ORTHANC_DICOMWEB)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True, "DicomAlwaysAllowEcho": True,
            "StableAge": 1, "OverwriteInstances": False,
        }
        (self.base / "orthanc.json").write_text(json.dumps(config))
        self.log = open(self.base / "orthanc.log", "w")
        self.proc = subprocess.Popen([binary, str(self.base / "orthanc.json")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.http_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not start: {(self.base / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.1)

    def as_dict(self) -> dict:
        return {"url": self.url, "aet": self.aet, "host": self.host, "port": self.port, "proc": self.proc}

    def instances(self) -> int:
        import requests

        return len(requests.get(f"{self.url}/instances", timeout=30).json())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()
