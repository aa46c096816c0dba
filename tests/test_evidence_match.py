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
    # weight = share of the summed peak activation: Hund 2.0 + 1.5, die 3.0, dog 1.0 of 7.5
    assert [(t.token, t.weight) for t in ev.peaks] == [("Hund", round(3.5 / 7.5, 6)), ("die", 0.4),
                                                       ("dog", round(1 / 7.5, 6))]
    assert ev.active == []  # no random windows
    assert type(ev).from_json(ev.to_json()).peaks == ev.peaks
    # the evidence match reads those peaks, weighted by their share
    terms = concept_terms(GERMAN + ["Der Hund bellt."], ENGLISH + ["The dog barks."])
    score, _ = evidence_score(NeuronExplanation(NeuronId(0, 0), "x", source="t",
                                                evidence=NeuronEvidence(ev, None)), terms)
    assert score == pytest.approx((3.5 * terms["hund"] + 1.0 * terms["dog"] + 3.0 * terms["die"]) / 7.5, abs=1e-5)


def test_peaks_read_every_top_window_and_active_every_token_of_the_random_windows():
    from snip_lens.explain.input import input_evidence
    from snip_lens.types import ActivationRecord, NeuronRecords

    top = [ActivationRecord(["\u0120Hund"], [2.0])] * 2 + [ActivationRecord(["\u0120dog"], [1.0])] * 3
    rnd = [ActivationRecord(["\u0120der", "\u0120Hund", "\u0120the"], [-1.0, 0.5, 0.0]),
           ActivationRecord(["\u0120the", "\u0120der"], [0.5, 1.0])]
    ev = input_evidence(NeuronRecords(NeuronId(0, 0), top, rnd), max_records=2)
    assert [t.token for t in ev.top_tokens] == ["Hund"]  # the sentence reads the first max_records windows
    assert [(t.token, t.weight) for t in ev.peaks] == [("Hund", round(4 / 7, 6)), ("dog", round(3 / 7, 6))]
    # |activation| over every token of the random windows: der 1 + 1, Hund 0.5, the 0 + 0.5 of 3
    assert [(t.token, t.weight) for t in ev.active] == [("der", round(2 / 3, 6)), ("Hund", round(0.5 / 3, 6)),
                                                        ("the", round(0.5 / 3, 6))]
    assert type(ev).from_json(ev.to_json()) == ev
    # the score is the mean of the two input readings
    terms = {"hund": 4.0, "dog": -2.0, "der": 3.0, "the": -1.0}
    score, _ = evidence_score(NeuronExplanation(NeuronId(0, 0), "x", source="t",
                                                evidence=NeuronEvidence(ev, None)), terms)
    peaks = (4 * 4.0 + 3 * -2.0) / 7
    active = (2 * 3.0 + 0.5 * 4.0 + 0.5 * -1.0) / 3
    assert score == pytest.approx((peaks + active) / 2, abs=1e-5)


def test_active_keeps_the_largest_shares_only():
    from snip_lens.explain.input import active_shares
    from snip_lens.types import ActivationRecord, NeuronRecords

    rnd = [ActivationRecord([f"t{i}" for i in range(10)], [float(i) for i in range(10)])]
    kept = active_shares(NeuronRecords(NeuronId(0, 0), [], rnd), limit=3)
    assert [t.token for t in kept] == ["t9", "t8", "t7"]
    assert kept[0].weight == pytest.approx(9 / 45)  # shares of the whole activity, not of the kept part


def _piece_only_in(tok, forget: list[str], reference: list[str]) -> str:
    """A decoded token of ``forget`` that is not a whole word and never occurs in ``reference``."""
    ref_ids = {i for t in reference for i in tok(t, add_special_tokens=False)["input_ids"]}
    seen: dict[str, int] = {}
    for t in forget:
        for i in tok(t, add_special_tokens=False)["input_ids"]:
            s = tok.decode([i])
            if i not in ref_ids and s.strip().isalpha() and not s.startswith(" ") and len(s) >= 2:
                seen[s] = seen.get(s, 0) + 1
    assert seen, "the test corpora should split German words into pieces"
    return max(seen, key=lambda s: (seen[s], s))


def test_token_terms_weigh_the_word_pieces_that_word_terms_cannot():
    from snip_lens.concepts import token_terms
    from snip_lens.testing import tiny_tokenizer

    tok = tiny_tokenizer()  # trained on English prose: German words come out as pieces
    tt = token_terms(GERMAN * 3, ENGLISH * 3, tok)
    piece = _piece_only_in(tok, GERMAN, ENGLISH)
    words = concept_terms(GERMAN * 3, ENGLISH * 3)
    # a piece of a German word: no word term knows it, the token terms do
    assert max((words.get(t, 0.0) for t in term_pieces(piece)), default=0.0) == 0.0
    assert tt[piece] > 0
    # keys are the tokens as explanations record them: decoded, leading space and case kept
    assert tt[" the"] < 0 and "the" not in tt
    de = _expl(0, 0, peaks=[(piece, 1.0)])
    assert evidence_score(de, words)[0] == 0.0
    assert evidence_score(de, words, None, tt)[0] == pytest.approx(tt[piece])
    # a token the token terms lack is weighed by its word terms
    assert evidence_score(_expl(0, 1, peaks=[("\u0120Hundx", 1.0)]), words, None, tt)[0] == 0.0
    assert evidence_score(_expl(0, 1, peaks=[("Die!", 1.0)]), words, None, tt)[0] == pytest.approx(
        max(words["die"], words.get("!", 0.0)))
    with pytest.raises(ValueError, match="Hugging Face tokenizer"):
        token_terms(GERMAN, ENGLISH, "not a tokenizer")


