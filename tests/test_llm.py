"""Tests of the LLM client, batch runner and disk cache, over real HTTP to a loopback server."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random

import pytest

from snip_lens.llm import (DiskCache, LLMConfig, LLMError, OpenAIChatClient, backoff_delay, run_all)
from snip_lens.loopback import LoopbackServer

KEY = "sk-test-loopback-SECRET-0123456789"


def fast_config(srv: LoopbackServer, **kw) -> LLMConfig:
    base = dict(model="loopback-model", base_url=srv.base_url, api_key_env="SNIP_TEST_KEY", timeout=0.5,
                backoff_base=0.005, backoff_max=0.02, max_retries=3, concurrency=8)
    base.update(kw)
    return LLMConfig(**base)


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("SNIP_TEST_KEY", KEY)


def msg(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# -- config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, needle", [
    (dict(temperature=3.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(concurrency=0), "concurrency"),
    (dict(max_retries=-1), "max_retries"), (dict(timeout=0), "timeout"), (dict(max_tokens=0), "max_tokens"),
    (dict(model=""), "model"), (dict(api_key_env=""), "api_key_env"),
])
def test_config_validation_names_the_bad_value(kw, needle):
    args = dict(model="m")
    args.update(kw)
    with pytest.raises(ValueError, match=needle):
        LLMConfig(**args)


def test_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("SNIP_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="SNIP_NO_SUCH_KEY"):
        OpenAIChatClient(LLMConfig(model="m", api_key_env="SNIP_NO_SUCH_KEY"))


def test_key_not_in_repr_or_config(key_env):
    c = OpenAIChatClient(LLMConfig(model="m", api_key_env="SNIP_TEST_KEY"))
    assert KEY not in repr(c)
    assert KEY not in json.dumps(c.config.to_json())
    assert KEY not in repr(vars(c).get("config"))


# -- backoff ------------------------------------------------------------------------------------------

def test_backoff_is_exponential_with_jitter_and_capped():
    rng = random.Random(0)
    for attempt in range(8):
        d = min(10.0, 0.5 * 2 ** attempt)
        vals = [backoff_delay(attempt, 0.5, 10.0, rng) for _ in range(200)]
        assert all(d / 2 <= v <= d for v in vals)
        assert max(vals) - min(vals) > d / 4  # really jittered
    assert backoff_delay(30, 1.0, 5.0, rng) <= 5.0


# -- client over HTTP ---------------------------------------------------------------------------------

def test_generate_and_embed_roundtrip(key_env):
    with LoopbackServer(api_key=KEY) as srv:
        c = OpenAIChatClient(fast_config(srv))
        out = run_all([c.generate(msg(f"a\t0\n w{i}\t10")) for i in range(5)], progress=False)
        assert out == [f" the token 'w{i}' in text." for i in range(5)]
        texts = ["alpha", "beta", "gamma"]
        (vecs,) = run_all([c.embed(texts, "text-embedding-3-small")], progress=False)
        for t, v in zip(texts, vecs):  # brute-force the server's deterministic vectors
            h = hashlib.sha256(t.encode()).digest()
            assert v == pytest.approx([(h[j % len(h)] - 127.5) / 127.5 for j in range(16)])
        assert srv.stats.auth_headers == {f"Bearer {KEY}"}


def test_dummy_key_for_keyless_servers():
    with LoopbackServer() as srv:
        c = OpenAIChatClient(fast_config(srv, api_key_env=None))
        assert run_all([c.generate(msg("x\t10"))], progress=False) == [" the token 'x' in text."]
        assert srv.stats.auth_headers == {"Bearer EMPTY"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retryable_faults_are_retried_until_exhausted(key_env, seed):
    with LoopbackServer(fault_rate=1.0, seed=seed, hang_seconds=0.6,
                        fault_kinds=("429", "500", "timeout")) as srv:
        c = OpenAIChatClient(fast_config(srv, max_retries=2, timeout=0.2))
        (res,) = run_all([c.generate(msg("x\t10"))], progress=False, return_exceptions=True)
        assert isinstance(res, LLMError), res
        assert res.attempts == 3 and res.retryable
        assert srv.stats.requests == 3
        assert sum(srv.stats.faults.values()) == 3


def test_malformed_bodies_are_retried_then_succeed(key_env):
    # 50% faults of kind "garbage": bodies that are not JSON / lack choices are retried like 5xx; a
    # well-formed but meaningless answer is returned as is (the explainer's parser rejects it).
    with LoopbackServer(fault_rate=0.5, seed=3, fault_kinds=("garbage",)) as srv:
        c = OpenAIChatClient(fast_config(srv, max_retries=6))
        out = run_all([c.generate(msg(f"y{i}\t10")) for i in range(30)], progress=False, return_exceptions=True)
        from snip_lens.loopback import GARBAGE_ANSWERS
        for i, o in enumerate(out):
            assert o == f" the token 'y{i}' in text." or o in GARBAGE_ANSWERS, o
        assert srv.stats.requests > 30  # some were retried


def test_other_4xx_is_not_retried(key_env):
    with LoopbackServer(api_key="another-key") as srv:  # -> 401 for our key
        c = OpenAIChatClient(fast_config(srv, max_retries=4))
        (res,) = run_all([c.generate(msg("x"))], progress=False, return_exceptions=True)
        assert isinstance(res, LLMError)
        assert res.status == 401 and not res.retryable and res.attempts == 1
        assert srv.stats.requests == 1
        # the server echoed the key in its 401 message; the error we keep must not carry it
        assert "Incorrect API key provided" in str(res) and KEY not in str(res) and "***" in str(res)
        assert c._scrub("Incorrect API key provided: sk-proj-ab12********wxyz.") == \
            "Incorrect API key provided: sk-***."  # OpenAI's own partial masking is masked fully
        assert res.__cause__ is None


def test_concurrency_is_bounded_by_the_semaphore(key_env):
    with LoopbackServer(latency=0.08) as srv:
        c = OpenAIChatClient(fast_config(srv, concurrency=3))
        run_all([c.generate(msg(f"t\t{i}")) for i in range(12)], progress=False)
        assert srv.stats.max_in_flight <= 3
        assert srv.stats.max_in_flight >= 2  # it did run concurrently


def test_client_survives_several_event_loops(key_env):
    with LoopbackServer() as srv:
        c = OpenAIChatClient(fast_config(srv))
        for _ in range(3):  # each run_all has its own loop; semaphore and httpx pool must follow
            assert run_all([c.generate(msg("q\t10"))], progress=False) == [" the token 'q' in text."]


# -- run_all ------------------------------------------------------------------------------------------

def test_run_all_keeps_order_and_can_return_exceptions():
    async def work(i: int) -> int:
        await asyncio.sleep(0.001 * (10 - i))
        if i == 3:
            raise RuntimeError("three")
        return i * i

    out = run_all(range(10), work, progress=False, return_exceptions=True)
    assert [o for i, o in enumerate(out) if i != 3] == [i * i for i in range(10) if i != 3]
    assert isinstance(out[3], RuntimeError)
    with pytest.raises(RuntimeError, match="three"):
        run_all(range(10), work, progress=False)

    class Bar:  # a shared bar advances over several calls and is left open
        n, closed = 0, False

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    bar = Bar()
    run_all(range(4, 10), work, bar=bar)
    run_all(range(4, 8), work, bar=bar)
    assert bar.n == 10 and not bar.closed


def test_run_all_inside_a_running_loop():
    async def outer():
        async def sq(i):
            return i * i
        return run_all(range(4), sq, progress=False)

    assert asyncio.run(outer()) == [0, 1, 4, 9]


# -- cache --------------------------------------------------------------------------------------------

def test_cache_key_is_canonical_and_complete():
    k = DiskCache.key(model="m", temperature=1.0, neuron=[1, 2], prompt_version="v1")
    assert k == DiskCache.key(prompt_version="v1", neuron=[1, 2], temperature=1.0, model="m")
    expected = hashlib.sha256(json.dumps({"model": "m", "neuron": [1, 2], "prompt_version": "v1",
                                          "temperature": 1.0}, sort_keys=True,
                                         separators=(",", ":")).encode()).hexdigest()
    assert k == expected
    for change in (dict(model="m2"), dict(temperature=0.5), dict(neuron=[1, 3]), dict(prompt_version="v2")):
        parts = dict(model="m", temperature=1.0, neuron=[1, 2], prompt_version="v1")
        parts.update(change)
        assert DiskCache.key(**parts) != k
    with pytest.raises(ValueError, match="api_key"):
        DiskCache.key(model="m", api_key="x")


def test_cache_put_get_atomic_and_sharded(tmp_path):
    c = DiskCache(tmp_path / "c")
    k = DiskCache.key(x=1)
    assert c.get(k) is None and k not in c and len(c) == 0
    c.put(k, {"explanation": "hello"})
    assert c.get(k) == {"explanation": "hello"} and k in c and len(c) == 1
    assert c.path(k) == tmp_path / "c" / k[:2] / f"{k}.json"
    assert [p.name for p in c.path(k).parent.iterdir()] == [f"{k}.json"]  # no temp files left
    c.path(k).write_text("{truncated")
    assert c.get(k) is None  # unreadable -> recomputed, not a crash
    with pytest.raises(ValueError, match="hex digest"):
        c.path("../../etc")
