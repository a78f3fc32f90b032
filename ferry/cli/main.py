"""`ferry`: submit and follow jobs through the API, and run Ferry's processes.

Exit codes: 0 success; 1 the job ended with failed items (or failed, or was cancelled);
2 the request was refused (bad input); 3 the API could not be reached or errored.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ferry.cli.client import ApiError, ApiUnreachable, Client
from ferry.errors import FerryError
from ferry.settings import get_settings

EXIT_OK, EXIT_ITEMS_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE = 0, 1, 2, 3
TERMINAL = {"succeeded", "failed", "partially_failed", "cancelled"}

console = Console(stderr=True)
out = Console()


def fail(message: str, code: int) -> None:
    # One line whatever the terminal's width, so logs and scripts can grep it.
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
    sys.exit(code)


class FerryGroup(click.Group):
    """Turns Ferry's errors into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            where = f" (field {exc.field})" if exc.field else ""
            fail(f"{exc.message}{where} [{exc.code}]", EXIT_REFUSED if exc.status < 500 else EXIT_UNREACHABLE)
        except ApiUnreachable as exc:
            fail(exc.message, EXIT_UNREACHABLE)
        except FerryError as exc:
            fail(exc.message, EXIT_REFUSED)


@click.group(cls=FerryGroup)
@click.version_option(package_name="ferry")
def cli() -> None:
    """Ferry keeps content-addressed objects where policy says they should be."""


def client() -> Client:
    from ferry.security import read_key_file

    settings = get_settings()
    return Client(settings.api_url, settings.api_key or read_key_file(settings.key_path))


# --- jobs -------------------------------------------------------------------------------

def parse_location(text: str, *, role: str) -> tuple[str, str]:
    """'backend:path' -> (backend, path)."""
    backend, sep, path = text.partition(":")
    if not sep or not backend:
        raise click.BadParameter(f"{text!r}: expected BACKEND:PATH, e.g. local:photos/", param_hint=role)
    return backend, path


def job_payload(kind: str, src: str, dsts: tuple[str, ...], keep_source: bool, keys_from,
                tags: tuple[str, ...] = ()) -> dict:
    backend, path = parse_location(src, role="SRC")
    source: dict = {"backend": backend}
    if keys_from is not None:
        if path:
            raise click.BadParameter("with --keys-from, give SRC as BACKEND: only", param_hint="SRC")
        source["keys"] = [line.strip() for line in keys_from if line.strip()]
    elif path == "" or path.endswith("/"):
        source["prefix"] = path
    else:
        source["keys"] = [path]
    targets = []
    for d in dsts:
        tb, tp = parse_location(d, role="DST")
        if tp and not tp.endswith("/"):
            tp += "/"
        targets.append({"backend": tb, "prefix": tp})
    payload = {"kind": kind, "source": source, "targets": targets}
    if kind == "migrate":
        payload["keep_source"] = keep_source
    if tags:
        payload["tags"] = list(tags)
    return payload


def _submit_and_follow(payload: dict, wait: bool, as_json: bool) -> None:
    c = client()
    _follow_accepted(c, c.submit(payload), wait, as_json)


def _follow_accepted(c: Client, accepted: dict, wait: bool, as_json: bool) -> None:
    job_id = accepted["id"]
    if not wait:
        out.print_json(data=accepted) if as_json else out.print(job_id)
        return
    try:
        job = follow(c, job_id, quiet=as_json)
    except KeyboardInterrupt:
        console.print(f"\nstopped following job {job_id}; it goes on. Follow it again with "
                      f"`ferry job watch {job_id}`, or stop it with `ferry job cancel {job_id}`.")
        sys.exit(130)
    if as_json:
        out.print_json(data=job)
    else:
        summary(c, job)
    sys.exit(exit_code(job))


wait_opt = click.option("--wait/--no-wait", default=True, show_default=True,
                        help="Follow the job with a progress bar until it ends.")
tag_opt = click.option("--tag", "tags", multiple=True, help="Tag every object copied (repeatable); "
                       "policies select by tags.")
json_opt = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
keys_opt = click.option("--keys-from", type=click.File("r"), default=None,
                        help="Read the source keys from a file, one per line ('-' for stdin).")


