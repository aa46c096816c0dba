"""Generation-level forgetting: domain detectors on known strings, the auto rules, prompts, decoding and fluency."""

from __future__ import annotations

import pydoc_data.topics
import pytest
import torch

from snip_lens.corpus import load_texts
from snip_lens.evaluate._common import hooked_names
from snip_lens.evaluate.generation import (ClassifierDetector, GenerationConfig, GenerationEvaluator,
                                           LanguageDetector, PythonDetector, choose_detector, continuation_loss,
                                           flat_metrics, generate, is_python, make_detector, make_prompts,
                                           parse_detector)
from snip_lens.mask import NeuronMask
from snip_lens.testing import forbid_network, tiny_model

PROSE = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]

CODE_FRAGMENTS = [
    "import os\nimport sys\n\ndef main(argv):\n    return len(argv)\n",
    "x)\n        return self._cache[key]\n\n    def clear(self):\n        self._cache = {}\n",  # starts mid-line
    "        if value is None:\n            raise ValueError('no value')\n        return value\n    def",  # indented
    "    for i in range(10):\n        total += i\n    return total\n\nclass Foo(Bar):\n    x = [1, 2,\n",
    "result = compute(a, b,\n                 c)\n",
]
PROSE_FRAGMENTS = [
    "The quick brown fox jumps over the lazy dog, and then it runs away into the forest.",
    "This function returns the number of items in the container. It raises an error when",
    "Der Hund läuft schnell über die Straße und bellt laut, weil er die Katze gesehen hat.",
    "",
    "   \n\n  ",
]
GERMAN = ["Der Hund läuft schnell über die Straße und bellt laut, weil er die Katze gesehen hat.",
          "Wer anderen eine Grube gräbt, fällt selbst hinein. Das wusste schon meine Großmutter.",
          "Ich habe heute keine Zeit, weil ich noch einkaufen gehen und das Abendessen kochen muss."]
ENGLISH = ["The dog runs quickly across the street and barks loudly because it has seen the cat.",
           "He who digs a pit for others falls into it himself. My grandmother already knew that.",
           "I have no time today because I still have to go shopping and cook dinner for everyone."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2, d_mlp=32)


@pytest.fixture(scope="module")
def code_texts():
    return load_texts("code", max_docs=40, seed=0)


def test_python_detector_scores_known_code_and_prose():
    det = PythonDetector()
    assert det(CODE_FRAGMENTS) == [True] * len(CODE_FRAGMENTS)
    assert det(PROSE_FRAGMENTS) == [False] * len(PROSE_FRAGMENTS)
    assert is_python("def f(x):\n") and not is_python('print("unterminated\nnext line is prose, not code at all.')


def test_language_detector_scores_known_german_and_english():
    de, en = LanguageDetector("de"), LanguageDetector("en")
    assert de(GERMAN) == [True] * 3 and de(ENGLISH) == [False] * 3
    assert en(ENGLISH) == [True] * 3 and en(GERMAN) == [False] * 3
    assert de(["", "1234 5678", "   "]) == [False] * 3  # no letter: never in a language
    with pytest.raises(ValueError, match="does not know the language 'zz'"):
        LanguageDetector("zz")


def test_language_detector_works_without_network(monkeypatch):
    refused = forbid_network(monkeypatch)
    assert LanguageDetector("de")(GERMAN[:1]) == [True]
    assert refused == []  # the model ships inside the package: nothing was even tried


def test_classifier_detector_learns_forget_vs_retain_and_reports_heldout_accuracy(model, code_texts):
    det = ClassifierDetector(model, code_texts, PROSE, n_tokens=24, max_chunks=120)
    assert det.accuracy >= 0.85
    assert det.describe()["heldout_accuracy"] == det.accuracy and det.n_test > 0
    assert sum(det(CODE_FRAGMENTS)) >= 3  # a ~90% classifier: most, not all, of the code fragments
    assert det(PROSE_FRAGMENTS) == [False] * len(PROSE_FRAGMENTS)


def test_auto_rules_choose_python_language_or_classifier(code_texts):
    assert choose_detector(code_texts, PROSE)[0] == "python"
    assert choose_detector(GERMAN * 4, ENGLISH * 4)[0] == "language:de"
    spec, evidence = choose_detector(PROSE, code_texts)  # English prose vs code: neither rule holds
    assert spec == "classifier" and evidence["retain_python_share"] == 1.0


