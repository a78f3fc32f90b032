"""`ferry index` and `ferry search`: clients of index jobs, /v1/search and
/v1/objects/{cid}/text."""

from __future__ import annotations

import html
import re

import click
from rich.markup import escape
from rich.table import Table

from ferry.cli.main import _submit_and_follow, cli, client, json_opt, out, parse_location, wait_opt

_MARK = re.compile(r"<mark>(.*?)</mark>", re.S)


@cli.command("index")
@click.argument("selection", metavar="BACKEND:PATH")
@click.option("--keys-from", type=click.File("r"), default=None,
              help="Read the keys from a file, one per line ('-' for stdin).")
@wait_opt
@json_opt
def index_cmd(selection: str, keys_from, wait: bool, as_json: bool) -> None:
    """Index catalogued objects for search: extract their text, embed it.

    PATH ending in '/' (or empty) is a prefix. Objects whose entry would not change are
    skipped without being read. Example: ferry index local:docs/
    """
    backend, path = parse_location(selection, role="BACKEND:PATH")
    if keys_from is not None:
        source: dict = {"backend": backend, "keys": [line.strip() for line in keys_from if line.strip()]}
    elif path == "" or path.endswith("/"):
        source = {"backend": backend, "prefix": path}
    else:
        source = {"backend": backend, "keys": [path]}
    _submit_and_follow({"kind": "index", "source": source, "targets": []}, wait, as_json)


def _snippet(text: str) -> str:
    """The API's HTML-safe snippet as rich markup: matches bold."""
    parts, last = [], 0
    for m in _MARK.finditer(text):
        parts.append(escape(html.unescape(text[last:m.start()])))
        parts.append(f"[bold yellow]{escape(html.unescape(m.group(1)))}[/]")
        last = m.end()
    parts.append(escape(html.unescape(text[last:])))
    return "".join(parts)


@cli.command("search")
@click.argument("query")
@click.option("--mode", type=click.Choice(["hybrid", "text", "vector"]), default="hybrid", show_default=True)
@click.option("--tag", "tags", multiple=True, help="Only objects with this tag (repeatable: all of them).")
@click.option("--type", "media_types", multiple=True, help='Only this media type, e.g. text/markdown or "text/*" '
              "(repeatable: any of them).")
@click.option("--meta", "metadata", multiple=True, help="Only objects whose metadata KEY=VALUE (repeatable).")
@click.option("--backend", "backends", multiple=True, help="Only objects with a verified replica here (repeatable).")
@click.option("--limit", type=click.IntRange(1, 100), default=10, show_default=True)
@click.option("--offset", type=click.IntRange(0, 10_000), default=0, show_default=True)
@click.option("--weight", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Hybrid: the vector ranking's share (0 text only, 1 vector only).")
@json_opt
def search_cmd(query: str, mode: str, tags, media_types, metadata, backends, limit: int, offset: int,
               weight: float, as_json: bool) -> None:
    """Search indexed objects. QUERY takes web-search syntax: "a phrase", or, -word."""
    meta = {}
    for pair in metadata:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE", param_hint="--meta")
        meta[key] = value
    body = {"query": query, "mode": mode, "limit": limit, "offset": offset, "weight": weight,
            "filters": {"tags": list(tags), "media_type": list(media_types), "metadata": meta,
                        "backend": list(backends)}}
    data = client().request("POST", "/v1/search", json=body)
    if as_json:
        out.print_json(data=data)
        return
    if not data["hits"]:
        out.print(f"no results for {query!r} ({mode}, {data['took_ms']:.0f} ms)", highlight=False)
        return
    table = Table("#", "name", "type", "score", "match", title=f"{query!r}: {mode}, {data['took_ms']:.0f} ms",
                  show_lines=True)
    for i, hit in enumerate(data["hits"], start=offset + 1):
        name = hit["title"] or hit["name"] or hit["cid"]
        where = f"[bold]{escape(name)}[/]\n[dim]{escape(hit['name'] or '')}  {hit['cid']}[/]"
        ranks = " ".join(f"{k[0]}#{hit[k + '_rank']}" for k in ("text", "vector") if hit[k + "_rank"])
        score = f"{hit['score']:.4f}\n[dim]{ranks}[/]"
        table.add_row(str(i), where, hit["media_type"], score, _snippet(hit["snippet"]))
    out.print(table)
    if data["next_offset"] is not None:
        out.print(f"[dim]more: --offset {data['next_offset']}[/]")


@cli.command("text")
@click.argument("cid")
@json_opt
def text_cmd(cid: str, as_json: bool) -> None:
    """The text Ferry extracted from an object for search."""
    data = client().request("GET", f"/v1/objects/{cid}/text")
    if as_json:
        out.print_json(data=data)
        return
    if data["reason"]:
        click.echo(f"# {data['reason']}", err=True)
    click.echo(data["text"])
