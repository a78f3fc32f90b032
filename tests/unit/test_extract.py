"""ferry.search.extract: media type detection and text extraction for the search index.

Every input is built here; the PDFs are written by hand (one Helvetica text object per page)
or by pypdf's writer, and read back by pypdf.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time

import pypdf
import pytest

from ferry.search.extract import (
    EXTRACTOR_VERSION,
    Extracted,
    detect_media_type,
    extract,
)

CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"


def make_pdf(*pages: str) -> bytes:
    """A small valid PDF: each page's lines drawn in Helvetica ("" for a page without text)."""
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        shows = " ".join(f"({line}) Tj T*" for line in text.split("\n"))
        stream = f"BT /F1 12 Tf 14 TL 72 720 Td {shows} ET" if text else ""
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                       f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>")
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def rewrite_pdf(pdf: bytes, *, title: str | None = None, password: str | None = None) -> bytes:
    writer = pypdf.PdfWriter(clone_from=io.BytesIO(pdf))
    if title is not None:
        writer.add_metadata({"/Title": title})
    if password is not None:
        writer.encrypt(user_password=password, owner_password="owner", algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


# --- detection ---------------------------------------------------------------------------

def test_a_declared_type_wins_without_its_parameters():
    assert detect_media_type(b"{}", name="table.csv", declared="Text/HTML; charset=utf-8") == "text/html"


@pytest.mark.parametrize("declared", [None, "", "application/octet-stream", "binary/octet-stream", "nonsense",
                                      "text/", "/plain", "text/plain/x", "a" * 200 + "/b"])
def test_a_missing_or_unusable_declared_type_defers_to_the_name(declared):
    assert detect_media_type(b"plain words", name="notes.md", declared=declared) == "text/markdown"


@pytest.mark.parametrize(("name", "expected"), [
    ("notes.md", "text/markdown"),
    ("dir/sub/README.markdown", "text/markdown"),
    ("TABLE.CSV", "text/csv"),
    ("data.tsv", "text/tab-separated-values"),
    ("doc.json", "application/json"),
    ("events.jsonl", "application/x-ndjson"),
    ("events.ndjson", "application/x-ndjson"),
    ("paper.pdf", "application/pdf"),
    ("index.html", "text/html"),
    ("index.htm", "text/html"),
    ("readme.txt", "text/plain"),
    ("config.yaml", "text/yaml"),
    ("config.yml", "text/yaml"),
    ("photo.png", "image/png"),
    ("notes.txt.gz", "application/gzip"),
    ("windows\\path\\report.pdf", "application/pdf"),
])
def test_the_extension_names_the_type(name, expected):
    assert detect_media_type(b"plain words", name=name) == expected


@pytest.mark.parametrize(("head", "expected"), [
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "application/pdf"),
    (b"\xef\xbb\xbf \n<!DOCTYPE html><html><body>x</body></html>", "text/html"),
    (b"\n  <HTML lang=en><p>x</p></HTML>", "text/html"),
    (b'<?xml version="1.0"?>\n<html xmlns="http://www.w3.org/1999/xhtml"></html>', "text/html"),
    (b'{"a": [1, 2]}', "application/json"),
    (b" [1, 2]\n", "application/json"),
    (b'{"a": 1}\n{"a": 2}\n', "application/x-ndjson"),
    (b"{not json at all", "text/plain"),
    (b"[INFO] a log line\n", "text/plain"),
    (b"just some words\nand more\n", "text/plain"),
    (PNG, "image/png"),
    (b"GIF89a\x01\x00\x01\x00", "image/gif"),
    (b"PK\x03\x04\x14\x00\x00\x00", "application/zip"),
    (bytes(range(256)) * 4, "application/octet-stream"),
    (b"\x00\x01\x02\x03binary\x00\x00\x00\x00", "application/octet-stream"),
])
def test_without_a_type_or_an_extension_the_bytes_decide(head, expected):
    assert detect_media_type(head, name=CID) == expected
    assert detect_media_type(head, name="file.bin") == expected  # an extension that says octet-stream


def test_a_head_may_cut_a_character_and_need_not_parse():
    assert detect_media_type("café".encode()[:-1], complete=False) == "text/plain"
    assert detect_media_type(b'{"title": "cut off', complete=False) == "application/json"
    assert detect_media_type(b'{"title": "cut off', complete=True) == "text/plain"


# --- decoding ----------------------------------------------------------------------------

