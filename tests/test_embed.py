"""Tests of the embedders: the disk cache, width checks, the local MiniLM model's precision shortcuts."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from snip_lens.embed import (
    CachedEmbedder,
    Embedder,
    LocalEmbedder,
    OpenAIEmbedder,
    bf16_supported,
    get_embedder,
    normalize_rows,
)


class CountingEmbedder:
    """Deterministic hash vectors; records every batch it is asked to embed."""

    def __init__(self, dim: int = 8, name: str = "counting") -> None:
        self.dim = dim
        self.name = name
        self.calls: list[list[str]] = []

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest(), dtype=np.uint8)[: self.dim].astype(np.float32)
                - 127.5 for t in texts]
        return normalize_rows(np.array(rows).reshape(len(texts), self.dim))


def test_normalize_rows():
    x = normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert x.dtype == np.float32 and np.allclose(x, [[0.6, 0.8], [0, 0]])


def test_cached_embedder_dedups_and_reuses(tmp_path):
    inner = CountingEmbedder()
    emb = CachedEmbedder(inner, tmp_path)
    assert isinstance(emb, Embedder)
    texts = ["a", "b", "a", "c", "b"]
    v = emb.embed(texts)
    assert inner.calls == [["a", "b", "c"]]  # each distinct text once
    assert np.array_equal(v, inner.embed(texts))  # order preserved, duplicates filled in
    inner.calls.clear()
    v2 = emb.embed(["c", "d", "a"])
    assert inner.calls == [["d"]]
    assert np.array_equal(v2, inner.embed(["c", "d", "a"]))
    assert len(list(emb.root.glob("shard-*.npz"))) == 2  # one shard per call with new texts, not per text
    # a fresh process (new object) reads the shards instead of recomputing
    inner2 = CountingEmbedder()
    v3 = CachedEmbedder(inner2, tmp_path).embed(["a", "b", "c", "d"])
    assert inner2.calls == [] and np.array_equal(v3, inner.embed(["a", "b", "c", "d"]))
    # another embedder name gets its own namespace
    other = CountingEmbedder(name="other")
    CachedEmbedder(other, tmp_path).embed(["a"])
    assert other.calls == [["a"]]


def test_cached_embedder_empty(tmp_path):
    emb = CachedEmbedder(CountingEmbedder(dim=5), tmp_path)
    assert emb.embed([]).shape == (0, 5)
    with pytest.raises(ValueError, match="list of texts"):
        emb.embed("just a string")


class FakeEmbedClient:
    def __init__(self, width: int, widths: dict[str, int] | None = None) -> None:
        self.width = width
        self.widths = widths or {}
        self.batches: list[list[str]] = []

    async def embed(self, texts: list[str], model: str) -> list[list[float]]:
        self.batches.append(list(texts))
        return [[float(len(t) + j) for j in range(self.widths.get(t, self.width))] for t in texts]


def test_openai_embedder_wrong_width_names_both():
    emb = OpenAIEmbedder(FakeEmbedClient(384), "text-embedding-3-small", progress=False)
    assert emb.dim == 1536
    with pytest.raises(ValueError, match=r"width 384 .*expected 1536"):
        emb.embed(["hello"])


def test_openai_embedder_ragged_widths():
    emb = OpenAIEmbedder(FakeEmbedClient(4, {"b": 3}), "my-model", progress=False)
    with pytest.raises(ValueError, match=r"width \[3, 4\]"):
        emb.embed(["a", "b"])


def test_openai_embedder_batches_dedups_and_normalises():
    client = FakeEmbedClient(4)
    emb = OpenAIEmbedder(client, "my-model", batch_size=2, progress=False)
    v = emb.embed(["aa", "b", "aa", "ccc", "dddd"])
    assert sorted(map(tuple, client.batches)) == [("aa", "b"), ("ccc", "dddd")]
    assert v.shape == (5, 4) and emb.dim == 4
    assert np.allclose(np.linalg.norm(v, axis=1), 1) and np.array_equal(v[0], v[2])


def test_openai_embedder_over_http():
    from snip_lens.llm import LLMConfig
    from snip_lens.loopback import LoopbackServer

    with LoopbackServer(embed_dim=16) as srv:
        cfg = LLMConfig(model="chat", base_url=srv.base_url, api_key_env=None, max_retries=0)
        ok = OpenAIEmbedder(cfg, "loop-embed", dim=16, progress=False)
        assert ok.embed(["x", "y"]).shape == (2, 16)
        bad = OpenAIEmbedder(cfg, "text-embedding-3-small", progress=False)
        with pytest.raises(ValueError, match=r"width 16 .*expected 1536"):
            bad.embed(["x"])


def test_get_embedder_bad_spec():
    with pytest.raises(ValueError, match="unknown embedder 'bert'"):
        get_embedder("bert")
    with pytest.raises(ValueError, match="not a directory"):
        get_embedder("local:/no/such/dir")


@pytest.fixture(scope="module")
def minilm():
    return LocalEmbedder(precision="fp32", progress=False)


SENTENCES = [
    "the Python keyword 'def' and function definitions in Python source code",
    "the word 'the' in English prose",
    "the tokens 'self', '.', '_' in Python source code",
    "indentation whitespace and Python source code",
    "numbers and numeric data",
    "the words 'cat' and 'dog' in stories about animals",
]


def test_local_embedder_normalised_and_meaningful(minilm):
    v = minilm.embed(SENTENCES + SENTENCES[:2])
    assert v.shape == (8, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert np.array_equal(v[6], v[0])
    q = minilm.embed(["Python function definitions"])[0]
    sims = v[:6] @ q
    assert sims.argmax() == 0 and sims[0] > sims[1] + 0.2


@pytest.mark.skipif(not bf16_supported(), reason="CPU without native bfloat16")
def test_local_embedder_bf16_matches_fp32(minilm):
    fast = LocalEmbedder(precision="bf16", progress=False)
    assert fast.name != minilm.name  # different vectors -> different cache keys
    texts = SENTENCES + [f"the identifier 'var_{i}' and assignments in Python source code" for i in range(20)]
    ref = minilm.embed(texts)
    assert (fast.embed(texts) * ref).sum(1).min() >= 0.999
    fastest = LocalEmbedder(precision="bf16-weights", progress=False)
    assert len({fastest.name, fast.name, minilm.name}) == 3
    assert (fastest.embed(texts) * ref).sum(1).min() >= 0.99
    assert minilm.model is not fastest.model  # the fp32 model is not converted in place
