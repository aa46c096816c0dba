"""Tests of SNIP step 1: the explainer prompt (golden strings), answer parsing, the three explainers, the
per-neuron cache and resume, and importing published explanations."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from pathlib import Path

import pytest

from snip_lens.explain.input import clean_token as clean
from snip_lens.explain import (EXPLANATION_PREFIX, FEW_SHOT_EXAMPLES, ExplainConfig, HeuristicExplainer, describe_input,
                               LocalChatClient, build_explanation_prompt, explain, import_explanations,
                               load_explanations, non_zero_proportion, parse_explanation, save_explanations,
                               scale_activations)
from snip_lens.llm import LLMConfig
from snip_lens.loopback import GARBAGE_ANSWERS, LoopbackServer
from snip_lens.types import ActivationRecord, NeuronExplanation, NeuronId, NeuronRecords

FIXTURES = Path(__file__).parent / "fixtures"
KEY = "sk-explain-test-SECRET-9f8e7d6c5b4a"

SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a short "
    "document. Look at the parts of the document the neuron activates for and summarize in a single sentence "
    "what the neuron is looking for. Don't list examples of words.\n\nThe activation format is "
    "token<tab>activation. Activation values range from 0 to 10. A neuron finding what it's looking for is "
    "represented by a non-zero activation value. The higher the activation value, the stronger the match."
)


def dense_records() -> NeuronRecords:
    return NeuronRecords(NeuronId(1, 2), [
        ActivationRecord(["def", " foo", "(", "self", "):"], [4.0, 0.0, -1.0, 2.0, 0.5]),
        ActivationRecord([" return", " x"], [1.0, 0.0]),
    ])


# -- prompt -------------------------------------------------------------------------------------------

def test_golden_prompt_without_few_shot():
    msgs = build_explanation_prompt(dense_records(), few_shot=False)
    assert msgs == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content":
            "\n\nNeuron 1\nActivations:\n<start>\ndef\t10\n foo\t0\n(\t0\nself\t5\n):\t1\n<end>\n<start>\n"
            " return\t2\n x\t0\n<end>\n\nExplanation of neuron 1 behavior: the main thing this neuron does is find"},
    ]


def test_golden_prompt_sparse_repeats_nonzero_tokens():
    recs = [ActivationRecord(list("abcdef"), [0, 0, 3.0, 0, 0, 0])]  # 1/6 non-zero < 0.2
    (_, user) = build_explanation_prompt(recs, few_shot=False)
    assert user["content"] == (
        "\n\nNeuron 1\nActivations:\n<start>\na\t0\nb\t0\nc\t10\nd\t0\ne\t0\nf\t0\n<end>\n"
        "\nSame activations, but with all zeros filtered out:\n<start>\nc\t10\n<end>\n"
        "\nExplanation of neuron 1 behavior: the main thing this neuron does is find")


def test_golden_prompt_with_original_few_shot_examples():
    msgs = build_explanation_prompt(dense_records())
    assert len(FEW_SHOT_EXAMPLES) == 3
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant",
                                         "user"]
    assert msgs[0]["content"] == SYSTEM
    assert [m["content"] for m in msgs[2:7:2]] == [
        " present tense verbs ending in 'ing'.", " words related to physical medical conditions.",
        " phrases related to community."]
    # Example 3 (paper appendix A.1: "together 3 / ness 7 / town 1"); 9 of 32 non-zero, so no repeat.
    assert msgs[5]["content"] == (
        "\n\nNeuron 3\nActivations:\n<start>\nthe\t0\n sense\t0\n of\t0\n together\t3\nness\t7\n in\t0\n our\t0\n"
        " town\t1\n is\t0\n strong\t0\n .\t0\n<end>\n<start>\na\t0\n buoy\t0\nant\t0\n romantic\t0\n comedy\t0\n"
        " about\t0\n friendship\t0\n ,\t0\n love\t0\n ,\t0\n and\t0\n the\t0\n truth\t0\n that\t0\n we\t2\n"
        "'re\t4\n all\t3\n in\t7\n this\t10\n together\t5\n .\t0\n<end>\n"
        "\nExplanation of neuron 3 behavior: the main thing this neuron does is find")
    # Example 1 is sparse: the zeros-filtered repeat (appendix A.1: "aping 9 / the 4 / affecting 3").
    assert ("\nSame activations, but with all zeros filtered out:\n<start>\n'\t1\n disappearing\t6\nearing\t10\n"
            "<end>\n<start>\naping\t9\n the\t4\n affecting\t3\n<end>\n") in msgs[1]["content"]
    assert msgs[7]["content"] == (
        "\n\nNeuron 4\nActivations:\n<start>\ndef\t10\n foo\t0\n(\t0\nself\t5\n):\t1\n<end>\n<start>\n"
        " return\t2\n x\t0\n<end>\n\nExplanation of neuron 4 behavior: the main thing this neuron does is find")
    assert msgs[-1]["content"].endswith(EXPLANATION_PREFIX)


def test_explicit_max_activation_and_max_records():
    msgs = build_explanation_prompt(dense_records(), few_shot=False, max_activation=8.0, max_records=1)
    assert "def\t5\n foo\t0\n(\t0\nself\t2\n):\t0\n<end>\n\n" in msgs[1]["content"]
    assert " return" not in msgs[1]["content"]


def test_tokens_with_newlines_keep_the_line_format():
    msgs = build_explanation_prompt([ActivationRecord(["a\n", "\tb"], [1.0, 0.0])], few_shot=False)
    assert "a\\n\t10\n\\tb\t0" in msgs[1]["content"]


def test_empty_records_raise_naming_the_neuron():
    with pytest.raises(ValueError, match="L3/N4"):
        build_explanation_prompt(NeuronRecords(NeuronId(3, 4), []))


def test_scaling_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        acts = [rng.uniform(-3, 5) for _ in range(rng.randint(1, 20))]
        mx = max(0.0, max(acts))
        got = scale_activations(acts, mx)
        for a, g in zip(acts, got):
            want = 0 if mx <= 0 or a <= 0 else min(10, int(math.floor(10 * a / mx)))
            assert g == want and 0 <= g <= 10
    assert scale_activations([1.0, 2.0], 0.0) == [0, 0]
    recs = [ActivationRecord(["a", "b"], [0.0, 1.0]), ActivationRecord(["c", "d", "e"], [0.05, 0.0, 0.5])]
    assert non_zero_proportion(recs, 1.0) == pytest.approx(2 / 5)


# -- parsing ------------------------------------------------------------------------------------------

def test_parse_follows_openai_rule():
    assert parse_explanation(" words related to cats.") == "words related to cats"
    assert parse_explanation("the main thing this neuron does is find verbs in the past tense.\n\nNeuron 5") == \
        "verbs in the past tense"
    assert parse_explanation(" the token '====' in headings.") == "the token '====' in headings"
    with pytest.raises(ValueError, match="not a sentence"):
        parse_explanation(" '#### ???' !!")


@pytest.mark.parametrize("garbage", list(GARBAGE_ANSWERS) + [None, "a a a a a a", ".", "...."])
def test_parse_rejects_garbage(garbage):
    with pytest.raises(ValueError):
        parse_explanation(garbage)


# -- offline input-centric explainer -----------------------------------------------------------------

CODE = [
    ["\n", "def", " parse", "_", "args", "(", "self", ",", " argv", "):", "\n", "    ", "return", " self", ".",
     "parser", ".", "parse", "_", "args", "(", "argv", ")"],
    ["class", " Foo", "Bar", ":", "\n", "    ", "def", " __", "init", "__", "(", "self", "):", "\n", "        ",
     "self", ".", "x", " =", " None"],
]
PROSE = [
    ["The", " cat", " sat", " on", " the", " mat", " and", " looked", " at", " the", " door", " of", " the",
     " house", "."],
    ["It", " is", " one", " of", " the", " oldest", " stories", " in", " the", " world", ",", " and", " it",
     " was", " told", " by", " the", " people", "."],
]


def peak_records(neuron: NeuronId, windows: list[list[str]], peak: str, random_windows=()) -> NeuronRecords:
    recs = []
    for w in windows:
        acts = [0.0] * len(w)
        acts[w.index(peak)] = 2.0
        recs.append(ActivationRecord(w, acts))
    rand = [ActivationRecord(w, [0.0] * len(w)) for w in random_windows]
    return NeuronRecords(neuron, recs, rand)


def test_offline_input_explainer_reads_only_the_records():
    h = HeuristicExplainer()
    e = h.explain_one(peak_records(NeuronId(0, 0), CODE, "def", random_windows=PROSE))
    assert e.ok and e.kind == "input" and e.source == "offline-input"
    ev = e.evidence.input
    assert [t.token for t in ev.top_tokens] == ["def"] and ev.top_tokens[0].weight == pytest.approx(1.0)
    # 'self' is in both top windows and in no random window; ':' and 'the' are not distinctive
    assert "self" in [t.token for t in ev.distinctive]
    assert all(t.token not in {"the", "The"} for t in ev.distinctive)
    assert e.explanation.startswith("the token 'def'") and "in text with" in e.explanation and "'self'" in \
        e.explanation
    assert ev.contexts[0].endswith("[[def]] parse_args")
    # the same peak in other text gives another description: nothing in it comes from outside the records
    other = h.explain_one(peak_records(NeuronId(0, 1), PROSE, " the", random_windows=CODE))
    assert other.explanation.startswith("the token 'the'") and "'self'" not in other.explanation
    # BPE markers are decoded and a token shared by most peaks' neighbours is named as context
    bpe = NeuronRecords(NeuronId(0, 2), [ActivationRecord(["ĠThe", "Ġcat", "Ġsat"], [0, 3.0, 0]),
                                         ActivationRecord(["ĠThe", "Ġcat", "Ġran"], [0, 2.0, 0])])
    assert h.explain_one(bpe).explanation == "the token 'cat' after 'The'"
    ws = NeuronRecords(NeuronId(0, 3), [ActivationRecord(["a", "\n", "b"], [0, 1.0, 0])])
    assert h.explain_one(ws).explanation == "the token '\\n' after 'a' before 'b'"
    empty = h.explain_one(NeuronRecords(NeuronId(0, 4), []))
    assert not empty.ok and "no activation records" in empty.error


def test_offline_input_explainer_source_has_no_rule_for_a_language_or_domain():
    import importlib
    import inspect

    for name in ("input", "output", "both", "vocabproj"):
        mod = importlib.import_module(f"snip_lens.explain.{name}")
        src = inspect.getsource(mod).lower()
        for word in ("python", "english", "prose", "keyword", "stopword", "'def'", "docstring", "german"):
            assert word not in src, (mod.__name__, word)


def test_offline_input_explainer_is_deterministic_through_explain():
    recs = [peak_records(NeuronId(0, i), CODE if i % 2 else PROSE, "self" if i % 2 else " and") for i in range(6)]
    a = explain(recs, ExplainConfig(kind="heuristic"), progress=False)
    b = explain(recs, ExplainConfig(kind="heuristic"), progress=False)
    assert a == b and all(isinstance(e, NeuronExplanation) and e.ok for e in a)
    assert [e.neuron for e in a] == [r.neuron for r in recs]
    assert a[1].explanation.startswith("the token 'self'") and a[0].explanation.startswith("the token 'and'")


def test_offline_input_explainer_on_a_tiny_model_fed_two_languages():
    """Neurons of a tiny model over German and English text: every quoted token is in the neuron's own top
    windows, neurons whose top windows are all in one language are described with that language's tokens
    only, and the descriptions are distinct."""
    import pydoc_data.topics

    from snip_lens.collect import collect
    from snip_lens.corpus import TokenWindows, make_windows
    from snip_lens.testing import tiny_model

    model = tiny_model("llama", n_layers=2, d_mlp=32, seed=3)
    german = (FIXTURES / "two_languages_de.txt").read_text(encoding="utf-8").splitlines()
    english = [pydoc_data.topics.topics[k][:600] for k in sorted(pydoc_data.topics.topics)[:16]]
    de = make_windows(model, german, n_ctx=24, max_windows=16, seed=0, name="de")
    en = make_windows(model, english, n_ctx=24, max_windows=16, seed=0, name="en")
    import torch

    probe = TokenWindows(torch.cat([de.tokens, en.tokens]), list(range(len(de.tokens) + len(en.tokens))), "probe")
    records = collect(model, probe, top_k=6, context=(6, 2), n_random=6, batch_size=8, progress=False)
    n_de = len(de.tokens)
    de_text = "".join(german)
    en_text = "".join(english)
    out = explain(records, ExplainConfig(), progress=False)
    assert len(out) == 64 and all(e.ok for e in out)
    assert len({e.explanation for e in out}) >= 0.9 * len(out)
    one_language = {"de": 0, "en": 0}
    special = set(model.tokenizer.all_special_tokens)
    for e in out:
        rec = records.neuron_records(e.neuron)
        ev = e.evidence.input
        assert e.explanation == describe_input(ev)  # the sentence says what the evidence holds, nothing else
        seen = {clean(t) for r in rec.top for t in r.tokens} | {t for r in rec.top for t in r.tokens}
        named = [t.token for t in ev.top_tokens + ev.preceding + ev.following + ev.distinctive]
        assert named and all(t in seen for t in named), (e.explanation, named)
        langs = {"de" if r.document < n_de else "en" for r in rec.top}
        if len(langs) == 1:
            lang = langs.pop()
            one_language[lang] += 1
            text = de_text if lang == "de" else en_text
            # byte pieces of a multi-byte character decode to U+FFFD on their own: not a substring of the text
            assert all(t in text for t in named if t not in special and "\ufffd" not in t), (lang, e.explanation)
    assert one_language["de"] >= 1 and one_language["en"] >= 1, one_language


# -- openai explainer over a faulty loopback server ---------------------------------------------------

def unique_records(n: int) -> list[NeuronRecords]:
    """Neurons whose strongest token is unique to them, so answers can be traced to their neuron."""
    out = []
    for i in range(n):
        nid = NeuronId(i % 3, i)
        toks = [" the", " value", f" tok{nid.layer}x{nid.index}", " of", " it"]
        out.append(NeuronRecords(nid, [ActivationRecord(toks, [0.0, 0.5, 3.0, 0.0, 0.2])]))
    return out


def expected_text(r: NeuronRecords) -> str:
    return f"the token 'tok{r.neuron.layer}x{r.neuron.index}' in text"


def llm_config(srv: LoopbackServer, **kw) -> LLMConfig:
    base = dict(model="loopback-gpt", base_url=srv.base_url, api_key_env="SNIP_EXPLAIN_KEY", timeout=0.25,
                backoff_base=0.005, backoff_max=0.02, max_retries=1, concurrency=16)
    base.update(kw)
    return LLMConfig(**base)


def test_faulty_server_run_finishes_then_rerun_asks_only_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("SNIP_EXPLAIN_KEY", KEY)
    recs = unique_records(60)
    cache = tmp_path / "cache"
    with LoopbackServer(latency=0.01, fault_rate=0.3, seed=7, hang_seconds=1.0, api_key=KEY) as srv:
        cfg = ExplainConfig(kind="openai", llm=llm_config(srv, timeout=0.4))
        first = explain(recs, cfg, cache_dir=cache, progress=False)
        assert [e.neuron for e in first] == [r.neuron for r in recs]
        assert sum(srv.stats.faults.values()) > 0 and set(srv.stats.faults) >= {"429", "500", "timeout", "garbage"}
        failed = set()
        for r, e in zip(recs, first):
            if e.ok:
                assert e.explanation == expected_text(r) and e.error is None  # never garbage
            else:
                assert e.explanation is None and e.error
                failed.add(r.neuron)
        assert 0 < len(failed) < len(recs)
        save_explanations(tmp_path / "expl.jsonl", first)
        (tmp_path / "config.json").write_text(json.dumps(cfg.to_json()))

        # Only successes were cached.
        stored = [json.loads(p.read_text()) for p in cache.rglob("*.json")]
        assert sorted(s["explanation"] for s in stored) == sorted(e.explanation for e in first if e.ok)

        srv.fault_rate = 0.0
        n_prompts = len(srv.stats.chat_prompts)
        # More retries do not change what determines an answer, so the cache still applies.
        cfg_retry = ExplainConfig(kind="openai", llm=dataclasses.replace(cfg.llm, max_retries=4, timeout=5.0))
        second = explain(recs, cfg_retry, cache_dir=cache, progress=False)
        asked = srv.stats.chat_prompts[n_prompts:]
        asked_tokens = {m for p in asked for m in re.findall(r"^ (tok\d+x\d+)\t10$", p, flags=re.M)}
        assert asked_tokens == {f"tok{n.layer}x{n.index}" for n in failed}
        assert len(asked) == len(failed)
        assert all(e.ok for e in second)
        assert [e.explanation for e in second] == [expected_text(r) for r in recs]

    # The key is sent to the server but never written anywhere.
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert KEY not in p.read_text(errors="replace"), p


def test_cache_hit_skips_the_client(tmp_path, monkeypatch):
    monkeypatch.setenv("SNIP_EXPLAIN_KEY", KEY)
    recs = unique_records(5)
    with LoopbackServer() as srv:
        cfg = ExplainConfig(kind="openai", llm=llm_config(srv, timeout=10.0))
        first = explain(recs, cfg, cache_dir=tmp_path, progress=False)

    class Exploding:
        async def generate(self, messages):
            raise AssertionError("cache should have answered")

    assert all(e.ok for e in first)
    again = explain(recs, cfg, cache_dir=tmp_path, progress=False, client=Exploding())
    assert again == first
    # Changing what determines the output (sampling, records) misses the cache.
    class Fixed:
        calls = 0

        async def generate(self, messages):
            Fixed.calls += 1
            return " something else entirely."

    cfg2 = ExplainConfig(kind="openai", llm=dataclasses.replace(cfg.llm, temperature=0.5))
    explain(recs[:2], cfg2, cache_dir=tmp_path, progress=False, client=Fixed())
    changed = [NeuronRecords(recs[0].neuron, [ActivationRecord([" a", " b"], [1.0, 0.0])])]
    explain(changed, cfg, cache_dir=tmp_path, progress=False, client=Fixed())
    assert Fixed.calls == 3

    class Crashing:  # a client that raises something other than LLMError fails per neuron, not the run
        async def generate(self, messages):
            raise RuntimeError("out of memory")

    crashed = explain(changed, cfg, cache_dir=tmp_path / "other", progress=False, client=Crashing())
    assert crashed[0].error == "LLM call failed: RuntimeError: out of memory"
    assert not list((tmp_path / "other").rglob("*.json"))


def test_explain_accepts_a_records_store_and_a_neuron_subset():
    recs = {r.neuron: r for r in unique_records(6)}

    class Store:
        def neurons(self):
            return list(recs)

        def neuron_records(self, n):
            return recs[n]

    sub = [NeuronId(1, 4), NeuronId(0, 0)]
    out = explain(Store(), ExplainConfig(), neurons=sub, progress=False)
    assert [e.neuron for e in out] == sub
    out2 = explain(list(recs.values()), ExplainConfig(), neurons=sub, progress=False)
    assert {e.neuron for e in out2} == set(sub)
    with pytest.raises(TypeError, match="NeuronRecords"):
        explain([1, 2], ExplainConfig(), progress=False)


def test_explain_config_validation():
    with pytest.raises(ValueError, match="llm=LLMConfig"):
        ExplainConfig(kind="openai")
    with pytest.raises(ValueError, match="'gpt'"):
        ExplainConfig(kind="gpt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_records"):
        ExplainConfig(max_records=0)


# -- local explainer ----------------------------------------------------------------------------------

def test_local_client_plumbing_with_a_tiny_model():
    """Each answer of the local model reaches its neuron as the parser reads it: a parsed sentence, or the
    parser's own reason recorded as the failure (never the raw text, never another neuron's answer)."""
    from snip_lens.testing import tiny_hf_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    client = LocalChatClient("tiny", hf_model=tiny_hf_model("llama", n_ctx=512), tokenizer=tok,
                             max_new_tokens=5)
    recs = unique_records(4)
    raw = {r.neuron: client._generate_sync(build_explanation_prompt(r, few_shot=False)) for r in recs}
    out = explain(recs, ExplainConfig(kind="local", few_shot=False), client=client, progress=False)
    assert [e.neuron for e in out] == [r.neuron for r in recs]
    assert all(e.source == "local:smollm2-135m" and e.kind == "input" for e in out)
    for e in out:
        try:
            want = parse_explanation(raw[e.neuron])
        except ValueError as exc:
            assert e.explanation is None and e.error == f"unparseable answer: {exc}"
        else:
            assert e.explanation == want and e.error is None


@pytest.mark.slow
def test_local_smollm2_explains_a_neuron():
    client = LocalChatClient("smollm2-135m", max_new_tokens=24)
    recs = [peak_records(NeuronId(0, 0), CODE, "def"), peak_records(NeuronId(0, 1), PROSE, " the")]
    out = explain(recs, ExplainConfig(kind="local", few_shot=False), client=client, progress=False)
    assert all(e.ok for e in out), [e.error for e in out]
    for e in out:  # a parsed sentence of its own: not the prompt echoed, not a few-shot answer
        assert parse_explanation(e.explanation) == e.explanation
        assert e.explanation not in {x for _, x in FEW_SHOT_EXAMPLES} and "\t" not in e.explanation
    assert out[0].explanation != out[1].explanation  # different records, different explanations


# -- save / load / import -----------------------------------------------------------------------------

def test_save_load_roundtrip_and_overwrite_flag(tmp_path):
    items = [NeuronExplanation(NeuronId(0, 1), "cats", score=0.5, source="x"),
             NeuronExplanation(NeuronId(2, 3), None, source="x", error="timeout")]
    p = save_explanations(tmp_path / "e.jsonl", items)
    assert load_explanations(p) == items
    with pytest.raises(FileExistsError, match="overwrite"):
        save_explanations(p, items, overwrite=False)
    assert os.listdir(tmp_path) == ["e.jsonl"]


def test_import_openai_keeps_best_score_and_filters():
    out = import_explanations(FIXTURES / "explanations_openai.jsonl", n_layers=3, d_mlp=64)
    got = {e.neuron: (e.explanation, e.score) for e in out}
    assert got == {NeuronId(0, 7): ("references to movies, films and cinema", 0.61),
                   NeuronId(1, 3): ("function definitions in Python code", 0.48),
                   NeuronId(2, 60): ("the letter 'q'", 0.05)}
    kept = import_explanations(FIXTURES / "explanations_openai.jsonl", min_score=0.3)
    assert [e.neuron for e in kept] == [NeuronId(0, 7), NeuronId(1, 3)]
    assert all(e.ok and e.source == "import:explanations_openai.jsonl" for e in out)


def test_import_deepdecipher_file_and_directory(tmp_path):
    out = import_explanations(FIXTURES / "explanations_deepdecipher.json")
    assert [(e.neuron, e.explanation, e.score) for e in out] == [
        (NeuronId(0, 7), "mentions of films", 0.55), (NeuronId(1, 3), "Python function definitions", 0.31),
        (NeuronId(2, 9), "the end of a sentence", -0.02)]
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "17.json").write_text(json.dumps({"explanation": " quotes", "score": 0.2}))
    d = import_explanations(tmp_path, format="deepdecipher")
    assert [(e.neuron, e.explanation, e.score) for e in d] == [(NeuronId(4, 17), "quotes", 0.2)]


def test_import_neuronpedia_export():
    out = import_explanations(FIXTURES / "explanations_neuronpedia.json")
    assert [(e.neuron, e.explanation, e.score) for e in out] == [
        (NeuronId(0, 7), "film and movie titles", 0.42), (NeuronId(2, 11), "Python keywords like def and class",
                                                         None)]
    assert [e.neuron for e in import_explanations(FIXTURES / "explanations_neuronpedia.json", min_score=0.1)] == \
        [NeuronId(0, 7)]


def test_import_of_another_models_file_names_the_entry():
    with pytest.raises(ValueError) as ei:
        import_explanations(FIXTURES / "explanations_openai_gpt2xl.jsonl", n_layers=30, d_mlp=1536)
    msg = str(ei.value)
    assert "explanations_openai_gpt2xl.jsonl:2" in msg and "layer 47" in msg and "index 6399" in msg


def test_import_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        import_explanations(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown import format 'csv'"):
        import_explanations(FIXTURES / "explanations_openai.jsonl", format="csv")  # type: ignore[arg-type]
    weird = tmp_path / "weird.json"
    weird.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(ValueError, match=r"weird.json\[0\].*format"):
        import_explanations(weird)
    broken = tmp_path / "broken.jsonl"
    good = (FIXTURES / "explanations_openai.jsonl").read_text().splitlines()[0]
    broken.write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        import_explanations(broken)


# -- CLI ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    import pydoc_data.topics

    from snip_lens.collect import collect
    from snip_lens.corpus import make_windows
    from snip_lens.testing import tiny_model

    model = tiny_model("llama", n_layers=2, d_mlp=16)
    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:6]]
    windows = make_windows(model, texts, n_ctx=24, max_windows=8, seed=0, name="probe")
    d = tmp_path_factory.mktemp("records")
    collect(model, windows, top_k=4, context=(6, 2), n_random=2, batch_size=4, out_dir=d, progress=False)
    return d


def test_cli_heuristic_equals_library(records_dir, tmp_path, capsys):
    from snip_lens.cli import main
    from snip_lens.collect import ActivationRecords

    out = tmp_path / "e.jsonl"
    assert main(["explain", "--records", str(records_dir), "--out", str(out)]) == 0
    got = load_explanations(out)
    want = explain(ActivationRecords.load(records_dir), ExplainConfig(), progress=False)
    assert got == want and len(got) == 2 * 16
    assert json.loads((tmp_path / "e.jsonl.config.json").read_text())["explain"]["kind"] == "heuristic"
    mtime = out.stat().st_mtime_ns
    assert main(["explain", "--records", str(records_dir), "--out", str(out)]) == 0  # same command: nothing failed
    assert out.stat().st_mtime_ns == mtime
    capsys.readouterr()
    # Another command's output is never replaced silently.
    assert main(["explain", "--records", str(records_dir), "--max-records", "3", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_openai_against_loopback_and_import(records_dir, tmp_path, capsys):
    from snip_lens.cli import main

    out = tmp_path / "o.jsonl"
    with LoopbackServer() as srv:
        rc = main(["explain", "--records", str(records_dir), "--explainer", "openai", "--llm-model", "m",
                   "--base-url", srv.base_url, "--api-key-env", "none", "--neurons", "L1/N3,0:5",
                   "--out", str(out)])
    assert rc == 0
    got = load_explanations(out)
    assert [e.neuron for e in got] == [NeuronId(1, 3), NeuronId(0, 5)]
    assert all(e.ok and e.source == "openai:m" and e.explanation.startswith("the token") for e in got)
    from snip_lens.llm import PROBE_PROMPT

    assert srv.stats.chat_prompts[0] == PROBE_PROMPT  # the server is checked once before the stage
    assert len(srv.stats.chat_prompts) == 1 + 2 and list((tmp_path / "o.jsonl.cache").rglob("*.json"))

    imp = tmp_path / "i.jsonl"
    fixture = str(FIXTURES / "explanations_openai.jsonl")
    assert main(["explain", "--import", fixture, "--min-score", "0.3", "--out", str(imp)]) == 0
    assert [e.neuron for e in load_explanations(imp)] == [NeuronId(0, 7), NeuronId(1, 3)]
    assert main(["explain", "--import", fixture, "--min-score", "0.3", "--out", str(imp)]) == 0  # same import again
    assert main(["explain", "--import", fixture, "--min-score", "0.5", "--out", str(imp)]) == 2  # another one
    assert "--overwrite" in capsys.readouterr().err
    # the records' model has 16 neurons per layer: neuron 0:7 fits, 2:60 does not
    rc = main(["explain", "--records", str(records_dir), "--import", fixture, "--out", str(tmp_path / "j.jsonl")])
    assert rc == 2
    assert "layer 2, index 60" in capsys.readouterr().err


def test_cli_rerun_retries_exactly_the_failed_neurons_and_says_so(records_dir, tmp_path, capsys, caplog):
    """The failure warning says 'rerun the same command to retry only them'; that rerun does exactly that."""
    import zlib

    from snip_lens.cli import main

    state = {"first": True}
    asked: list[str] = []

    from snip_lens.llm import PROBE_PROMPT

    def answer(messages):
        text = messages[-1]["content"]
        if text == PROBE_PROMPT:  # the one-request server check before the stage
            return "OK"
        asked.append(text)
        if state["first"] and zlib.crc32(text.encode()) % 2 == 0:
            return ""  # unparseable: this neuron fails
        return f"the token number {zlib.crc32(text.encode()) % 89}"

    out = tmp_path / "r.jsonl"
    with LoopbackServer(answer=answer) as srv:
        argv = ["explain", "--records", str(records_dir), "--explainer", "openai", "--llm-model", "m", "--base-url",
                srv.base_url, "--api-key-env", "none", "--out", str(out)]
        with caplog.at_level("WARNING", logger="snip_lens.explain"):
            assert main(argv) == 0
        assert "rerun the same command to retry only them" in caplog.text
        first = load_explanations(out)
        failed_prompts = [p for p in asked if zlib.crc32(p.encode()) % 2 == 0]
        n_failed = sum(not e.ok for e in first)
        assert 0 < n_failed == len(failed_prompts) < len(first)
        state["first"] = False
        asked.clear()
        caplog.clear()
        with caplog.at_level("WARNING", logger="snip_lens.explain"):
            assert main(argv) == 0
    assert sorted(asked) == sorted(failed_prompts)
    assert f"retrying {n_failed} failed and 0 missing explanation(s)" in caplog.text
    second = load_explanations(out)
    assert [e.neuron for e in second] == [e.neuron for e in first] and all(e.ok for e in second)
    assert [b for a, b in zip(first, second) if a.ok] == [a for a in first if a.ok]
    assert json.loads((tmp_path / "r.jsonl.config.json").read_text())["n_failed"] == 0
    assert "--overwrite" not in capsys.readouterr().err


def test_cli_missing_key_names_the_variable(records_dir, tmp_path, capsys, monkeypatch):
    from snip_lens.cli import main

    monkeypatch.delenv("SNIP_UNSET_KEY_VAR", raising=False)
    rc = main(["explain", "--records", str(records_dir), "--explainer", "openai", "--api-key-env",
               "SNIP_UNSET_KEY_VAR", "--out", str(tmp_path / "x.jsonl")])
    assert rc == 2 and "SNIP_UNSET_KEY_VAR" in capsys.readouterr().err


@pytest.mark.parametrize("layer", ["6-res-jb", "3-mlp_128k-oai", "10-gemmascope-res-16k"])
def test_import_neuronpedia_sae_latents_is_refused(tmp_path, layer):
    f = tmp_path / "np.json"
    f.write_text(json.dumps([
        {"modelId": "gpt2-small", "layer": "0-mlp", "index": "7", "description": "films", "scores": []},
        {"modelId": "gpt2-small", "layer": layer, "index": "21", "description": "dates", "scores": []}]))
    with pytest.raises(ValueError) as ei:
        import_explanations(f)
    msg = str(ei.value)
    assert "np.json[1]" in msg and repr(layer) in msg and "not MLP neurons" in msg and "'<layer>-mlp'" in msg


# -- output-centric and combined prompts ----------------------------------------------------------------

def output_evidence():
    from snip_lens.types import OutputEvidence, TokenWeight

    return OutputEvidence(promoted=[TokenWeight(" def", 1.25), TokenWeight("\n", 0.5)],
                          suppressed=[TokenWeight(" the", -0.75)], sign=1)


def test_golden_output_prompt():
    from snip_lens.explain import build_output_prompt
    from snip_lens.explain.prompts import OUTPUT_SYSTEM_PROMPT

    msgs = build_output_prompt(output_evidence())
    assert msgs[0] == {"role": "system", "content": OUTPUT_SYSTEM_PROMPT}
    assert OUTPUT_SYSTEM_PROMPT.startswith("We're studying neurons in a neural network. When a neuron activates")
    assert msgs[1] == {"role": "user", "content":
                       "\n\nNeuron 1\nPromoted tokens:\n<start>\n def\t1.25\n\\n\t0.5\n<end>\nSuppressed tokens:\n"
                       "<start>\n the\t-0.75\n<end>\n\nExplanation of neuron 1 behavior: the main thing this neuron "
                       "does is"}


def test_golden_both_prompt_shows_both_kinds_of_evidence():
    from snip_lens.explain import build_both_prompt
    from snip_lens.explain.prompts import BOTH_SYSTEM_PROMPT

    msgs = build_both_prompt(dense_records(), output_evidence())
    assert msgs == [
        {"role": "system", "content": BOTH_SYSTEM_PROMPT},
        {"role": "user", "content":
            "\n\nNeuron 1\nActivations:\n<start>\ndef\t10\n foo\t0\n(\t0\nself\t5\n):\t1\n<end>\n<start>\n"
            " return\t2\n x\t0\n<end>\n\nPromoted tokens:\n<start>\n def\t1.25\n\\n\t0.5\n<end>\n"
            "Suppressed tokens:\n<start>\n the\t-0.75\n<end>\n\nExplanation of neuron 1 behavior: the main thing "
            "this neuron does is"},
    ]
    assert "looks for" in BOTH_SYSTEM_PROMPT and "promotes and suppresses" in BOTH_SYSTEM_PROMPT
    assert parse_explanation(" the main thing this neuron does is predict ' def' after newlines.") == \
        "predict ' def' after newlines"
    with pytest.raises(ValueError, match="no activation records"):
        build_both_prompt([], output_evidence())


def _tok(t: str) -> str:
    return t.replace("\n", "\\n").replace("\t", "\\t")


def test_llm_explainer_with_both_kinds_over_http(tmp_path):
    from snip_lens.testing import tiny_model

    model = tiny_model("llama", n_layers=1, d_mlp=8)
    orig = unique_records(3)
    recs = [NeuronRecords(NeuronId(0, i), r.top) for i, r in enumerate(orig)]  # layer 0 of a one-layer model
    marker = {NeuronId(0, i): f" tok{r.neuron.layer}x{r.neuron.index}\t10\n" for i, r in enumerate(orig)}
    with LoopbackServer(answer=lambda m: " promotes what follows the strongest token.") as srv:
        cfg = ExplainConfig(kind="openai", explanations="both", llm=llm_config(srv, api_key_env=None, timeout=5.0))
        out = explain(recs, cfg, model=model, cache_dir=tmp_path, progress=False)
        prompts = list(srv.stats.chat_prompts)
    assert all(e.ok and e.kind == "both" and e.explanation == "promotes what follows the strongest token"
               for e in out)
    assert all(e.evidence.input and e.evidence.output for e in out)
    assert len(prompts) == 3
    for e in out:  # each neuron's prompt shows its own activations and its own VocabProj tokens
        p = next(q for q in prompts if marker[e.neuron] in q)
        top = e.evidence.output.promoted[0]
        assert "Promoted tokens:\n<start>\n" + f"{_tok(top.token)}\t{top.weight:.3g}\n" in p
    with pytest.raises(ValueError, match="pass model="):
        explain(recs, ExplainConfig(explanations="output"), progress=False)


def test_offline_sentences_are_one_line_whatever_the_tokens():
    from snip_lens.explain import describe_output
    from snip_lens.types import OutputEvidence, TokenWeight

    ev = OutputEvidence([TokenWeight('"\x1d"', 1.0), TokenWeight("a\tb", 0.5)], [TokenWeight("\r\n", -1.0)])
    text = describe_output(ev)
    assert text.isprintable() and len(text.splitlines()) == 1
    assert text == "raises the next tokens '\"\\x1d\"' and 'a\\tb' and lowers '\\r\\n'"
