"""CID computation throughput: Ferry's streaming ContentHasher (sha256 + CIDv1 in one pass)
against the real IPFS node's `add --only-hash` (same chunker, raw leaves, CIDv1) on the same
file, in the same run. Both must give the same CID.

    .venv/bin/python bench/cid.py [--mib 1024] [--runs 3]

The node is the tests' js-ipfs 0.18.1 (tests/fixtures/ipfs, `npm ci` on first use), offline on
loopback; the file goes to it over its HTTP RPC API, as any client's would. The file is read
from the page cache by both (read once before measuring). Ends with one JSON line:
`cid_mb_per_s`, `node_only_hash_mb_per_s`, `ratio_cid` (MB = 10^6 bytes), medians.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.fixtures

from tests.fixtures.ipfsnode import start_node  # noqa: E402
from workers.cid import CHUNK, ContentHasher, normalize_cid  # noqa: E402

READ = 2**20


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_file(path: Path, mib: int) -> None:
    block = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(READ // 32))
    with path.open("wb") as f:
        for i in range(mib):
            f.write(i.to_bytes(8, "big") + block[8:])  # every MiB different


def ferry_cid(path: Path) -> tuple[str, float]:
    hasher = ContentHasher()
    started = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while chunk := f.read(READ):
            hasher.update(chunk)
    cid = hasher.digest().cid
    return cid, time.perf_counter() - started


def node_cid(api_url: str, path: Path) -> tuple[str, float]:
    params = {"only-hash": "true", "cid-version": "1", "raw-leaves": "true", "chunker": f"size-{CHUNK}",
              "pin": "false"}
    started = time.perf_counter()
    with path.open("rb") as f:
        r = httpx.post(f"{api_url}/api/v0/add", params=params, files={"file": (path.name, f)}, timeout=3600)
    r.raise_for_status()
    cid = normalize_cid(json.loads(r.text.splitlines()[-1])["Hash"])
    return cid, time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=1024, help="size of the file (default 1 GiB)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-bench-cid-") as tmp:
        base = Path(tmp)
        data = base / "data.bin"
        say(f"writing {args.mib} MiB")
        make_file(data, args.mib)
        subprocess.run(["cat", str(data)], stdout=subprocess.DEVNULL, check=True)  # into the page cache
        say("starting the IPFS node")
        node, group = start_node(base / "ipfs")
        try:
            nbytes = data.stat().st_size
            ferry_rates, node_rates, cids = [], [], set()
            for run in range(args.runs):
                cid, secs = node_cid(node.api_url, data)
                node_rates.append(nbytes / secs / 1e6)
                cids.add(("node", cid))
                cid, secs = ferry_cid(data)
                ferry_rates.append(nbytes / secs / 1e6)
                cids.add(("ferry", cid))
                say(f"run {run + 1}: Ferry {ferry_rates[-1]:.0f} MB/s, node --only-hash {node_rates[-1]:.0f} MB/s")
        finally:
            group.stop()
    if len({cid for _, cid in cids}) != 1:
        say(f"FAILED: the CIDs differ: {sorted(cids)}")
        return 1
    ferry, peer = statistics.median(ferry_rates), statistics.median(node_rates)
    print(json.dumps({"cid_mb_per_s": round(ferry, 1), "node_only_hash_mb_per_s": round(peer, 1),
                      "ratio_cid": round(ferry / peer, 2), "mib": args.mib, "runs": args.runs,
                      "cid": cids.pop()[1], "raw": {"cid_mb_per_s": [round(x, 1) for x in ferry_rates],
                                                     "node_only_hash_mb_per_s": [round(x, 1) for x in node_rates]},
                      "node": "js-ipfs 0.18.1 (tests/fixtures/ipfs)", "mb_unit": "10**6 bytes"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
