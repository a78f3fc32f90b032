"""`ferry deal ...` and `ferry provider ...`: clients of deal jobs, /v1/deals and
/v1/providers."""

from __future__ import annotations

import sys

import click
from rich.table import Table

from ferry.cli.main import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    _submit_and_follow,
    cli,
    client,
    json_opt,
    out,
    parse_location,
    wait_opt,
)

ATTO = 10**18


def _fil(atto: int | None) -> str:
    if atto is None:
        return "-"
    return f"{atto / ATTO:.9f}".rstrip("0").rstrip(".") + " FIL"


def _source(selection: str, keys_from) -> dict:
    backend, path = parse_location(selection, role="SELECTION")
    if keys_from is not None:
        return {"backend": backend, "keys": [line.strip() for line in keys_from if line.strip()]}
    if path == "" or path.endswith("/"):
        return {"backend": backend, "prefix": path}
    return {"backend": backend, "keys": [path]}


def _terms(copies, verified, regions, spread_regions, max_price) -> dict:
    terms: dict = {}
    if copies is not None:
        terms["copies"] = copies
    if verified is not None:
        terms["verified"] = verified
    if regions:
        terms["regions"] = list(regions)
    if spread_regions:
        terms["spread_regions"] = True
    if max_price is not None:
        terms["max_price"] = max_price
    return terms


def terms_options(fn):
    for option in reversed([
        click.option("--to", "backend", default="filecoin", show_default=True, help="The filecoin backend."),
        click.option("--copies", type=click.IntRange(1, 16), default=None,
                     help="Deals per piece, with distinct providers (default: the backend's)."),
        click.option("--verified/--unverified", default=None, help="Verified (datacap) deals or not."),
        click.option("--region", "regions", multiple=True, help="Only providers in this region (repeatable)."),
        click.option("--spread-regions", is_flag=True, help="Every copy of a piece in another region."),
        click.option("--max-price", type=click.IntRange(0), default=None,
                     help="attoFIL per GiB per epoch, at most."),
        click.option("--keys-from", type=click.File("r"), default=None,
                     help="Read the keys from a file, one per line ('-' for stdin)."),
    ]):
        fn = option(fn)
    return fn


@cli.group()
def deal() -> None:
    """Filecoin storage deals: quote, make, list, show, retry."""


@deal.command("quote")
@click.argument("selection", metavar="BACKEND:PREFIX")
@terms_options
@click.option("--duration", type=click.IntRange(2880), default=None, help="Epochs (default: the backend's).")
@json_opt
def deal_quote(selection, backend, copies, verified, regions, spread_regions, max_price, keys_from, duration,
               as_json):
    """Estimate the cost of deals of SELECTION before anything is proposed."""
    body = {"source": _source(selection, keys_from), "backend": backend,
            "deal": _terms(copies, verified, regions, spread_regions, max_price)}
    if duration:
        body["duration"] = duration
    q = client().request("POST", "/v1/deals/quote", json=body)
    if as_json:
        out.print_json(data=q)
        return
    out.print(f"{q['objects']} objects, {q['bytes']} bytes -> {q['pieces']} pieces ({q['padded_bytes']} padded "
              f"bytes), {q['copies']} copies, {'verified' if q['verified'] else 'unverified'}, "
              f"{q['duration']} epochs")
    table = Table("provider", "region", "attoFIL/GiB/epoch", "cost", "reputation")
    for p in q["providers"]:
        table.add_row(p["provider"], p["region"] or "-", str(p["price"]), _fil(p["cost"]), f"{p['reputation']:.3f}")
    out.print(table)
    out.print(f"storage {_fil(q['storage_cost'])} + gas {_fil(q['gas_cost'])} = [bold]{_fil(q['total_cost'])}[/]")
    for provider, why in sorted(q["excluded"].items()):
        out.print(f"  not {provider}: {why}")
    if q["too_big"]:
        out.print(f"[yellow]{q['too_big']} objects are larger than a piece and would fail[/]")


@deal.command("make")
@click.argument("selection", metavar="BACKEND:PREFIX")
@terms_options
@wait_opt
@json_opt
def deal_make(selection, backend, copies, verified, regions, spread_regions, max_price, keys_from, wait, as_json):
    """Pack SELECTION into pieces and propose deals of them (a `deal` job)."""
    payload = {"kind": "deal", "source": _source(selection, keys_from), "targets": [{"backend": backend}],
               "deal": _terms(copies, verified, regions, spread_regions, max_price)}
    _submit_and_follow(payload, wait, as_json)