def test_concepts_keep_their_token_terms_and_older_files_load(tmp_path):
    c = DatasetConcepts(["Der Hund"], source="t", terms={"die": 2.0}, token_terms={" die": 3.0}, tokenizer="m")
    back = DatasetConcepts.load(c.save(tmp_path / "c.json"))
    assert (back.token_terms, back.tokenizer, back.terms) == ({" die": 3.0}, "m", {"die": 2.0})
    (tmp_path / "v2.json").write_text(json.dumps({"format": "snip_lens.concepts", "version": 2, "concepts": ["a"],
                                                  "terms": {"a": 1.0}}))
    v2 = DatasetConcepts.load(tmp_path / "v2.json")
    assert v2.token_terms == {} and v2.terms == {"a": 1.0}
    with pytest.raises(ValueError, match="without the tokenizer"):
        DatasetConcepts(["a"], token_terms={" a": 1.0})
    with pytest.raises(ValueError, match="token_terms"):
        DatasetConcepts(["a"], token_terms={" a": float("nan")}, tokenizer="m")


def test_with_evidence_terms_fills_only_the_missing_weights():
    from snip_lens.concepts import with_evidence_terms
    from snip_lens.testing import tiny_model

    model = tiny_model("llama")
    bare = DatasetConcepts(["Der Hund"], source="t")
    filled = with_evidence_terms(bare, GERMAN, ENGLISH, model)
    assert filled.terms and filled.token_terms and filled.tokenizer == "tiny-llama"
    assert filled.concepts == bare.concepts and filled.source == bare.source
    # weights it already has are kept, with the tokenizer that counted them
    kept = DatasetConcepts(["Der Hund"], source="t", token_terms={" die": 3.0}, tokenizer="other")
    got = with_evidence_terms(kept, GERMAN, ENGLISH, model)
    assert (got.token_terms, got.tokenizer) == ({" die": 3.0}, "other") and got.terms == filled.terms
    assert with_evidence_terms(filled, [], None, None) is filled  # complete: nothing recounted


def test_a_token_weighs_the_larger_of_its_word_and_token_readings():
    tt = {"ung": 4.0, " the": -3.0, " die": 5.0}
    concepts = DatasetConcepts(["Der Hund"], source="t", terms={"the": -1.0, "die": 2.0}, token_terms=tt,
                               tokenizer="m")
    s = score_neurons([_expl(0, 0, peaks=[(" the", 1.0)]), _expl(0, 1, promoted=["ung", "ung"]),
                       _expl(0, 2, peaks=[(" die", 1.0)]), _expl(0, 3, peaks=[("Die", 1.0)])], concepts, None,
                      n_layers=1, d_mlp=4, match="evidence")
    assert [round(float(v), 4) for v in s.scores[0]] == [-1.0, 4.0, 5.0, 2.0]
    # input evidence keys ' Haus' and 'Haus' as one entry 'Haus': it reads as either model token
    haus = {" Haus": 5.0, "Haus": -1.0}
    assert evidence_score(_expl(0, 0, peaks=[("Haus", 1.0)]), {}, None, haus)[0] == pytest.approx(5.0)
    assert evidence_score(_expl(0, 0, peaks=[(" Haus", 1.0)]), {}, None, {"Haus": 7.0})[0] == 0.0


def test_cli_concepts_with_a_tokenizer_writes_token_terms_and_score_warns_without(tmp_path, capsys, caplog):
    from snip_lens.testing import tiny_hf_model, tiny_tokenizer

    model_dir = tmp_path / "tiny"
    tiny_hf_model("llama", n_layers=1, d_mlp=8).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    forget, ref = tmp_path / "de.txt", tmp_path / "en.txt"
    forget.write_text("\n\n".join(GERMAN * 2))
    ref.write_text("\n\n".join(ENGLISH * 2))
    co, plain = tmp_path / "c.json", tmp_path / "plain.json"
    assert main(["concepts", "--forget", str(forget), "--reference", str(ref), "--tokenizer", str(model_dir),
                 "--out", str(co)]) == 0
    c = DatasetConcepts.load(co)
    assert c.token_terms[" the"] < 0 and c.tokenizer
    assert main(["concepts", "--forget", str(forget), "--reference", str(ref), "--out", str(plain)]) == 0
    ex = tmp_path / "e.jsonl"
    ex.write_text(json.dumps(_expl(0, 0, peaks=[("\u0120die", 1.0)]).to_json()) + "\n")
    caplog.clear()
    assert main(["score", "--explanations", str(ex), "--concepts", str(plain), "--shape", "1x1",
                 "--out", str(tmp_path / "s")]) == 0
    assert any("no token terms" in r.getMessage() and "--tokenizer" in r.getMessage() for r in caplog.records)
