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

from ferry.settings import Settings, get_settings


def api_command(bind: str, workers: int = 2, threads: int = 4) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", str(workers),
            "--threads", str(threads), "--timeout", "120", "--limit-request-line", "8190",
            "--config", "python:api.gunicorn_conf", "api.wsgi:app"]


def worker_command(queues: Sequence[str], concurrency: int, name: str, loglevel: str = "INFO") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "tasks.app", "worker", "-Q", ",".join(queues),
            "-c", str(concurrency), "-n", name, "--loglevel", loglevel, "--without-mingle",
            "--without-gossip"]


def flower_command(address: str, port: int) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "tasks.app", "flower", f"--address={address}", f"--port={port}",
            "--purge_offline_workers=600"]


def worker_name(queues: Sequence[str]) -> str:
    """What Flower and `celery inspect` call a worker: the backend (or role) of its one queue,
    e.g. `s3-archive@host`, `index@host`, `control@host`; `ferry@host` when it serves several."""
    if len(queues) == 1:
        q = queues[0]
        role = q.removeprefix("backend.") if q.startswith("backend.") else \
            {"ferry.control": "control"}.get(q, q)
        return f"{role}@%h"
    return "ferry@%h"


def beat_command(settings: Settings, loglevel: str = "INFO") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "tasks.app", "beat", "--loglevel", loglevel,
            "--schedule", str(settings.data_path / "celerybeat-schedule")]


def all_queues(settings: Settings) -> list[str]:
    return ["ferry.control", "index"] + [f"backend.{name}" for name in settings.backends()]


class ProcessFailed(RuntimeError):
    """Raised when a child process exits early or never says it is ready."""


def _die_with_parent() -> None:
    # If the launcher itself is killed, its children go too instead of lingering.
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ProcessGroup:
    """Ferry's processes that live and die together (`ferry serve`, the e2e tests, the bench).

    Each child runs in its own session, so stopping it stops its whole tree (gunicorn's
    or celery's pool); on Linux it also dies with its launcher. With a `log_dir`, each
    child logs to `<log_dir>/<name>.log`; without, to the launcher's terminal.
    """

    def __init__(self, log_dir: Path | None = None, env: dict[str, str] | None = None):
        self.log_dir = log_dir
        self.env = env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps its copy)
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT if log else None,
                env={**(self.env if self.env is not None else os.environ), **(env or {})}, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        finally:
            if log is not None:
                log.close()
        self.procs[name] = proc
        return proc

    def logs(self, name: str, tail: int = 6000) -> str:
        path = self.log_dir / f"{name}.log" if self.log_dir else None
        return path.read_text(errors="replace")[-tail:] if path and path.exists() else "(no log)"

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        """Wait until a child's log says `text`; ProcessFailed if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.logs(name, tail=10**9):
                return
            if self.procs[name].poll() is not None:
                break
            time.sleep(0.2)
        raise ProcessFailed(f"{name} did not log {text!r} within {timeout:.0f}s:\n{self.logs(name)}")

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise ProcessFailed(f"{name} exited with code {p.returncode}:\n{self.logs(name)}")

    def kill(self, name: str) -> None:
        """SIGKILL a child and its whole tree, as a crash would."""
        proc = self.procs.pop(name)
        _signal_group(proc, signal.SIGKILL)
        proc.wait()

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
        self.stop(get_settings().shutdown_grace_seconds)
        return code

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to each child's leader (gunicorn's master drains its workers; a Celery
        worker's main process has its pool finish or requeue the batches under way), then
        after `grace` seconds SIGKILL to whatever of its tree is left."""
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()
            _signal_group(p, signal.SIGKILL)  # pool processes the leader left behind, if any
        self.procs.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


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
