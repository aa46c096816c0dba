"""Tests of snip_lens.evaluate: LM metrics against plain references, prefix reuse, CBT (KV cache vs naive
vs a brute-force reference), CBT loading/building errors, toxicity sampling and scorers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pydoc_data.topics
import pytest
import torch

from snip_lens.evaluate import (PREPOSITIONS, VERBS, CBTItem, DetoxifyScorer, ProfanityScorer, ToxicityConfig,
                                build_cloze_items, cbt_accuracy, cbt_scores, generate_samples, lm_metrics,
                                load_cbt, prefix_cache, save_cbt_jsonl, toxicity_rate)
from snip_lens.evaluate import toxicity as toxicity_mod
from snip_lens.evaluate._common import kv_cache_fix
from snip_lens.models import hook_name, prepends_bos
from snip_lens.testing import reference_cbt_scores, tiny_model

FIXTURES = Path(__file__).parent / "fixtures"
TEXTS = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ZeroMask:
    """Stands in for a NeuronMask: zeroes some neurons of one layer inside ``applied``."""

    def __init__(self, layer: int, indices: list[int]):
        self.layer, self.indices = layer, indices

    def applied(self, model):
        def fn(act, hook):
            act = act.clone()
            act[..., self.indices] = 0.0
            return act

        return model.hooks(fwd_hooks=[(hook_name(self.layer), fn)])


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return tiny_model(request.param, n_layers=3)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", n_layers=3)


def random_tokens(n=5, pos=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (n, pos), generator=g)


def reference_metrics(model, tokens):
    with torch.no_grad():
        logits = model(tokens)[:, :-1]
    target = tokens[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    ranks = (logits > logits.gather(-1, target[..., None])).sum(-1)  # how many logits beat the target
    return {"loss": float(loss), "top1": float((ranks == 0).float().mean()),
            "top10": float((ranks < 10).float().mean()), "n_tokens": target.numel()}


# ---- LM metrics --------------------------------------------------------------------------------------


def test_lm_metrics_equal_plain_reference(model):
    tokens = random_tokens()
    got = lm_metrics(model, tokens, batch_size=2)  # 2 does not divide 5 windows: a ragged last batch
    ref = reference_metrics(model, tokens)
    assert got["n_tokens"] == ref["n_tokens"] == 5 * 23
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["top1"] == pytest.approx(ref["top1"])
    assert got["top10"] == pytest.approx(ref["top10"])
    assert 0 <= got["top1"] <= got["top10"] <= 1


def test_lm_metrics_on_a_learnable_sequence_reach_full_accuracy(llama):
    # A constant sequence: a model whose unembedding strongly prefers token 7 gets every prediction right.
    tokens = torch.full((2, 10), 7)
    bias = torch.zeros(512)
    bias[7] = 1e4

    def boost(logits, hook):
        return logits + bias

    with llama.hooks(fwd_hooks=[("unembed.hook_out", boost)]):
        got = lm_metrics(llama, tokens)
    assert got["top1"] == 1.0 and got["top10"] == 1.0 and got["loss"] == pytest.approx(0.0, abs=1e-4)


def test_lm_metrics_with_mask_match_reference_with_same_hook(model):
    tokens = random_tokens()
    mask = ZeroMask(1, list(range(0, 64, 2)))
    got = lm_metrics(model, tokens, mask=mask)
    with mask.applied(model):
        ref = reference_metrics(model, tokens)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["loss"] != pytest.approx(lm_metrics(model, tokens)["loss"], rel=1e-6)
    assert not model.blocks[1].mlp.hook_post.fwd_hooks  # the mask's hook is gone afterwards


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_prefix_cache_gives_identical_metrics_and_skips_lower_blocks(model, layer):
    tokens = random_tokens(n=3)
    cache = prefix_cache(model, tokens, layer, batch_size=2)
    assert cache.residual.shape == (3, 24, model.cfg.d_model)
    mask = ZeroMask(2, [1, 5, 9, 30])
    calls = []
    handle = model.blocks[0].original_component.register_forward_hook(lambda *a: calls.append(1))
    try:
        fast = lm_metrics(model, tokens, mask=mask, start_cache=cache, batch_size=2)
    finally:
        handle.remove()
    assert len(calls) == (2 if layer == 0 else 0)  # block 0 runs only when the cache starts at it
    full = lm_metrics(model, tokens, mask=mask, batch_size=2)
    assert fast["loss"] == pytest.approx(full["loss"], rel=1e-6, abs=1e-7)
    assert fast["top1"] == full["top1"] and fast["top10"] == full["top10"]
    # and the skip is undone: a full forward afterwards still equals the plain reference
    assert lm_metrics(model, tokens)["loss"] == pytest.approx(reference_metrics(model, tokens)["loss"], rel=1e-5)


def test_prefix_cache_refuses_hooks_below_its_layer(llama):
    tokens = random_tokens(n=2)
    cache = prefix_cache(llama, tokens, 2)
    with pytest.raises(ValueError, match=r"hooks are attached below layer 2 \(blocks\.1\.mlp"):
        lm_metrics(llama, tokens, mask=ZeroMask(1, [0]), start_cache=cache)
    with pytest.raises(ValueError, match="different tokens"):
        lm_metrics(llama, random_tokens(n=2, seed=1), start_cache=cache)
    assert "forward" not in llama.blocks[0].__dict__


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(4, dtype=torch.long), r"shape \[window, pos\]"),
    (torch.zeros(2, 5), "integer tensor"),
    (torch.zeros(2, 1, dtype=torch.long), "at least 2 tokens"),
    (torch.full((2, 5), 9999), r"\[0, 512\)"),
])
def test_lm_metrics_bad_tokens(llama, bad, match):
    with pytest.raises(ValueError, match=match):
        lm_metrics(llama, bad)


def test_prefix_cache_bad_layer(llama):
    with pytest.raises(ValueError, match="layer 3 is out of range .* 0..2"):
        prefix_cache(llama, random_tokens(n=1), 3)


# ---- CBT scoring ---------------------------------------------------------------------------------------




@pytest.fixture(scope="module")
def prose_items():
    return build_cloze_items(TEXTS, "P", n_items=3, seed=0, n_context=3)


def test_cbt_kv_naive_and_reference_agree(model, prose_items):
    items = prose_items + load_cbt(FIXTURES / "cbt_sample.jsonl")
    kv = cbt_scores(model, items, batch_size=4)
    naive = cbt_scores(model, items, use_kv_cache=False, batch_size=3)
    for item, a, b in zip(items, kv, naive):
        ref = reference_cbt_scores(model, item)
        assert a == pytest.approx(ref, rel=1e-4)
        assert b == pytest.approx(ref, rel=1e-4)
    acc_kv = cbt_accuracy(model, items)
    acc_naive = cbt_accuracy(model, items, use_kv_cache=False)
    assert acc_kv["predictions"] == acc_naive["predictions"]
    assert acc_kv["predictions"] == [max(range(10), key=s.__getitem__) for s in naive]
    assert acc_kv["n_items"] == 6
    assert acc_kv["accuracy"] == sum(p == it.label for p, it in zip(acc_kv["predictions"], items)) / 6


def test_cbt_item_without_context_on_a_model_without_bos():
    """SmolLM2 takes no BOS: an item with no context then starts at the question, whose first token is unscored."""
    no_bos = tiny_model("llama", n_layers=2, prepend_bos=False)
    assert not prepends_bos(no_bos)
    items = load_cbt(FIXTURES / "cbt_sample.jsonl")
    assert any(not it.context for it in items)
    kv = cbt_scores(no_bos, items, batch_size=4)
    naive = cbt_scores(no_bos, items, use_kv_cache=False, batch_size=3)
    for item, a, b in zip(items, kv, naive):
        ref = reference_cbt_scores(no_bos, item)
        assert a == pytest.approx(ref, rel=1e-4)
        assert b == pytest.approx(ref, rel=1e-4)
    assert cbt_accuracy(no_bos, items)["predictions"] == cbt_accuracy(no_bos, items, use_kv_cache=False)["predictions"]


def test_cbt_mask_changes_scores_and_both_paths_agree_under_it(llama, prose_items):
    mask = ZeroMask(1, list(range(64)))
    plain = cbt_scores(llama, prose_items)
    kv = cbt_scores(llama, prose_items, mask=mask)
    naive = cbt_scores(llama, prose_items, mask=mask, use_kv_cache=False)
    change = max(abs(x / y - 1) for a, b in zip(kv, plain) for x, y in zip(a, b))
    assert change > 1e-3, change
    for a, b in zip(kv, naive):
        assert a == pytest.approx(b, rel=1e-4)
    with mask.applied(llama):
        assert kv[0] == pytest.approx(reference_cbt_scores(llama, prose_items[0]), rel=1e-4)
    assert not llama.blocks[1].mlp.hook_post.fwd_hooks


def test_cbt_truncates_long_contexts_from_the_left():
    small = tiny_model("llama", n_ctx=48)
    item = build_cloze_items(TEXTS, "V", n_items=1, seed=3)[0]  # 20 sentences: far more than 48 tokens
    kv = cbt_scores(small, [item])[0]
    naive = cbt_scores(small, [item], use_kv_cache=False)[0]
    assert kv == pytest.approx(naive, rel=1e-4)
    assert all(0 < s <= 1 for s in kv)


def test_cbt_question_too_long_for_context():
    small = tiny_model("llama", n_ctx=16)
    item = CBTItem(["Short."], "This question is much too long for such a tiny model to read XXXXX the end of it.",
                   list(PREPOSITIONS[:10]), PREPOSITIONS[0])
    with pytest.raises(ValueError, match="does not fit the model's context of 16 tokens"):
        cbt_scores(small, [item])


def test_kv_cache_fix_makes_cached_generation_match_uncached(llama):
    hf = llama.original_model
    ids = random_tokens(n=1, pos=6)
    kw = dict(do_sample=False, max_new_tokens=8, pad_token_id=0)
    with torch.no_grad():
        uncached = hf.generate(ids, use_cache=False, **kw)
        with kv_cache_fix(llama):
            cached = hf.generate(ids, use_cache=True, **kw)
    assert torch.equal(cached, uncached)
    assert not any(m._forward_pre_hooks for m in llama.modules() if hasattr(type(m), "_update_kv_cache"))


# ---- CBT loading and building --------------------------------------------------------------------------


def test_load_cbt_jsonl_and_roundtrip(tmp_path):
    items = load_cbt(FIXTURES / "cbt_sample.jsonl")
    assert len(items) == 3  # the blank line is skipped
    assert items[0].answer == "in" and items[0].label == 0 and len(items[0].options) == 10
    assert items[1].context[1] == "The youngest son was called Jack ."
    assert len(load_cbt(FIXTURES / "cbt_sample.jsonl", max_items=2)) == 2
    save_cbt_jsonl(items, tmp_path / "out.jsonl")
    assert load_cbt(tmp_path / "out.jsonl") == items


def _write(tmp_path, lines):
    p = tmp_path / "cbt.jsonl"
    p.write_text("".join(lines), encoding="utf-8")
    return p


GOOD = {"sentences": ["A ."], "question": "B XXXXX C .", "answer": "in", "options": ["in", "on"]}


@pytest.mark.parametrize("record, match", [
    ({k: v for k, v in GOOD.items() if k != "options"}, r"cbt\.jsonl:2: missing field 'options'"),
    ({k: v for k, v in GOOD.items() if k != "sentences"}, r"cbt\.jsonl:2: missing field 'sentences'"),
    ({**GOOD, "answer": "at"}, r"cbt\.jsonl:2: the answer 'at' is not among the options"),
    ({**GOOD, "question": "no blank here"}, r"cbt\.jsonl:2: .*'XXXXX' exactly once"),
    ({**GOOD, "options": "in on"}, r"cbt\.jsonl:2: field 'options' must be a list"),
])
def test_load_cbt_bad_records_name_field_and_line(tmp_path, record, match):
    p = _write(tmp_path, [json.dumps(GOOD) + "\n", json.dumps(record) + "\n"])
    with pytest.raises(ValueError, match=match):
        load_cbt(p)


def test_load_cbt_empty_missing_and_invalid_files(tmp_path):
    with pytest.raises(ValueError, match="holds no items"):
        load_cbt(_write(tmp_path, ["\n", "  \n"]))
    with pytest.raises(ValueError, match=r":1: not valid JSON"):
        load_cbt(_write(tmp_path, ["{not json\n"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cbt(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown CBT config 'X'"):
        load_cbt(FIXTURES / "cbt_sample.jsonl", config="X")


def test_load_cbt_hub_failure_explains_offline_options(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'cam-cst/cbt' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="could not load CBT config 'V'.*local JSONL.*build_cloze_items"):
        load_cbt("hf", "V")


@pytest.mark.parametrize("kind, words", [("P", PREPOSITIONS), ("V", VERBS)])
def test_build_cloze_items(kind, words):
    items = build_cloze_items(TEXTS, kind, n_items=25, seed=7)
    assert items == build_cloze_items(TEXTS, kind, n_items=25, seed=7)
    assert items != build_cloze_items(TEXTS, kind, n_items=25, seed=8)
    corpus = re.sub(r"\s+", " ", " ".join(TEXTS))
    for it in items:
        assert len(it.context) == 20 and len(it.options) == 10 and len(set(it.options)) == 10
        assert set(it.options) <= set(words) and it.answer in it.options
        filled = it.question.replace("XXXXX", it.answer)
        assert re.search(r"(^|[^A-Za-z])XXXXX([^A-Za-z]|$)", it.question)  # a whole word was blanked
        assert " ".join(it.context + [filled]) in corpus  # context and question are consecutive prose


def test_build_cloze_items_bad_inputs():
    with pytest.raises(ValueError, match="fewer than n_items=5"):
        build_cloze_items(["One. Two. Three is in."], "P", n_items=5, n_context=2)
    with pytest.raises(ValueError, match="kind must be 'P'"):
        build_cloze_items(TEXTS, "N")
    with pytest.raises(ValueError, match="list of documents"):
        build_cloze_items("a single text", "P")


# ---- toxicity ------------------------------------------------------------------------------------------


class ConstantScorer:
    def __init__(self, scores):
        self.scores = scores

    def __call__(self, texts):
        return self.scores[:len(texts)]


def test_generation_is_seeded_and_masks_change_it(llama):
    cfg = ToxicityConfig(n=5, batch_size=2, max_new_tokens=6, scorer="profanity")
    state = torch.random.get_rng_state()
    a = generate_samples(llama, cfg)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert len(a) == 5
    assert generate_samples(llama, cfg) == a
    assert generate_samples(llama, ToxicityConfig(n=5, batch_size=2, max_new_tokens=6, seed=1)) != a
    assert generate_samples(llama, cfg, mask=ZeroMask(1, list(range(64)))) != a
    assert not llama.blocks[1].mlp.hook_post.fwd_hooks


def test_toxicity_rate_aggregates_scores(llama):
    cfg = ToxicityConfig(n=4, batch_size=4, max_new_tokens=3, n_samples=2)
    res = toxicity_rate(llama, cfg, scorer=ConstantScorer([0.9, 0.1, 0.85, 0.8]), progress=False)
    assert res["n"] == 4 and res["pct_toxic"] == 50.0  # 0.8 is not above the threshold
    assert res["mean_toxicity"] == pytest.approx(0.6625)
    assert [s["score"] for s in res["samples"]] == [0.9, 0.1]
    assert res["samples"][0]["text"] == generate_samples(llama, cfg)[0]


def test_toxicity_rate_with_profanity_scorer(llama):
    res = toxicity_rate(llama, ToxicityConfig(n=3, batch_size=3, max_new_tokens=4, scorer="profanity"),
                        progress=False)
    assert res["n"] == 3 and res["scorer"] == "profanity" and 0 <= res["mean_toxicity"] <= 1


def test_profanity_scorer_ranks_profanity_higher():
    clean, rude = ProfanityScorer()(["Have a lovely afternoon in the garden.", "fuck you, you stupid shit"])
    assert rude > 0.8 > clean


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), "n must be a positive integer"), (dict(temperature=0), "temperature must be > 0"),
    (dict(scorer="perspective"), "unknown scorer 'perspective'"), (dict(threshold=80), "threshold"),
    (dict(top_p=0), "top_p"),
])
def test_toxicity_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ToxicityConfig(**kwargs)


def test_detoxify_scorer_errors_offline(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.ckpt' does not exist; download https://github.com"):
        DetoxifyScorer(tmp_path / "missing.ckpt")
    monkeypatch.setattr(toxicity_mod, "_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ConnectionError, match="github.com cannot be reached.*checkpoint=.*config_dir=.*profanity"):
        toxicity_rate(tiny_model("gpt2"), ToxicityConfig(n=1, scorer="detoxify"))


def test_detoxify_checkpoint_and_config_dir_load_with_no_network(tmp_path, monkeypatch):
    """A Detoxify-format checkpoint naming bert-base-uncased (as the released one) plus a local config
    directory: loaded and scored with every non-loopback connection refused, equal to a plain BERT forward."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from snip_lens.testing import forbid_network, tiny_detoxify_checkpoint

    ckpt, cfg_dir = tiny_detoxify_checkpoint(tmp_path)
    texts = ["you are nice", "you are bad", "i hate the bad"]
    with pytest.MonkeyPatch.context() as mp:
        refused = forbid_network(mp)
        scorer = DetoxifyScorer(ckpt, config_dir=cfg_dir, batch_size=2)
        got = scorer(texts)
    assert refused == []
    saved = torch.load(ckpt, weights_only=True)
    bert = BertForSequenceClassification(BertConfig.from_pretrained(cfg_dir, num_labels=6)).eval()
    bert.load_state_dict(saved["state_dict"])
    tok = BertTokenizer.from_pretrained(cfg_dir)
    with torch.no_grad():
        ref = torch.sigmoid(bert(**tok(texts, return_tensors="pt", padding=True)).logits[:, 0])
    assert got == pytest.approx(ref.tolist(), rel=1e-5)
    assert len(set(got)) == 3
    with pytest.raises(ValueError, match="is not a Detoxify checkpoint"):
        torch.save({"state_dict": {}}, tmp_path / "bad.ckpt")
        DetoxifyScorer(tmp_path / "bad.ckpt", config_dir=cfg_dir)
    with pytest.raises(FileNotFoundError, match="config directory"):
        DetoxifyScorer(ckpt, config_dir=tmp_path / "nope")


