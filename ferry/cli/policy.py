"""`ferry policy ...`, `ferry verify`, `ferry object ...` and `ferry events`: clients of
/v1/policies, verify jobs, /v1/objects and /v1/events."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml
from rich.table import Table

from ferry.cli.main import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    EXIT_REFUSED,
    _human,
    cli,
    client,
    console,
    exit_code,
    fail,
    follow,
    follow_events,
    json_opt,
    out,
    parse_location,
    wait_opt,
)


@cli.group()
def policy() -> None:
    """Declarative policies: placement, transitions, retention, verification, schedule."""


@policy.command("apply")
@click.option("-f", "--file", "path", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="The policy document (YAML); - reads stdin.")
@json_opt
def policy_apply(path: str, as_json: bool) -> None:
    """Create a policy, or update it (a new version when its document changed)."""
    if path == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read {path}: {exc}", EXIT_REFUSED)
    p = client().request("POST", "/v1/policies", json={"yaml": text})
    if as_json:
        out.print_json(data=p)
        return
    what = "stored as version" if p["changed"] else "unchanged, still version"
    out.print(f"policy {p['name']}: {what} {p['version']}")


def _schedule(doc: dict) -> str:
    s = doc.get("schedule", "continuous")
    if isinstance(s, str):
        return s
    text = f"cron {s['cron']}" if s.get("cron") else f"every {s.get('every')}"
    return text + (f" (window {s['window']})" if s.get("window") else "")


def _when(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "-"


@policy.command("list")
@json_opt
def policy_list(as_json: bool) -> None:
    """Every policy in force."""
    body = client().request("GET", "/v1/policies")
    if as_json:
        out.print_json(data=body)
        return
    table = Table("name", "version", "schedule", "run open since", "next run", "last pass", "converged")
    for p in body["policies"]:
        table.add_row(p["name"], str(p["version"]), _schedule(p["document"]), _when(p.get("run_started_at")),
                      _when(p.get("next_run_at")), _when(p.get("last_pass_at")), _when(p.get("converged_at")))
    out.print(table)


@policy.command("show")
@click.argument("name")
@json_opt
def policy_show(name: str, as_json: bool) -> None:
    """A policy's current document (YAML) and its versions."""
    p = client().request("GET", f"/v1/policies/{name}")
    if as_json:
        out.print_json(data=p)
        return
    out.print(f"# {p['name']}, version {p['version']} of {len(p.get('versions', []))}", highlight=False)
    out.print(yaml.safe_dump(p["document"], sort_keys=False).rstrip(), highlight=False)


@policy.command("delete")
@click.argument("name")
def policy_delete(name: str) -> None:
    """Stop enforcing a policy; stored objects are not touched, its versions are kept."""
    client().request("DELETE", f"/v1/policies/{name}")
    out.print(f"policy {name} deleted")


@policy.command("run")
@click.argument("name")
def policy_run(name: str) -> None:
    """Start the policy's work now, whatever its schedule."""
    client().request("POST", f"/v1/policies/{name}/run")
    out.print(f"policy {name}: run started; follow it with `ferry policy status {name}`")


@policy.command("plan")
@click.argument("name")
@json_opt
def policy_plan(name: str, as_json: bool) -> None:
    """Dry run: what the policy's next run would copy, move, delete and verify."""
    p = client().request("GET", f"/v1/policies/{name}/plan")
    if as_json:
        out.print_json(data=p)
        return
    table = Table("", "objects", "bytes", "backends", title=f"plan of {name}"
                  + ("" if p["active"] else " (outside its schedule: runs at its next window)"))
    for verb in ("copy", "move", "delete", "verify"):
        v = p[verb]
        where = ", ".join(f"{b} {x['objects']}" for b, x in sorted(v["backends"].items())) or "-"
        table.add_row(verb, str(v["objects"]), _human(v["bytes"]), where)
    out.print(table)


