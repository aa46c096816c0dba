"""The real offline model (SmolLM2-135M): it knows Paris, a mask removes that, removal restores it exactly,
and an exported pruned copy reproduces the masked model. Plus: missing models fail fast and clearly."""

from __future__ import annotations

import socket

import pytest
import torch
from transformers import AutoModelForCausalLM

from snip_lens.export import export_pruned
from snip_lens.mask import NeuronMask
from snip_lens.models import ModelNotFoundError, hook_name, load_model, to_tokens

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


@pytest.mark.slow
def test_paris_then_mask_then_exact_restore(smollm):
    model, tokens, base, cache = smollm
    assert _top1(model, base) == " Paris"
    paris = int(base[0, -1].argmax())
    mask = NeuronMask.from_neurons(model, _top_neurons(cache, list(range(26, 30)), 200))
    with torch.no_grad(), mask.applied(model):
        masked = model(tokens)
    assert _top1(model, masked) != " Paris"
    assert masked[0, -1].softmax(-1)[paris] < 0.1 * base[0, -1].softmax(-1)[paris]
    with torch.no_grad():
        after = model(tokens)
    assert torch.equal(after, base)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())

    handle = mask.attach(model)
    with torch.no_grad():
        assert torch.equal(model(tokens), masked)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(model(tokens), base)


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


def _forbid_network(monkeypatch):
    attempts: list[object] = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in this test ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return attempts


def test_unknown_model_fails_at_once_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = _forbid_network(monkeypatch)
    with pytest.raises(ModelNotFoundError, match=r"'no-such-model-xyz'.*built-in offline model.*'smollm2-135m'"):
        load_model("no-such-model-xyz")
    assert attempts == []  # no hub retries: nothing even tried to connect


def test_missing_local_dir_fails_at_once_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = _forbid_network(monkeypatch)
    missing = tmp_path / "my-pruned-model"
    with pytest.raises(ModelNotFoundError, match=r"my-pruned-model.*not a local directory.*save_pretrained"):
        load_model(str(missing))
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match=r"empty-dir.*not a Hugging Face model directory.*config\.json"):
        load_model(empty)
    assert attempts == []