# ---- real model ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_metrics_prefix_reuse_and_cbt():
    from snip_lens import load_model
    from snip_lens.models import to_tokens

    model = load_model("smollm2-135m")
    text = pydoc_data.topics.topics["if"] + pydoc_data.topics.topics["while"]
    ids = to_tokens(model, text)[0]
    tokens = ids[: 2 * 64].reshape(2, 64)
    metrics = lm_metrics(model, tokens)
    assert metrics["loss"] < 4.5 and metrics["top1"] > 0.25 and metrics["top10"] > 0.5  # uniform: 10.8 nats
    mask = ZeroMask(20, list(range(0, 1536, 3)))
    cache = prefix_cache(model, tokens, 18)
    fast = lm_metrics(model, tokens, mask=mask, start_cache=cache)
    full = lm_metrics(model, tokens, mask=mask)
    assert fast["loss"] == pytest.approx(full["loss"], rel=1e-5) and fast["top1"] == full["top1"]
    items = build_cloze_items(TEXTS, "P", n_items=2, seed=0, n_context=5)
    kv = cbt_accuracy(model, items)
    naive = cbt_accuracy(model, items, use_kv_cache=False)
    assert kv["predictions"] == naive["predictions"]


# ---- command line ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from snip_lens.testing import tiny_hf_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_cli_evaluate_cbt_lm_and_toxicity(model_dir, tmp_path, capsys):
    from snip_lens.cli import main

    out = tmp_path / "cbt.json"
    assert main(["evaluate", "cbt", "--model", str(model_dir), "--source", str(FIXTURES / "cbt_sample.jsonl"),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_items"] == 3 and len(res["predictions"]) == 3 and 0 <= res["accuracy"] <= 1
    text = tmp_path / "doc.txt"
    text.write_text(" ".join(TEXTS[:3]))
    assert main(["evaluate", "lm", "--model", str(model_dir), "--corpus", str(text), "--windows", "2",
                 "--n-ctx", "16", "--out", str(tmp_path / "lm.json")]) == 0
    assert json.loads((tmp_path / "lm.json").read_text())["n_tokens"] == 2 * 15
    assert main(["evaluate", "toxicity", "--model", str(model_dir), "--n", "2", "--max-new-tokens", "3",
                 "--scorer", "profanity", "--out", str(tmp_path / "tox.json")]) == 0
    assert json.loads((tmp_path / "tox.json").read_text())["n"] == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    capsys.readouterr()
    assert main(["evaluate", "cbt", "--model", str(model_dir), "--source", str(empty)]) == 2
    assert "holds no items" in capsys.readouterr().err


def test_real_neuron_mask_matches_the_hook_double(llama, prose_items):
    from snip_lens.mask import NeuronMask

    neurons = [(1, i) for i in range(0, 64, 3)] + [(2, 5), (2, 40)]
    mask = NeuronMask.from_neurons(llama, neurons)

    class Double:
        def applied(self, model):
            def fn(layer):
                idx = [i for l, i in neurons if l == layer]

                def hook(act, hook):
                    act = act.clone()
                    act[..., idx] = 0.0
                    return act
                return hook
            return model.hooks(fwd_hooks=[(hook_name(1), fn(1)), (hook_name(2), fn(2))])

    tokens = random_tokens(n=3)
    got = lm_metrics(llama, tokens, mask=mask)
    assert got == lm_metrics(llama, tokens, mask=Double())
    cache = prefix_cache(llama, tokens, min(mask.layers))
    assert lm_metrics(llama, tokens, mask=mask, start_cache=cache)["loss"] == pytest.approx(got["loss"], rel=1e-6)
    assert cbt_scores(llama, prose_items[:1], mask=mask) == cbt_scores(llama, prose_items[:1], mask=Double())
    cfg = ToxicityConfig(n=2, max_new_tokens=4)
    assert generate_samples(llama, cfg, mask=mask) == generate_samples(llama, cfg, mask=Double())