@cli.command()
@click.argument("src")
@click.argument("dst")
@click.option("--keep-source", is_flag=True, help="Keep the source once the copy is verified.")
@keys_opt
@tag_opt
@wait_opt
@json_opt
def migrate(src: str, dst: str, keep_source: bool, keys_from, tags: tuple[str, ...], wait: bool,
            as_json: bool) -> None:
    """Move objects: copy SRC to DST, verify the copy, then delete the source.

    SRC and DST are BACKEND:PATH; a PATH ending in '/' (or empty) is a prefix.
    Example: ferry migrate local:photos/ s3:archive/
    """
    _submit_and_follow(job_payload("migrate", src, (dst,), keep_source, keys_from, tags), wait, as_json)


@cli.command()
@click.argument("src")
@click.argument("dsts", nargs=-1, required=True, metavar="DST...")
@keys_opt
@tag_opt
@wait_opt
@json_opt
def replicate(src: str, dsts: tuple[str, ...], keys_from, tags: tuple[str, ...], wait: bool, as_json: bool) -> None:
    """Copy objects from SRC to one or more DSTs, verifying every copy."""
    _submit_and_follow(job_payload("replicate", src, dsts, False, keys_from, tags), wait, as_json)


@cli.command("delete")
@click.argument("cid")
@wait_opt
@json_opt
def delete_cmd(cid: str, wait: bool, as_json: bool) -> None:
    """Delete an object from every backend that holds it, and from search at once.

    Refused under legal hold, or while a replica lies on a read-only backend.
    """
    c = client()
    accepted = c.request("DELETE", f"/v1/objects/{cid}")
    _follow_accepted(c, accepted, wait, as_json)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def follow(c: Client, job_id: str, *, quiet: bool = False, interval: float = 0.5) -> dict:
    """Follow a job until it ends, showing objects, bytes, rate and ETA."""
    started = time.monotonic()
    progress = Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("objects"), TextColumn("{task.fields[bytes]}"), TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(), console=console, disable=quiet, transient=False,
    )
    with progress:
        task = progress.add_task(f"job {job_id[:8]}", total=None, bytes="", rate="")
        for job in job_states(c, job_id, interval=interval):
            counts, nbytes = job["items"], dict(job["bytes"])
            nbytes["done"] += nbytes.get("in_flight", 0)
            finished = counts["done"] + counts["skipped"] + counts["failed"] + counts["cancelled"]
            elapsed = max(time.monotonic() - started, 1e-6)
            progress.update(
                task, total=job["total"], completed=finished, description=f"job {job_id[:8]} {job['state']}",
                bytes=(f"{_human(nbytes['done'])}/{_human(nbytes['known'])}" if nbytes["known"]
                       else _human(nbytes["done"])),
                rate=f"{_human(nbytes['done'] / elapsed)}/s",
            )
            if job["state"] in TERMINAL:
                return job
    raise AssertionError("job_states ended before the job did")


def job_states(c: Client, job_id: str, *, interval: float = 0.5) -> Iterator[dict]:
    """A job as GET /v1/jobs/{id} shows it, each time it changes: from the live event
    stream (reconnecting with the last event id if the connection drops), or by polling
    every `interval` seconds, with a warning, from an API that has no event stream."""
    events = c.live_events(lambda: {"job": job_id, "types": "job", "until": "job_done"})
    try:
        for event in events:
            if event.event == "job":
                yield event.json()
            elif event.event == "busy":  # no room for another stream yet: look meanwhile
                yield c.job(job_id)
            elif event.event == "end" and event.json().get("reason") == "unauthenticated":
                raise ApiError(401, {"error": {"code": "unauthenticated", "message":
                                               "the API key was revoked or expired while following the job"}})
    except ApiError as exc:
        if exc.status != 404 or exc.code == "job_not_found":
            raise
        console.print("[yellow]warning:[/] this API has no live events (GET /v1/events/stream answers 404); "
                      "polling the job instead", highlight=False)
        while True:
            yield c.job(job_id)
            time.sleep(interval)


