"""Selection methods: each ranks neurons as documented, and top-k turns into the right mask."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from snip_lens.score import NeuronScores
from snip_lens.select import (
    activation_scores,
    hybrid_scores,
    judge_shortlist,
    keyword_scores,
    llm_judge_scores,
    mask_from_scores,
    parse_k,
    random_scores,
)
from snip_lens.types import NeuronExplanation, NeuronId


def test_parse_k_counts_and_percentages():
    assert parse_k(10, 1000) == 10
    assert parse_k("10", 1000) == 10
    assert parse_k("2%", 46080) == 922
    assert parse_k("0.5%", 1000) == 5
    assert parse_k(0, 10) == 0


@pytest.mark.parametrize("bad", ["-1", -3, "abc", "150%", "2.5x", 1001, 2.5])
def test_parse_k_rejects_bad_values_by_name(bad):
    with pytest.raises(ValueError, match=str(bad).rstrip("0").rstrip(".") if isinstance(bad, float) else str(bad)):
        parse_k(bad, 1000)


def test_random_scores_are_seeded_and_uniform():
    a = random_scores(4, 50, seed=1)
    b = random_scores(4, 50, seed=1)
    c = random_scores(4, 50, seed=2)
    assert torch.equal(a.scores, b.scores)
    assert not torch.equal(a.scores, c.scores)
    # every layer is about equally likely to be hit
    layers = [n.layer for n in random_scores(4, 500, seed=0).top_k(1000)]
    counts = torch.bincount(torch.tensor(layers), minlength=4)
    assert counts.min() > 200


def _expl(layer, index, text, score=None):
    return NeuronExplanation(NeuronId(layer, index), text, score=score, source="test")


def test_keyword_scores_select_matches_ranked_by_explanation_score():
    ex = [
        _expl(0, 0, "Python keywords like def", 0.2),
        _expl(0, 1, "commas in English prose", 0.9),
        _expl(1, 0, "the python import statement", 0.8),
        _expl(1, 1, "pythonic idioms", 0.99),  # 'python' only as part of a word: not a match
        NeuronExplanation(NeuronId(1, 2), None, error="timeout"),
    ]
    s = keyword_scores(ex, ["python"], n_layers=2, d_mlp=3)
    assert s.top_k(2) == [NeuronId(1, 0), NeuronId(0, 0)]
    assert s.secondary_name == "explanation score"
    assert int(torch.isfinite(s.scores).sum()) == 2
    assert s.labels[NeuronId(1, 0)] == "python"
    with pytest.raises(ValueError, match="keyword"):
        keyword_scores(ex, [" "], n_layers=2, d_mlp=3)
    with pytest.raises(ValueError, match="L5/N0"):
        keyword_scores([_expl(5, 0, "x")], ["x"], n_layers=2, d_mlp=3)


def _records(forget_abs, retain_abs, layers=(0, 1)):
    mk = lambda t: SimpleNamespace(mean_abs=torch.tensor(t, dtype=torch.float64),  # noqa: E731
                                   freq_pos=torch.tensor(t, dtype=torch.float64) / 10)
    return SimpleNamespace(stats={"forget": mk(forget_abs), "retain": mk(retain_abs)}, layers=list(layers),
                           n_layers=max(layers) + 1, model_name="m")


def test_activation_scores_are_the_forget_retain_ratio():
    rec = _records([[1.0, 2.0, 0.5], [4.0, 0.1, 1.0]], [[1.0, 1.0, 1.0], [2.0, 0.1, 4.0]])
    s = activation_scores(rec, eps=0.0)
    expected = torch.tensor([[1.0, 2.0, 0.5], [2.0, 1.0, 0.25]], dtype=torch.float64)
    assert torch.allclose(s.scores, expected, atol=1e-5)
    # tie at 2.0: the declared secondary signal (mean |act| on forget: 4.0 > 2.0) decides, not (layer, index)
    assert s.top_k(2) == [NeuronId(1, 0), NeuronId(0, 1)]
    assert s.secondary_name == "mean_abs on forget"
    f = activation_scores(rec, statistic="freq_pos")
    assert f.method == "activation-freq"
    with pytest.raises(ValueError, match="'forget'"):
        activation_scores(SimpleNamespace(stats={"retain": 1}, layers=[0], model_name="m"))
    with pytest.raises(ValueError, match="median"):
        activation_scores(rec, statistic="median")


def test_activation_scores_place_partial_layers():
    rec = _records([[1.0, 3.0]], [[1.0, 1.0]], layers=(2,))
    s = activation_scores(rec)
    assert s.scores.shape == (3, 2)
    assert s.top_k(2) == [NeuronId(2, 1), NeuronId(2, 0)]
    assert not torch.isfinite(s.scores[:2]).any()


def test_hybrid_weight_zero_is_the_activation_ranking_and_concepts_reorder():
    g = torch.Generator().manual_seed(0)
    act = NeuronScores(torch.rand(3, 20, generator=g, dtype=torch.float64) + 0.5, "activation")
    snip = NeuronScores(torch.rand(3, 20, generator=g, dtype=torch.float64), "snip",
                        labels={NeuronId(0, 0): "c"})
    h0 = hybrid_scores(snip, act, weight=0.0)
    assert h0.top_k(60) == act.top_k(60)
    h1 = hybrid_scores(snip, act, weight=1.0)
    assert h1.top_k(60) != act.top_k(60)
    assert h1.labels == {NeuronId(0, 0): "c"}
    # the documented formula, against a direct computation
    z = (snip.scores - snip.scores.mean()) / snip.scores.std()
    want = torch.log(act.scores + 1e-6) + 0.3 * z
    assert torch.allclose(hybrid_scores(snip, act, weight=0.3).scores, want)
    # a small weight only reorders neurons of similar activation evidence
    act.scores[1, 5] = 100.0
    snip.scores[1, 5] = snip.scores.min()
    assert hybrid_scores(snip, act, weight=0.05).top_k(1) == [NeuronId(1, 5)]
    # a neuron without an activation ratio is never selected
    act.scores[2, 2] = float("-inf")
    snip.scores[2, 2] = 10.0
    assert NeuronId(2, 2) not in hybrid_scores(snip, act, weight=1.0).top_k(59)
    with pytest.raises(ValueError, match="-1"):
        hybrid_scores(snip, act, weight=-1)
    with pytest.raises(ValueError, match="shapes"):
        hybrid_scores(NeuronScores(torch.zeros(2, 2), "snip"), act)


class _FakeJudge:
    model = "fake"

    def __init__(self):
        self.calls = 0

    async def generate(self, messages):
        self.calls += 1
        text = messages[-1]["content"]
        if "garbage" in text:
            return "I cannot say"
        return "8" if "python" in text else "2"


def test_llm_judge_rates_parses_and_records_failures(tmp_path):
    ex = [_expl(0, 0, "python code"), _expl(0, 1, "prose"), _expl(1, 0, "garbage"), _expl(1, 1, "python defs")]
    judge = _FakeJudge()
    s = llm_judge_scores(ex, ["def f(): pass"], judge, n_layers=2, d_mlp=2, cache_dir=tmp_path, progress=False)
    assert s.scores[0, 0] == 8 and s.scores[1, 1] == 8 and s.scores[0, 1] == 2
    assert s.scores[1, 0] == float("-inf")  # unparseable: never pruned on a guess
    assert judge.calls == 4
    again = llm_judge_scores(ex, ["def f(): pass"], judge, n_layers=2, d_mlp=2, cache_dir=tmp_path, progress=False)
    assert judge.calls == 5  # only the failure is asked again
    assert torch.equal(again.scores, s.scores)
    with pytest.raises(ValueError, match="samples"):
        llm_judge_scores(ex, [], judge, n_layers=2, d_mlp=2)


def test_mask_from_scores_prunes_the_top_k():
    from snip_lens.testing import tiny_model

    model = tiny_model("llama", n_layers=2, d_mlp=16)
    s = random_scores(2, 16, seed=3)
    mask = mask_from_scores(model, s, "25%")
    assert len(mask) == 8
    assert set(mask.neurons) == set(s.top_k(8))
    partial = keyword_scores([_expl(0, 1, "python")], ["python"], n_layers=2, d_mlp=16)
    with pytest.raises(ValueError, match="ranked only 1"):
        mask_from_scores(model, partial, 2)
    with pytest.raises(ValueError, match="larger than"):
        mask_from_scores(model, s, 33)


def test_keyword_matches_without_a_score_tie_and_a_seeded_draw_orders_them():
    ex = [_expl(layer, i, "python code") for layer in range(3) for i in range(20)]
    a = keyword_scores(ex, ["python"], n_layers=3, d_mlp=20, seed=0).top_k(10)
    assert a == keyword_scores(ex, ["python"], n_layers=3, d_mlp=20, seed=0).top_k(10)
    assert a != keyword_scores(ex, ["python"], n_layers=3, d_mlp=20, seed=1).top_k(10)
    assert a != [NeuronId(0, i) for i in range(10)] and len({n.layer for n in a}) > 1


def test_judge_shortlist_takes_snip_and_activation_in_turn_and_ties_follow_it():
    ex = [_expl(layer, i, f"neuron {layer} {i}") for layer in range(2) for i in range(6)]
    snip = NeuronScores(torch.arange(12, dtype=torch.float64).view(2, 6), "snip")  # best: L1/N5, L1/N4, ...
    act = NeuronScores(-torch.arange(12, dtype=torch.float64).view(2, 6), "activation")  # best: L0/N0, ...
    short = judge_shortlist(4, ex, snip=snip, activation=act, n_layers=2, d_mlp=6)
    assert short == [NeuronId(1, 5), NeuronId(0, 0), NeuronId(1, 4), NeuronId(0, 1)]
    assert judge_shortlist(2, ex, how="snip", snip=snip, n_layers=2, d_mlp=6) == [NeuronId(1, 5), NeuronId(1, 4)]
    rnd = judge_shortlist(5, ex, how="random", seed=3, n_layers=2, d_mlp=6)
    assert rnd == judge_shortlist(5, ex, how="random", seed=3, n_layers=2, d_mlp=6) and len(set(rnd)) == 5
    with pytest.raises(ValueError, match="between 1 and the 12"):
        judge_shortlist(13, ex, snip=snip, activation=act, n_layers=2, d_mlp=6)
    with pytest.raises(ValueError, match="needs the snip and activation scores"):
        judge_shortlist(2, ex, n_layers=2, d_mlp=6)

    class Flat:  # every neuron gets the same rating: the shortlist order decides
        model = "flat"

        async def generate(self, messages):
            return "5"

    s = llm_judge_scores(ex, ["x"], Flat(), n_layers=2, d_mlp=6, candidates=short, progress=False)
    assert s.top_k(4) == short
    assert s.secondary_name == "shortlist position" and s.cut_ties(2).to_json() == {
        "tied": 4, "selected": 2, "tied_after_secondary": 0}


def test_mask_from_scores_per_layer_selection():
    from snip_lens.testing import tiny_model

    model = tiny_model("llama", n_layers=2, d_mlp=16)
    s = NeuronScores(torch.cat([torch.ones(1, 16) * 5, torch.rand(1, 16)]).double(), "t")
    assert set(mask_from_scores(model, s, 8).layers) == {0}
    per = mask_from_scores(model, s, 8, select="per-layer")
    assert sorted(n.layer for n in per.neurons) == [0] * 4 + [1] * 4