def test_the_declared_charset_decodes():
    got = extract(b"caf\xe9 cr\xe8me", media_type="text/plain; charset=ISO-8859-1")
    assert (got.media_type, got.text, got.metadata_only) == ("text/plain", "café crème", False)


def test_an_unknown_or_non_text_charset_falls_back_to_utf8():
    for charset in ("no-such-charset", "zlib", "base64", "idna", "undefined"):
        assert extract("café".encode(), media_type=f"text/plain; charset={charset}").text == "café"


def test_byte_order_marks_are_honoured():
    assert extract("héllo".encode("utf-16")).text == "héllo"
    assert extract(b"\xef\xbb\xbfhello", media_type="text/plain; charset=latin-1").text == "hello"


def test_a_few_bad_bytes_are_replaced_but_many_make_it_binary():
    got = extract(b"fine words " * 20 + b"\xff\xfe", media_type="text/plain")
    assert not got.metadata_only
    assert got.text.endswith("fine words \ufffd\ufffd")
    junk = extract(bytes(range(0x80, 0x100)) * 4, media_type="text/plain")
    assert junk == Extracted("application/octet-stream", None, "", True, False,
                             "binary content (application/octet-stream): indexed by name and metadata only")


def test_a_utf16_byte_order_mark_does_not_make_binary_text():
    noise = bytes((i * 7919 + 13) % 256 for i in range(4000))  # no valid UTF-16 for long
    assert extract(b"\xff\xfe" + noise).metadata_only
    assert extract(b"\xfe\xff" + noise, media_type="text/plain").metadata_only


def test_an_html_meta_charset_is_used_when_nothing_else_says():
    page = (b'<html><head><meta http-equiv="Content-Type" content="text/html; charset=windows-1252">'
            b"<title>Caf\xe9</title></head><body><p>na\xefve</p></body></html>")
    got = extract(page)
    assert (got.title, got.text) == ("Café", "naïve")


# --- plain text and Markdown -------------------------------------------------------------

def test_plain_text_keeps_its_words_with_tidy_lines():
    got = extract(b"one\r\ntwo  \r\n\r\n\r\n\r\nthree\rfour\n\n", name="a.txt")
    assert got == Extracted("text/plain", None, "one\ntwo\n\nthree\nfour", False, False, None)


def test_yaml_is_plain_text():
    got = extract(b"name: ferry\nitems:\n  - one\n", name="c.yml")
    assert (got.media_type, got.title, got.text) == ("text/yaml", None, "name: ferry\nitems:\n  - one")


MARKDOWN = """\
Intro line before the title.

# Ferry *storage* replication #

Some **bold**, _emphasis_ and `inline_code` with a [link text](https://example.com/x "t") and
an image ![a diagram](img/d.png) plus <span class="x">inline html</span> and <https://ferry.dev>.

- first **item**
* second item
1. numbered item
- [x] done task

> quoted *words*
> > nested quote

| Name | Size |
|:-----|-----:|
| a.txt | 10 |

```python
def f(x):  # *not* emphasis
    return x * 2
```

***

Snake_case_names, 2 * 3 and \\*escaped stars\\* stay. [ref link][r1]

[r1]: https://example.com/ref "Title"
## Second heading
"""

MARKDOWN_TEXT = """\
Intro line before the title.

Ferry storage replication

Some bold, emphasis and inline_code with a link text and
an image a diagram plus inline html and https://ferry.dev.

first item
second item
numbered item
done task

quoted words
nested quote

Name; Size
a.txt; 10

def f(x):  # *not* emphasis
    return x * 2

Snake_case_names, 2 * 3 and *escaped stars* stay. ref link

Second heading"""


def test_markdown_keeps_the_prose_and_drops_the_markup():
    got = extract(MARKDOWN.encode(), name="README.md")
    assert got.media_type == "text/markdown"
    assert got.title == "Ferry storage replication"
    assert got.text == MARKDOWN_TEXT


def test_a_setext_heading_is_a_title_but_a_rule_after_a_list_is_not():
    data = b"- item\n---\n\nProject   Ferry\n=============\n\nBody text.\n\nSub\n---\n"
    got = extract(data, media_type="text/markdown")
    assert got.title == "Project Ferry"
    assert got.text == "item\n\nProject   Ferry\n\nBody text.\n\nSub"


def test_markdown_front_matter_gives_the_title_and_stays_searchable():
    got = extract(b'---\ntitle: "From the front"\ntags: [a, b]\n---\n# Heading\n\nText.\n', name="post.md")
    assert got.title == "From the front"
    assert got.text == 'title: "From the front"\ntags: [a, b]\n\nHeading\n\nText.'


