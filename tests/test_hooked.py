"""HookedTransformer (TransformerLens 2.x/3.x): masks, collection, metrics, CBT and generation, same guarantees.

These tests build a real ``HookedTransformer`` from a config (random weights, no download). TransformerLens
4.x has no ``HookedTransformer``, so in the main environment they skip; ``python3 dev.py test-hooked`` runs
them in a second environment with TransformerLens 3.x (where a skip is an error).
"""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch

try:
    from transformer_lens import HookedTransformer  # noqa: F401
    HAVE_HOOKED = True
except ImportError:
    HAVE_HOOKED = False

if not HAVE_HOOKED:
    if os.environ.get("SNIP_LENS_REQUIRE_HOOKED"):
        raise RuntimeError("SNIP_LENS_REQUIRE_HOOKED is set but this TransformerLens has no HookedTransformer")
    pytest.skip("TransformerLens 4.x has no HookedTransformer; run `python3 dev.py test-hooked`",
                allow_module_level=True)

from snip_lens.backends import HookedBackend, backend  # noqa: E402
from snip_lens.collect import collect  # noqa: E402
from snip_lens.corpus import make_windows  # noqa: E402
from snip_lens.evaluate import ToxicityConfig, build_cloze_items, cbt_accuracy, lm_metrics, prefix_cache  # noqa: E402
from snip_lens.evaluate.cbt import cbt_scores  # noqa: E402
from snip_lens.evaluate.toxicity import generate_samples  # noqa: E402
from snip_lens.mask import NeuronMask  # noqa: E402
from snip_lens.models import hook_name, to_tokens  # noqa: E402
from snip_lens.testing import SAMPLE_TEXTS, hook_state, reference_cbt_scores, tiny_hooked_model  # noqa: E402

TEXTS = SAMPLE_TEXTS
NEURONS = [(2, 5), (0, 1), (1, 63), (0, 40), (2, 0)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.lru_cache(maxsize=None)
def _model(arch: str):
    return tiny_hooked_model(arch)


@pytest.fixture(params=["gpt2", "llama"])
def arch(request):
    return request.param


def _tokens(model):
    return to_tokens(model, TEXTS)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)




def _prose():
    import pydoc_data.topics

    t = pydoc_data.topics.topics
    return [t[k] for k in sorted(t)[:12]]


def test_backend_is_hooked_and_add_hook_returns_none_here():
    model = _model("llama")
    assert isinstance(backend(model), HookedBackend)
    # The situation the mask must handle: this TransformerLens's HookPoint.add_hook returns no handle.
    point = model.hook_dict[hook_name(0)]
    ret = point.add_hook(lambda act, hook: None, dir="fwd")
    try:
        assert ret is None
    finally:
        model.reset_hooks(including_permanent=True)


# ---- masks ---------------------------------------------------------------------------------------------