@policy.command("status")
@click.argument("name")
@json_opt
def policy_status(name: str, as_json: bool) -> None:
    """Objects matched, converged, replicating, stuck, bad and lost."""
    s = client().request("GET", f"/v1/policies/{name}/status")
    if as_json:
        out.print_json(data=s)
        return
    table = Table("matched", "converged", "replicating", "stuck", "bad", "lost", title=f"policy {name}")
    table.add_row(*(str(s[k]) for k in ("matched", "converged", "replicating", "stuck", "bad", "lost")))
    out.print(table)
    if s["stuck"]:
        console.print(f"{s['stuck']} objects are stuck: see `ferry job items JOB --state stuck`, "
                      f"then `ferry policy retry {name}`")
    if s["lost"]:
        console.print(f"[bold red]{s['lost']} objects are lost[/]: see `ferry events --kind object.lost`")


@policy.command("retry")
@click.argument("name")
def policy_retry(name: str) -> None:
    """Queue the policy's stuck work again, with fresh attempts."""
    r = client().request("POST", f"/v1/policies/{name}/retry")
    out.print(f"policy {name}: {r['requeued']} stuck items queued again")


@cli.command()
@click.argument("location", metavar="BACKEND:PREFIX")
@click.option("--sample", type=click.FloatRange(0, 100, min_open=True), default=None,
              help="Check only this percentage of the keys (the same keys each time).")
@wait_opt
@json_opt
def verify(location: str, sample: float | None, wait: bool, as_json: bool) -> None:
    """Re-read and re-hash replicas under a prefix; report what is bad or missing and the
    healing scheduled for it. Exit code 1 when anything bad or missing was found."""
    backend, prefix = parse_location(location, role="BACKEND:PREFIX")
    payload: dict = {"kind": "verify", "source": {"backend": backend, "prefix": prefix}}
    if sample is not None:
        payload["sample"] = sample
    c = client()
    job_id = c.submit(payload)["id"]
    if not wait:
        out.print(job_id)
        return
    job = follow(c, job_id, quiet=as_json)
    report = c.request("GET", f"/v1/jobs/{job_id}/report")
    if as_json:
        out.print_json(data={"job": job, "report": report})
    else:
        out.print(f"verified {report['checked']} replicas ({_human(report['bytes_read'])} read): "
                  f"{report['ok']} ok, {report['bad']} bad, {report['missing']} missing; "
                  f"healing scheduled for {report['healing_scheduled']}, {report['lost']} lost", highlight=False)
        if report["findings"]:
            table = Table("backend", "key", "result", "healing", "cid")
            for f in report["findings"]:
                table.add_row(f["backend"], f["key"], f["result"], f["healing"], f["cid"])
            out.print(table)
        failed = job["items"]["failed"]
        if failed:
            console.print(f"{failed} keys could not be checked: `ferry job items {job_id} --state failed`")
    code = exit_code(job)
    sys.exit(EXIT_ITEMS_FAILED if report["bad"] or report["missing"] else code if code else EXIT_OK)


@cli.group()
def object() -> None:  # noqa: A001 - the command is `ferry object`
    """Objects in the catalog, by CID."""


@object.command("show")
@click.argument("cid")
@json_opt
def object_show(cid: str, as_json: bool) -> None:
    o = client().request("GET", f"/v1/objects/{cid}")
    if as_json:
        out.print_json(data=o)
        return
    flags = (" [bold red]LOST[/]" if o.get("lost_at") else "") + (" (legal hold)" if o["legal_hold"] else "")
    out.print(f"{o['cid']}  {_human(o['size'])}  sha256 {o['sha256']}{flags}")
    table = Table("backend", "key", "state", "verified", "error")
    for r in o["replicas"]:
        table.add_row(r["backend"], r["key"], r["state"], _when(r.get("verified_at")), r.get("last_error") or "")
    out.print(table)


