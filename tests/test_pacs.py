"""DICOM networking against real peers: dcmtk's storescu as the modality, Debian's Orthanc (with
its DICOMweb plugin) as the PACS, dicom3tools' dciodvfy validating every object we write."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests

from batchcxr.ingest.scp import Receiver
from batchcxr.paths import DEMO_DIR
from batchcxr.settings import DicomSettings, Settings, load_settings
from batchcxr.store.repo import Store

from tests.conftest import free_port, need_tool
from tests.dicoms import chest_like, dicom_file
from tests.helpers import cli, daemon, wait_until, write_config

PROPOSE = {  # how storescu must be told to offer a file's own transfer syntax
    "1.2.840.10008.1.2.1": [], "1.2.840.10008.1.2.4.90": ["-xv"], "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.50": ["-xy"], "1.2.840.10008.1.2.5": ["-xr"],
}


def _receiver(tmp_path: Path, **cfg) -> Receiver:
    settings = DicomSettings(**{"ae_title": "BATCHCXR", "port": free_port(), "allowed_calling": ("MODALITY",), **cfg})
    r = Receiver(settings, tmp_path / "incoming")
    r.start()
    return r


def _storescu(port: int, files, *extra: str, aet: str = "MODALITY") -> subprocess.CompletedProcess:
    return subprocess.run([need_tool("storescu", "dcmtk"), "-aet", aet, "-aec", "BATCHCXR", *extra, "127.0.0.1",
                           str(port), *map(str, files)], capture_output=True, text=True, timeout=120)


def test_the_scp_accepts_every_syntax_as_sent_from_allowed_callers_only(tmp_path):
    receiver = _receiver(tmp_path)
    try:
        demo = sorted((DEMO_DIR / "dicom").rglob("*.dcm"))
        for f in demo:
            ts = pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
            out = _storescu(receiver.port, [f], *PROPOSE[str(ts)])
            assert out.returncode == 0, out.stderr
        received = sorted((tmp_path / "incoming").rglob("*.dcm"))
        assert len(received) == len(demo)
        by_sop = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in received}
        for f in demo:
            original = pydicom.dcmread(f)
            copy = pydicom.dcmread(by_sop[original.SOPInstanceUID])
            assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID  # accepted as sent
            assert copy.PixelData == original.PixelData
            assert by_sop[original.SOPInstanceUID].parent.name == original.StudyInstanceUID
        intruder = _storescu(receiver.port, demo[:1], aet="INTRUDER")
        assert intruder.returncode != 0 and len(list((tmp_path / "incoming").rglob("*.dcm"))) == len(demo)
    finally:
        receiver.stop()


def test_an_association_killed_mid_transfer_leaves_no_partial_file(tmp_path):
    from pynetdicom import evt

    big = dicom_file(tmp_path / "big.dcm", chest_like(3000, 3000, seed=7).astype("uint16") * 16)  # ~18 MB
    receiver = _receiver(tmp_path)
    started = threading.Event()
    receiver.server.bind(evt.EVT_PDU_RECV, lambda e: started.set())
    proc = subprocess.Popen([need_tool("storescu", "dcmtk"), "-aet", "MODALITY", "-aec", "BATCHCXR", "--max-send-pdu",
                             "4096", "127.0.0.1", str(receiver.port), str(big)])
    try:
        assert started.wait(30)
        proc.send_signal(signal.SIGKILL)  # the modality dies with the transfer half done
        proc.wait()
        ok = _storescu(receiver.port, [DEMO_DIR / "dicom" / "dx-16bit-explicit.dcm"])
        assert ok.returncode == 0  # the listener goes on
        files = [p.name for p in (tmp_path / "incoming").rglob("*") if p.is_file()]
        assert len(files) == 1 and not any(n.startswith(".") for n in files)  # no partial, no temp left
    finally:
        receiver.stop()


def test_the_scp_speaks_tls(tmp_path):
    import ssl

    from pynetdicom import AE

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    receiver = _receiver(tmp_path, tls_cert=str(cert), tls_key=str(key))
    try:
        context = ssl.create_default_context(cafile=str(cert))
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="BATCHCXR", tls_args=(context, "localhost"))
        assert assoc.is_established
        status = assoc.send_c_store(pydicom.dcmread(DEMO_DIR / "dicom" / "dx-16bit-explicit.dcm"))
        assoc.release()
        assert status.Status == 0
        assert len(list((tmp_path / "incoming").rglob("*.dcm"))) == 1
    finally:
        receiver.stop()


def _orthanc_instances(orthanc) -> list[dict]:
    ids = requests.get(f"{orthanc['url']}/instances", timeout=10).json()
    return [requests.get(f"{orthanc['url']}/instances/{i}/simplified-tags", timeout=10).json() for i in ids]


def _upload(orthanc, path: Path) -> None:
    r = requests.post(f"{orthanc['url']}/instances", data=path.read_bytes(), timeout=30)
    assert r.status_code == 200, r.text


def _dicom_config(tmp_path: Path, orthanc, scp_port: int, db_url: str | None = None, **dicom) -> Path:
    cfg = write_config(tmp_path, db_url=db_url)
    lines = ["[batchcxr.dicom]", 'ae_title = "BATCHCXR"', f"port = {scp_port}",
             'allowed_calling = ["ORTHANC", "MODALITY"]', f'pacs_ae = "{orthanc["aet"]}"',
             f'pacs_port = {orthanc["port"]}', f'dicomweb_url = "{orthanc["url"]}/dicom-web"',
             f'uid_root = "1.2.826.0.1.3680043.8.498."']
    lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}".replace("'", '"') for k, v in dicom.items()]
    lines += ["[batchcxr.dicom.destinations.pacs]", 'kind = "dimse"', f'ae_title = "{orthanc["aet"]}"',
              f'port = {orthanc["port"]}', 'objects = ["sr", "sc"]',
              "[batchcxr.dicom.destinations.web]", 'kind = "stow"', f'url = "{orthanc["url"]}/dicom-web"',
              'objects = ["gsps"]']
    text = cfg.read_text().replace("[batchcxr.watch]", f'outbox_dir = "{tmp_path / "outbox"}"\n[batchcxr.watch]')
    cfg.write_text(text + "\n".join(lines) + "\n")
    return cfg


def test_pull_by_c_find_and_c_move_and_by_dicomweb(tmp_path, orthanc):
    uid = "1.2.826.0.1.3680043.8.498.555"
    for k in range(2):
        _upload(orthanc, dicom_file(tmp_path / "up" / f"{k}.dcm", chest_like(seed=1500 + k), StudyInstanceUID=uid,
                                    StudyDate="20261201", modality="DX"))
    port = free_port()
    requests.put(f"{orthanc['url']}/modalities/BATCHCXR", json={"AET": "BATCHCXR", "Host": "127.0.0.1", "Port": port},
                 timeout=10).raise_for_status()
    cfg = _dicom_config(tmp_path, orthanc, port)
    out = cli("pull", "--config", str(cfg), "--since", "2026-11-30", "--receive-to", str(tmp_path / "in"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(list((tmp_path / "in" / uid).glob("*.dcm"))) == 2
    assert cli("score", str(tmp_path / "in"), "--config", str(cfg)).returncode == 0
    again = cli("pull", "--config", str(cfg), "--since", "2026-11-30", "--receive-to", str(tmp_path / "in2"))
    assert "1 already here" in again.stdout and not list((tmp_path / "in2").rglob("*.dcm"))
    (tmp_path / "w").mkdir()
    web = _dicom_config(tmp_path / "w", orthanc, free_port(), pull_via="dicomweb")
    out = cli("pull", "--config", str(web), "--since", "2026-11-30", "--receive-to", str(tmp_path / "w" / "in"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(list((tmp_path / "w" / "in" / uid).glob("*.dcm"))) == 2


def test_results_go_back_as_valid_sr_sc_and_gsps_once(tmp_path, orthanc):
    dciodvfy = need_tool("dciodvfy", "dicom3tools")
    uid = "1.2.826.0.1.3680043.8.498.777"
    folder = tmp_path / "in"
    for k in range(2):
        dicom_file(folder / f"{k}.dcm", chest_like(seed=1600 + k), StudyInstanceUID=uid, PatientName="Send^Back",
                   PatientID="SB-1", modality="DX")
    before = len(requests.get(f"{orthanc['url']}/instances", timeout=10).json())
    cfg = _dicom_config(tmp_path, orthanc, free_port())
    assert cli("score", str(folder), "--config", str(cfg)).returncode == 0
    out = cli("send", "--config", str(cfg))
    assert out.returncode == 0, out.stdout + out.stderr
    objects = sorted((tmp_path / "outbox").glob("*.dcm"))
    kinds = sorted(str(pydicom.dcmread(p).Modality) for p in objects)
    assert kinds == ["OT", "OT", "OT", "OT", "PR", "PR", "PR", "PR", "SR"]  # 2 images x 2 models x (SC, GSPS) + SR
    for p in objects:
        report = subprocess.run([dciodvfy, str(p)], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], (p.name, errors)
    after = len(requests.get(f"{orthanc['url']}/instances", timeout=10).json())
    assert after - before == 9
    sr = next(i for i in _orthanc_instances(orthanc) if i.get("Modality") == "SR" and i["StudyInstanceUID"] == uid)
    assert sr["PatientID"] == "SB-1" and "NOT FOR DIAGNOSTIC USE" in sr["SeriesDescription"]
    # scoring again (a new model version would too) and sending again replaces, never duplicates
    assert cli("score", str(folder), "--config", str(cfg), "--rescore").returncode == 0
    assert cli("send", "--config", str(cfg)).returncode == 0
    assert len(requests.get(f"{orthanc['url']}/instances", timeout=10).json()) == after


def test_the_outbox_waits_for_a_destination_that_is_down_and_survives_kill_9(tmp_path, orthanc):
    uid = "1.2.826.0.1.3680043.8.498.888"
    folder = tmp_path / "in"
    for k in range(3):
        dicom_file(folder / f"{k}.dcm", chest_like(seed=1700 + k), StudyInstanceUID=uid, modality="DX")
    down = free_port()  # nothing listens there
    cfg = _dicom_config(tmp_path, orthanc, free_port())
    text = cfg.read_text().replace(f'port = {orthanc["port"]}\nobjects = ["sr", "sc"]', f'port = {down}\nobjects = ["sr", "sc"]')
    cfg.write_text(text.replace('objects = ["gsps"]', 'objects = []'))
    assert cli("score", str(folder), "--config", str(cfg)).returncode == 0
    out = cli("send", "--config", str(cfg))
    assert out.returncode == 1 and "waiting 7" in out.stdout  # 1 SR + 3 x 2 SC, kept
    status = cli("status", "--config", str(cfg), "--json")
    assert '"pending": 7' in status.stdout
    cfg.write_text(cfg.read_text().replace(f"port = {down}", f'port = {orthanc["port"]}'))
    store = Store.open(load_settings(cfg).sqlalchemy_url)
    with store.session() as s, s.begin():  # the back-off is over
        from sqlalchemy import update

        from batchcxr.store.schema import OutboxItem

        s.execute(update(OutboxItem).values(next_attempt_at=OutboxItem.created_at))
    store.close()
    before = len(requests.get(f"{orthanc['url']}/instances", timeout=10).json())
    for _ in range(3):  # kill -9 in the middle of sending, again and again
        proc = subprocess.Popen([sys.executable, "-m", "batchcxr.cli", "send", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.8)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = cli("send", "--config", str(cfg))
    assert final.returncode == 0, final.stdout
    assert len(requests.get(f"{orthanc['url']}/instances", timeout=10).json()) - before == 7  # each once


def test_modality_to_listener_to_watcher_to_pacs(tmp_path, orthanc):
    """storescu sends 5 studies -> the watcher's in-process listener -> scored -> SR + SC in Orthanc."""
    drop = tmp_path / "drop"
    drop.mkdir()
    port = free_port()
    cfg = _dicom_config(tmp_path, orthanc, port, listen_in_watch=True)
    cfg.write_text(cfg.read_text().replace('objects = ["gsps"]', 'objects = []'))
    before = len(requests.get(f"{orthanc['url']}/instances", timeout=10).json())
    files = [dicom_file(tmp_path / "modality" / f"{k}.dcm", chest_like(seed=1800 + k), modality="DX",
                        StudyInstanceUID=f"1.2.826.0.1.3680043.8.498.9{k}") for k in range(5)]
    proc = daemon(cfg, drop, log=tmp_path / "watch.log")
    try:
        wait_until(lambda: "receiving DICOM" in (tmp_path / "watch.log").read_text(), 60, what="the listener")
        out = _storescu(port, files)
        assert out.returncode == 0, out.stderr
        sent_at = time.monotonic()
        wait_until(lambda: len(requests.get(f"{orthanc['url']}/instances", timeout=10).json()) - before >= 5 * 3,
                   180, what="5 SR + 10 SC in the PACS")
        latency = time.monotonic() - sent_at
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    assert len(list((tmp_path / "archive").rglob("*.dcm"))) == 5
    assert latency < 120
