"""CommP throughput: Ferry's streaming PieceHasher against `sha256sum` on the same file, in
the same run. sha256sum is the floor: one hash over the bytes, in C; CommP hashes every
64 bytes of fr32-padded data separately, in Python.

    .venv/bin/python bench/commp.py [--mib 256] [--runs 3]

The file is random bytes, read once before measuring so both read it from the page cache.
Ends with one JSON line: `commp_mb_per_s`, `sha256sum_mb_per_s`, `ratio` (MB = 10^6 bytes),
medians over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.commp import PieceHasher  # noqa: E402

READ = 1 << 20


def commp_seconds(path: Path) -> float:
    hasher = PieceHasher()
    buf = bytearray(READ)
    view = memoryview(buf)
    start = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            hasher.update(view[:n])
    hasher.digest()
    return time.perf_counter() - start


def sha256sum_seconds(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["sha256sum", str(path)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = args.mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "payload"
        with path.open("wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        path.read_bytes()  # warm the page cache
        commp, shasum = [], []
        for run in range(args.runs):
            commp.append(size / commp_seconds(path) / 1e6)
            shasum.append(size / sha256sum_seconds(path) / 1e6)
            print(f"run {run}: commp {commp[-1]:.1f} MB/s, sha256sum {shasum[-1]:.1f} MB/s", file=sys.stderr)
    c, s = statistics.median(commp), statistics.median(shasum)
    print(json.dumps({"commp_mb_per_s": round(c, 1), "sha256sum_mb_per_s": round(s, 1), "ratio": round(c / s, 4)}))


if __name__ == "__main__":
    main()
