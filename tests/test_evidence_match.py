"""SNIP's evidence match: explanations scored by the term weights of the tokens their evidence names."""

from __future__ import annotations

import json

import pytest

from snip_lens.cli import main
from snip_lens.concepts import concept_terms, extract_concepts, term_pieces
from snip_lens.score import evidence_score, score_neurons
from snip_lens.types import (DatasetConcepts, InputEvidence, NeuronEvidence, NeuronExplanation, NeuronId,
                             OutputEvidence, TokenWeight)

GERMAN = ["Der Hund und die Katze schlafen im Haus.", "Die Kinder spielen und der Vater liest.",
          "Im Winter ist es kalt und die Tage sind kurz.", "Der Zug kommt und die Leute steigen ein."]
ENGLISH = ["The dog and the cat sleep in the house.", "The children play and the father reads.",
           "In winter it is cold and the days are short.", "The train comes and the people get in."]


def _expl(layer: int, index: int, peaks: list[tuple[str, float]] | None = None,
          promoted: list[str] | None = None, text: str = "x") -> NeuronExplanation:
    inp = InputEvidence(top_tokens=[TokenWeight(t, w) for t, w in peaks], peaks=[TokenWeight(t, w) for t, w in peaks]) \
        if peaks else None
    out = OutputEvidence([TokenWeight(t, 1.0) for t in promoted], []) if promoted else None
    return NeuronExplanation(NeuronId(layer, index), text, source="t", evidence=NeuronEvidence(inp, out))


def test_terms_are_log_odds_of_the_forget_set_against_the_reference():
    terms = concept_terms(GERMAN, ENGLISH)
    assert terms["die"] > 0 and terms["der"] > 0 and terms["the"] < 0
    # a term is read the same written out or as a byte-level BPE token
    assert term_pieces("\u0120Die") == term_pieces(" Die") == ["die"]
    assert term_pieces("):") == [")", ":"]


def test_evidence_match_ranks_the_neuron_whose_evidence_is_forget_text_first():
    terms = concept_terms(GERMAN, ENGLISH)
    concepts = DatasetConcepts(["Der Hund"], source="t", terms=terms)
    expl = [_expl(0, 0, peaks=[("\u0120the", 0.7), ("\u0120and", 0.3)]),       # English: negative
            _expl(0, 1, peaks=[("\u0120die", 0.6), ("\u0120der", 0.4)]),       # German: first
            _expl(0, 2, promoted=["\u0120und", "\u0120die", "\u0120the"]),      # output evidence, mostly German
            _expl(0, 3, peaks=[("\u0120die", 1.0)], promoted=["\u0120the", "\u0120in"])]  # both kinds: mean
    s = score_neurons(expl, concepts, None, n_layers=1, d_mlp=4, match="evidence")
    order = s.top_k(4)
    assert order[0] == NeuronId(0, 1) and order[-1] == NeuronId(0, 0)
    v = {n: float(s.scores[n.layer, n.index]) for n in order}
    assert v[NeuronId(0, 0)] < 0 < v[NeuronId(0, 2)]
    both, _ = evidence_score(expl[3], terms)
    assert both == pytest.approx((terms["die"] + (terms["the"] + terms["in"]) / 2) / 2)
    assert "die" in s.labels[NeuronId(0, 1)] and "term weight" in s.labels[NeuronId(0, 1)]
    assert s.secondary_name  # ties go to a declared signal


def test_text_only_explanations_are_read_by_what_they_quote():
    terms = concept_terms(GERMAN, ENGLISH)
    de = NeuronExplanation(NeuronId(0, 0), "the German articles 'die' and 'der'", source="import")
    en = NeuronExplanation(NeuronId(0, 1), "the English article 'the'", source="import")
    assert evidence_score(de, terms)[0] > 0 > evidence_score(en, terms)[0]


