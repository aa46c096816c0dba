"""VocabProj (output-centric evidence) against the measured direct logit effect of stimulating each neuron."""

from __future__ import annotations

import pytest
import torch

from snip_lens.explain import ExplainConfig, activation_signs, explain, vocab_projection
from snip_lens.explain.input import show_token
from snip_lens.explain.vocabproj import direction_through_norm
from snip_lens.models import hook_name
from snip_lens.testing import tiny_model
from snip_lens.types import NeuronId


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def stimulated_logits(model, neuron: int, value: float, tokens: torch.Tensor) -> torch.Tensor:
    """Last-position logits with the neuron's activation set to ``value`` at every position."""
    def hook(act, hook):
        act[..., neuron] = value
        return act

    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(hook_name(0), hook)])[0, -1].double()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gated MLP + RMSNorm + untied; plain MLP + LayerNorm + tied
def test_vocabproj_equals_the_direct_effect_of_stimulating_each_neuron(arch):
    model = tiny_model(arch, n_layers=1, d_mlp=16, d_model=32)
    tied = model.original_model.config.tie_word_embeddings
    assert tied == (arch == "gpt2")
    vocab = model.W_U.shape[1]
    proj = vocab_projection(model, k=vocab)
    tokens = torch.tensor([[5, 17, 42, 7, 99, 3]])
    w = model.blocks[0].mlp.W_out.detach()
    for n in range(16):
        big = 1e4 / float(w[n].norm())  # the write dominates the residual stream: the direct effect alone
        effect = (stimulated_logits(model, n, big, tokens) - stimulated_logits(model, n, -big, tokens)) / 2
        vp = torch.zeros(vocab, dtype=torch.float64)
        vp[proj.promoted_ids[0, n]] = proj.promoted_weights[0, n].double()
        assert set(effect.topk(10).indices.tolist()) == set(proj.promoted_ids[0, n, :10].tolist())
        assert set((-effect).topk(10).indices.tolist()) == set(proj.suppressed_ids[0, n, :10].tolist())
        assert spearman(vp, effect) >= 0.99
    # one unit of activation at a typical residual scale: the weights are logit changes per unit
    assert torch.all(proj.promoted_weights[0, :, 0] > 0) and torch.all(proj.suppressed_weights[0, :, 0] < 0)


def test_negative_typical_activation_swaps_promoted_and_suppressed():
    model = tiny_model("llama", n_layers=1, d_mlp=16, d_model=32)
    plain = vocab_projection(model, k=8)
    signs = torch.ones(1, 16, dtype=torch.int64)
    signs[0, 3] = -1
    flipped = vocab_projection(model, k=8, signs=signs)
    assert torch.equal(flipped.promoted_ids[0, 3], plain.suppressed_ids[0, 3])
    assert torch.equal(flipped.suppressed_ids[0, 3], plain.promoted_ids[0, 3])
    assert torch.equal(flipped.promoted_ids[0, 4], plain.promoted_ids[0, 4])
    # a strongly negative activation raises exactly the flipped neuron's promoted tokens
    tokens = torch.tensor([[5, 17, 42, 7]])
    w = model.blocks[0].mlp.W_out.detach()
    big = 1e4 / float(w[3].norm())
    neg_effect = stimulated_logits(model, 3, -big, tokens) - stimulated_logits(model, 3, big, tokens)
    assert neg_effect.topk(8).indices.tolist() == flipped.promoted_ids[0, 3].tolist()
    ev = flipped.evidence(NeuronId(0, 3))
    assert ev.sign == -1 and [t.weight for t in ev.promoted] == sorted([t.weight for t in ev.promoted], reverse=True)
    with pytest.raises(ValueError, match=r"signs must have shape \(1, 16\)"):
        vocab_projection(model, signs=torch.ones(2, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="layers \\[5\\]"):
        vocab_projection(model, layers=[5])


def test_signs_come_from_collected_statistics_and_reach_the_explanations():
    import pydoc_data.topics

    from snip_lens.collect import collect
    from snip_lens.corpus import make_windows

    model = tiny_model("llama", n_layers=2, d_mlp=16, d_model=32)
    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:4]]
    windows = make_windows(model, texts, n_ctx=24, max_windows=6, seed=0, name="probe")
    records = collect(model, windows, top_k=3, context=(4, 2), n_random=2, batch_size=3, progress=False)
    signs = activation_signs(records)
    mean = records.stats[records.records_corpus].mean
    assert torch.equal(signs, torch.where(mean >= 0, 1, -1))
    assert (signs == -1).any() and (signs == 1).any()  # a gated MLP's neurons rest on either side of zero
    out = explain(records, ExplainConfig(explanations="output"), model=model, progress=False)
    assert len(out) == 32 and all(e.ok and e.kind == "output" for e in out)
    neg = next(e for e in out if signs[e.neuron.layer, e.neuron.index] == -1)
    assert neg.evidence.output.sign == -1
    plain = vocab_projection(model, layers=[neg.neuron.layer], k=12)
    assert [t.token for t in neg.evidence.output.promoted] == \
        [plain.vocab[int(i)] for i in plain.suppressed_ids[0, neg.neuron.index]]
    # each explanation names its own promoted tokens, and neurons with different evidence read differently
    for e in out:
        assert e.explanation.startswith("raises the next token")
        assert show_token(e.evidence.output.promoted[0].token) in e.explanation
    assert len({e.explanation for e in out}) >= 0.9 * len(out)


def test_direction_through_layernorm_removes_the_mean_and_the_bias():
    model = tiny_model("gpt2", n_layers=1, d_mlp=8, d_model=32)
    ln = model.ln_final.original_component
    with torch.no_grad():
        ln.bias.normal_()
    w = model.blocks[0].mlp.W_out.detach()
    d = direction_through_norm(model, w)
    centred = w - w.mean(dim=1, keepdim=True)
    want = centred / centred.std(dim=1, unbiased=False, keepdim=True) * ln.weight.detach()
    want = want * w.std(dim=1, unbiased=False, keepdim=True)
    assert torch.allclose(d, want, atol=1e-4)