def _deals_table(deals: list[dict]) -> Table:
    table = Table("id", "state", "provider", "piece", "size", "price/epoch", "chain id", "error")
    for d in deals:
        table.add_row(d["id"][:8], d["state"], d["provider"], d["piece_cid"][:20] + "…", str(d["padded_size"]),
                      _fil(d["price_per_epoch"]), str(d["chain_deal_id"] or "-"), (d["error"] or "")[:60])
    return table


@deal.command("list")
@click.option("--state", type=click.Choice(["planned", "proposed", "published", "active", "expiring", "expired",
                                            "rejected", "failed", "slashed"]))
@click.option("--provider")
@click.option("--piece", help="A piece CID.")
@click.option("--cid", help="An object's CID: the deals holding it.")
@click.option("--job", "job_id", help="The deal job that planned them.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@json_opt
def deal_list(state, provider, piece, cid, job_id, limit, as_json):
    """Deals, newest first."""
    params = {"state": state, "provider": provider, "piece": piece, "cid": cid, "job_id": job_id, "limit": limit}
    page = client().request("GET", "/v1/deals", params={k: v for k, v in params.items() if v is not None})
    if as_json:
        out.print_json(data=page)
    else:
        out.print(_deals_table(page["deals"]))


@deal.command("show")
@click.argument("deal_id")
@json_opt
def deal_show(deal_id, as_json):
    """One deal, its chain facts and the objects of its piece."""
    d = client().request("GET", f"/v1/deals/{deal_id}")
    if as_json:
        out.print_json(data=d)
        return
    for k in ("id", "state", "provider", "client", "piece_cid", "padded_size", "car_size", "verified",
              "price_per_epoch", "duration", "start_epoch", "end_epoch", "sector_start_epoch", "chain_deal_id",
              "proposal_id", "attempt", "retry_of", "renewal_of", "job_id", "error", "created_at", "proposed_at",
              "published_at", "activated_at", "ended_at"):
        out.print(f"{k:>18}: {d[k] if d[k] is not None else '-'}", highlight=False)
    out.print(f"{'objects':>18}: {len(d['objects'])}")
    for cid in d["objects"][:20]:
        out.print(f"{'':>20}{cid}")
    sys.exit(EXIT_ITEMS_FAILED if d["state"] in ("rejected", "failed", "slashed") else EXIT_OK)


@deal.command("retry")
@click.argument("deal_id")
@json_opt
def deal_retry(deal_id, as_json):
    """Make an ended deal's copy again, with a provider its piece has not had."""
    r = client().request("POST", f"/v1/deals/{deal_id}/retry")
    if as_json:
        out.print_json(data=r)
    else:
        out.print("planned " + ", ".join(r["planned"]))


@cli.group()
def provider() -> None:
    """Storage providers Ferry may make deals with."""


@provider.command("set")
@click.argument("provider_id")
@click.option("--region")
@click.option("--price", type=click.IntRange(0), default=0, show_default=True, help="attoFIL/GiB/epoch, unverified.")
@click.option("--verified-price", type=click.IntRange(0), default=0, show_default=True,
              help="attoFIL/GiB/epoch, verified.")
@click.option("--min-piece-size", type=click.IntRange(128), default=256, show_default=True)
@click.option("--max-piece-size", type=click.IntRange(128), default=2**36, show_default=True)
@click.option("--no-verified", is_flag=True, help="It takes no verified deals.")
@click.option("--retrieval-url", help="Its trustless HTTP retrieval base URL.")
@click.option("--access", type=click.Choice(["auto", "allow", "deny"]), default="auto", show_default=True)
@click.option("--notes")
@json_opt
def provider_set(provider_id, region, price, verified_price, min_piece_size, max_piece_size, no_verified,
                 retrieval_url, access, notes, as_json):
    """Add a provider or replace its terms (admin)."""
    body = {"id": provider_id, "region": region, "price": price, "verified_price": verified_price,
            "min_piece_size": min_piece_size, "max_piece_size": max_piece_size, "verified": not no_verified,
            "retrieval_url": retrieval_url, "access": access, "notes": notes}
    p = client().request("PUT", "/v1/providers", json=body)
    out.print_json(data=p) if as_json else out.print(f"provider {p['id']}: {p['access']}")


@provider.command("list")
@json_opt
def provider_list(as_json):
    """Providers with their terms and the reputation Ferry's own deals give them."""
    page = client().request("GET", "/v1/providers")
    if as_json:
        out.print_json(data=page)
        return
    table = Table("id", "region", "price", "verified price", "pieces", "access", "score", "proposed", "rejected",
                  "active", "slashed")
    for p in page["providers"]:
        r = p["reputation"]
        table.add_row(p["id"], p["region"] or "-", str(p["price"]), str(p["verified_price"]),
                      f"{p['min_piece_size']}-{p['max_piece_size']}", p["access"], f"{r['score']:.3f}",
                      str(r["proposed"]), str(r["rejected"]), str(r["activated"]), str(r["slashed"]))
    out.print(table)


@deal.group("schedule")
def schedule() -> None:
    """Standing orders for deals: cron or interval runs within pending and total caps."""


@schedule.command("set")
@click.argument("name")
@click.argument("selection", metavar="BACKEND:PREFIX")
@click.option("--to", "backend", default="filecoin", show_default=True, help="The filecoin backend.")
@click.option("--cron", help='When it runs, e.g. "0 * * * *".')
@click.option("--every", help="Or how often, e.g. 6h.")
@click.option("--deals-per-run", type=click.IntRange(1), default=10, show_default=True)
@click.option("--max-pending", type=click.IntRange(1), default=None, help="Deals proposed or published, at most.")
@click.option("--total-deals", type=click.IntRange(1), default=None, help="Deals in all, at most.")
@click.option("--total-bytes", type=click.IntRange(1), default=None, help="Padded bytes in all, at most.")
@click.option("--copies", type=click.IntRange(1, 16), default=None)
@click.option("--verified/--unverified", default=None)
@click.option("--region", "regions", multiple=True)
@click.option("--spread-regions", is_flag=True)
@click.option("--max-price", type=click.IntRange(0), default=None, help="attoFIL per GiB per epoch, at most.")
@click.option("--paused", is_flag=True, help="Create it paused.")
@json_opt
def schedule_set(name, selection, backend, cron, every, deals_per_run, max_pending, total_deals, total_bytes,
                 copies, verified, regions, spread_regions, max_price, paused, as_json):
    """Create or replace the deal schedule NAME over BACKEND:PREFIX."""
    if (cron is None) == (every is None):
        raise click.UsageError("give either --cron or --every")
    source = _source(selection, None)
    if "prefix" not in source:
        raise click.BadParameter("a schedule selects a prefix: end it with '/'", param_hint="SELECTION")
    body = {"name": name, "source": source, "backend": backend,
            "deal": _terms(copies, verified, regions, spread_regions, max_price),
            "schedule": {"cron": cron} if cron else {"every": every}, "deals_per_run": deals_per_run,
            "max_pending": max_pending, "total_deals": total_deals, "total_bytes": total_bytes, "paused": paused}
    s = client().request("PUT", "/v1/deal-schedules", json=body)
    out.print_json(data=s) if as_json else out.print(f"schedule {s['name']}: next run {s['next_run_at']}")


@schedule.command("list")
@json_opt
def schedule_list(as_json):
    """Deal schedules and how far they have got."""
    page = client().request("GET", "/v1/deal-schedules")
    if as_json:
        out.print_json(data=page)
        return
    table = Table("name", "selection", "when", "per run", "pending", "made", "paused", "next run", "last error")
    for s in page["schedules"]:
        spec = s["spec"]
        when = spec["schedule"].get("cron") or f"every {spec['schedule'].get('every')}"
        table.add_row(s["name"], f"{spec['source']['backend']}:{spec['source'].get('prefix', '')}", when,
                      str(spec["deals_per_run"]), f"{s['pending']}/{spec.get('max_pending') or '-'}",
                      f"{s['made']}/{spec.get('total_deals') or '-'}", "yes" if s["paused"] else "no",
                      s["next_run_at"] or "-", (s["last_error"] or "")[:50])
    out.print(table)


@schedule.command("pause")
@click.argument("name")
def schedule_pause(name):
    """Stop making new deals (those made go on)."""
    client().request("POST", f"/v1/deal-schedules/{name}/pause")
    out.print(f"schedule {name} paused")


@schedule.command("resume")
@click.argument("name")
def schedule_resume(name):
    """Make deals again at the next run."""
    client().request("POST", f"/v1/deal-schedules/{name}/resume")
    out.print(f"schedule {name} resumed")


@schedule.command("delete")
@click.argument("name")
def schedule_delete(name):
    """Remove the schedule (its deals go on)."""
    client().request("DELETE", f"/v1/deal-schedules/{name}")
    out.print(f"schedule {name} deleted")
