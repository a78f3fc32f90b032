#!/usr/bin/env bash
# Ferry's main job on the embedded default, no servers needed: installs Ferry into
# .venv, starts `ferry serve` (SQLite catalog, filesystem broker, two local disks),
# migrates a sample folder from the `local` disk to the `archive` disk with a live
# progress bar, prints the summary, and stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .

export FERRY_DATA_DIR="${FERRY_DATA_DIR:-$PWD/.ferry-demo}"
export FERRY_API_URL="${FERRY_API_URL:-http://127.0.0.1:8470}"
rm -rf "$FERRY_DATA_DIR"
mkdir -p "$FERRY_DATA_DIR/logs"

# A sample folder: 300 files from a few bytes to 4 MiB.
.venv/bin/python - <<'PY'
import os, random
from pathlib import Path
root = Path(os.environ["FERRY_DATA_DIR"]) / "disks" / "local" / "photos"
rng = random.Random(1)
for i in range(300):
    d = root / f"album-{i % 6}"
    d.mkdir(parents=True, exist_ok=True)
    size = rng.choice([rng.randint(1, 64 * 1024), rng.randint(64 * 1024, 4 * 2**20)])
    (d / f"img-{i:04d}.jpg").write_bytes(os.urandom(size))
print(f"sample: 300 files under {root}")
PY

port="${FERRY_API_URL##*:}"
.venv/bin/ferry serve --port "$port" --log-dir "$FERRY_DATA_DIR/logs" &
serve_pid=$!
trap 'kill $serve_pid 2>/dev/null; wait $serve_pid 2>/dev/null' EXIT
.venv/bin/python -c "from ferry.cli.launch import wait_ready; wait_ready('$FERRY_API_URL', 90)" \
  || { echo "ferry serve did not become ready; see $FERRY_DATA_DIR/logs" >&2; exit 1; }

.venv/bin/ferry migrate local:photos/ archive:photos/
echo "archive now holds $(find "$FERRY_DATA_DIR/disks/archive/photos" -type f | wc -l) files; logs in $FERRY_DATA_DIR/logs"