@object.command("tag")
@click.argument("cid")
@click.argument("tags", nargs=-1)
@click.option("--remove", multiple=True, help="A tag to remove (repeatable).")
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Set a metadata key (KEY= removes it).")
@click.option("--media-type", default=None)
def object_tag(cid: str, tags: tuple[str, ...], remove: tuple[str, ...], meta: tuple[str, ...],
               media_type: str | None) -> None:
    """Add tags to an object (remove some, set metadata): what policy selectors match on."""
    metadata: dict = {}
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--meta {item!r}: expected KEY=VALUE", EXIT_REFUSED)
        metadata[key] = value or None
    body: dict = {"add_tags": list(tags), "remove_tags": list(remove), "metadata": metadata}
    if media_type:
        body["media_type"] = media_type
    o = client().request("PATCH", f"/v1/objects/{cid}", json=body)
    out.print(f"{cid}: tags {', '.join(o['tags']) or '-'}", highlight=False)


@object.command("hold")
@click.argument("cid")
@click.option("--release", is_flag=True, help="Release the hold instead.")
def object_hold(cid: str, release: bool) -> None:
    """Put an object under legal hold (retention may not delete it), or release it."""
    client().request("PUT", f"/v1/objects/{cid}/hold", json={"hold": not release})
    out.print(f"{cid}: legal hold {'released' if release else 'set'}")


@object.command("get")
@click.argument("cid")
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="Write here (default stdout).")
def object_get(cid: str, output: str) -> None:
    """Stream an object's bytes from its best verified replica (checked as they stream)."""
    c = client()
    with c.http.stream("GET", f"/v1/objects/{cid}/content") as resp:
        if resp.status_code >= 400:
            resp.read()
            c.request("GET", f"/v1/objects/{cid}/content")  # raises the API's error
        expected = int(resp.headers.get("Content-Length", -1))
        sink = sys.stdout.buffer if output == "-" else open(output, "wb")  # noqa: SIM115
        n = 0
        try:
            for chunk in resp.iter_bytes():
                sink.write(chunk)
                n += len(chunk)
        finally:
            if sink is not sys.stdout.buffer:
                sink.close()
    if expected >= 0 and n != expected:
        fail(f"the stream stopped after {n} of {expected} bytes: the replica read failed its check "
             "(it is marked bad; try again to read another replica)", EXIT_ITEMS_FAILED)


@cli.command()
@click.option("--kind", default=None, help="Only events of this kind, e.g. object.lost.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("-f", "--follow", "live", is_flag=True, help="Print live events as they come: job progress, replica "
              "state changes and alerts (implied by the options below).")
@click.option("--job", "jobs", multiple=True, help="Live: only events about this job (repeatable).")
@click.option("--policy", "policies", multiple=True, help="Live: only events about this policy (repeatable).")
@click.option("--backend", "backend_names", multiple=True, help="Live: only events about this backend (repeatable).")
@click.option("--types", default=None, help="Live: which events, a comma list of job, replica, alert (default all).")
@click.option("--max-seconds", type=click.FloatRange(min=0), default=None, help="Live: stop after this long.")
@json_opt
def events(kind: str | None, limit: int, live: bool, jobs: tuple[str, ...], policies: tuple[str, ...],
           backend_names: tuple[str, ...], types: str | None, max_seconds: float | None, as_json: bool) -> None:
    """Events the reconcile loop raised: objects lost, ... With --follow, live events as
    they come (NDJSON with --json), until Ctrl-C."""
    if live or jobs or policies or backend_names or types or max_seconds is not None:
        if kind:
            raise click.UsageError("--kind filters the list of stored events; live, use --types alert")
        follow_events(client(), jobs=jobs, policies=policies, backends=backend_names, types=types, as_json=as_json,
                      max_seconds=max_seconds)
        return
    body = client().request("GET", "/v1/events", params={k: v for k, v in {"kind": kind, "limit": limit}.items() if v})
    if as_json:
        out.print_json(data=body)
        return
    table = Table("when", "severity", "kind", "message")
    for e in body["events"]:
        table.add_row(_when(e["created_at"]), e["severity"], e["kind"], e["message"])
    out.print(table)
