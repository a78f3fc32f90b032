"""Searchable text from an object's bytes, by media type.

`extract` turns the bytes of an object (all of them, or a head with `complete=False`) into an
`Extracted`: the body text, the title where the format has one, and whether the object can
only be found by its name, tags and metadata (binary or unextractable content).
`detect_media_type` names the type: the declared one, else one guessed from the name's
extension, else one sniffed from the bytes.

Pure functions: no database, no network; the standard library, and pypdf for PDF. Hostile
input (deep nesting, huge lines, NUL bytes, broken encodings) gives a result, never an error.
Bump EXTRACTOR_VERSION whenever the output for some input changes, so objects get re-indexed.
"""

from __future__ import annotations

import codecs
import csv
import html
import io
import json
import mimetypes
import re
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from html.parser import HTMLParser
from typing import Any

EXTRACTOR_VERSION = 1

OCTET_STREAM = "application/octet-stream"
TITLE_MAX = 300
_SNIFF_BYTES = 64 * 1024
_MAX_DEPTH = 64           # JSON levels followed; deeper values are not indexed
_MAX_REPLACED = 0.05      # share of undecodable characters a text may have
_MAX_CONTROLS = 0.02      # share of control characters a text may have
_CUT_WINDOW = 200         # how far back a cut at max_chars looks for whitespace


@dataclass(frozen=True, slots=True)
class Extracted:
    """What the index stores for one object's content."""

    media_type: str        # the type the text was extracted as
    title: str | None      # from the format (HTML <title>, first Markdown heading, PDF /Title)
    text: str              # the body text; "" for a metadata-only entry
    metadata_only: bool    # binary or unextractable: indexed by name, tags and metadata only
    truncated: bool        # cut at max_chars, or only a head of the object was read
    reason: str | None     # why metadata_only or truncated


# --- media types -------------------------------------------------------------------------

_TOKEN = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}")
# Stores say this when they know nothing (S3 defaults to binary/octet-stream).
_UNDECLARED = frozenset({OCTET_STREAM, "binary/octet-stream", "application/unknown"})

