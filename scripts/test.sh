#!/usr/bin/env bash
# Run Ferry's whole test suite against real Postgres and Redis (started if needed),
# real celery worker processes and an S3 peer on loopback. Installs what it needs
# into .venv first. Extra arguments go to pytest (e.g. `-m "not e2e"`).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
exec .venv/bin/python -m pytest "$@"
