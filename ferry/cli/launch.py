"""Starting Ferry's processes: the API (gunicorn), Celery workers and beat.

`ferry serve` runs all three together for the embedded mode; `ferry api`, `ferry worker`
and `ferry beat` run one each, as a cluster deployment does. Each is a child process
running the same code the cluster runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from ferry.settings import Settings


def api_command(bind: str, workers: int = 2, threads: int = 4) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", str(workers),
            "--threads", str(threads), "--timeout", "120", "--access-logfile", "-", "api.wsgi:app"]


def worker_command(queues: Sequence[str], concurrency: int, name: str, loglevel: str = "INFO") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-Q", ",".join(queues),
            "-c", str(concurrency), "-n", name, "--loglevel", loglevel, "--without-mingle",
            "--without-gossip"]


def beat_command(settings: Settings, loglevel: str = "INFO") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "tasks.app", "beat", "--loglevel", loglevel,
            "--schedule", str(settings.data_path / "celerybeat-schedule")]


def all_queues(settings: Settings) -> list[str]:
    return ["ferry.control"] + [f"backend.{name}" for name in settings.backends()]


class ProcessGroup:
    """Children that live and die together: if one exits, the others are stopped."""

    def __init__(self, log_dir: Path | None = None):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> None:
        out = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child owns it)
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT if out else None,
                                            env=os.environ.copy())

    def wait(self) -> int:
        """Block until a child exits or we are told to stop; stop the rest; return a code."""
        stopping = {"signal": None}

        def on_signal(signum, _frame):
            stopping["signal"] = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        code = 0
        while stopping["signal"] is None:
            dead = [(n, p.poll()) for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                name, code = dead[0]
                print(f"ferry: {name} exited with code {code}; stopping the others", file=sys.stderr)
                code = code or 1
                break
            time.sleep(0.3)
        self.stop()
        return code

    def stop(self, grace: float = 20.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_ready(url: str, timeout: float = 60.0) -> None:
    """Wait until the API's /readyz answers 200, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url.rstrip("/") + "/readyz", timeout=2)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.TransportError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise TimeoutError(f"the API at {url} was not ready after {timeout:.0f}s: {last}")