_EXTENSIONS = {
    "md": "text/markdown", "markdown": "text/markdown",
    "csv": "text/csv", "tsv": "text/tab-separated-values",
    "json": "application/json", "jsonl": "application/x-ndjson", "ndjson": "application/x-ndjson",
    "pdf": "application/pdf",
    "html": "text/html", "htm": "text/html", "xhtml": "application/xhtml+xml",
    "txt": "text/plain", "yaml": "text/yaml", "yml": "text/yaml",
}
# A compressed name is compressed content whatever the inner extension says.
_COMPRESSED = {
    "gz": "application/gzip", "tgz": "application/gzip", "svgz": "application/gzip",
    "bz2": "application/x-bzip2", "tbz2": "application/x-bzip2",
    "xz": "application/x-xz", "txz": "application/x-xz",
    "zst": "application/zstd", "z": "application/x-compress",
}
_SIGNATURES = (
    (b"%PDF-", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"PK\x03\x04", "application/zip"),
    (b"PK\x05\x06", "application/zip"),
    (b"\x1f\x8b", "application/gzip"),
    (b"\xfd7zXZ\x00", "application/x-xz"),
    (b"\x28\xb5\x2f\xfd", "application/zstd"),
    (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (b"\x7fELF", "application/x-executable"),
    (b"SQLite format 3\x00", "application/vnd.sqlite3"),
)

_PDF, _HTML, _MARKDOWN, _JSON, _NDJSON, _CSV, _TSV, _TEXT, _BINARY = (
    "pdf", "html", "markdown", "json", "ndjson", "csv", "tsv", "text", "binary")
_KINDS = {
    "application/pdf": _PDF, "application/x-pdf": _PDF,
    "text/html": _HTML, "application/xhtml+xml": _HTML,
    "text/markdown": _MARKDOWN, "text/x-markdown": _MARKDOWN,
    "application/json": _JSON, "text/json": _JSON, "application/x-json": _JSON,
    "application/x-ndjson": _NDJSON, "application/ndjson": _NDJSON, "application/jsonl": _NDJSON,
    "application/x-jsonlines": _NDJSON, "application/jsonlines": _NDJSON,
    "text/csv": _CSV, "application/csv": _CSV, "text/tab-separated-values": _TSV,
}
_TEXT_APPLICATIONS = frozenset({
    "application/xml", "application/yaml", "application/x-yaml", "application/toml",
    "application/javascript", "application/x-javascript", "application/ecmascript",
    "application/x-sh", "application/x-shellscript", "application/sql", "application/graphql",
    "application/x-tex", "application/x-latex", "application/x-httpd-php",
})


def detect_media_type(head: bytes, *, name: str | None = None, declared: str | None = None,
                      complete: bool = True) -> str:
    """The media type of content starting with `head`, without parameters.

    A declared type wins unless it is missing, unparseable or only says "octet-stream"; then
    the name's extension decides, then the bytes. `complete` says `head` is all the content
    (a JSON text must then parse to count as JSON).
    """
    bare, _ = _parse_media_type(declared)
    if bare is not None and bare not in _UNDECLARED:
        return bare
    guessed = _type_from_name(name) if name else None
    return guessed or _sniff(head, complete=complete)


def _parse_media_type(value: str | None) -> tuple[str | None, str | None]:
    """(type, charset) of a Content-Type value; (None, None) when missing or unparseable."""
    if not value:
        return None, None
    bare, _, params = value.partition(";")
    bare = bare.strip().lower()
    if not _MEDIA_TYPE.fullmatch(bare):
        return None, None
    charset = None
    for param in params.split(";"):
        key, sep, val = param.partition("=")
        if sep and key.strip().lower() == "charset":
            charset = _text_codec(val.strip().strip("\"'"))
    return bare, charset


def _text_codec(name: str) -> str | None:
    """The codec's canonical name if `name` is a text encoding Python has."""
    if not name or len(name) > 40:
        return None
    try:
        # Refuses unknown names, bytes-to-bytes codecs (zlib, base64) and codecs that cannot
        # replace what they fail to decode (idna).
        b"x".decode(name, "replace")
        return codecs.lookup(name).name
    except (LookupError, UnicodeError):
        return None


@cache
def _mime_table() -> mimetypes.MimeTypes:
    # Python's built-in table only, not the host's mime.types: the same answer everywhere.
    return mimetypes.MimeTypes()


def _type_from_name(name: str) -> str | None:
    base = name.replace("\\", "/").rpartition("/")[2].lower()
    stem, dot, ext = base.rpartition(".")
    if not dot or not stem.strip(".") or not ext:
        return None
    if ext in _COMPRESSED:
        return _COMPRESSED[ext]
    table = _mime_table().types_map
    guessed = _EXTENSIONS.get(ext) or table[True].get(f".{ext}") or table[False].get(f".{ext}")
    return None if guessed in _UNDECLARED else guessed


def _signature(head: bytes) -> str | None:
    """The type of a binary format recognised by its first bytes."""
    for magic, media_type in _SIGNATURES:
        if head.startswith(magic):
            return media_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":
        return "application/x-bzip2"
    return None


_JSON_START = re.compile(r'\{\s*["}]|\[\s*(?:[\[{"\]]|-?\d|true\b|false\b|null\b)')


def _sniff(head: bytes, *, complete: bool) -> str:
    signature = _signature(head)
    if signature is not None:
        return signature
    sample_complete = complete and len(head) <= _SNIFF_BYTES
    sample = _decode(head[:_SNIFF_BYTES], None, complete=sample_complete)
    if sample is None:
        return OCTET_STREAM
    start = sample.lstrip()
    if start.startswith("<?xml") and "?>" in start[:1024]:
        start = start[start.index("?>") + 2:].lstrip()
    if start[:14].lower().startswith(("<!doctype html", "<html")):
        return "text/html"
    if start[:1] in ("{", "["):
        return _sniff_json(head, sample, complete=complete, sample_complete=sample_complete)
    return "text/plain"


def _sniff_json(head: bytes, sample: str, *, complete: bool, sample_complete: bool) -> str:
    """JSON, NDJSON or plain text, for content starting with "{" or "["."""
    if complete:
        whole = sample if sample_complete else _decode(head, None, complete=True)
        if whole is not None and _json_value(whole) is not _INVALID:
            return "application/json"
    lines = sample.split("\n", 8)
    if len(lines) == 9 or not sample_complete:
        lines.pop()  # the rest, or a line the head may cut
    records = [line for line in lines if line.strip()]
    if len(records) >= 2 and all(isinstance(_json_value(line), dict | list) for line in records):
        return "application/x-ndjson"
    if not complete and _JSON_START.match(sample.lstrip()):
        return "application/json"  # a head need not parse
    return "text/plain"


def _kind(media_type: str) -> str:
    if media_type in _KINDS:
        return _KINDS[media_type]
    if media_type.endswith("+json"):
        return _JSON
    if media_type.startswith("text/") or media_type.endswith(("+xml", "+yaml")) or media_type in _TEXT_APPLICATIONS:
        return _TEXT
    return _BINARY


# --- decoding ----------------------------------------------------------------------------

_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
# C0 controls and DEL, but tab, newlines, form feed and ESC (coloured logs) are text.
_DROP_CONTROLS = dict.fromkeys([*range(9), 0x0B, *range(0x0E, 0x1B), *range(0x1C, 0x20), 0x7F])
_META_CHARSET = re.compile(rb"""<meta[^>]{0,512}?charset\s*=\s*["']?\s*([a-z0-9_.:-]{1,40})""", re.IGNORECASE)


def _decode(data: bytes, charset: str | None, *, complete: bool) -> str | None:
    """The text of `data`, or None when it is not text.

    A byte-order mark wins, then the declared charset, then UTF-8. A lenient decode is kept
    only when few characters are lost, and never for UTF-16: nearly any even run of bytes
    decodes as UTF-16 with few losses. `complete=False` allows a character cut at the end.
    """
    lenient = True
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            data, encodings, lenient = data[len(bom):], [encoding], encoding == "utf-8"
            break
    else:
        encodings = [charset, "utf-8"] if charset and charset != "utf-8" else ["utf-8"]
    for encoding in encodings:
        try:
            text = codecs.getincrementaldecoder(encoding)("strict").decode(data, final=complete)
        except UnicodeError:  # also UTF-16 and UTF-32 without their byte-order mark
            continue
        return text if _mostly_text(text) else None
    if not lenient or encodings[0].startswith(("utf-16", "utf-32")):
        return None
    try:
        text = codecs.getincrementaldecoder(encodings[0])("replace").decode(data, final=complete)
    except UnicodeError:
        return None
    if text.count("\ufffd") > len(text) * _MAX_REPLACED:
        return None
    return text if _mostly_text(text) else None


def _mostly_text(text: str) -> bool:
    return len(text) - len(text.translate(_DROP_CONTROLS)) <= len(text) * _MAX_CONTROLS


def _meta_charset(data: bytes) -> str | None:
    """The charset an HTML page names in a <meta> tag near its start."""
    match = _META_CHARSET.search(data[:1024])
    codec = _text_codec(match.group(1).decode("ascii")) if match else None
    # A page that could be read this far is not UTF-16, whatever it says (as browsers do).
    return None if codec is None or codec.startswith(("utf-16", "utf-32")) else codec


# --- extraction --------------------------------------------------------------------------

def extract(data: bytes, *, media_type: str | None = None, name: str | None = None,
            max_chars: int = 1_000_000, complete: bool = True) -> Extracted:
    """The searchable text of an object's bytes (`complete=False`: only its first bytes)."""
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    detected = detect_media_type(data, name=name, declared=media_type, complete=complete)
    kind = _kind(detected)
    if kind not in (_PDF, _BINARY):
        # Declared or named as text but a known binary format: the bytes are right.
        signature = _signature(data)
        if signature is not None:
            detected, kind = signature, _kind(signature)
    if kind == _PDF:
        return _extract_pdf(data, complete=complete, max_chars=max_chars)
    if kind == _BINARY:
        return _binary(detected)
    charset = _parse_media_type(media_type)[1] or (_meta_charset(data) if kind == _HTML else None)
    text = _decode(data, charset, complete=complete)
    if text is None:
        return _binary(OCTET_STREAM)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not complete and "\n" in text:
        text = text[:text.rindex("\n") + 1]  # the last line may be cut
    detected, title, body, stopped = _extract_text(kind, detected, text, max_chars)
    body, cut = _cut(_tidy(body), max_chars)
    reasons = []
    if not complete:
        reasons.append(f"only the first {len(data)} bytes were read")
    if cut or stopped:
        reasons.append(f"text cut at {max_chars} characters")
    return Extracted(detected, _title(title), body, False, bool(reasons), "; ".join(reasons) or None)


def _extract_text(kind: str, media_type: str, text: str, limit: int) -> tuple[str, str | None, str, bool]:
    """(media type, title, body, whether the body stopped early at `limit`) of a text."""
    if kind == _MARKDOWN:
        markdown = _Markdown()
        body, stopped = _join_limited(markdown.lines(text.split("\n")), limit)
        return media_type, markdown.title, body, stopped
    if kind == _HTML:
        title, body, stopped = _html_text(text, limit)
        return media_type, title, body, stopped
    if kind == _JSON:
        value = _json_value(text)
        if value is _INVALID:
            return "text/plain", None, text, False
        body, stopped = _join_limited(_json_lines(value), limit)
        return media_type, _json_title(value), body, stopped
    if kind == _NDJSON:
        body, stopped = _join_limited(_ndjson_lines(text), limit)
        return media_type, None, body, stopped
    if kind in (_CSV, _TSV):
        delimiter = "\t" if kind == _TSV else _csv_delimiter(text)
        try:
            body, stopped = _join_limited(_csv_lines(text, delimiter), limit)
        except csv.Error:  # e.g. a field over the csv module's size limit
            return "text/plain", None, text, False
        return media_type, None, body, stopped
    return media_type, None, text, False


def _binary(media_type: str) -> Extracted:
    return _metadata_only(media_type, f"binary content ({media_type}): indexed by name and metadata only")


def _metadata_only(media_type: str, reason: str, title: str | None = None) -> Extracted:
    return Extracted(media_type, _title(title), "", True, False, reason)


def _join_limited(lines: Iterable[str], limit: int) -> tuple[str, bool]:
    """The lines joined, stopping once past `limit` characters; and whether it stopped."""
    parts: list[str] = []
    total = 0
    for line in lines:
        if total > limit:
            return "\n".join(parts), True
        parts.append(line)
        total += len(line) + 1
    return "\n".join(parts), False


_BLANK_RUNS = re.compile(r"\n{3,}")


def _tidy(text: str) -> str:
    """Text without control characters or trailing spaces, at most one blank line in a row."""
    text = text.replace("\f", "\n").translate(_DROP_CONTROLS)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


def _cut(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to `limit` characters, at whitespace when there is some near the end."""
    if len(text) <= limit:
        return text, False
    if not text[limit].isspace():
        window = text[max(0, limit - _CUT_WINDOW):limit]
        gap = max(window.rfind(" "), window.rfind("\n"), window.rfind("\t"))
        if gap > 0:
            limit = limit - len(window) + gap
    return text[:limit].rstrip(), True


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _title(text: str | None) -> str | None:
    if not text:
        return None
    return _one_line(text.translate(_DROP_CONTROLS))[:TITLE_MAX].rstrip() or None


# --- Markdown ----------------------------------------------------------------------------

# Patterns stay linear on hostile lines: no class can run across the delimiter that ends it.
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")
_UNPROTECT = {0xE000 + c: c for c in range(0x21, 0x7F)}
_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_QUOTE = re.compile(r"(?: {0,3}> ?)+")
_ATX = re.compile(r" {0,3}#{1,6}(?=[ \t]|$)")
_BULLET = re.compile(r"[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+(?:\[[ xX]\][ \t]+)?")
_REF_DEF = re.compile(r""" {0,3}\[[^\[\]]+\]:[ \t]*<?\S+>?(?:[ \t]+(?:"[^"]*"|'[^']*'|\([^()]*\)))?[ \t]*""")
_TABLE_RULE = re.compile(r":?-+:?")
_CODE_SPAN = re.compile(r"(?<!`)(`++)([^`]+)\1(?!`)")
_IMAGE = re.compile(r"!\[([^\[\]\n]*)\]\([^()\n]*\)")
_LINK = re.compile(r"\[([^\[\]\n]*)\]\([^()\n]*\)")
_REF_LINK = re.compile(r"\[([^\[\]\n]+)\]\[[^\[\]\n]*\]")
_AUTOLINK = re.compile(r"<((?:https?|ftp)://[^<>\s]*|mailto:[^<>\s]*)>")
_TAG = re.compile(r"<[A-Za-z/!][^<>\n]*>")
_EMPHASIS = re.compile(r"(?<!\w)[*_]{1,3}(?=\S)|(?<=\S)[*_]{1,3}(?!\w)")
_FRONT_TITLE = re.compile(r"title[ \t]*:[ \t]*(.+)", re.IGNORECASE)



class _Markdown:
    """Markdown to prose, line by line: the words and the code kept, the markup dropped."""

    def __init__(self) -> None:
        self.title: str | None = None

    def lines(self, lines: list[str]) -> Iterator[str]:
        start = yield from self._front_matter(lines)
        fence: tuple[str, int] | None = None   # the open code fence's character and length
        paragraph = ""                         # the previous line if prose: a setext heading's text?
        table = False
        for at in range(start, len(lines)):
            line = lines[at]
            opening = _FENCE.match(line)
            if fence is not None:
                bare = line.strip()
                if opening and bare == fence[0] * len(bare) and len(bare) >= fence[1]:
                    fence = None
                else:
                    yield line
                continue
            if opening and not (opening.group(1)[0] == "`" and "`" in line[opening.end():]):
                fence, paragraph, table = (opening.group(1)[0], len(opening.group(1))), "", False
                continue
            line = _ESCAPE.sub(_protect, line)
            quote = _QUOTE.match(line)
            if quote:
                line = line[quote.end():]
            bare = line.strip()
            if not bare:
                paragraph, table = "", False
                yield ""
                continue
            if paragraph and _is_underline(bare):
                self._heading(paragraph)
                paragraph = ""
                continue
            paragraph = ""
            if "|" in bare and (table or (at + 1 < len(lines) and _is_table_rule(lines[at + 1].strip()))):
                table = True
                if not _is_table_rule(bare):
                    yield "; ".join(filter(None, (_inline(cell.strip()) for cell in bare.strip("|").split("|"))))
                continue
            table = False
            if _is_rule(bare) or _REF_DEF.fullmatch(line):
                continue
            heading = _ATX.match(line)
            if heading:
                text = _inline(_atx_text(line[heading.end():]))
                self._heading(text)
                yield text
                continue
            bullet = _BULLET.match(line)
            if bullet:
                yield _inline(line[bullet.end():].strip())
                continue
            paragraph = _inline(bare)
            yield paragraph

    def _front_matter(self, lines: list[str]) -> Generator[str, None, int]:
        """YAML front matter as plain lines, its `title:` the title; returns where the body starts."""
        if not lines or lines[0].strip() != "---":
            return 0
        for end in range(1, min(len(lines), 200)):
            if lines[end].strip() in ("---", "..."):
                for line in lines[1:end]:
                    found = _FRONT_TITLE.fullmatch(line.strip())
                    if found:
                        self._heading(found.group(1).strip().strip("\"'"))
                    yield line
                yield ""
                return end + 1
        return 0

    def _heading(self, text: str) -> None:
        if self.title is None and text.strip():
            self.title = text


def _protect(escape: re.Match[str]) -> str:
    # An escaped character moves to the private use area until the markup is gone.
    return chr(0xE000 + ord(escape.group(1)))


def _is_underline(bare: str) -> bool:
    return bare == "=" * len(bare) or (len(bare) > 1 and bare == "-" * len(bare))


def _is_rule(bare: str) -> bool:
    marks = bare.replace(" ", "").replace("\t", "")
    return len(marks) >= 3 and marks[0] in "-*_" and marks == marks[0] * len(marks)


def _is_table_rule(bare: str) -> bool:
    cells = bare.strip("|").split("|")
    return "|" in bare and "-" in bare and all(_TABLE_RULE.fullmatch(cell.strip()) for cell in cells)


def _atx_text(rest: str) -> str:
    rest = rest.strip()
    bare = rest.rstrip("#")
    return bare.rstrip() if bare != rest and (not bare or bare[-1] in " \t") else rest


def _inline(text: str) -> str:
    """A line without inline markup; code spans keep their content as written."""
    parts: list[str] = []
    at = 0
    for span in _CODE_SPAN.finditer(text):
        parts += (_prose(text[at:span.start()]), span.group(2))
        at = span.end()
    parts.append(_prose(text[at:]))
    return "".join(parts).translate(_UNPROTECT)


def _prose(text: str) -> str:
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _REF_LINK.sub(r"\1", text)
    text = _AUTOLINK.sub(r"\1", text)
    text = _TAG.sub("", text)
    return _EMPHASIS.sub("", text)


# --- HTML --------------------------------------------------------------------------------

_SKIPPED = frozenset({"script", "style", "template", "noscript", "svg", "head"})
_PARAGRAPHS = frozenset({
    "address", "article", "aside", "blockquote", "details", "dialog", "div", "dl", "fieldset", "figure",
    "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hgroup", "hr", "main", "menu", "nav",
    "ol", "p", "pre", "section", "table", "ul",
})
_LINES = frozenset({"br", "caption", "dd", "dt", "figcaption", "legend", "li", "option", "summary", "tr"})
_CELLS = frozenset({"td", "th"})
_SPACES = re.compile(r"\s+")
_HTML_CHUNK = 64 * 1024
_HTML_STUCK = 1024 * 1024    # unparsed characters that mean an unterminated tag or comment
_HTML_TAIL = 4096            # unparsed characters close() may rescan


class _HtmlText(HTMLParser):
    """The visible text of an HTML page: a line break at each block, the <title> aside."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.size = 0
        self.title: str | None = None
        self._title: list[str] | None = None   # the <title> being read
        self._skipped: list[str] = []          # open elements whose content is not text
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.end_title()
        if tag == "body":
            self._skipped.clear()  # </head> is optional
        if tag == "title" and self.title is None and all(open_ == "head" for open_ in self._skipped):
            self._title = []
        elif tag in _SKIPPED:
            self._skipped.append(tag)
        elif not self._skipped:
            if tag == "pre":
                self._pre += 1
            self._break(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.end_title()
        if not self._skipped and tag not in _SKIPPED:
            self._break(tag)

    def handle_endtag(self, tag: str) -> None:
        self.end_title()
        if self._skipped:
            if tag in self._skipped:
                del self._skipped[len(self._skipped) - 1 - self._skipped[::-1].index(tag):]
            return
        if tag == "pre" and self._pre:
            self._pre -= 1
        if tag in _PARAGRAPHS:
            self._break(tag)

    def handle_data(self, data: str) -> None:
        if self._title is not None:
            self._title.append(data)
        elif not self._skipped:
            text = data if self._pre else _SPACES.sub(" ", data)
            self.parts.append(text)
            self.size += len(text)

    def parse_marked_section(self, i: int, report: int = 1) -> int:
        # Python 3.11's parser raises AssertionError at "<![" with an unknown keyword, which
        # browsers show as text.
        try:
            return super().parse_marked_section(i, report)
        except AssertionError:
            self.handle_data("<![")
            return i + 3

    def stuck(self) -> bool:
        """Whether an unterminated tag or comment holds back a large part of the page."""
        return len(self.rawdata) > _HTML_STUCK and not self._in_raw_text()

    def finish(self, rest: str = "") -> None:
        """Ends the page, `rest` being what was not fed: close() in linear time.

        Past an unterminated tag or comment, close() would rescan the rest of the page once
        for each "<" in it (quadratic on crafted input); the rest is read as text instead,
        tag-like runs dropped.
        """
        rest = self.rawdata + rest
        if len(rest) > _HTML_TAIL and not self._in_raw_text():
            self.reset()  # drops the unparsed rest
            self.handle_data(html.unescape(_TAG.sub(" ", rest)))
        self.close()
        self.end_title()

    def _in_raw_text(self) -> bool:
        # Inside <script> or <style> the parser waits for the end tag: the rest is theirs.
        return bool(self._skipped) and self._skipped[-1] in ("script", "style")

    def end_title(self) -> None:
        if self._title is not None:
            self.title = _title("".join(self._title))
            self._title = None

    def _break(self, tag: str) -> None:
        if tag in _PARAGRAPHS:
            self.parts.append("\n\n")
        elif tag in _LINES:
            self.parts.append("\n")
        elif tag in _CELLS:
            self.parts.append(" ")


def _html_text(text: str, limit: int) -> tuple[str | None, str, bool]:
    """(title, body, whether it stopped early at `limit`) of an HTML page."""
    parser = _HtmlText()
    stopped = False
    for at in range(0, len(text), _HTML_CHUNK):
        if parser.size > limit:
            stopped = True
            break
        parser.feed(text[at:at + _HTML_CHUNK])
        if parser.stuck():
            parser.finish(text[at + _HTML_CHUNK:])
            break
    else:
        parser.finish()
    body = "\n".join(_one_line(line) for line in "".join(parser.parts).split("\n"))
    return parser.title, body, stopped


# --- JSON and NDJSON ---------------------------------------------------------------------

_INVALID = object()


def _json_value(text: str) -> Any:
    """The parsed JSON text, or _INVALID (also when nested deeper than the parser goes)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _INVALID


def _json_lines(value: Any, path: str = "", depth: int = 0) -> Iterator[str]:
    """One `dotted.path: value` line per scalar; arrays add no index, so keys stay words."""
    if isinstance(value, dict):
        if depth < _MAX_DEPTH:
            for key, item in value.items():
                key = _one_line(key)
                yield from _json_lines(item, f"{path}.{key}" if path else key, depth + 1)
    elif isinstance(value, list):
        if depth < _MAX_DEPTH:
            for item in value:
                yield from _json_lines(item, path, depth + 1)
    elif value is not None:
        text = ("true" if value else "false") if isinstance(value, bool) else _one_line(str(value))
        if text:
            yield f"{path}: {text}" if path else text


def _json_title(value: Any) -> str | None:
    if isinstance(value, dict):
        for key in ("title", "name"):
            if isinstance(value.get(key), str) and value[key].strip():
                return value[key]
    return None


def _ndjson_lines(text: str) -> Iterator[str]:
    """Each record's lines, a blank line between records; a line that is not JSON as it is."""
    first = True
    for line in text.split("\n"):
        if not line.strip():
            continue
        if not first:
            yield ""
        first = False
        value = _json_value(line)
        if value is _INVALID:
            yield line.strip()
        else:
            yield from _json_lines(value)


# --- CSV ---------------------------------------------------------------------------------

def _csv_delimiter(text: str) -> str:
    sample = text[:4096]  # the sniffer is slow on long samples
    if len(text) > len(sample) and "\n" in sample:
        sample = sample[:sample.rindex("\n")]  # whole lines only
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","


def _csv_lines(text: str, delimiter: str) -> Iterator[str]:
    """One line per row: `header: value` pairs joined by "; ", or the values without a header."""
    header: list[str] | None = None
    first = True
    for row in csv.reader(io.StringIO(text), delimiter=delimiter):
        cells = [_one_line(cell) for cell in row]
        if not any(cells):
            continue
        if first:
            first = False
            if not any(_is_number(cell) for cell in cells if cell):
                header = cells
                continue
        yield "; ".join(_csv_pair(header, at, cell) for at, cell in enumerate(cells) if cell)


def _csv_pair(header: list[str] | None, at: int, cell: str) -> str:
    name = header[at] if header is not None and at < len(header) else ""
    return f"{name}: {cell}" if name else cell


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# --- PDF ---------------------------------------------------------------------------------

_PDF_TYPE = "application/pdf"


def _extract_pdf(data: bytes, *, complete: bool, max_chars: int) -> Extracted:
    if not complete:
        return _metadata_only(_PDF_TYPE, f"PDF larger than the read limit ({_size(len(data))}): its text was not "
                                         "extracted; indexed by name and metadata only")
    pypdf = _import_pypdf()
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            return _metadata_only(_PDF_TYPE, "PDF is encrypted with a password: indexed by name and metadata only")
        title = _pdf_title(reader)
        texts, stopped, failure = _pdf_pages(reader, max_chars)
    except Exception as exc:  # noqa: BLE001 - pypdf raises errors of many kinds on malformed files
        return _metadata_only(_PDF_TYPE, f"PDF could not be parsed: {_describe(exc)}")
    body = _tidy("\n\n".join(texts))
    if not body.strip():
        if failure is not None:
            return _metadata_only(_PDF_TYPE, f"PDF could not be parsed: {_describe(failure)}", title)
        return _metadata_only(_PDF_TYPE, "PDF has no text layer (scanned?): indexed by name and metadata only", title)
    body, cut = _cut(body, max_chars)
    truncated = cut or stopped
    return Extracted(_PDF_TYPE, _title(title), body, False, truncated,
                     f"text cut at {max_chars} characters" if truncated else None)


def _import_pypdf() -> Any:
    try:
        import pypdf
    except ImportError as exc:
        raise ImportError("extracting text from PDF needs pypdf: pip install pypdf") from exc
    return pypdf


def _pdf_title(reader: Any) -> str | None:
    try:
        meta = reader.metadata
        title = meta.title if meta is not None else None
    except Exception:  # noqa: BLE001 - a broken Info dictionary costs the title, not the text
        return None
    return title if isinstance(title, str) else None


def _pdf_pages(reader: Any, limit: int) -> tuple[list[str], bool, Exception | None]:
    """The pages' text until past `limit`, whether it stopped early, and the first page that failed."""
    texts: list[str] = []
    total = 0
    failure: Exception | None = None
    for page in reader.pages:
        if total > limit:
            return texts, True, failure
        try:
            text = page.extract_text()
        except Exception as exc:  # noqa: BLE001 - one bad page costs that page, not the document
            failure = failure or exc
            continue
        texts.append(text)
        total += len(text) + 2
    return texts, False, failure


def _describe(exc: BaseException) -> str:
    message = _one_line(str(exc).translate(_DROP_CONTROLS))[:200]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"
