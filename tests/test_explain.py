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

from snip_lens.explain import (EXPLANATION_PREFIX, FEW_SHOT_EXAMPLES, ExplainConfig, HeuristicExplainer,
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


# -- heuristic ----------------------------------------------------------------------------------------

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


def peak_records(neuron: NeuronId, windows: list[list[str]], peak: str) -> NeuronRecords:
    recs = []
    for w in windows:
        acts = [0.0] * len(w)
        acts[w.index(peak)] = 2.0
        recs.append(ActivationRecord(w, acts))
    return NeuronRecords(neuron, recs)


def test_heuristic_names_the_top_token_and_its_context():
    h = HeuristicExplainer()
    code = h.explain_one(peak_records(NeuronId(0, 0), CODE, "def"))
    assert code.ok and code.source == "heuristic"
    assert code.explanation == "the Python keyword 'def' and function definitions in Python source code"
    prose = h.explain_one(peak_records(NeuronId(0, 1), PROSE, " the"))
    assert prose.explanation == "the word 'the' in English prose"
    # BPE markers are cleaned
    bpe = NeuronRecords(NeuronId(0, 2), [ActivationRecord(["ĠThe", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", "Ġof",
                                                           "Ġthe", "Ġhouse"], [0, 3.0, 0, 0, 0, 0, 0, 0, 0])])
    assert h.explain_one(bpe).explanation == "the word 'cat' in English prose"
    nums = NeuronRecords(NeuronId(0, 3), [ActivationRecord(["1", "2", ",", " 3", "4", ",", " 5", "6"],
                                                           [0, 0, 0, 1.0, 0, 0, 0, 0])])
    assert h.explain_one(nums).explanation == "the number '3' in numbers and numeric data"
    doc = ["    ", '"""', "Return", " the", " number", " of", " items", " in", " the", " list", ".", '"""', "\n",
           "    ", "def", " foo", "(", "self", "):"]
    near = HeuristicExplainer(context=4)  # the docstring alone around the peak; code further away
    assert near.explain_one(peak_records(NeuronId(0, 5), [doc], " number")).explanation == \
        "the word 'number' in comments and docstrings of Python source code"
    piece = [" inform", "ation", " is", " the", " key", " of", " the", " world", " and", " it", " is", " free"]
    assert h.explain_one(peak_records(NeuronId(0, 6), [piece], "ation")).explanation == \
        "the word piece 'ation' in English prose"
    empty = h.explain_one(NeuronRecords(NeuronId(0, 4), []))
    assert not empty.ok and "no activation records" in empty.error


def test_heuristic_is_deterministic_and_same_type_through_explain():
    recs = [peak_records(NeuronId(0, i), CODE if i % 2 else PROSE, "self" if i % 2 else " and") for i in range(6)]
    a = explain(recs, ExplainConfig(kind="heuristic"), progress=False)
    b = explain(recs, ExplainConfig(kind="heuristic"), progress=False)
    assert a == b and all(isinstance(e, NeuronExplanation) and e.ok for e in a)
    assert [e.neuron for e in a] == [r.neuron for r in recs]
    assert "'self'" in a[1].explanation and "Python source code" in a[1].explanation
    assert a[0].explanation == "the word 'and' in English prose"


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
    from snip_lens.testing import tiny_hf_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    client = LocalChatClient("tiny", hf_model=tiny_hf_model("llama", n_ctx=512), tokenizer=tok,
                             max_new_tokens=5)
    out = explain(unique_records(2), ExplainConfig(kind="local", few_shot=False), client=client, progress=False)
    assert len(out) == 2 and all(e.source == "local:smollm2-135m" for e in out)
    for e in out:  # a random model's answer is either a parsed sentence or a recorded failure
        assert e.ok or (e.explanation is None and e.error)


@pytest.mark.slow
def test_local_smollm2_explains_a_neuron():
    client = LocalChatClient("smollm2-135m", max_new_tokens=24)
    recs = [peak_records(NeuronId(0, 0), CODE, "def")]
    out = explain(recs, ExplainConfig(kind="local", few_shot=False), client=client, progress=False)
    assert out[0].ok, out[0].error
    assert len(out[0].explanation.split()) >= 2


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