def follow_events(c: Client, *, jobs: tuple[str, ...] = (), policies: tuple[str, ...] = (),
                  backends: tuple[str, ...] = (), types: str | None = None, as_json: bool = False,
                  max_seconds: float | None = None) -> None:
    """Print live events as they come, a line each (or NDJSON: id, event, data), until
    `max_seconds` have passed, or for ever (Ctrl-C)."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    last_ask = {"final": False}

    def params() -> dict:
        query: dict = {"job": list(jobs), "policy": list(policies), "backend": list(backends), "types": types}
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            query["max_seconds"] = round(min(left, MAX_STREAM_SECONDS), 3)
            last_ask["final"] = left <= MAX_STREAM_SECONDS  # this connection may run to the end
        return {k: v for k, v in query.items() if v not in ([], None)}

    try:
        for event in c.live_events(params):
            if event.event == "busy":
                console.print(f"the API serves as many event streams as it may; retrying in "
                              f"{event.json()['retry_after']:.0f} s", highlight=False)
                continue
            if event.event == "end":
                reason = event.json().get("reason")
                if reason == "unauthenticated":
                    fail("the API key was revoked or expired", EXIT_REFUSED)
                if reason == "max_seconds" and last_ask["final"]:
                    return
                continue
            if as_json:
                sys.stdout.write(json.dumps({"id": event.id, "event": event.event, "data": event.json()}) + "\n")
                sys.stdout.flush()
            else:
                out.print(describe_event(event.event, event.json()), highlight=False, markup=False, soft_wrap=True)
    except KeyboardInterrupt:
        sys.exit(130)


MAX_STREAM_SECONDS = 3600  # what the API lets one stream last (`max_seconds`)


def describe_event(kind: str, data: dict) -> str:
    """One readable line of a live event."""
    now = time.strftime("%H:%M:%S")
    if kind == "job":
        counts, nbytes = data["items"], data["bytes"]
        ended = counts["done"] + counts["skipped"] + counts["failed"] + counts["cancelled"] + counts["stuck"]
        failed = f", {counts['failed'] + counts['stuck']} failed" if counts["failed"] + counts["stuck"] else ""
        return (f"{now} job      {data['id']} {data['kind']} {data['state']}: {ended}/{data['total'] or '?'} "
                f"objects{failed}, {_human(nbytes['done'] + nbytes['in_flight'])}")
    if kind == "replica":
        error = f" ({data['last_error']})" if data.get("last_error") else ""
        return f"{now} replica  {data['backend']}:{data['key']} {data['state']} {data['cid']}{error}"
    if kind == "alert":
        return f"{now} alert    {data['severity']} {data['kind']}: {data['message']}"
    return f"{now} {kind} {json.dumps(data)}"


def exit_code(job: dict) -> int:
    return EXIT_OK if job["state"] == "succeeded" else EXIT_ITEMS_FAILED


def summary(c: Client, job: dict) -> None:
    counts = job["items"]
    colour = "green" if job["state"] == "succeeded" else "red"
    out.print(f"{job['kind']} job {job['id']}: [bold {colour}]{job['state']}[/]", highlight=False)
    table = Table(show_header=False)
    for key in ("total", "done", "skipped", "failed", "stuck", "cancelled"):
        table.add_row(key, str(counts[key]))
    table.add_row("bytes", _human(job["bytes"]["done"]))
    if job.get("started_at") and job.get("finished_at"):
        from datetime import datetime
        secs = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()
        table.add_row("time", f"{secs:.1f} s")
        if secs > 0:
            table.add_row("rate", f"{counts['done'] / secs:.0f} objects/s, {_human(job['bytes']['done'] / secs)}/s")
    out.print(table)
    if job.get("error"):
        console.print(f"[red]{job['error']}[/]")
    if counts["failed"]:
        failed = c.items(job["id"], state="failed", limit=10)["items"]
        for item in failed:
            console.print(f"[red]failed[/] {item['source_key']}: {item['error']}", highlight=False)
        if counts["failed"] > len(failed):
            console.print(f"... see all with: ferry job items {job['id']} --state failed")


# --- job ----------------------------------------------------------------------------------

@cli.group()
def job() -> None:
    """Follow, list and cancel jobs."""


@job.command("status")
@click.argument("job_id")
@json_opt
def job_status(job_id: str, as_json: bool) -> None:
    """A job's state and counts."""
    c = client()
    data = c.job(job_id)
    if as_json:
        out.print_json(data=data)
    else:
        summary(c, data)
    sys.exit(exit_code(data) if data["state"] in TERMINAL else EXIT_OK)


