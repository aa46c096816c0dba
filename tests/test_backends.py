"""The backend seam: removable hooks on every TransformerLens version, device/dtype handling, the sync-free
collection path, and bf16 results within a stated tolerance of float32."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from snip_lens.backends import BridgeBackend, backend
from snip_lens.collect import collect
from snip_lens.corpus import make_windows
from snip_lens.evaluate import lm_metrics, prefix_cache
from snip_lens.mask import NeuronMask
from snip_lens.models import bridge_from_hf, hook_name, load_model, model_device, model_dtype, parse_dtype, to_tokens
from snip_lens.testing import SAMPLE_TEXTS, hook_state, tiny_hf_model, tiny_model, tiny_tokenizer

collect_mod = importlib.import_module("snip_lens.collect")
TEXTS = SAMPLE_TEXTS


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")




def _prose():
    import pydoc_data.topics

    t = pydoc_data.topics.topics
    return [t[k] for k in sorted(t)[:12]]


def test_backend_of_a_bridge_and_a_clear_error_for_other_objects(llama):
    be = backend(llama)
    assert isinstance(be, BridgeBackend) and backend(llama) is be
    assert (be.n_layers, be.d_mlp, be.d_vocab) == (3, 64, 512)
    assert be.device == torch.device("cpu") and be.dtype == torch.float32
    with pytest.raises(TypeError, match="TransformerBridge .* or HookedTransformer"):
        backend(torch.nn.Linear(2, 2))


def test_mask_removes_its_hooks_when_add_hook_returns_no_handle(llama, monkeypatch):
    """TransformerLens < 4.3 returns None from HookPoint.add_hook: the mask must still remove exactly its hooks."""
    from transformer_lens.hook_points import HookPoint

    original = HookPoint.add_hook

    def add_hook_returning_none(self, *args, **kwargs):
        original(self, *args, **kwargs)
        return None

    monkeypatch.setattr(HookPoint, "add_hook", add_hook_returning_none)
    tokens = to_tokens(llama, TEXTS)
    with torch.no_grad():
        base = llama(tokens)
    user_calls: list[int] = []
    llama.add_hook(hook_name(1), lambda act, hook: user_calls.append(1), is_permanent=True)
    try:
        state = hook_state(llama)
        mask = NeuronMask.from_neurons(llama, [(0, 3), (1, 7), (2, 9)])
        with mask.applied(llama):
            assert hook_state(llama) != state
        assert hook_state(llama) == state
        with pytest.raises(RuntimeError, match="boom"), mask.applied(llama):
            raise RuntimeError("boom")
        assert hook_state(llama) == state
        handle = mask.attach(llama)
        handle.remove()
        assert hook_state(llama) == state
        user_calls.clear()
        with torch.no_grad():
            out = llama(tokens)
        assert user_calls == [1]  # the user's permanent hook on the same point stayed
    finally:
        llama.reset_hooks(including_permanent=True)
    assert torch.equal(out, base)


@pytest.mark.parametrize("name,want", [("bf16", torch.bfloat16), ("float32", torch.float32),
                                       ("fp16", torch.float16), (torch.bfloat16, torch.bfloat16)])
def test_parse_dtype(name, want):
    assert parse_dtype(name) is want


def test_bad_dtype_and_device_raise_with_the_fix():
    with pytest.raises(ValueError, match="unknown dtype 'int8'.*bf16"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="unknown device"):
        load_model("smollm2-135m", device="warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            load_model("smollm2-135m", device="cuda")


def _bf16_model():
    hf = tiny_hf_model("llama").to(torch.bfloat16)
    return bridge_from_hf(hf, tiny_tokenizer(), name="tiny-llama")


def test_bf16_model_reports_its_dtype_and_runs():
    model = _bf16_model()
    assert model_dtype(model) == torch.bfloat16 and model_device(model) == torch.device("cpu")
    with torch.no_grad():
        assert model(to_tokens(model, TEXTS)).dtype == torch.bfloat16


def test_collect_in_bf16_equals_float32_within_tolerance(llama):
    """Stated tolerance: bf16 keeps 8 significant bits, so values agree within 3% of the neuron's largest
    |activation|, and the top-1 token is the same for at least 90% of neurons (the rest are near-ties)."""
    tw = make_windows(llama, _prose(), n_ctx=24, max_windows=8, seed=0)
    ref = collect(llama, tw, top_k=4, context=(2, 1), n_random=2, batch_size=4, progress=False)
    got = collect(_bf16_model(), tw, top_k=4, context=(2, 1), n_random=2, batch_size=4, progress=False)
    scale = ref.top_values[..., :1].abs().clamp(min=1e-3)  # (layer, neuron, 1)
    assert ((got.top_values - ref.top_values).abs() / scale).max() < 0.03
    same_top1 = (got.top_window[..., 0] == ref.top_window[..., 0]) & (got.top_pos[..., 0] == ref.top_pos[..., 0])
    assert same_top1.float().mean() >= 0.9
    a, b = ref.stats[tw.name or "records"], got.stats[tw.name or "records"]
    s = a.max.abs().clamp(min=1e-3)
    for f in ("mean", "mean_abs", "std"):
        assert ((getattr(b, f) - getattr(a, f)).abs() / s).max() < 0.03, f
    assert torch.equal(a.count, b.count)
    # The random records sample the same tokens whatever the dtype (seeded on the CPU); only a neuron whose
    # top-k changed can drop a different candidate.
    assert (got.random_window == ref.random_window).float().mean() >= 0.9


def test_lm_metrics_in_bf16_equal_float32_within_tolerance(llama):
    """Stated tolerance: loss within 1% relative, top-1 and top-10 accuracy within 0.03 absolute."""
    tokens = torch.randint(0, 512, (6, 24), generator=torch.Generator().manual_seed(0))
    ref = lm_metrics(llama, tokens, batch_size=4)
    model = _bf16_model()
    got = lm_metrics(model, tokens, batch_size=4)
    assert got["loss"] == pytest.approx(ref["loss"], rel=0.01)
    assert abs(got["top1"] - ref["top1"]) <= 0.03 and abs(got["top10"] - ref["top10"]) <= 0.03
    cache = prefix_cache(model, tokens, 1)
    assert cache.residual.dtype == torch.bfloat16
    assert lm_metrics(model, tokens, start_cache=cache, batch_size=4)["loss"] == pytest.approx(got["loss"], rel=1e-3)


def test_lm_metrics_upcast_in_chunks_equal_one_pass(llama, monkeypatch):
    tokens = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(1))
    one = lm_metrics(llama, tokens)
    monkeypatch.setattr(importlib.import_module("snip_lens.evaluate.lm"), "LOSS_CHUNK_ELEMENTS", 512 * 7)
    assert lm_metrics(llama, tokens)["loss"] == pytest.approx(one["loss"], rel=1e-6)


# ---- the sync-free (accelerator) collection path, run on the CPU -------------------------------------


def _force_sync_free(monkeypatch):
    init = collect_mod._State.__init__
    monkeypatch.setattr(collect_mod._State, "__init__",
                        lambda self, *a, **kw: init(self, *a, **{**kw, "sync_free": True}))


@pytest.mark.parametrize("n_random", [0, 3])
def test_sync_free_collection_equals_the_cpu_path_exactly(llama, monkeypatch, n_random):
    tw = make_windows(llama, _prose(), n_ctx=24, max_windows=9, seed=0)
    ref = collect(llama, tw, top_k=4, context=(3, 2), n_random=n_random, batch_size=2, progress=False)
    _force_sync_free(monkeypatch)
    got = collect(llama, tw, top_k=4, context=(3, 2), n_random=n_random, batch_size=2, progress=False)
    for name in ("top_values", "top_window", "top_pos", "random_values", "random_window", "random_pos"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    for name in ("top_context", "random_context"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=0, atol=0, equal_nan=True)
    for f in ("mean", "mean_abs", "std", "max", "freq_pos"):
        torch.testing.assert_close(getattr(got.stats[tw.name or "records"], f),
                                   getattr(ref.stats[tw.name or "records"], f), rtol=1e-6, atol=1e-7)


_SYNCING = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "numpy", "cpu")


@contextlib.contextmanager
def _no_host_sync(monkeypatch):
    """Every tensor operation that would wait for an accelerator (reading a value back) raises inside."""
    def refuse(name):
        def f(*a, **kw):
            raise AssertionError(f"host sync: Tensor.{name} called in the hot loop")
        return f

    with monkeypatch.context() as m:
        for name in _SYNCING:
            m.setattr(torch.Tensor, name, refuse(name))
        m.setattr(torch, "nonzero", refuse("nonzero"))
        m.setattr(torch, "unique", refuse("unique"))
        yield


def test_sync_free_hooks_never_read_a_value_back(llama, monkeypatch):
    """Off the CPU the hooks run without a host sync (at most the per-batch work outside them)."""
    tw = make_windows(llama, _prose(), n_ctx=24, max_windows=6, seed=0)
    _force_sync_free(monkeypatch)
    calls = {"n": 0}
    for meth in ("update_stats", "update_records"):
        orig = getattr(collect_mod._State, meth)

        def guarded(self, *a, _orig=orig, **kw):
            calls["n"] += 1
            with _no_host_sync(monkeypatch):
                return _orig(self, *a, **kw)

        monkeypatch.setattr(collect_mod._State, meth, guarded)
    collect(llama, tw, top_k=3, context=(2, 1), n_random=2, batch_size=2, progress=False)
    assert calls["n"] == 2 * 3 * 3  # two updates x three layers x three batches, all without a sync