def test_markdown_without_a_heading_has_no_title():
    assert extract(b"just *prose*\n", name="x.md").title is None


# --- HTML --------------------------------------------------------------------------------

PAGE = b"""<!DOCTYPE html>
<html><head>
  <title>
    Ferry &amp; friends
  </title>
  <style>body { color: red }</style>
  <script>var hidden = "<p>not text</p>";</script>
  <meta name="description" content="ignored">
</head>
<body>
  <noscript>Enable JavaScript</noscript>
  <template><p>template text</p></template>
  <svg><title>icon title</title><text>svg text</text></svg>
  <h1>Welcome&nbsp;aboard</h1>
  <p>First   paragraph
     with a <a href="/x">link</a> &lt;tag&gt; &#233;t&eacute;.</p>
  <ul><li>one</li><li>two</li></ul>
  <table><tr><th>Name</th><th>Size</th></tr><tr><td>a</td><td>10</td></tr></table>
  <div>line<br>break<br/>again</div>
  <pre>  keep
  lines</pre>
  <script type="module">import("x")</script>
</body></html>
"""


def test_html_keeps_the_visible_text_and_the_title():
    got = extract(PAGE, name=CID)
    assert got.media_type == "text/html"
    assert got.title == "Ferry & friends"
    assert got.text == ("Welcome aboard\n\nFirst paragraph with a link <tag> été.\n\none\ntwo\n\nName Size\na 10\n\n"
                        "line\nbreak\nagain\n\nkeep\nlines")


def test_html_without_a_closing_head_still_has_a_body():
    got = extract(b"<html><head><title>T</title><body><p>Body words</p>", media_type="application/xhtml+xml")
    assert (got.media_type, got.title, got.text) == ("application/xhtml+xml", "T", "Body words")


def test_a_long_html_title_is_collapsed_and_capped():
    got = extract(b"<title>" + b"word\n  " * 100 + b"</title><p>x</p>", media_type="text/html")
    assert got.title == ("word " * 60).strip()
    assert len(got.title) <= 300


# --- JSON and NDJSON ---------------------------------------------------------------------

def test_json_becomes_one_line_per_value_with_dotted_keys():
    doc = (b'{"name": "Alice", "address": {"city": "Paris", "zip": null}, "age": 31, "active": true, '
           b'"items": [{"sku": "X1", "tags": ["red", "big"]}, {"sku": "X2"}], "note": "two\\n  lines", "empty": []}')
    got = extract(doc, name="person.json")
    assert got.media_type == "application/json"
    assert got.title == "Alice"
    assert got.text == ("name: Alice\naddress.city: Paris\nage: 31\nactive: true\nitems.sku: X1\nitems.tags: red\n"
                        "items.tags: big\nitems.sku: X2\nnote: two lines")


def test_a_json_title_comes_before_a_name_and_must_be_a_string():
    assert extract(b'{"name": "n", "title": "t"}', media_type="application/json").title == "t"
    assert extract(b'{"title": 5, "name": "n"}', media_type="application/json").title == "n"
    assert extract(b'[{"title": "nested"}]', media_type="application/json").title is None


def test_json_suffix_types_are_json():
    got = extract(b'{"@type": "Person", "name": "Bo"}', media_type="application/ld+json")
    assert got.text == "@type: Person\nname: Bo"


def test_invalid_json_is_plain_text():
    got = extract(b'{"broken": ', media_type="application/json")
    assert (got.media_type, got.text, got.metadata_only) == ("text/plain", '{"broken":', False)


def test_ndjson_records_are_separated_by_a_blank_line():
    got = extract(b'{"event": "put", "key": "a"}\n\nnot json\n{"event": "delete"}\n', name="log.jsonl")
    assert got.media_type == "application/x-ndjson"
    assert got.text == "event: put\nkey: a\n\nnot json\n\nevent: delete"


# --- CSV ---------------------------------------------------------------------------------

def test_csv_rows_pair_values_with_the_header():
    data = b'name,city,age\nAlice,"Paris, France",30\nBob,,25\n\nCarol,Oslo,41,extra\n'
    got = extract(data, name="people.csv")
    assert (got.media_type, got.title) == ("text/csv", None)
    assert got.text == ("name: Alice; city: Paris, France; age: 30\nname: Bob; age: 25\n"
                        "name: Carol; city: Oslo; age: 41; extra")


