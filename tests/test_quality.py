"""Explanation quality scorers: OpenAI's simulator (golden prompt, logprob parser, loopback server with
logprobs) and the delphi-style embedding AUROC; and their use as a weight in SNIP's scoring."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from snip_lens.llm import LLMConfig
from snip_lens.loopback import LoopbackServer
from snip_lens.quality import (EmbeddingScorer, SimulatorScorer, auroc, build_simulation_prompt, expected_values,
                               quality_weight, score_explanations)
from snip_lens.quality.simulator import SIMULATOR_SYSTEM_PROMPT
from snip_lens.types import ActivationRecord, DatasetConcepts, NeuronExplanation, NeuronId, NeuronRecords


def test_golden_simulation_prompt():
    msgs = build_simulation_prompt(" words about cats", ["The", " cat", "\n"], few_shot=False)
    assert msgs == [
        {"role": "system", "content":
            "We're studying neurons in a neural network.\nEach neuron looks for some particular thing in a short "
            "document.\nLook at  an explanation of what the neuron does, and try to predict its activations on "
            "each token.\n\nThe activation format is token<tab>activation, activations go from 0 to 10, "
            "\"unknown\" indicates an unknown activation. Most activations will be 0.\n"},
        {"role": "user", "content":
            "\n\nNeuron 1\nExplanation of neuron 1 behavior: the main thing this neuron does is find words about "
            "cats\nActivations: \n<start>\nThe\tunknown\n cat\tunknown\n\\n\tunknown\n<end>\n\nReplace every "
            "\"unknown\" by the activation, from 0 to 10: answer with the same token<tab>activation lines, in the "
            "same order, and nothing else."},
    ]
    few = build_simulation_prompt("cats", ["a"])
    assert [m["role"] for m in few] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert few[0]["content"] == SIMULATOR_SYSTEM_PROMPT
    assert few[1]["content"].endswith("does is find present tense verbs ending in 'ing'")
    assert few[6]["content"].startswith("\nActivations: \n<start>\nthe\t0\n sense\t0\n of\t0\n together\t3\n")
    assert few[7]["content"].startswith("\n\nNeuron 4\n")


def lp(token: str, dist: dict[str, float] | None = None) -> dict:
    """One logprobs.content entry; ``dist`` maps candidate tokens to probabilities."""
    dist = dist or {token: 1.0}
    return {"token": token, "logprob": math.log(dist.get(token, 1e-9)),
            "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in dist.items()]}


def test_expected_values_from_logprobs():
    content = [lp("The"), lp("\t"), lp("0", {"0": 0.5, "10": 0.25, "4": 0.25}), lp("\n"),
               lp(" cat"), lp("\t"), lp("9", {"9": 0.5, "8": 0.5, " sure": 0.1}), lp("\n")]
    assert expected_values(content, 2) == pytest.approx([3.5, 8.5])
    with pytest.raises(ValueError, match="2 activation lines for 3 tokens"):
        expected_values(content, 3)
    with pytest.raises(ValueError, match="no candidate among"):
        expected_values([lp("a"), lp("\t"), lp("x", {"x": 1.0})], 1)


def fake_simulator(messages: list[dict]) -> list[dict]:
    """A simulator that believes the explanation: "the token 'X'" -> 10 on X, 0 elsewhere, with some doubt."""
    text = messages[-1]["content"]
    target = re.search(r"does is find the token '([^']*)'", text).group(1)
    out = []
    for tok in re.findall(r"^(.*)\tunknown$", text, flags=re.M):
        hit = tok.strip() == target
        out += [lp(tok), lp("\t"), lp("10" if hit else "0", {"10": 0.8, "0": 0.2} if hit else {"0": 0.9, "3": 0.1}),
                lp("\n")]
    return out


def records_for(neuron: NeuronId, peak: str) -> NeuronRecords:
    words = [" alpha", " beta", " gamma", " delta", " eps"]
    top = []
    for i in range(3):
        toks = words[i:] + [f" {peak}"] + words[:i]
        top.append(ActivationRecord(toks, [0.0] * (len(toks) - 1 - i) + [4.0 - i] + [0.0] * i))
    rand = [ActivationRecord(words, [0.1, 0.0, 0.2, 0.0, 0.0])]
    return NeuronRecords(neuron, top, rand)


def test_simulator_scores_true_explanations_above_wrong_ones_over_http(monkeypatch):
    monkeypatch.setenv("SNIP_SIM_KEY", "sk-sim-test")
    recs = [records_for(NeuronId(0, 0), "zeta"), records_for(NeuronId(0, 1), "omega")]
    good = [NeuronExplanation(NeuronId(0, 0), "the token 'zeta'"), NeuronExplanation(NeuronId(0, 1), "the token 'omega'")]
    wrong = [NeuronExplanation(NeuronId(0, 0), "the token 'beta'"),
             NeuronExplanation(NeuronId(0, 1), None, error="timeout")]
    with LoopbackServer(logprobs=fake_simulator, api_key="sk-sim-test") as srv:
        cfg = LLMConfig(model="sim", base_url=srv.base_url, api_key_env="SNIP_SIM_KEY", max_retries=0)
        scorer = SimulatorScorer(cfg, n_top=3, n_random=1, few_shot=False)
        res_good = score_explanations(good, recs, scorer)
        res_wrong = scorer(wrong, recs)
    assert all(r.ok for r in res_good) and all(e.quality["simulator"] == r.score for e, r in zip(good, res_good))
    assert min(r.score for r in res_good) > 0.9
    by = {r.neuron: r for r in res_wrong}
    assert by[NeuronId(0, 0)].ok and by[NeuronId(0, 0)].score < 0.1
    assert not by[NeuronId(0, 1)].ok and "no usable explanation" in by[NeuronId(0, 1)].error
    assert len(srv.stats.chat_prompts) == 4 * 2 + 4  # one call per window; the failed explanation costs none


def test_simulator_failure_is_a_value_not_a_score(monkeypatch):
    recs = [records_for(NeuronId(0, 0), "zeta")]
    with LoopbackServer(answer=lambda m: "0\n0") as srv:  # a server that returns logprobs of the wrong shape
        cfg = LLMConfig(model="sim", base_url=srv.base_url, api_key_env=None, max_retries=0)
        res = SimulatorScorer(cfg, n_top=1, n_random=0 or 1, few_shot=False)(
            [NeuronExplanation(NeuronId(0, 0), "the token 'zeta'")], recs)
    assert not res[0].ok and res[0].score is None and "simulation failed" in res[0].error


def test_auroc_and_weight():
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1], [1]) == 0.5 and auroc([1, 2], [3, 4]) == 0.0
    assert quality_weight("embedding", 0.5) == 0.0 and quality_weight("embedding", 0.75) == 0.5
    assert quality_weight("simulator", -0.3) == 0.0 and quality_weight("simulator", None) == 0.0
    with pytest.raises(ValueError, match="unknown quality scorer 'x'"):
        quality_weight("x", 1.0)


def test_embedding_scorer_ranks_a_planted_neurons_true_explanation_above_a_wrong_one():
    """A planted neuron fires on German sentences and rests on windows of standard-library source code: its
    true description separates the two, a wrong one does not."""
    from pathlib import Path

    from snip_lens.corpus import load_texts
    from snip_lens.embed import LocalEmbedder

    german = (Path(__file__).parent / "fixtures" / "two_languages_de.txt").read_text(encoding="utf-8").splitlines()
    code = [t[len(t) // 2: len(t) // 2 + 300] for t in load_texts("code", max_docs=8, seed=1)]
    rec = NeuronRecords(NeuronId(0, 0), [ActivationRecord([t], [1.0]) for t in german[:8]],
                        [ActivationRecord([t], [0.0]) for t in code])
    true = NeuronExplanation(NeuronId(0, 0), "German sentences about everyday life")
    wrong = NeuronExplanation(NeuronId(0, 0), "program source code: functions, imports and variable names")
    scorer = EmbeddingScorer(LocalEmbedder(progress=False), n_top=8, n_random=8)
    (t,), (w,) = scorer([true], [rec]), scorer([wrong], [rec])
    assert t.ok and w.ok and t.score > 0.9 and w.score < 0.5
    assert t.details["n_top"] == 8 and t.details["n_random"] == 8
    (missing,) = scorer([true], [NeuronRecords(NeuronId(0, 0), rec.top, [])])
    assert not missing.ok and "random windows" in missing.error


class BagEmbedder:
    """Deterministic bag-of-words vectors: cosine = word overlap (a test stand-in for a sentence embedder)."""

    name = "bag"

    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def embed(self, texts):
        v = np.array([[t.lower().split().count(w) for w in self.vocab] for t in texts], dtype=np.float32)
        return v + 1e-3


def test_score_neurons_guard_secondary_signal_and_quality_weight():
    from snip_lens.score import SECONDARY_SIGNAL, score_neurons

    emb = BagEmbedder(["cat", "dog", "fish", "bird"])
    concepts = DatasetConcepts(["cat", "dog"])
    expl = [NeuronExplanation(NeuronId(0, 0), "cat fish", quality={"embedding": 0.55}),
            NeuronExplanation(NeuronId(0, 1), "cat dog fish", quality={"embedding": 0.95}),
            NeuronExplanation(NeuronId(0, 2), "cat bird"),
            NeuronExplanation(NeuronId(0, 3), "fish")]
    s = score_neurons(expl, concepts, emb, n_layers=1, d_mlp=4)
    # neurons 0 and 2 tie on max cosine; the declared secondary signal separates neuron 1 from them
    assert s.scores[0, 0] == pytest.approx(float(s.scores[0, 2]))
    sec = s.secondary
    assert s.secondary_name == SECONDARY_SIGNAL and "mean cosine" in SECONDARY_SIGNAL and float(sec[0, 1]) > float(sec[0, 0])
    w = score_neurons(expl, concepts, emb, n_layers=1, d_mlp=4, quality="embedding")
    assert float(w.scores[0, 2]) == 0.0  # no quality score: weight 0
    assert float(w.scores[0, 1]) == pytest.approx(float(s.scores[0, 1]) * 0.9, rel=1e-4)
    assert w.top_k(1) == [NeuronId(0, 1)]
    with pytest.raises(ValueError, match="no explanation has a 'simulator' quality"):
        score_neurons(expl, concepts, emb, n_layers=1, d_mlp=4, quality="simulator")
    with pytest.raises(ValueError, match="concept 'Cat  fish' equals an explanation \\(neuron L0/N0\\)"):
        score_neurons(expl, DatasetConcepts(["dog", "Cat  fish"]), emb, n_layers=1, d_mlp=4)
