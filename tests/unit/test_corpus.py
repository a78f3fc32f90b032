"""The search test corpus (tests/fixtures/corpus.py) keeps its own promises."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sqlite3
import time
from html import escape

import pytest

from tests.fixtures import corpus

SEEDS = (7, 11)
EXTENSIONS = {"text/plain": "txt", "text/markdown": "md", "text/html": "html", "application/json": "json",
              "text/csv": "csv"}
# Postgres's english.stop (the Snowball list).
_STOPWORD_TEXT = (
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers "
    "herself it its itself they them their theirs themselves what which who whom this that these those am is "
    "are was were be been being have has had having do does did doing a an the and but if or because as until "
    "while of at by for with about against between into through during before after above below to from up "
    "down in out on off over under again further then once here there when where why how all any both each "
    "few more most other some such no nor not only own same so than too very s t can will just don should now"
)
STOPWORDS = frozenset(_STOPWORD_TEXT.split())


def stem(word: str) -> str:
    """A rough English stemmer, more eager than Porter's: it conflates more, so no less is caught."""
    w = word.lower()
    for suffix, repl in (("ational", "ate"), ("ization", "ize"), ("iveness", "ive"), ("fulness", "ful"),
                         ("ations", ""), ("ation", ""), ("ments", ""), ("ment", ""), ("ness", ""), ("ingly", ""),
                         ("edly", ""), ("ings", ""), ("ing", ""), ("ions", ""), ("ion", ""), ("ies", "i"),
                         ("ied", "i"), ("ers", ""), ("er", ""), ("ed", ""), ("es", ""), ("ly", ""), ("s", "")):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3 and not w.endswith("ss"):
            w = w[: len(w) - len(suffix)] + repl
            break
    if w.endswith("y"):
        w = w[:-1] + "i"
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]
    if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "aeioulsz":
        w = w[:-1]
    return w


def content_stems(text: str) -> set[str]:
    return {stem(w) for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in STOPWORDS}


def everything(doc: corpus.Doc) -> str:
    """All that an indexer might index: key, tags, title, the raw bytes with their markup, and the text.
    (Raw JSON alone would not do: "\\n\\nWord" tokenizes as "n", "nword".)"""
    return " ".join([doc.key, *doc.tags, doc.title, doc.body.decode(), doc.text()])


@pytest.fixture(scope="module", params=SEEDS)
def built(request):
    seed = request.param
    docs = corpus.documents(corpus.BASE_SIZE + 30, seed)  # past 300: filler that answers nothing
    return docs, corpus.queries(seed)


def test_stemmer_conflates_what_porter_does():
    for a, b in [("tomatoes", "tomato"), ("splitting", "split"), ("keeps", "keeping"), ("dropping", "drop"),
                 ("remedies", "remedy"), ("headaches", "headache"), ("pictures", "picture"), ("retirement", "retire"),
                 ("saving", "save"), ("queries", "query"), ("tipped", "tips"), ("eruption", "erupt"),
                 ("happens", "happen"), ("getting", "get"), ("tuning", "tune")]:
        assert stem(a) == stem(b), (a, b)


def test_deterministic_and_prefix_stable():
    assert corpus.documents(300, 7) == corpus.documents(300, 7)
    assert corpus.queries(7) == corpus.queries(7)
    assert corpus.documents(320, 7)[:300] == corpus.documents(300, 7)
    assert corpus.documents(40, 7) == corpus.documents(300, 7)[:40]
    assert corpus.documents(300, 8) != corpus.documents(300, 7)
    assert [q.text for q in corpus.queries(8)] == [q.text for q in corpus.queries(7)]


def test_generation_is_fast():
    best = min(_timed(corpus.documents, 300, seed) for seed in (21, 22, 23))
    assert best < 0.5, best  # ~0.05 s on an idle core; the bound leaves room for a busy machine


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def test_documents(built):
    docs, _ = built
    keys = [d.key for d in docs]
    assert len(set(keys)) == len(keys)
    long = 0
    for d in docs:
        assert d.topic in corpus.TOPICS
        assert re.fullmatch(rf"corpus/{d.topic}/\d{{4}}\.{EXTENSIONS[d.media_type]}", d.key), d.key
        assert d.tags[0] == d.topic and set(d.tags[1:]) <= {"review", "draft"}, d.tags
        words = len(d.text().split())
        if words > 400:
            long += 1
            assert 1300 <= words <= 1800, (d.key, words)
        else:
            assert words >= 60, (d.key, words)
    assert 3 <= long <= 10
    assert {d.topic for d in docs} == set(corpus.TOPICS) and len(corpus.TOPICS) == 15
    counts = {m: sum(d.media_type == m for d in docs) for m in EXTENSIONS}
    assert all(counts.values()), counts
    assert counts["text/plain"] + counts["text/markdown"] > len(docs) / 2, counts
    assert sum(len(d.tags) > 1 for d in docs) > 10


