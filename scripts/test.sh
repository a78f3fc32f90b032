#!/usr/bin/env bash
# Run Ferry's whole test suite against real Postgres and Redis (started if needed),
# real celery worker processes and an S3 peer on loopback. Installs what it needs
# into .venv first. Extra arguments go to pytest (e.g. `-m "not e2e"`).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first, pinned: its CPU build lies on this machine's disk, where an unpinned torch
# (asked for by sentence-transformers) would pull several GB of CUDA packages.
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest "$@"
