"""`python -m benchmarks.fuzz`: a mutation-fuzzing campaign against the prepare path.

Real DICOM (every transfer syntax scoring decodes), JPEG and PNG files are mutated - bit flips,
byte runs, truncation, chunk deletion and duplication, DICOM element lengths corrupted, and
dimension lies (DICOM Rows/Columns, JPEG frame headers, PNG IHDR) - and each mutant goes through
``read`` -> ``is_complete`` -> ``prepare`` (everything before the models) in a worker process with
an address-space cap. Counted: exceptions that escape prepare (it must turn every bad input into
a recorded reason), inputs taking over ``--hang-seconds``, workers over the memory cap.

    python -m benchmarks.fuzz --n 20000            # the campaign (README figures)
    python -m benchmarks.fuzz --n 1000 --seed 1    # what CI runs (tests/test_fuzz.py)

Seeded: the same --seed gives the same mutants. Not coverage-guided (a plain mutation fuzzer).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

MUTATIONS = ("flip", "bytes", "truncate", "delete", "duplicate", "dicom_length", "dimensions", "splice")


def seed_files(work: Path) -> list[Path]:
    """Real inputs to mutate: the demo's DICOM/JPEG/PNG files and a chest X-ray written in every
    transfer syntax scoring decodes (and ../shared's real CXR DICOMs when present)."""
    from batchcxr.dicomwrite import TRANSFER_SYNTAXES, base_dataset, write_dicom
    from batchcxr.ingest.files import walk
    from batchcxr.paths import DEMO_DIR, PROJECT_ROOT

    seeds = [p for p in walk(DEMO_DIR) if p.suffix.lower() in (".dcm", ".jpeg", ".jpg", ".png")]
    import cv2

    gray = cv2.resize(cv2.imread(str(seeds[-1]) if seeds[-1].suffix != ".dcm" else
                                 str(next(p for p in seeds if p.suffix != ".dcm")), cv2.IMREAD_GRAYSCALE), (96, 80))
    for name in TRANSFER_SYNTAXES:
        try:
            seeds.append(write_dicom(work / f"seed-{name}.dcm", base_dataset(gray), name))
        except Exception:  # noqa: BLE001 - an encoder missing here (GDCM for some): fewer seeds
            pass
    shared = PROJECT_ROOT.parent / "shared" / "data" / "dicom_cxr"
    if shared.is_dir():
        seeds += sorted(shared.glob("*.dcm"))
    cv2.imwrite(str(work / "seed.png"), gray)
    cv2.imwrite(str(work / "seed16.png"), (gray.astype("uint16") * 257))
    seeds += [work / "seed.png", work / "seed16.png"]
    return seeds


def _dicom_elements(data: bytes) -> list[int]:
    """Offsets of explicit-VR element headers (a cheap scan: tag, then two upper-case letters)."""
    out = []
    for i in range(132, min(len(data) - 8, 6000)):
        if data[i + 4 : i + 6].isalpha() and data[i + 4 : i + 6].isupper():
            out.append(i)
    return out


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutant of ``data`` and the mutation's name."""
    kind = rng.choice(MUTATIONS)
    b = bytearray(data)
    n = len(b)
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            k = rng.randrange(n)
            b[k] ^= 1 << rng.randrange(8)
    elif kind == "bytes":
        k = rng.randrange(n)
        b[k : k + rng.randint(1, 64)] = bytes(rng.choice([0, 0xFF, rng.randrange(256)]) for _ in range(rng.randint(1, 64)))
    elif kind == "truncate":
        del b[rng.randint(0, n - 1):]
    elif kind == "delete":
        k = rng.randrange(n)
        del b[k : k + rng.randint(1, max(1, n // 8))]
    elif kind == "duplicate":
        k = rng.randrange(n)
        chunk = b[k : k + rng.randint(1, 4096)]
        b[k:k] = chunk * rng.randint(1, 8)
    elif kind == "dicom_length":
        offsets = _dicom_elements(data)
        if offsets:
            k = rng.choice(offsets)
            vr = bytes(b[k + 4 : k + 6])
            value = rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, rng.randrange(1 << 32), n, n * 1000])
            if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
                b[k + 8 : k + 12] = struct.pack("<I", value & 0xFFFFFFFF)
            else:
                b[k + 6 : k + 8] = struct.pack("<H", value & 0xFFFF)
    elif kind == "dimensions":
        side = rng.choice([0, 1, 63, 65535, 30000, rng.randrange(1 << 16)])
        side2 = rng.choice([0, 1, 65535, 30000, rng.randrange(1 << 16)])
        if data.startswith(b"\x89PNG"):
            b[16:24] = struct.pack(">II", side, side2)
        elif data.startswith(b"\xff\xd8"):
            k = data.find(b"\xff\xc0")
            if k > 0:
                b[k + 5 : k + 9] = struct.pack(">HH", side, side2)
        else:
            for tag in (b"\x28\x00\x10\x00", b"\x28\x00\x11\x00", b"\x28\x00\x08\x00", b"\x28\x00\x00\x01"):
                k = data.find(tag, 132)
                if k > 0:
                    b[k + 8 : k + 10] = struct.pack("<H", rng.choice([side, side2]) & 0xFFFF)
    elif kind == "splice":
        k = rng.randrange(n)
        b[k:k] = rng.choice([b"\xff\xd8\xff\xc0\x00\x11\x08\x75\x30\x75\x30\x01\x01\x11\x00",
                             b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\x00" * 128 + b"DICM", b"IEND\xaeB`\x82"])
    return bytes(b), kind


def _worker(conn, memory_cap: int) -> None:
    """Run prepare on each mutant received; answer (outcome, detail, peak RSS MB)."""
    import resource
    import warnings

    warnings.simplefilter("ignore")  # pydicom's warnings on mangled values: the outcome is what counts
    resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))
    from batchcxr.ingest.complete import is_complete
    from batchcxr.ingest.files import read_source
    from batchcxr.normalize.prepare import prepare
    from batchcxr.settings import QualitySettings

    quality = QualitySettings()
    while True:
        item = conn.recv()
        if item is None:
            return
        path = Path(item)
        try:
            source, data = read_source(path, quality.max_file_bytes)
            is_complete(data, quality)
            result = prepare(source, data, quality, "folder:fuzz", 512)
            status = getattr(result, "status", None)
            reason = getattr(result, "reason", "")
            outcome = "unexpected" if reason.startswith("unexpected") else (status.value if status else "scorable")
            detail = reason[:200]
        except MemoryError:
            outcome, detail = "memory", "MemoryError"
        except Exception as exc:  # noqa: BLE001 - what the campaign counts
            outcome, detail = "exception", "".join(traceback.format_exception_only(exc)).strip()[:300]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        conn.send((outcome, detail, rss))


class Runner:
    """One worker process at a time, restarted after a hang or a crash."""

    def __init__(self, memory_cap: int) -> None:
        self.memory_cap = memory_cap
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, self.memory_cap), daemon=True)
        self.proc.start()

    def run(self, path: Path, timeout: float) -> tuple[str, str, float, float]:
        start = time.monotonic()
        self.conn.send(str(path))
        if not self.conn.poll(timeout):
            self.proc.kill()
            self.proc.join()
            self._start()
            return "hang", f"over {timeout:g} s", 0.0, time.monotonic() - start
        try:
            outcome, detail, rss = self.conn.recv()
        except EOFError:
            code = self.proc.exitcode
            self.proc.join()
            self._start()
            return "crash", f"worker died (exit {code})", 0.0, time.monotonic() - start
        return outcome, detail, rss, time.monotonic() - start

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(timeout=10)


def campaign(n: int, seed: int, work: Path, hang_seconds: float = 10.0, memory_cap_mb: int = 1536,
             workers: int = 2) -> dict:
    """Mutate and run ``n`` inputs; return counts and the failures found."""
    from concurrent.futures import ThreadPoolExecutor

    work.mkdir(parents=True, exist_ok=True)
    seeds = seed_files(work)
    rng = random.Random(seed)
    inputs = []
    for i in range(n):
        src = rng.choice(seeds)
        data, kind = mutate(src.read_bytes(), rng)
        path = work / f"m{i:06d}{src.suffix}"
        path.write_bytes(data)
        inputs.append((path, kind, src.name))
    runners = [Runner(memory_cap_mb << 20) for _ in range(workers)]
    outcomes: Counter = Counter()
    by_mutation: Counter = Counter()
    problems: list[dict] = []
    peak = 0.0
    slowest = 0.0
    start = time.monotonic()

    def run_slice(k: int) -> list:
        return [(item, runners[k].run(item[0], hang_seconds)) for item in inputs[k::workers]]

    with ThreadPoolExecutor(workers) as pool:
        for results in pool.map(run_slice, range(workers)):
            for (path, kind, src), (outcome, detail, rss, seconds) in results:
                outcomes[outcome] += 1
                by_mutation[kind] += 1
                peak, slowest = max(peak, rss), max(slowest, seconds)
                if outcome in ("exception", "unexpected", "hang", "crash", "memory") or rss > memory_cap_mb:
                    problems.append({"input": path.name, "seed_file": src, "mutation": kind, "outcome": outcome,
                                     "detail": detail, "rss_mb": round(rss)})
                else:
                    path.unlink()
    for r in runners:
        r.close()
    return {
        "inputs": n, "seed": seed, "seed_files": len(seeds), "seconds": round(time.monotonic() - start, 1),
        "outcomes": dict(outcomes), "mutations": dict(by_mutation),
        "uncaught_exceptions": outcomes["exception"] + outcomes["unexpected"],
        "hangs_over_limit": outcomes["hang"], "crashes": outcomes["crash"],
        "over_memory_cap": outcomes["memory"] + sum(1 for p in problems if p["rss_mb"] > memory_cap_mb),
        "hang_limit_s": hang_seconds, "memory_cap_mb": memory_cap_mb, "peak_worker_rss_mb": round(peak),
        "slowest_input_s": round(slowest, 2), "problems": problems[:50],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--hang-seconds", type=float, default=10.0)
    p.add_argument("--memory-cap-mb", type=int, default=1536)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="Where mutants go [default: a temp folder].")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fuzz.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="batchcxr-fuzz-") as tmp:
        result = campaign(args.n, args.seed, args.work or Path(tmp), args.hang_seconds, args.memory_cap_mb,
                          args.workers)
    result["platform"] = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "problems"}, indent=2))
    for problem in result["problems"][:10]:
        print(problem)
    bad = result["uncaught_exceptions"] + result["hangs_over_limit"] + result["crashes"] + result["over_memory_cap"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