def _weight_edited_logits(model, tokens, edits):
    """Reference: a copy of the model with the neurons' output weights (rows of W_out) multiplied by a factor."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for (layer, index), factor in edits.items():
            ref.blocks[layer].mlp.W_out[index, :] *= factor
        return ref(tokens)


def test_zero_and_scale_masks_equal_weight_edits(arch):
    model = _model(arch)
    tokens = _tokens(model)
    base = _logits(model, tokens)
    with NeuronMask.from_neurons(model, NEURONS).applied(model):
        zero = _logits(model, tokens)
    assert (zero - base).abs().max() > 1e-4
    torch.testing.assert_close(zero, _weight_edited_logits(model, tokens, {n: 0.0 for n in NEURONS}),
                               rtol=1e-5, atol=1e-5)
    factors = [0.5, 2.0, -1.0, 0.0, 3.0]
    with NeuronMask.from_neurons(model, NEURONS, mode="scale", values=factors).applied(model):
        scaled = _logits(model, tokens)
    torch.testing.assert_close(scaled, _weight_edited_logits(model, tokens, dict(zip(NEURONS, factors))),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(_logits(model, tokens), base)


def test_mean_mask_sets_activation_to_value(arch):
    model = _model(arch)
    tokens = _tokens(model)
    values = [1.5, -2.0, 0.25, 7.0, -0.5]
    mask = NeuronMask.from_neurons(model, NEURONS, mode="mean", values=values)
    with mask.applied(model), torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook_name(l) for l in range(3)])
    for (layer, index), v in zip(NEURONS, values):
        assert torch.all(cache[hook_name(layer)][..., index] == v), (layer, index)


def test_applied_restores_exact_state_on_exit_and_on_exception(arch):
    model = _model(arch)
    tokens = _tokens(model)
    base = _logits(model, tokens)
    state = hook_state(model)
    mask = NeuronMask.from_neurons(model, NEURONS)
    with mask.applied(model):
        assert hook_state(model) != state
        assert not torch.equal(_logits(model, tokens), base)
    assert hook_state(model) == state
    assert torch.equal(_logits(model, tokens), base)
    with pytest.raises(RuntimeError, match="boom"):
        with mask.applied(model):
            raise RuntimeError("boom")
    assert hook_state(model) == state
    assert torch.equal(_logits(model, tokens), base)


def test_attach_remove_out_of_order_user_hooks_and_tl_resets():
    model = _model("llama")
    tokens = _tokens(model)
    base = _logits(model, tokens)
    calls: list[str] = []
    name = hook_name(1)
    model.add_hook(name, lambda act, hook: calls.append("perm"), is_permanent=True)
    try:
        before = hook_state(model)
        a = NeuronMask.from_neurons(model, [(0, 1), (1, 2)])
        b = NeuronMask.from_neurons(model, [(1, 3), (2, 4)])
        with b.applied(model):
            only_b = _logits(model, tokens)
        ha, hb = a.attach(model), b.attach(model)
        both = _logits(model, tokens)
        # TransformerLens's own hook contexts reset non-permanent hooks; the masks stay.
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(hook_name(0), lambda act, hook: None)])
        assert torch.equal(_logits(model, tokens), both)
        ha.remove()
        assert torch.equal(_logits(model, tokens), only_b)
        hb.remove()
        hb.remove()  # idempotent
        assert hook_state(model) == before
        calls.clear()
        assert torch.equal(_logits(model, tokens), base)
        assert calls == ["perm"]
    finally:
        model.reset_hooks(including_permanent=True)


def test_save_load_roundtrip_applies_the_same(tmp_path):
    model = _model("gpt2")
    tokens = _tokens(model)
    mask = NeuronMask.from_neurons(model, NEURONS, mode="scale", values=[0.5, 2.0, -1.0, 0.0, 3.0])
    loaded = NeuronMask.load(mask.save(tmp_path / "m.safetensors"), model)
    assert loaded == mask and loaded.model_name == "tiny-hooked-gpt2"
    with mask.applied(model):
        a = _logits(model, tokens)
    with loaded.applied(model):
        assert torch.equal(_logits(model, tokens), a)


def test_export_refuses_a_hooked_transformer_clearly(tmp_path):
    from snip_lens.export import export_pruned

    model = _model("llama")
    with pytest.raises(ValueError, match="hooked backend has no Hugging Face model"):
        export_pruned(model, NeuronMask.from_neurons(model, [(0, 1)]), tmp_path / "out")


# ---- collection ----------------------------------------------------------------------------------------


def _brute_force(model, tw, layer, k):
    _, cache = model.run_with_cache(tw.tokens, names_filter=hook_name(layer))
    x = cache[hook_name(layer)].reshape(-1, model.cfg.d_mlp).float()
    order = [sorted(range(x.shape[0]), key=lambda r: (-float(x[r, n]), r))[:k] for n in range(x.shape[1])]
    return x, order


@pytest.mark.parametrize("sync_free", [False, True])
def test_collect_equals_run_with_cache(arch, sync_free, monkeypatch):
    model = _model(arch)
    tw = make_windows(model, _prose(), n_ctx=24, max_windows=7, seed=0, name="probe")
    if sync_free:  # the accelerator path, forced on the CPU
        from snip_lens import collect as _  # noqa: F401
        import importlib

        mod = importlib.import_module("snip_lens.collect")
        init = mod._State.__init__
        monkeypatch.setattr(mod._State, "__init__",
                            lambda self, *a, **kw: init(self, *a, **{**kw, "sync_free": True}))
    before = hook_state(model)
    rec = collect(model, tw, top_k=4, context=(3, 2), n_random=2, batch_size=3, progress=False)
    assert hook_state(model) == before
    for li, layer in enumerate(rec.layers):
        x, order = _brute_force(model, tw, layer, 4)
        for n in range(0, 64, 7):
            rows = [rec.top_window[li, n, j] * tw.n_ctx + rec.top_pos[li, n, j] for j in range(4)]
            assert [int(r) for r in rows] == order[n], (layer, n)
            torch.testing.assert_close(rec.top_values[li, n], x[order[n], n], atol=1e-5, rtol=0)
        st = rec.stats["probe"]
        torch.testing.assert_close(st.mean[li].double(), x.double().mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.max[li].double(), x.double().max(0).values, atol=1e-6, rtol=0)


# ---- metrics -------------------------------------------------------------------------------------------


def _random_tokens(n=5, pos=24, seed=0):
    return torch.randint(0, 512, (n, pos), generator=torch.Generator().manual_seed(seed))


def _reference_metrics(model, tokens):
    with torch.no_grad():
        logits = model(tokens)[:, :-1]
    target = tokens[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    ranks = (logits > logits.gather(-1, target[..., None])).sum(-1)
    return {"loss": float(loss), "top1": float((ranks == 0).float().mean()), "top10": float((ranks < 10).float().mean())}


def test_lm_metrics_equal_reference_with_and_without_mask(arch):
    model = _model(arch)
    tokens = _random_tokens()
    got, ref = lm_metrics(model, tokens, batch_size=2), _reference_metrics(model, tokens)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["top1"] == pytest.approx(ref["top1"]) and got["top10"] == pytest.approx(ref["top10"])
    mask = NeuronMask.from_neurons(model, [(1, i) for i in range(0, 64, 2)])
    masked = lm_metrics(model, tokens, mask=mask)
    with mask.applied(model):
        assert masked["loss"] == pytest.approx(_reference_metrics(model, tokens)["loss"], rel=1e-5)
    assert masked["loss"] != pytest.approx(got["loss"], rel=1e-6)
    assert not model.blocks[1].mlp.hook_post.fwd_hooks


@pytest.mark.parametrize("layer", [0, 2])
def test_prefix_cache_equals_full_forward_and_skips_lower_blocks(arch, layer):
    model = _model(arch)
    tokens = _random_tokens(n=3)
    cache = prefix_cache(model, tokens, layer, batch_size=2)
    mask = NeuronMask.from_neurons(model, [(2, 1), (2, 5), (2, 9)])
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        fast = lm_metrics(model, tokens, mask=mask, start_cache=cache, batch_size=2)
    finally:
        handle.remove()
    assert len(calls) == (2 if layer == 0 else 0)
    full = lm_metrics(model, tokens, mask=mask, batch_size=2)
    assert fast["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert fast["top1"] == full["top1"] and fast["top10"] == full["top10"]


# ---- CBT and generation --------------------------------------------------------------------------------




def test_cbt_kv_cache_naive_and_reference_agree_with_and_without_mask(arch):
    model = _model(arch)
    import pydoc_data.topics

    prose = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    items = build_cloze_items(prose, "P", n_items=3, seed=0, n_context=3)
    kv = cbt_scores(model, items, batch_size=4)
    naive = cbt_scores(model, items, use_kv_cache=False, batch_size=3)
    for item, a, b in zip(items, kv, naive):
        ref = reference_cbt_scores(model, item)
        assert a == pytest.approx(ref, rel=1e-4)
        assert b == pytest.approx(ref, rel=1e-4)
    mask = NeuronMask.from_neurons(model, [(1, i) for i in range(64)])
    masked = cbt_scores(model, items, mask=mask)
    with mask.applied(model):
        assert masked[0] == pytest.approx(reference_cbt_scores(model, items[0]), rel=1e-4)
    assert masked != kv
    assert cbt_accuracy(model, items)["n_items"] == 3
    assert not model.blocks[1].mlp.hook_post.fwd_hooks


def test_generation_is_seeded_and_masks_change_it():
    model = _model("llama")
    cfg = ToxicityConfig(n=4, batch_size=2, max_new_tokens=6, scorer="profanity")
    a = generate_samples(model, cfg)
    assert len(a) == 4 and generate_samples(model, cfg) == a
    assert generate_samples(model, cfg, mask=NeuronMask.from_neurons(model, [(1, i) for i in range(64)])) != a
    assert not model.blocks[1].mlp.hook_post.fwd_hooks