@pytest.mark.parametrize(("data", "kwargs"), [
    (b"name\tcity\nAlice\tParis\n", {"name": "people.tsv"}),
    (b"name\tcity\nAlice\tParis\n", {"media_type": "text/csv"}),
    (b"name;city\nAlice;Paris\n", {"media_type": "text/csv"}),
])
def test_csv_delimiters_are_sniffed_or_known(data, kwargs):
    assert extract(data, **kwargs).text == "name: Alice; city: Paris"


def test_csv_without_a_header_gives_the_values():
    got = extract(b"1,2.5,3\n4,5,6\n", media_type="text/csv")
    assert got.text == "1; 2.5; 3\n4; 5; 6"


def test_a_csv_field_too_large_for_the_csv_module_is_plain_text():
    data = b'a,b\n"' + b"x" * 200_000 + b'",1\n'
    got = extract(data, media_type="text/csv")
    assert got.media_type == "text/plain"
    assert got.text.startswith('a,b\n"xxx')


# --- PDF ---------------------------------------------------------------------------------

def test_pdf_text_is_the_pages_text():
    got = extract(make_pdf("Hello PDF world\nsecond line", "Page two"), name=CID)
    assert got == Extracted("application/pdf", None, "Hello PDF world\nsecond line\n\nPage two", False, False, None)


def test_pdf_title_comes_from_its_metadata():
    got = extract(rewrite_pdf(make_pdf("Body"), title="  Quarterly\n  Report "), name="q.pdf")
    assert (got.title, got.text) == ("Quarterly Report", "Body")


def test_a_pdf_head_is_not_parsed():
    got = extract(make_pdf("Body")[:500], name="big.pdf", complete=False)
    assert got == Extracted("application/pdf", None, "", True, False,
                            "PDF larger than the read limit (500 bytes): its text was not extracted; "
                            "indexed by name and metadata only")
    assert "(16 MiB)" in extract(b"%PDF-1.7\n" + b"\0" * (16 * 2**20 - 9), complete=False).reason


@pytest.mark.parametrize("data", [b"%PDF-1.4\nthis is not a pdf", make_pdf("Body")[:200]])
def test_a_corrupt_pdf_is_metadata_only_with_the_error(data):
    got = extract(data, media_type="application/pdf")
    assert got.metadata_only and got.text == ""
    assert got.reason.startswith("PDF could not be parsed: ")
    assert len(got.reason) > len("PDF could not be parsed: ")


def test_a_pdf_without_a_text_layer_keeps_its_title():
    got = extract(rewrite_pdf(make_pdf(""), title="Scan 7"))
    assert got == Extracted("application/pdf", "Scan 7", "", True, False,
                            "PDF has no text layer (scanned?): indexed by name and metadata only")


def test_an_encrypted_pdf_is_read_only_without_a_user_password():
    locked = extract(rewrite_pdf(make_pdf("Secret words"), password="secret"))
    assert locked == Extracted("application/pdf", None, "", True, False,
                               "PDF is encrypted with a password: indexed by name and metadata only")
    assert extract(rewrite_pdf(make_pdf("Open words"), password="")).text == "Open words"


def test_a_pdf_declared_as_text_is_still_a_pdf():
    assert extract(make_pdf("Hello"), media_type="text/plain").text == "Hello"


def test_a_missing_pypdf_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pypdf", None)
    with pytest.raises(ImportError, match="pip install pypdf"):
        extract(make_pdf("Hello"))


# --- binary content ----------------------------------------------------------------------

def test_binary_content_is_indexed_by_name_and_metadata_only():
    assert extract(PNG, name=CID) == Extracted("image/png", None, "", True, False,
                                               "binary content (image/png): indexed by name and metadata only")
    assert extract(b"looks like text", media_type="image/jpeg").reason == \
        "binary content (image/jpeg): indexed by name and metadata only"
    assert extract(b"\x1f\x8b\x08\x00compressed", name="notes.txt").media_type == "application/gzip"
    assert extract(b"", media_type="audio/mpeg").metadata_only


# --- limits ------------------------------------------------------------------------------

def test_max_chars_cuts_at_whitespace():
    got = extract(b"alpha beta gamma delta", max_chars=13)
    assert got == Extracted("text/plain", None, "alpha beta", False, True, "text cut at 13 characters")
    assert extract(b"alpha beta gamma", max_chars=10).text == "alpha beta"


