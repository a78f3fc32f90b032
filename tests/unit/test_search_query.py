"""Search pieces that need no model: the web-search syntax for FTS5, rank fusion,
chunking, and the text and filter queries on SQLite (the embedded catalog)."""

from __future__ import annotations

import pytest

from ferry.search.embed import chunk
from ferry.search.query import Hit, fts5_query, fuse


@pytest.mark.parametrize("q, want", [
    ("tomato", '"tomato"'),
    ("how to prune roses", '"prune" AND "roses"'),
    ('"steady watering" tomatoes', '"steady watering" AND "tomatoes"'),
    ("kestrel or falcon", '("kestrel" OR "falcon")'),
    ("sail -motor", '"sail" NOT "motor"'),
    ("sail -motor -engine", '"sail" NOT ("motor" OR "engine")'),
    ("XR-7731", '"XR 7731"'),
    ('say "hi', '"say" AND "hi"'),
    ('a "b" OR c', '("b" OR "c")'),
    ("the and of", None),
    ("-only", None),
    ('"', None),
    ('quote"inside', '"quote inside"'),
])
def test_websearch_syntax_becomes_an_fts5_query(q, want):
    assert fts5_query(q) == want


def test_fusion_ranks_by_reciprocal_rank_with_weight():
    text = [Hit(1, text_rank=1, text_chunk=10), Hit(2, text_rank=2, text_chunk=20)]
    vec = [Hit(2, vector_rank=1, vector_chunk=21), Hit(3, vector_rank=2, vector_chunk=30)]
    fused = fuse(text, vec, 0.5)
    assert [h.object_id for h in fused] == [2, 1, 3]  # in both lists beats first in one
    assert fused[0].score == pytest.approx(0.5 / 62 + 0.5 / 61)
    assert (fused[0].text_chunk, fused[0].vector_chunk) == (20, 21)
    assert [h.object_id for h in fuse(text, vec, 0.0)][:2] == [1, 2]   # text only
    assert [h.object_id for h in fuse(text, vec, 1.0)][:2] == [2, 3]   # vectors only


def test_chunks_overlap_and_cover_every_word():
    words = [f"w{i}" for i in range(100)]
    chunks = chunk(" ".join(words), words=30, overlap=5)
    assert chunks[0].split() == words[:30]
    assert chunks[1].split()[:5] == words[25:30]
    assert [w for c in chunks for w in c.split()][-1] == "w99"
    covered = {w for c in chunks for w in c.split()}
    assert covered == set(words)
    assert all(len(c.split()) <= 30 for c in chunks)
    assert chunk("", words=30, overlap=5) == []
    assert chunk("one two", words=30, overlap=5) == ["one two"]


def test_filters_built_from_a_request_with_nothing_set_are_empty():
    # The API passes lists: an unfiltered search must not take the filtered path (which
    # lists every allowed chunk id: 200 ms at 100 000 chunks, seen in bench/search.py).
    from ferry.search.query import Filters

    assert Filters(tags=[], media_types=[], metadata={}, backends=[], readable=None).empty
    assert not Filters(tags=["a"]).empty
    assert not Filters(readable=[]).empty  # a caller who may read nothing sees nothing
