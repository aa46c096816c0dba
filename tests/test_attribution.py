"""Attribution selection: activation x gradient predicts the true single-neuron ablation effect; mask modes."""

from __future__ import annotations

import argparse

import pytest
import torch

from snip_lens.attribution import ablation_effect, attribution_effects, attribution_scores
from snip_lens.evaluate import lm_metrics
from snip_lens.mask import NeuronMask
from snip_lens.select import METHODS, mask_from_scores, parse_mask_mode
from snip_lens.sweep import DataConfig, SweepConfig, run_sweep
from snip_lens.testing import tiny_model
from snip_lens.types import NeuronId


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2, d_mlp=16, d_model=32)


def _tokens(seed: int, n: int = 4, pos: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (n, pos), generator=g)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_attribution_equals_true_ablation_to_first_order(model):
    toks = _tokens(0)
    est = attribution_effects(model, toks, batch_size=3)  # batches of 3, 1: they must add up
    assert est.shape == (2, 16) and est.dtype == torch.float64
    base = lm_metrics(model, toks)["loss"]
    true = torch.tensor([[ablation_effect(model, toks, (layer, i), baseline=base) for i in range(16)]
                         for layer in range(2)], dtype=torch.float64)
    e, t = est.flatten(), true.flatten()
    assert float(t.abs().max()) > 0  # the check means something: ablations do move the loss
    assert _spearman(e, t) > 0.95
    big = t.abs() > 0.2 * t.abs().max()
    assert big.sum() >= 3
    assert torch.equal(torch.sign(e[big]), torch.sign(t[big]))  # the sign is right where the effect matters
    assert float((e - t).abs().max()) < 0.1 * float(t.abs().max())  # and the value is close
    # no hook left behind
    assert torch.equal(model(toks, return_type="logits"), model(toks, return_type="logits"))
    assert not any(getattr(hp, "fwd_hooks", None) for hp in model.hook_dict.values())


def test_attribution_scores_are_forget_minus_retain(model):
    f, r = _tokens(1), _tokens(2)
    s = attribution_scores(model, f, r, batch_size=2)
    assert s.method == "attribution" and "attribution" in METHODS
    assert torch.allclose(s.scores, attribution_effects(model, f) - attribution_effects(model, r))


def test_attribution_rejects_bad_tokens(model):
    with pytest.raises(ValueError, match="shape"):
        attribution_effects(model, torch.zeros((2, 1), dtype=torch.long))
    with pytest.raises(ValueError, match="integer token tensor"):
        attribution_effects(model, torch.zeros((2, 5)))
    with pytest.raises(ValueError, match="batch_size"):
        attribution_effects(model, _tokens(0), batch_size=0)


@pytest.mark.parametrize("spec,expected", [("zero", ("zero", None)), ("mean", ("mean", None)),
                                           ("scale:-1", ("scale", -1.0)), ("scale:0.5", ("scale", 0.5)),
                                           (" scale:-2.5 ", ("scale", -2.5))])
def test_parse_mask_mode(spec, expected):
    assert parse_mask_mode(spec) == expected


@pytest.mark.parametrize("bad", ["ablate", "scale", "scale:", "scale:x", "scale:inf", "scale:nan", "Zero"])
def test_parse_mask_mode_rejects_bad_values_by_name(bad):
    with pytest.raises(ValueError, match="mask mode"):
        parse_mask_mode(bad)
    with pytest.raises(ValueError, match="mask mode"):
        SweepConfig(mask_mode=bad)


def test_mask_from_scores_reads_a_values_grid(model):
    from snip_lens.select import random_scores

    s = random_scores(2, 16, seed=0)
    grid = torch.arange(32, dtype=torch.float64).view(2, 16)
    mask = mask_from_scores(model, s, 5, mode="mean", values=grid)
    expected = torch.tensor([n.layer * 16 + n.index for n in mask.neurons], dtype=torch.float32)
    assert torch.equal(mask.values, expected)
    with pytest.raises(ValueError, match="grid has shape"):
        mask_from_scores(model, s, 5, mode="mean", values=torch.zeros(3, 16))


def _data(**kw):
    base = dict(forget="code", retain="prose", n_ctx=32, select_windows=6, eval_windows=3, max_docs=30, seed=0)
    base.update(kw)
    return DataConfig(**base)


@pytest.mark.parametrize("mode", ["scale:-1", "mean"])
def test_sweep_runs_attribution_with_a_mask_mode(model, tmp_path, mode):
    cfg = SweepConfig(model="tiny", data=_data(), ks=["10%"], methods=["attribution", "random"], mask_mode=mode)
    res = run_sweep(cfg, tmp_path, model=model, progress=False)
    assert [r["method"] for r in res["runs"]] == ["attribution", "random"]
    mask = NeuronMask.load(tmp_path / "masks" / "attribution_k3.safetensors", model=model)
    from snip_lens.score import NeuronScores

    att = NeuronScores.load(tmp_path / "scores" / "attribution.safetensors")
    assert set(mask.neurons) == set(att.top_k(3))
    if mode == "mean":
        from snip_lens.collect import ActivationRecords

        rec = ActivationRecords.load(tmp_path / "records")
        mean = rec.stats["retain"].mean
        assert mask.mode == "mean"
        assert torch.allclose(mask.values, torch.stack([mean[n.layer, n.index] for n in mask.neurons]).float())
    else:
        assert mask.mode == "scale" and torch.equal(mask.values, torch.full((3,), -1.0))
    # a rerun reuses the saved attribution scores instead of recomputing them
    (tmp_path / "results.json").unlink()
    again = run_sweep(cfg, tmp_path, model=model, progress=False)
    assert again["runs"] == res["runs"]
    assert "attribution" in res["timings_s"]


def test_cli_mask_mode_flag_reaches_the_config():
    from snip_lens import cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli._add_run(sub)
    args = parser.parse_args(["run", "--model", "m", "--forget", "code", "--retain", "prose", "--mask-mode",
                              "scale:-1", "--methods", "attribution,random"])
    cfg = cli._sweep_config(args)
    assert cfg.mask_mode == "scale:-1" and cfg.methods == ["attribution", "random"]
    with pytest.raises(ValueError, match="mask mode"):
        cli._sweep_config(parser.parse_args(["run", "--model", "m", "--forget", "code", "--retain", "prose",
                                             "--mask-mode", "flip"]))


def test_neuron_id_ordering_matches_grid(model):
    # ablation_effect accepts a NeuronId as well as a pair
    toks = _tokens(3, n=2, pos=8)
    assert ablation_effect(model, toks, NeuronId(1, 3)) == pytest.approx(ablation_effect(model, toks, (1, 3)))
