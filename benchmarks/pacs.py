"""`python -m benchmarks.pacs`: DICOM receiving speed, and a modality-to-PACS round trip.

1. Receive: dcmtk's storescu sends N real-size chest X-ray instances (one association) to
   `batchcxr listen`; instances/s and MB/s, from storescu's start to its end.
2. Round trip: storescu sends 50 studies to the watcher's in-process listener; the watcher scores
   them and its outbox sends an SR and a Grad-CAM SC per image and model to Orthanc; measured: the
   time from the last instance received to the last result stored in the PACS (Orthanc's REST API).

    python -m benchmarks.pacs                  # N = 300, 50 studies
    python -m benchmarks.pacs --n 50 --studies 5
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batchcxr.paths import PROJECT_ROOT
from benchmarks.servers import Orthanc, free_port

RESULTS = Path(__file__).parent / "results"


def _instances(folder: Path, n: int, rows: int, cols: int, seed: int, studies: int | None = None) -> list[Path]:
    from tests.dicoms import chest_like, dicom_file

    files = []
    for i in range(n):
        study = f"1.2.826.0.1.3680043.8.498.{seed}.{i if studies is None else i % studies}"
        files.append(dicom_file(folder / f"{i}.dcm", chest_like(rows, cols, seed=seed + i), modality="DX",
                                StudyInstanceUID=study))
    return files


def receive(work: Path, n: int) -> list[dict]:
    """storescu -> our C-STORE SCP, for two instance sizes and one or two sending modalities."""
    from batchcxr.ingest.scp import Receiver
    from batchcxr.settings import DicomSettings

    results = []
    for rows, cols in ((1024, 1024), (2048, 1700)):  # 8-bit: 1 MB and 3.5 MB an instance
        files = _instances(work / f"send-{rows}", n, rows, cols, 10_000 + rows)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        for senders in (1, 2):
            receiver = Receiver(DicomSettings(port=free_port(), allowed_calling=("MODALITY",)),
                                work / f"received-{rows}-{senders}")
            receiver.start()
            try:
                start = time.perf_counter()
                procs = [subprocess.Popen(["storescu", "-aet", "MODALITY", "-aec", "BATCHCXR", "127.0.0.1",
                                           str(receiver.port), *map(str, files[k::senders])],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                         for k in range(senders)]
                codes = [p.wait() for p in procs]
                seconds = time.perf_counter() - start
            finally:
                receiver.stop()
            if any(codes) or receiver.received != n:
                raise RuntimeError(f"storescu failed or instances lost: {codes}, {receiver.received} of {n}")
            results.append({"instance_mb": round(megabytes / n, 2), "senders": senders, "instances": n,
                            "seconds": round(seconds, 2), "instances_per_s": round(n / seconds, 1),
                            "megabytes_per_s": round(megabytes / seconds, 1)})
            print(json.dumps(results[-1]), flush=True)
        shutil.rmtree(work / f"send-{rows}")
    return results


def round_trip(work: Path, studies: int) -> dict:
    import requests

    orthanc = Orthanc(work / "orthanc")
    drop = work / "drop"
    drop.mkdir()
    port = free_port()
    cfg = work / "watch.toml"
    cfg.write_text("\n".join([
        "[batchcxr]", f'db_url = "sqlite:///{work / "r.sqlite"}"', f'reports_dir = "{work / "reports"}"',
        f'outbox_dir = "{work / "outbox"}"', "[batchcxr.watch]", f'archive_dir = "{work / "archive"}"',
        f'quarantine_dir = "{work / "quarantine"}"', "file_quiet_seconds = 0.5", "study_quiet_seconds = 1",
        "batch_wait_seconds = 0.5", "[batchcxr.dicom]", 'ae_title = "BATCHCXR"', f"port = {port}",
        'allowed_calling = ["MODALITY"]', "listen_in_watch = true", "[batchcxr.dicom.destinations.pacs]",
        'kind = "dimse"', 'ae_title = "ORTHANC"', f"port = {orthanc.port}", 'objects = ["sr", "sc"]', ""]))
    files = _instances(work / "modality", studies, 2048, 1700, 20_000)
    log = open(work / "watch.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "batchcxr.cli", "watch", str(drop), "--config", str(cfg)],
                            stderr=log, cwd=PROJECT_ROOT)
    try:
        deadline = time.monotonic() + 120
        while "receiving DICOM" not in (work / "watch.log").read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("the listener did not start")
            time.sleep(0.1)
        start = time.perf_counter()
        out = subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "BATCHCXR", "127.0.0.1", str(port),
                              *map(str, files)], capture_output=True, text=True)
        received = time.perf_counter()
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        expected = studies * (1 + 2)  # one SR per study, an SC per image and model
        while orthanc.instances() < expected:
            if time.perf_counter() - received > 600:
                raise RuntimeError(f"only {orthanc.instances()} of {expected} results reached the PACS")
            time.sleep(0.2)
        done = time.perf_counter()
        modalities = sorted({requests.get(f"{orthanc.url}/instances/{i}/simplified-tags", timeout=10).json()["Modality"]
                             for i in requests.get(f"{orthanc.url}/instances", timeout=10).json()})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        log.close()
        orthanc.stop()
    return {"studies": studies, "send_seconds": round(received - start, 2),
            "last_received_to_last_result_in_pacs_s": round(done - received, 2),
            "per_study_s": round((done - received) / studies, 3), "results_in_pacs": expected,
            "result_modalities": modalities}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--studies", type=int, default=50)
    p.add_argument("--out", type=Path, default=RESULTS / "pacs.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="batchcxr-pacs-") as tmp:
        work = Path(tmp)
        result = {"receive": receive(work / "r", args.n)}
        shutil.rmtree(work / "r")
        result["round_trip"] = round_trip(work / "t", args.studies)
        print(json.dumps(result["round_trip"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