@job.command("watch")
@click.argument("job_id")
@json_opt
def job_watch(job_id: str, as_json: bool) -> None:
    """Follow a job with a progress bar until it ends."""
    c = client()
    data = follow(c, job_id, quiet=as_json)
    out.print_json(data=data) if as_json else summary(c, data)
    sys.exit(exit_code(data))


@job.command("items")
@click.argument("job_id")
@click.option("--state", type=click.Choice(["queued", "running", "done", "failed", "skipped", "cancelled", "stuck"]))
@click.option("--limit", type=click.IntRange(1, 1_000_000), default=100, show_default=True)
@json_opt
def job_items(job_id: str, state: str | None, limit: int, as_json: bool) -> None:
    """A job's items, optionally only those in one state."""
    c = client()
    items: list[dict] = []
    after = -1
    while len(items) < limit:
        page = c.items(job_id, state=state, after=after, limit=min(1000, limit - len(items)))
        items += page["items"]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    if as_json:
        out.print_json(data={"items": items})
        return
    table = Table("seq", "state", "source", "destination", "size", "error")
    for it in items:
        table.add_row(str(it["seq"]), it["state"], it["source_key"], f"{it['dest_backend']}:{it['dest_key']}",
                      "" if it["size"] is None else _human(it["size"]), it["error"] or "")
    out.print(table)


@job.command("cancel")
@click.argument("job_id")
@json_opt
def job_cancel(job_id: str, as_json: bool) -> None:
    """Cancel a job: queued items are dropped, running ones finish."""
    data = client().cancel(job_id)
    out.print_json(data=data) if as_json else out.print(f"job {job_id} {data['state']}")


@cli.command()
@json_opt
def backends(as_json: bool) -> None:
    """The backends the API knows."""
    data = client().request("GET", "/v1/backends")
    if as_json:
        out.print_json(data=data)
        return
    table = Table("name", "driver", "labels", "queue")
    for b in data["backends"]:
        table.add_row(b["name"], b["driver"], ", ".join(f"{k}={v}" for k, v in b["labels"].items()), b["queue"])
    out.print(table)


# --- processes --------------------------------------------------------------------------

@cli.group()
def db() -> None:
    """The catalog database."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Apply the catalog's migrations."""
    from ferry.catalog.migrate import upgrade

    upgrade()
    console.print(f"catalog at {_redact_url(get_settings().database)} is up to date")


def _redact_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


def refuse_open_bind(host: str) -> None:
    """A server others can reach must not start without credentials to check."""
    from ferry.catalog.db import transaction
    from ferry.security import keys_exist

    settings = get_settings()
    with transaction() as session:
        credentials = keys_exist(session) or settings.oidc_issuer is not None
    if not credentials:
        fail(f"refusing to listen on {host}, reachable from other machines, with no credentials configured: "
             "create an admin key first (ferry admin key create --bootstrap --role admin --name NAME) or set "
             "FERRY_OIDC_ISSUER; or listen on 127.0.0.1", EXIT_REFUSED)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the API listens on.")
@click.option("--port", default=8470, show_default=True)
@click.option("--concurrency", default=2, show_default=True, help="Worker processes.")
@click.option("--log-dir", type=click.Path(path_type=Path), default=None,
              help="Write each process's log to a file here instead of the terminal.")
