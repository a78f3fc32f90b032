"""`ferry admin key create|list|revoke` and `ferry audit`: clients of /v1/keys and /v1/audit.

The first admin key of a cluster cannot come through the API (nothing may call it yet):
`ferry admin key create --bootstrap` writes it straight into the catalog, from a machine
that reaches the database. `ferry serve` does that by itself on first start.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click
from rich.table import Table

from ferry.cli.main import EXIT_REFUSED, cli, client, console, fail, json_opt, out


@cli.group()
def admin() -> None:
    """Administration: API keys."""


@admin.group()
def key() -> None:
    """API keys: shown once at creation, stored only as a hash."""


def _expiry(days: float | None) -> str | None:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat() if days is not None else None


def _grants(specs: tuple[str, ...]) -> list[dict[str, str]]:
    grants = []
    for spec in specs:
        access, sep, pattern = spec.partition(":")
        if not sep or access not in ("read", "write") or not pattern:
            raise click.BadParameter(f"{spec!r}: expected read:PATTERN or write:PATTERN, e.g. write:'ipfs-*'",
                                     param_hint="--grant")
        grants.append({"backends": pattern, "access": access})
    return grants


@key.command("create")
@click.option("--name", required=True, help="Who or what will use the key.")
@click.option("--role", type=click.Choice(["admin", "operator", "viewer"]), required=True)
@click.option("--grant", "grants", multiple=True, metavar="ACCESS:PATTERN",
              help="Backends an operator or viewer may touch, e.g. read:s3-archive, write:'ipfs-*'. Repeatable.")
@click.option("--expires-in-days", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--bootstrap", is_flag=True,
              help="Write the key straight into the catalog (the first admin key; needs the database).")
@json_opt
def key_create(name: str, role: str, grants: tuple[str, ...], expires_in_days: float | None, bootstrap: bool,
               as_json: bool) -> None:
    """Create a key; it is printed once and never again."""
    body = {"name": name, "role": role, "grants": _grants(grants), "expires_at": _expiry(expires_in_days)}
    if bootstrap:
        from ferry.catalog.db import transaction
        from ferry.catalog.migrate import upgrade
        from ferry.catalog.models import Role
        from ferry.security import create_key

        upgrade()
        expires = datetime.fromisoformat(body["expires_at"]) if body["expires_at"] else None
        with transaction() as session:
            row, secret = create_key(session, name=name, role=Role(role), grants=body["grants"],
                                     expires_at=expires, created_by="bootstrap")
            created = {"prefix": row.prefix, "name": name, "role": role, "grants": body["grants"],
                       "expires_at": body["expires_at"], "key": secret}
    else:
        created = client().request("POST", "/v1/keys", json=body)
    if as_json:
        out.print_json(data=created)
        return
    out.print(created["key"], highlight=False, soft_wrap=True)
    console.print(f"key {created['prefix']} ({created['role']}) created; it is shown only now: store it "
                  "(FERRY_API_KEY, or a 0600 file named by FERRY_API_KEY_FILE)", highlight=False)
    if role != "admin" and not grants:
        console.print("note: no --grant given: this key can touch no backend", highlight=False)


@key.command("list")
@json_opt
def key_list(as_json: bool) -> None:
    """Keys (never the keys themselves): prefix, role, grants, expiry, last use."""
    keys = client().request("GET", "/v1/keys")["keys"]
    if as_json:
        out.print_json(data=keys)
        return
    table = Table("prefix", "name", "role", "grants", "expires", "revoked", "last used")
    for k in keys:
        table.add_row(k["prefix"], k["name"], k["role"],
                      ", ".join(f"{g['access']}:{g['backends']}" for g in k["grants"]) or "-",
                      k["expires_at"] or "-", k["revoked_at"] or "-", k["last_used_at"] or "-")
    out.print(table)


@key.command("revoke")
@click.argument("prefix")
@json_opt
def key_revoke(prefix: str, as_json: bool) -> None:
    """Revoke a key at once (by its prefix)."""
    if prefix.startswith("fy_"):
        fail("give the key's prefix (ferry admin key list), not the key itself", EXIT_REFUSED)
    k = client().request("DELETE", f"/v1/keys/{prefix}")
    if as_json:
        out.print_json(data=k)
        return
    out.print(f"key {k['prefix']} revoked at {k['revoked_at']}")


@cli.command()
@click.option("--actor", help="A key prefix or OIDC subject.")
@click.option("--outcome", type=click.Choice(["ok", "failed", "denied", "unauthenticated"]))
@click.option("--action", help="An endpoint, e.g. jobs.create.")
@click.option("--job", "job_id")
@click.option("--policy")
@click.option("--backend")
@click.option("--cid")
@click.option("--since", help="ISO 8601 time.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@json_opt
def audit(actor, outcome, action, job_id, policy, backend, cid, since, limit, as_json: bool) -> None:
    """The audit log, newest first: every mutating call and every refused one."""
    params = {k: v for k, v in {"actor": actor, "outcome": outcome, "action": action, "job_id": job_id,
                                "policy": policy, "backend": backend, "cid": cid, "since": since,
                                "limit": limit}.items() if v is not None}
    entries = client().request("GET", "/v1/audit", params=params)["entries"]
    if as_json:
        out.print_json(data=entries)
        return
    table = Table("at", "who", "from", "call", "status", "outcome", "on")
    for e in entries:
        on = ", ".join(x for x in [e["job_id"] and f"job {e['job_id']}", e["policy"] and f"policy {e['policy']}",
                                   e["cid"], *e["backends"]] if x)
        table.add_row(e["at"], e["actor"] or "-", e["client"] or "-", f"{e['method']} {e['path']}",
                      str(e["status"]), e["outcome"], on or "-")
    out.print(table)