def test_detector_specs():
    assert parse_detector("language:de") == ("language", "de")
    assert parse_detector("python") == ("python", None)
    for bad in ("lang:de", "language:", "german", ""):
        with pytest.raises(ValueError, match="unknown detector"):
            parse_detector(bad)
    with pytest.raises(ValueError, match="decodings"):
        GenerationConfig(decodings=["beam"])
    with pytest.raises(ValueError, match="n_prompts"):
        GenerationConfig(n_prompts=0)


def test_prompts_come_from_the_given_documents_with_their_true_continuation(model, code_texts):
    prompts = make_prompts(model, code_texts, n=6, prompt_tokens=10, continuation_tokens=8, seed=3)
    assert len(prompts) == 6
    for p in prompts:
        span = code_texts[p.document][p.char_start:p.char_start + 18 * 16]
        assert p.char_start == 0 or code_texts[p.document][p.char_start - 1] == "\n"  # a line start
        ids = model.tokenizer(span, add_special_tokens=False)["input_ids"]
        assert p.tokens[-10:] == ids[p.offset:p.offset + 10]
        assert p.reference == ids[p.offset + 10:p.offset + 18]
    again = make_prompts(model, code_texts, n=6, prompt_tokens=10, continuation_tokens=8, seed=3)
    assert [p.tokens for p in again] == [p.tokens for p in prompts]
    assert any(p.char_start > 0 for p in prompts)  # not only the heads of the documents
    with pytest.raises(ValueError, match="no held-out forget document"):
        make_prompts(model, ["short"], n=2, prompt_tokens=10, continuation_tokens=8)


def test_continuation_loss_with_padding_equals_one_row_at_a_time(model, code_texts):
    prompts = make_prompts(model, code_texts, n=3, prompt_tokens=6, continuation_tokens=6, seed=0)
    conts = [p.reference[:n] for p, n in zip(prompts, (6, 2, 4))]  # different lengths: padded batch
    batched = continuation_loss(model, prompts, conts, batch_size=3)
    total, n = 0.0, 0
    with torch.no_grad():
        for p, c in zip(prompts, conts):
            ids = torch.tensor([p.tokens + c])
            lp = torch.log_softmax(model(ids, return_type="logits")[0].double(), -1)
            total += -sum(float(lp[len(p.tokens) - 1 + i, t]) for i, t in enumerate(c))
            n += len(c)
    assert batched == pytest.approx(total / n, rel=1e-5)


def test_generation_evaluator_is_seeded_masks_change_it_and_no_hook_remains(model, code_texts):
    cfg = GenerationConfig(n_prompts=4, prompt_tokens=8, max_new_tokens=6, batch_size=2, detector="python")
    ev = GenerationEvaluator(model, code_texts[:20], PROSE[:20], code_texts[20:], PROSE[20:], cfg)
    base = ev.run(None)
    assert set(base) == {"greedy", "sampled"}
    for res in base.values():
        assert 0.0 <= res["forget_in_domain"] <= 1.0 and 0.0 <= res["retain_in_domain"] <= 1.0
        assert res["retain_fluency"] > 0 and len(res["forget_examples"]) == 3
    assert ev.run(None) == base  # greedy and seeded sampling repeat exactly
    mask = NeuronMask.from_neurons(model, [(0, i) for i in range(32)] + [(1, i) for i in range(32)])
    pruned = {d: generate(model, ev.prompts["forget"], cfg, d, mask=mask) for d in cfg.decodings}
    plain = {d: generate(model, ev.prompts["forget"], cfg, d) for d in cfg.decodings}
    assert pruned != plain
    assert hooked_names(model, "model") == []
    desc = ev.describe()
    assert desc["detector"]["name"] == "python" and 0 <= desc["reference_forget_in_domain"] <= 1
    assert set(flat_metrics(base)) == {f"generation_{d}_{m}" for d in ("greedy", "sampled")
                                       for m in ("forget_in_domain", "retain_in_domain", "retain_fluency")}


def test_auto_detector_resolves_on_selection_documents(model, code_texts):
    det = make_detector("auto", model, code_texts, PROSE)
    assert det.name == "python" and det.auto_evidence["forget_python_share"] >= 0.8