def serve(host: str, port: int, concurrency: int, log_dir: Path | None) -> None:
    """Run everything in one go: API, a worker on every queue, and beat.

    With no configuration this is the embedded mode: SQLite, a filesystem broker and
    two local disks under FERRY_DATA_DIR (default ~/.ferry).
    """
    from ferry.catalog.db import transaction
    from ferry.catalog.migrate import upgrade
    from ferry.cli import launch
    from ferry.security import bootstrap_admin_key, is_loopback

    settings = get_settings()
    settings.data_path.mkdir(parents=True, exist_ok=True)
    upgrade()
    if is_loopback(host):
        with transaction() as session:
            prefix = bootstrap_admin_key(session, settings.key_path)
        if prefix:
            console.print(f"ferry: created admin key {prefix} in {settings.key_path} (0600); "
                          "the CLI on this machine uses it", highlight=False)
    else:
        refuse_open_bind(host)
    group = launch.ProcessGroup(log_dir)
    group.start("api", launch.api_command(f"{host}:{port}"))
    group.start("worker", launch.worker_command(launch.all_queues(settings), concurrency, "ferry@%h"))
    group.start("beat", launch.beat_command(settings))
    url = f"http://{host}:{port}"
    try:
        launch.wait_ready(url)
    except TimeoutError as exc:
        group.stop()
        fail(str(exc), EXIT_UNREACHABLE)
    console.print(f"ferry: API on {url}, data in {settings.data_path}, backends: "
                  f"{', '.join(settings.backends())}. Ctrl-C stops.", highlight=False)
    sys.exit(group.wait())


@cli.command()
@click.option("--bind", default="127.0.0.1:8470", show_default=True)
@click.option("--workers", default=2, show_default=True)
def api(bind: str, workers: int) -> None:
    """Run the API server alone (gunicorn)."""
    from ferry.cli import launch
    from ferry.security import is_loopback

    host = bind.rpartition(":")[0] if ":" in bind else bind
    if not is_loopback(host):
        refuse_open_bind(host)
    group = launch.ProcessGroup()
    group.start("api", launch.api_command(bind, workers))
    sys.exit(group.wait())


@cli.command()
@click.option("--queues", "-Q", default=None, help="Comma-separated queues (default: all).")
@click.option("--concurrency", "-c", default=2, show_default=True)
@click.option("--name", "-n", default=None,
              help="Worker name (default: its queue's backend, e.g. s3-archive@HOST; ferry@HOST for several).")
def worker(queues: str | None, concurrency: int, name: str | None) -> None:
    """Run a Celery worker, e.g. one per backend queue: -Q backend.s3-archive.

    SIGTERM: the items under way are finished, the rest of the batch goes back to the
    queue, and the worker exits (within FERRY_SHUTDOWN_GRACE_SECONDS, then it is killed)."""
    from ferry.cli import launch

    group = launch.ProcessGroup()
    qs = queues.split(",") if queues else launch.all_queues(get_settings())
    group.start("worker", launch.worker_command(qs, concurrency, name or launch.worker_name(qs)))
    sys.exit(group.wait())


@cli.command()
@click.option("--address", default="127.0.0.1", show_default=True, help="Address Flower listens on.")
@click.option("--port", default=5555, show_default=True)
def flower(address: str, port: int) -> None:
    """Run Flower (workers, queues and tasks, live) on Ferry's broker, behind basic auth.

    Credentials come from FERRY_FLOWER_BASIC_AUTH ("user:password", several comma-separated);
    without them Flower does not start. /healthcheck answers without them (for probes).
    """
    import os

    from ferry.cli import launch

    secret = get_settings().flower_basic_auth
    pairs = [p for p in (secret.get_secret_value() if secret else "").split(",") if p]
    if not pairs or any(not user or not password for user, _, password in (p.partition(":") for p in pairs)):
        fail("Flower needs credentials: set FERRY_FLOWER_BASIC_AUTH=user:password (its /api answers "
             "anyone otherwise)", EXIT_REFUSED)
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_UNAUTHENTICATED_API"}
    env["FLOWER_BASIC_AUTH"] = ",".join(pairs)
    group = launch.ProcessGroup(env=env)
    group.start("flower", launch.flower_command(address, port))
    sys.exit(group.wait())


@cli.command()
def beat() -> None:
    """Run Celery beat (exactly one per cluster): it drives the reconcile sweep."""
    from ferry.cli import launch

    group = launch.ProcessGroup()
    group.start("beat", launch.beat_command(get_settings()))
    sys.exit(group.wait())


# Policy, verify, object and events commands live beside this module; importing it
# registers them on `cli`.
from ferry.cli import admin as _admin_commands  # noqa: E402, F401
from ferry.cli import policy as _policy_commands  # noqa: E402, F401
from ferry.cli import deal as _deal_commands  # noqa: E402, F401
from ferry.cli import search as _search_commands  # noqa: E402, F401