def test_media_types_parse(built):
    docs, _ = built
    for d in docs:
        s = d.body.decode("utf-8")
        text = d.text()
        assert text.startswith(d.title + "\n\n"), d.key
        if d.media_type == "application/json":
            obj = json.loads(s)
            assert obj["title"] == d.title and obj["topic"] == d.topic and obj["tags"] == list(d.tags)
            assert isinstance(obj["text"], str) and len(obj["text"]) > 200
        elif d.media_type == "text/csv":
            rows = list(csv.reader(io.StringIO(s)))
            assert rows[0] == ["part", "text"] and rows[1] == ["title", d.title]
            assert len(rows) > 2 and all(len(r) == 2 for r in rows)
        elif d.media_type == "text/html":
            assert s.startswith("<!DOCTYPE html>")
            assert f"<title>{escape(d.title)}</title>" in s and "<p>" in s and s.rstrip().endswith("</html>")
        elif d.media_type == "text/markdown":
            assert s.startswith(f"# {d.title}\n\n")
        else:
            assert s.startswith(f"{d.title}\n\n")


def test_queries_answered(built):
    docs, qs = built
    keys = {d.key for d in docs}
    kinds = [q.kind for q in qs]
    assert len(qs) == 36 and {k: kinds.count(k) for k in set(kinds)} == {"lexical": 12, "semantic": 12, "mixed": 12}
    assert len({q.text for q in qs}) == 36
    sizes = {"lexical": (1, 3), "semantic": (2, 5), "mixed": (2, 3)}
    for q in qs:
        assert q.relevant <= keys, q.text
        lo, hi = sizes[q.kind]
        assert lo <= len(q.relevant) <= hi, q
        assert all(k.startswith("corpus/") for k in q.relevant)
    assert set(corpus.KEY_TERMS) == {q.text for q in qs if q.kind != "semantic"}


def test_semantic_queries_share_no_content_word_with_their_answers(built):
    docs, qs = built
    by_key = {d.key: d for d in docs}
    for q in qs:
        if q.kind != "semantic":
            continue
        words = content_stems(q.text)
        assert words, q.text
        for key in q.relevant:
            shared = words & content_stems(everything(by_key[key]))
            assert not shared, (q.text, key, shared)
        # and every answer is about the query's topic: all answers share one
        assert len({by_key[k].topic for k in q.relevant}) == 1


def test_full_text_search_misses_semantic_answers_and_finds_only_near_misses(built):
    """With SQLite FTS5's Porter stemmer, stopwords dropped and terms OR-ed: no answer matches, and at
    most three documents do (near-duplicate distractors of the same topic among them)."""
    docs, qs = built
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.execute("CREATE VIRTUAL TABLE f USING fts5(key UNINDEXED, body, tokenize='porter unicode61')")
        db.executemany("INSERT INTO f VALUES (?, ?)", [(d.key, everything(d)) for d in docs])
        topic_of = {d.key: d.topic for d in docs}
        for q in qs:
            terms = [w for w in re.findall(r"\w+", q.text.lower()) if w not in STOPWORDS]
            expr = " OR ".join(f'"{w}"' for w in terms)
            hits = {k for (k,) in db.execute("SELECT key FROM f WHERE f MATCH ?", (expr,))}
            if q.kind == "semantic":
                assert not hits & q.relevant, (q.text, hits & q.relevant)
                assert 1 <= len(hits) <= 3, (q.text, sorted(hits))
                topic = topic_of[next(iter(q.relevant))]
                assert any(topic_of[k] == topic for k in hits), (q.text, sorted(hits))
            else:
                assert q.relevant <= hits, (q.text, q.relevant - hits)


def test_needles_and_distinctive_terms_occur_only_in_their_answers(built):
    docs, qs = built
    texts = {d.key: everything(d).lower() for d in docs}
    for q in qs:
        if q.kind == "semantic":
            continue
        term = corpus.KEY_TERMS[q.text]
        assert term.lower() in q.text.lower()
        pattern = re.compile(rf"(?<![\w-]){re.escape(term.lower())}(?!-?\d)")
        having = {k for k, t in texts.items() if pattern.search(t)}
        assert having == q.relevant, (q.text, having ^ q.relevant)
        if q.kind == "lexical":  # a made-up name: not even as part of a longer word elsewhere
            assert {k for k, t in texts.items() if term.lower() in t} == q.relevant, q.text


def test_long_documents_hide_some_needles_past_the_first_chunk(built):
    docs, qs = built
    by_key = {d.key: d for d in docs}
    deep = 0
    for q in qs:
        if q.kind == "lexical":
            for key in q.relevant:
                words = by_key[key].text().split()
                first = next(i for i, w in enumerate(words) if corpus.KEY_TERMS[q.text].lower() in w.lower())
                deep += first > 400
    assert deep >= 2