def test_evidence_match_refuses_concepts_without_term_weights_and_bad_match():
    old = DatasetConcepts(["Der Hund"], source="old file")
    with pytest.raises(ValueError, match="term weights.*--match embedding"):
        score_neurons([_expl(0, 0, peaks=[("die", 1.0)])], old, None, n_layers=1, d_mlp=1, match="evidence")
    with pytest.raises(ValueError, match="match must be one of"):
        score_neurons([_expl(0, 0, peaks=[("die", 1.0)])], old, None, n_layers=1, d_mlp=1, match="cosine")
    with pytest.raises(ValueError, match="give an embedder"):
        score_neurons([_expl(0, 0, peaks=[("die", 1.0)])], old, None, n_layers=1, d_mlp=1, match="embedding")


def test_concepts_keep_their_term_weights_through_save_and_load(tmp_path):
    c = extract_concepts(GERMAN * 2, reference_texts=ENGLISH * 2)
    assert c.terms and c.terms["die"] > 0
    back = DatasetConcepts.load(c.save(tmp_path / "c.json"))
    assert back.terms == c.terms and back.concepts == c.concepts
    # a version-1 file (no terms) still loads
    (tmp_path / "v1.json").write_text(json.dumps({"concepts": ["a"], "source": "s"}))
    assert DatasetConcepts.load(tmp_path / "v1.json").terms == {}
    with pytest.raises(ValueError, match="terms"):
        DatasetConcepts(["a"], terms={"x": "high"})  # type: ignore[dict-item]


def test_cli_score_evidence_match_needs_no_embedder(tmp_path, capsys, caplog):
    forget, ref = tmp_path / "de.txt", tmp_path / "en.txt"
    forget.write_text("\n\n".join(GERMAN * 2))
    ref.write_text("\n\n".join(ENGLISH * 2))
    co = tmp_path / "c.json"
    assert main(["concepts", "--forget", str(forget), "--reference", str(ref), "--out", str(co)]) == 0
    ex = tmp_path / "e.jsonl"
    ex.write_text("".join(json.dumps(e.to_json()) + "\n" for e in
                          [_expl(0, 0, peaks=[("\u0120the", 1.0)]), _expl(0, 1, peaks=[("\u0120die", 1.0)])]))
    capsys.readouterr()
    # --embedder names a model that does not exist: the evidence match never loads it
    assert main(["score", "--explanations", str(ex), "--concepts", str(co), "--shape", "1x2", "--embedder",
                 str(tmp_path / "no-such-model"), "--out", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("L0/N1\t")
    assert any("is not used" in r.getMessage() and "--match embedding" in r.getMessage() for r in caplog.records)


def test_input_evidence_keeps_the_peak_token_of_every_top_window():
    from snip_lens.explain.input import input_evidence
    from snip_lens.types import ActivationRecord, NeuronRecords

    recs = [ActivationRecord(["\u0120Der", "\u0120Hund"], [0.1, 2.0]),
            ActivationRecord(["\u0120die", "\u0120Katze"], [3.0, 0.2]),
            ActivationRecord(["\u0120ein", "\u0120Hund"], [0.0, 1.5]),
            ActivationRecord(["\u0120the", "\u0120dog"], [0.3, 1.0])]
    ev = input_evidence(NeuronRecords(NeuronId(0, 0), recs))
    assert [(t.token, t.weight) for t in ev.peaks] == [("Hund", 0.5), ("die", 0.25), ("dog", 0.25)]
    assert type(ev).from_json(ev.to_json()).peaks == ev.peaks
    # the evidence match reads those peaks, weighted by their share
    terms = concept_terms(GERMAN + ["Der Hund bellt."], ENGLISH + ["The dog barks."])
    score, _ = evidence_score(NeuronExplanation(NeuronId(0, 0), "x", source="t",
                                                evidence=NeuronEvidence(ev, None)), terms)
    assert score == pytest.approx(0.5 * terms["hund"] + 0.25 * terms["dog"] + 0.25 * terms["die"])
