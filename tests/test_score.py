"""Tests of SNIP step 3: max-cosine scoring against a numpy brute force, NeuronScores, neuron search, CLI."""

from __future__ import annotations

import re

import json
import math

import numpy as np
import pytest
import torch

from snip_lens.cli import main
from snip_lens.embed import normalize_rows
from snip_lens.score import NeuronIndex, NeuronScores, max_cosine, max_cosine_reference, score_neurons
from snip_lens.types import DatasetConcepts, NeuronExplanation, NeuronId

WORDS = ["python", "code", "def", "function", "english", "prose", "word", "the", "number", "digits", "self",
         "class", "import", "loop", "string", "comment"]


class BagOfWordsEmbedder:
    """Count vectors over a tiny vocabulary plus a hashed remainder: similar words -> similar vectors."""

    name = "bow-test"
    dim = len(WORDS) + 4

    def __init__(self) -> None:
        self.n_texts = 0

    def embed(self, texts: list[str]) -> np.ndarray:
        self.n_texts += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace("'", " ").split():
                if w in WORDS:
                    out[i, WORDS.index(w)] += 1
                else:
                    out[i, len(WORDS) + sum(map(ord, w)) % 4] += 0.25
        return normalize_rows(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_cosine_equals_bruteforce(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(3000, 48)) * rng.uniform(0.1, 10, size=(3000, 1))  # unnormalised on purpose
    b = rng.normal(size=(37, 48))
    s, i = max_cosine(a, b, chunk=1000)
    s_ref, i_ref = max_cosine_reference(a, b)
    np.testing.assert_allclose(s, s_ref, atol=1e-5)
    # indices agree except where two concepts tie within float32 precision
    sims = normalize_rows(a).astype(np.float64) @ normalize_rows(b).T.astype(np.float64)
    top2 = np.sort(sims, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5
    assert clear.mean() > 0.99 and np.array_equal(i[clear], i_ref[clear])


def test_max_cosine_width_mismatch():
    with pytest.raises(ValueError, match="width 4 but concept vectors 5"):
        max_cosine(np.ones((2, 4)), np.ones((3, 5)))


def _explanations():
    texts = {
        (0, 0): "the python keyword def and function definitions in python code",
        (0, 3): "the word the in english prose",
        (1, 1): "numbers and digits",
        (1, 2): "the python name self in python code",
        (2, 5): "the word the in english prose",  # duplicate text: embedded once
    }
    out = [NeuronExplanation(NeuronId(*k), v, source="t") for k, v in texts.items()]
    out.append(NeuronExplanation(NeuronId(2, 0), None, source="t", error="API failure"))
    out.append(NeuronExplanation(NeuronId(2, 1), "", source="t"))
    return out


CONCEPTS = DatasetConcepts(["python code", "function definitions", "class import"], "test")


def test_score_neurons_equals_bruteforce():
    emb = BagOfWordsEmbedder()
    expl = _explanations()
    s = score_neurons(expl, CONCEPTS, emb, n_layers=3, d_mlp=6, model_name="tiny")
    assert s.scores.shape == (3, 6) and s.method == "snip" and s.model_name == "tiny"
    ok = [e for e in expl if e.ok]
    ref, idx = max_cosine_reference(emb.embed([e.explanation for e in ok]), emb.embed(CONCEPTS.concepts))
    for e, r, i in zip(ok, ref, idx):
        assert s.scores[e.neuron.layer, e.neuron.index].item() == pytest.approx(r, abs=1e-5)
        assert s.labels[e.neuron] == CONCEPTS.concepts[i]
    finite = torch.isfinite(s.scores)
    assert int(finite.sum()) == len(ok)  # failed / empty / unexplained neurons are -inf
    assert s.scores[2, 0] == -math.inf and s.scores[2, 1] == -math.inf and s.scores[0, 1] == -math.inf
    want = sorted(zip(ok, ref), key=lambda p: (-p[1], p[0].neuron))
    assert s.top_k(len(ok)) == [e.neuron for e, _ in want]


def test_score_neurons_bad_inputs():
    emb = BagOfWordsEmbedder()
    with pytest.raises(ValueError, match=r"L5/N0 is outside the model's shape \(3 layers x 6 neurons\)"):
        score_neurons([NeuronExplanation(NeuronId(5, 0), "x")], CONCEPTS, emb, n_layers=3, d_mlp=6)
    with pytest.raises(ValueError, match="none of the 1 explanations is usable"):
        score_neurons([NeuronExplanation(NeuronId(0, 0), None, error="boom")], CONCEPTS, emb, n_layers=3, d_mlp=6)


def test_top_k_and_rank_order_by_score():
    scores = torch.tensor([[0.5, 0.9, -math.inf], [0.8, 0.4, 0.1]], dtype=torch.float64)
    s = NeuronScores(scores, "t")
    assert s.top_k(5) == [NeuronId(0, 1), NeuronId(1, 0), NeuronId(0, 0), NeuronId(1, 1), NeuronId(1, 2)]
    assert s.rank().tolist() == [[2, 0, 5], [1, 3, 4]]
    with pytest.raises(ValueError, match="k=6 but method 't' scored only 5"):
        s.top_k(6)


def test_ties_go_to_the_secondary_signal_then_a_seeded_draw_never_layer_index():
    flat = NeuronScores(torch.ones(4, 50, dtype=torch.float64), "t", tie_seed=0)
    by_index = [NeuronId(0, i) for i in range(20)]
    got = flat.top_k(20)
    assert got != by_index and len({n.layer for n in got}) > 1  # the old (layer, index) order: all layer 0
    assert got == NeuronScores(torch.ones(4, 50, dtype=torch.float64), "t", tie_seed=0).top_k(20)
    assert got != NeuronScores(torch.ones(4, 50, dtype=torch.float64), "t", tie_seed=1).top_k(20)
    # brute force on random scores with many ties: score, then secondary, then the seeded draw
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (4, 7), generator=g).double()
    sec = torch.randint(0, 2, (4, 7), generator=g).double()
    s = NeuronScores(r, "r", secondary=sec, secondary_name="test signal", tie_seed=5)
    draw = np.random.default_rng(5).permutation(28)
    want = sorted((NeuronId(a, b) for a in range(4) for b in range(7)),
                  key=lambda n: (-r[n.layer, n.index], -sec[n.layer, n.index], draw[n.layer * 7 + n.index]))
    assert s.top_k(28) == want
    assert s.tie_break == "test signal, then a random draw (seed 5)"
    with pytest.raises(ValueError, match="secondary_name"):
        NeuronScores(r, "r", secondary=sec)
    with pytest.raises(ValueError, match=r"secondary has shape \(2, 2\)"):
        NeuronScores(r, "r", secondary=torch.zeros(2, 2), secondary_name="x")


def test_cut_ties_counts_the_neurons_the_tie_break_decided():
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    plain = NeuronScores(scores, "t")
    assert plain.cut_ties(1).to_json() == {"tied": 0, "selected": 0, "tied_after_secondary": 0}
    assert plain.cut_ties(3).to_json() == {"tied": 4, "selected": 2, "tied_after_secondary": 4}
    assert plain.cut_ties(5).tied == 0  # the cut falls between 1.0 and 0.0: nothing tied across it
    sec = torch.tensor([[0.0, 4.0, 3.0, 2.0], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    with_sec = NeuronScores(scores, "t", secondary=sec, secondary_name="s")
    assert with_sec.top_k(3) == [NeuronId(0, 0), NeuronId(0, 1), NeuronId(0, 2)]
    assert with_sec.cut_ties(3).to_json() == {"tied": 4, "selected": 2, "tied_after_secondary": 0}


def test_per_layer_selection_takes_k_over_l_from_every_layer():
    g = torch.Generator().manual_seed(0)
    r = torch.rand(3, 10, generator=g, dtype=torch.float64)
    r[0] += 10  # a global top-k would take layer 0 only
    s = NeuronScores(r, "r")
    assert {n.layer for n in s.top_k(6)} == {0}
    chosen = s.top_k(6, "per-layer")
    assert sorted(n.layer for n in chosen) == [0, 0, 1, 1, 2, 2]
    for layer in range(3):
        best = set(torch.argsort(r[layer], descending=True)[:2].tolist())
        assert {n.index for n in chosen if n.layer == layer} == best
    # 7 = 2 per layer and one more, to the layer whose next neuron ranks best overall (layer 0)
    assert sorted(n.layer for n in s.top_k(7, "per-layer")) == [0, 0, 0, 1, 1, 2, 2]
    assert s.cut_ties(6, "per-layer").tied == 0
    sparse = r.clone()
    sparse[2, 1:] = -math.inf
    with pytest.raises(ValueError, match="L2: 1"):
        NeuronScores(sparse, "r").top_k(6, "per-layer")
    with pytest.raises(ValueError, match="'per-layer'"):
        s.top_k(3, "uneven")


def test_scores_save_load_roundtrip_and_shape_check(tmp_path):
    s = score_neurons(_explanations(), CONCEPTS, BagOfWordsEmbedder(), n_layers=3, d_mlp=6, model_name="tiny")
    path = s.save(tmp_path / "snip")
    assert path.name == "snip.safetensors" and (tmp_path / "snip.json").exists()
    back = NeuronScores.load(path, n_layers=3, d_mlp=6)
    assert torch.equal(back.scores, s.scores) and back.labels == s.labels
    # score_neurons declares its tie-break signal, and it survives the round trip
    assert torch.equal(back.secondary, s.secondary) and back.secondary_name == "mean cosine to all concepts"
    sec = NeuronScores(s.scores, "snip", secondary=torch.rand(3, 6, dtype=torch.float64), secondary_name="q",
                       tie_seed=7)
    again = NeuronScores.load(sec.save(tmp_path / "sec"))
    assert torch.equal(again.secondary, sec.secondary) and again.secondary_name == "q" and again.tie_seed == 7
    n = int(torch.isfinite(sec.scores).sum())
    assert again.top_k(n) == sec.top_k(n)
    assert back.method == "snip" and back.model_name == "tiny"
    with pytest.raises(ValueError, match=r"3 layers x 6 neurons \(tiny\), not 30 x 1536"):
        NeuronScores.load(path, n_layers=30, d_mlp=1536)
    with pytest.raises(FileNotFoundError, match="no scores file"):
        NeuronScores.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_neuron_index_search(kind, tmp_path):
    emb = BagOfWordsEmbedder()
    expl = _explanations()
    index = NeuronIndex.build(expl, emb, kind=kind, ivf_lists=2)
    assert len(index) == 5 and index.kind == kind
    hits = index.search("python function definitions", k=3)
    ok = {e.neuron: e.explanation for e in expl if e.ok}
    neurons = sorted(ok)
    sims = emb.embed([ok[n] for n in neurons]) @ emb.embed(["python function definitions"])[0]
    want = [neurons[i] for i in np.argsort(-sims, kind="stable")[:3]]
    if kind == "flat":
        assert [h[0] for h in hits] == want
        np.testing.assert_allclose([h[1] for h in hits], np.sort(sims)[::-1][:3], atol=1e-5)
    assert hits[0][0] == NeuronId(0, 0) and hits[0][2] == ok[NeuronId(0, 0)]
    index.save(tmp_path / "idx")
    back = NeuronIndex.load(tmp_path / "idx", emb)
    assert back.search("python function definitions", k=3) == hits
    other = BagOfWordsEmbedder()
    other.name = "something-else"
    with pytest.raises(ValueError, match="built with embedder 'bow-test'"):
        NeuronIndex.load(tmp_path / "idx", other)


def test_neuron_index_bad_query():
    index = NeuronIndex.build(_explanations(), BagOfWordsEmbedder())
    with pytest.raises(ValueError, match="non-empty"):
        index.search("  ")
    assert len(index.search("prose", k=100)) == 5


def _write_inputs(tmp_path):
    ex = tmp_path / "expl.jsonl"
    ex.write_text("".join(json.dumps(e.to_json()) + "\n" for e in _explanations()))
    co = tmp_path / "concepts.json"
    co.write_text(json.dumps({"concepts": ["Python function definitions", "Python source code"], "source": "t"}))
    return ex, co


def test_cli_concepts_score_search(tmp_path, capsys):
    forget = tmp_path / "forget.txt"
    forget.write_text("\n\n".join(
        f"def f{i}(self_value):\n    return self_value + {i}\n\nclass C{i}:\n    def run(self):\n        pass"
        for i in range(6)))
    out = tmp_path / "c.json"
    assert main(["concepts", "--forget", str(forget), "--reference", "prose", "--out", str(out)]) == 0
    c = json.loads(out.read_text())
    assert c["source"].startswith("distinctive") and "def run(self):" in c["concepts"] and "self_value" in c["concepts"]
    assert main(["concepts", "--forget", str(forget), "--out", str(out)]) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err

    ex, co = _write_inputs(tmp_path)
    cache = tmp_path / "cache"
    # these hand-written concepts have no term weights: the default evidence match says so and names the fix
    assert main(["score", "--explanations", str(ex), "--concepts", str(co), "--shape", "3x6",
                 "--out", str(tmp_path / "scores")]) == 2
    err = capsys.readouterr().err
    assert "term weights" in err and "--match embedding" in err and "snip concepts" in err
    assert main(["score", "--explanations", str(ex), "--concepts", str(co), "--shape", "3x6", "--embedder", "local",
                 "--match", "embedding", "--cache-dir", str(cache), "--out", str(tmp_path / "scores")]) == 0
    s = NeuronScores.load(tmp_path / "scores.safetensors", n_layers=3, d_mlp=6)
    assert s.top_k(1) == [NeuronId(0, 0)] and s.labels[NeuronId(0, 0)] == "Python function definitions"
    assert main(["score", "--explanations", str(ex), "--concepts", str(co), "--shape", "2x6", "--match", "embedding",
                 "--cache-dir", str(cache), "--out", str(tmp_path / "s2")]) == 2
    assert "outside the model's shape" in capsys.readouterr().err

    capsys.readouterr()
    assert main(["search", "numbers", "--explanations", str(ex), "--cache-dir", str(cache), "-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("L1/N1\t") and lines[0].endswith("numbers and digits")


def test_quality_floor_code_concepts_pick_code_neurons():
    """Real MiniLM, real text, no hand-written explanation: planted neurons that fire on windows of stdlib
    source code or of its English help topics are explained by the offline explainer (which knows neither),
    scored against the offline concepts of code vs prose; the code neurons rank first."""
    import random

    from snip_lens.concepts import distinctive_concepts
    from snip_lens.corpus import load_texts
    from snip_lens.embed import LocalEmbedder
    from snip_lens.explain import OfflineInputExplainer
    from snip_lens.types import ActivationRecord, NeuronRecords

    rng = random.Random(0)
    code = load_texts("code", max_docs=80, seed=2)
    prose = load_texts("prose")

    def windows(texts, n):
        out = []
        for t in rng.sample([x for x in texts if len(x) > 600], n):
            words = re.findall(r"\S+|\s+", t[len(t) // 3:])[:24]
            out.append(words)
        return out

    recs = []
    for i in range(16):
        side = code if i < 8 else prose
        top = []
        for w in windows(side, 4):
            acts = [0.0] * len(w)
            acts[rng.randrange(len(w))] = 3.0
            top.append(ActivationRecord(w, acts))
        rand = [ActivationRecord(w, [0.0] * len(w)) for w in windows(code, 2) + windows(prose, 2)]
        recs.append(NeuronRecords(NeuronId(i // 4, i % 4), top, rand))
    expl = OfflineInputExplainer()(recs, progress=False)
    concepts = DatasetConcepts(distinctive_concepts(code[:60], prose, 30))
    s = score_neurons(expl, concepts, LocalEmbedder(progress=False), n_layers=4, d_mlp=4)
    top = s.top_k(8)
    assert sum(n.layer * 4 + n.index < 8 for n in top) >= 6


def test_auto_index_is_exact_up_to_the_threshold_and_ivf_beyond():
    # IVF, not HNSW, beyond the threshold: at 2.3M vectors HNSW took 45x as long to build for the same
    # query time (benchmarks/results/score.json).
    from snip_lens.score import build_faiss_index

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((600, 8)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    assert build_faiss_index(vecs, "auto", approximate_above=600)[1] == "flat"
    index, kind = build_faiss_index(vecs, "auto", approximate_above=599, ivf_lists=4)
    assert kind == "ivf" and index.ntotal == 600 and index.nprobe == 4
    _, ids = index.search(vecs[:5], 1)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]  # nprobe = all lists: exact


def test_cli_search_index_rebuilds_when_the_explanations_differ(tmp_path, capsys):
    """A saved index answers only for the explanations it was built from (a digest is recorded and checked)."""
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps(NeuronExplanation(NeuronId(0, 1), "numbers and digits", source="t").to_json()) + "\n"
                 + json.dumps(NeuronExplanation(NeuronId(0, 2), "the word because", source="t").to_json()) + "\n")
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps(NeuronExplanation(NeuronId(2, 5), "numbers and digits", source="t").to_json()) + "\n")
    index = tmp_path / "index"
    common = ["--index", str(index), "--embedder", "local", "--no-cache", "-k", "1"]
    assert main(["search", "numbers", "--explanations", str(a), *common]) == 0
    assert capsys.readouterr().out.startswith("L0/N1\t")
    meta = json.loads((index / "neurons.json").read_text())
    from snip_lens.explain import load_explanations
    from snip_lens.score import explanations_digest

    assert meta["explanations_sha256"] == explanations_digest(load_explanations(a))
    assert main(["search", "numbers", "--explanations", str(a), *common]) == 0  # same explanations: reused
    captured = capsys.readouterr()
    assert captured.out.startswith("L0/N1\t") and "rebuilding" not in captured.err
    assert main(["search", "numbers", "--explanations", str(b), *common]) == 0  # other explanations: rebuilt
    captured = capsys.readouterr()
    assert captured.out.startswith("L2/N5\t") and "built from other explanations" in captured.err
    assert main(["search", "numbers", *common]) == 0  # no --explanations: the saved index as it is
    assert capsys.readouterr().out.startswith("L2/N5\t")
