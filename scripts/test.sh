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
# promtool checks deploy/prometheus (config, rules, rule unit tests); Debian's prometheus
# package carries it. The package also starts a prometheus daemon where policy-rc.d allows
# it (and enables it under systemd): the tests need none, so one it started is stopped and
# disabled.
if ! command -v promtool >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  prometheus_was_running=$(pgrep -x prometheus >/dev/null && echo yes || echo no)
  install_prometheus() {
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  }
  install_prometheus || { $sudo apt-get update -qq && install_prometheus; }
  if [ "$prometheus_was_running" = no ]; then
    if [ -d /run/systemd/system ]; then
      $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
    else
      $sudo update-rc.d prometheus disable >/dev/null 2>&1 || true
      if pgrep -x prometheus >/dev/null; then $sudo /etc/init.d/prometheus stop >/dev/null 2>&1 || true; fi
    fi
  fi
fi
exec .venv/bin/python -m pytest "$@"
