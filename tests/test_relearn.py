"""Relearning attack on a tiny model: the exported form regrows its zeroed weights, the masked form cannot,
the user's model is untouched, and the relearn split never holds an evaluation document."""

from __future__ import annotations

import pytest
import torch

from snip_lens.corpus import load_texts, make_windows
from snip_lens.evaluate._common import hooked_names
from snip_lens.evaluate.relearn import (RelearnConfig, RelearnTarget, add_recovery, attack, check_disjoint,
                                        plot_relearn, relearn_attack, relearn_documents, relearn_table)
from snip_lens.mask import NeuronMask
from snip_lens.models import hook_name
from snip_lens.sweep import split_documents
from snip_lens.testing import tiny_model

PRUNED = [(0, 3), (0, 17), (1, 5), (1, 30)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2, d_mlp=32)


@pytest.fixture(scope="module")
def data(model):
    texts = load_texts("code", max_docs=30, seed=0)
    sel, held = split_documents(texts, 0.3, 0)
    relearn = make_windows(model, relearn_documents(sel, held), n_ctx=24, max_windows=6, seed=2)
    forget = make_windows(model, held, n_ctx=24, max_windows=3, seed=1)
    retain = make_windows(model, load_texts("prose", max_docs=10), n_ctx=24, max_windows=3, seed=1)
    return relearn.tokens, forget.tokens, retain.tokens


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_exported_form_zeroed_weights_get_gradient_and_move(model, data):
    mask = NeuronMask.from_neurons(model, PRUNED)
    before = _state(model)
    res = attack(model, RelearnTarget("m", mask, "exported", len(mask)), *data,
                 RelearnConfig(steps=[2, 4], lr=1e-2, batch_size=2))
    assert res["steps"] == [0, 2, 4] and len(res["forget_top1"]) == 3 and len(res["train_loss"]) == 4
    assert res["pruned_out_norm"][0] == 0.0  # exported: the pruned neurons' output weights start at zero
    assert all(g > 0 for g in res["pruned_out_grad_norm"])  # ... receive gradient at every step
    assert res["pruned_out_norm"][1] > 0 and res["pruned_out_norm"][2] > 0  # ... and move
    assert "masked_max_abs_act" not in res
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the user's model is untouched
    assert hooked_names(model, "model") == []


def test_masked_form_keeps_pruned_activations_exactly_zero_at_every_step(model, data):
    mask = NeuronMask.from_neurons(model, PRUNED)
    before = _state(model)
    per_layer = mask.per_layer()
    seen: list[float] = []

    def check(step, attacked):
        # Independent of the attack's own probe: read the activations off a fresh cached forward.
        _, cache = attacked.run_with_cache(data[0][:2], names_filter=lambda n: n.endswith("mlp.hook_post"))
        for layer, idx in per_layer.items():
            seen.append(float(cache[hook_name(layer)][..., idx].abs().max()))
        unpruned = [i for i in range(32) if i not in idx.tolist()]
        assert float(cache[hook_name(0)][..., unpruned].abs().max()) > 0

    res = attack(model, RelearnTarget("m", mask, "masked", len(mask)), *data,
                 RelearnConfig(steps=[3], lr=1e-2, batch_size=2), on_step=check)
    assert res["masked_max_abs_act"] == [0.0, 0.0, 0.0]  # every training step's forward
    assert seen == [0.0] * 6  # 3 steps x 2 layers, after each update
    assert res["pruned_out_grad_norm"] == [0.0, 0.0, 0.0]  # a zero activation passes no gradient to W_out
    assert res["train_loss"][-1] < res["train_loss"][0] or res["forget_top1"][-1] != res["forget_top1"][0]
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert hooked_names(model, "model") == []


def test_attack_refuses_a_model_with_hooks_attached(model, data):
    mask = NeuronMask.from_neurons(model, PRUNED)
    with mask.applied(model):
        with pytest.raises(ValueError, match="hooks attached"):
            attack(model, RelearnTarget("unpruned", None), *data, RelearnConfig(steps=[1]))
    assert hooked_names(model, "model") == []


def test_relearn_attack_compares_forms_with_unpruned_and_reports_recovery(model, data, tmp_path):
    masks = {"a": NeuronMask.from_neurons(model, PRUNED), "b": NeuronMask.from_neurons(model, [(1, 2), (1, 9)])}
    res = relearn_attack(model, masks, *data, RelearnConfig(steps=[1, 2], lr=5e-3, batch_size=2))
    runs = res["runs"]
    assert [(r["method"], r["form"]) for r in runs] == [("unpruned", "none"), ("a", "exported"), ("a", "masked"),
                                                         ("b", "exported"), ("b", "masked")]
    # The same batches for every target: at step 0 both forms of one mask are the same model.
    assert runs[1]["forget_top1"][0] == pytest.approx(runs[2]["forget_top1"][0], abs=1e-6)
    assert res["original_forget_top1"] == runs[0]["forget_top1"][0]
    for r in runs[1:]:
        assert len(r["recovery"]) == 3
    path = plot_relearn(res, tmp_path)
    assert path.stat().st_size > 1000
    rows = relearn_table(res)
    assert rows[0][:3] == ["method", "form", "k"] and len(rows) == 6


def test_recovery_formula_and_undefined_when_nothing_was_removed():
    runs = [{"form": "none", "forget_top1": [0.5, 0.6]},
            {"form": "masked", "forget_top1": [0.3, 0.4]},
            {"form": "exported", "forget_top1": [0.499, 0.55]}]
    add_recovery(runs, 0.5)
    assert runs[1]["recovery"] == [pytest.approx(0.0), pytest.approx(0.5)]
    assert runs[2]["recovery"] == [None, None]  # a 0.001 drop is below MIN_DROP
    assert "recovery" not in runs[0]


def test_relearn_split_is_disjoint_from_the_evaluation_split_by_document(model):
    texts = load_texts("code", max_docs=30, seed=0)
    texts = texts + texts[:5]  # duplicated documents may land on both sides of a split by index
    sel, held = split_documents(texts, 0.3, 0)
    assert set(sel) & set(held), "the duplicates put the same text on both sides"
    with pytest.raises(ValueError, match="also evaluation documents"):
        check_disjoint(sel, held)
    docs = relearn_documents(sel, held)
    check_disjoint(docs, held)
    windows = make_windows(model, docs, n_ctx=24, max_windows=20, seed=2)
    assert not {docs[d] for d in windows.documents} & set(held)
    with pytest.raises(ValueError, match="no forget document is left"):
        relearn_documents(held, held)


def test_relearn_config_validation():
    assert RelearnConfig(steps="10,5").steps == [5, 10]
    for bad in (dict(steps=[]), dict(steps=[0]), dict(lr=0), dict(forms=["frozen"]), dict(batch_size=0),
                dict(grad_clip=0)):
        with pytest.raises(ValueError, match="RelearnConfig"):
            RelearnConfig(**bad)