def test_max_chars_cuts_hard_without_whitespace_near_the_end():
    got = extract(b"x" * 500 + b" tail", max_chars=300)
    assert (got.text, got.truncated) == ("x" * 300, True)


def test_max_chars_stops_structured_formats_early():
    doc = b"[" + b",".join(b'{"word": "w%d"}' % i for i in range(10_000)) + b"]"
    got = extract(doc, media_type="application/json", max_chars=50)
    assert got.truncated and got.reason == "text cut at 50 characters"
    assert got.text.startswith("word: w0\nword: w1\n")
    assert len(got.text) <= 50


def test_max_chars_must_be_positive():
    with pytest.raises(ValueError, match="max_chars"):
        extract(b"x", max_chars=0)


def test_a_head_of_text_drops_its_last_partial_line():
    got = extract(b"line one\nline two\nline thr", name="a.txt", complete=False)
    assert got == Extracted("text/plain", None, "line one\nline two", False, True,
                            "only the first 26 bytes were read")


def test_a_head_cut_inside_a_character_is_still_text():
    got = extract("one line, café".encode()[:-1], complete=False)
    assert (got.text, got.truncated, got.metadata_only) == ("one line, caf", True, False)


def test_both_reasons_are_given():
    got = extract(b"alpha beta gamma\nnext", complete=False, max_chars=12)
    assert (got.text, got.reason) == ("alpha beta", "only the first 21 bytes were read; text cut at 12 characters")


def test_a_head_of_ndjson_keeps_its_whole_records():
    got = extract(b'{"a": 1}\n{"a": 2}\n{"a": ', name="x.ndjson", complete=False)
    assert (got.text, got.truncated) == ("a: 1\n\na: 2", True)


# --- hostile input -----------------------------------------------------------------------

def test_deeply_nested_json_does_not_raise():
    deep = b"[" * 10_000 + b"]" * 10_000
    for kwargs in ({}, {"media_type": "application/json"}, {"name": "x.ndjson"}):
        got = extract(deep, **kwargs)
        assert not got.metadata_only
    nested = b'{"top": "shallow", "deep": ' + b'{"k": ' * 200 + b'"bottom"' + b"}" * 200 + b"}"
    assert extract(nested, media_type="application/json").text == "top: shallow"


def test_nul_bytes_never_reach_the_text():
    got = extract(b"hello world " * 20 + b"\x00\x00", media_type="text/plain")
    assert "\x00" not in got.text and got.text.startswith("hello world")
    assert extract(b"a\x00b\x00c\x00d\x00", media_type="text/plain").metadata_only
    assert "\x00" not in extract(b"<title>a\x00b</title>" + b"<p>text</p>" * 20, media_type="text/html").title


@pytest.mark.parametrize("media_type", [None, "text/plain", "text/markdown", "text/html", "application/json",
                                        "application/x-ndjson", "text/csv", "text/tab-separated-values",
                                        "application/pdf", "text/plain; charset=utf-16"])
@pytest.mark.parametrize("data", [
    b"\xff\xfe\xfd invalid utf-8 \xc3\x28 \xa0\xa1",
    b"\xc3",
    b"",
    b"\x00" * 64,
    b"<![foo bar <p>x</p>",
    b'<a b="' * 100 + b"<!--",
    b"`" * 1000 + b"![" * 1000 + b"*_" * 1000,
    b"\xef\xbb\xbf" + b"{" * 5000,
])
def test_hostile_input_gives_a_result(media_type, data):
    for complete in (True, False):
        got = extract(data, media_type=media_type, complete=complete, max_chars=1000)
        assert isinstance(got, Extracted) and "\x00" not in got.text
        assert not got.metadata_only or (got.text == "" and got.reason)


@pytest.mark.parametrize(("media_type", "data"), [
    ("text/html", b"<a" * 100_000),
    ("text/html", b"<!--" * 50_000),
    ("text/markdown", b"![" * 100_000 + b"\n" + b"`" * 200_000 + b"\n" + b"<a" * 100_000),
])
def test_huge_malformed_lines_stay_fast(media_type, data):
    start = time.monotonic()
    got = extract(data, media_type=media_type)
    assert not got.metadata_only
    assert time.monotonic() - start < 10  # linear work: well under a second; quadratic: minutes


def test_the_result_is_frozen_and_versioned():
    got = extract(b"x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.text = "y"  # type: ignore[misc]
    assert EXTRACTOR_VERSION == 1
