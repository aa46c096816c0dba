"""The whole pipeline end to end on a tiny model: collect -> explain -> concepts -> embed -> score -> sweep."""

from __future__ import annotations

import json
import re

import pytest
import torch

from snip_lens.evaluate import lm_metrics
from snip_lens.mask import NeuronMask
from snip_lens.sweep import DataConfig, SweepConfig, run_sweep, split_documents, summary_table
from snip_lens.testing import tiny_model
from snip_lens.types import NeuronId

KS = ["5%", "10%"]


def _data(**kw):
    base = dict(forget="code", retain="prose", n_ctx=32, select_windows=8, eval_windows=4, max_docs=40, seed=0)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2, d_mlp=32)


def _held_out_windows(cfg, model):
    from snip_lens.corpus import make_windows
    from snip_lens.sweep import load_sides

    d = cfg.data
    out = {}
    for side, texts in zip(("forget", "retain"), load_sides(d)):
        _, held = split_documents(texts, d.eval_fraction, d.seed)
        out[side] = make_windows(model, held, n_ctx=d.n_ctx, max_windows=d.eval_windows, seed=d.seed + 1,
                                 max_doc_tokens=d.max_doc_tokens).tokens
    return out


@pytest.fixture(scope="module")
def offline_run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    # keywords the offline explanations quote from code and prose records (they name tokens, not domains)
    cfg = SweepConfig(model="tiny", data=_data(), ks=KS, keywords=["self", "def", "return", "the", "of", "and", "is"],
                      methods=["snip", "hybrid", "activation", "activation-freq", "random", "keyword"])
    return out, cfg, run_sweep(cfg, out, model=model, progress=False)


def test_results_schema_and_outputs(offline_run, model):
    out, cfg, res = offline_run
    assert res["model"] == "tiny-llama" and res["n_neurons"] == 64
    for side in ("forget", "retain"):
        assert set(res["baseline"][side]) >= {"loss", "top1", "top10"}
    assert len(res["runs"]) == 6 * 2
    assert {(r["method"], r["k"]) for r in res["runs"]} == {(m, k) for m in cfg.methods for k in (3, 6)}
    # Every number is what it says: the metrics of the saved mask on the held-out windows, which are made as
    # the module documents (split by document with the data seed, then windows with seed + 1).
    held_out = _held_out_windows(cfg, model)
    for r in [dict(res["baseline"], method=None)] + res["runs"]:
        mask = None
        if r["method"] is not None:
            mask = NeuronMask.load(out / "masks" / f"{r['method']}_k{r['k']}.safetensors", model=model)
            assert len(mask) == r["k"]
        for side, toks in held_out.items():
            want = lm_metrics(model, toks, mask=mask)
            assert r[side]["top1"] == want["top1"] and r[side]["top10"] == want["top10"], (r["method"], side)
            assert r[side]["loss"] == pytest.approx(want["loss"], abs=1e-5)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["runs"] == res["runs"]
    for name in ("top1.png", "top10.png", "loss.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## snip" in report and "## keyword" in report
    html = (out / "report.html").read_text()
    assert "<table>" in html and "weightiest evidence" in html
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["version"] == 2 and cfg_json["select"]["methods"] == cfg.methods
    assert "(none)" in summary_table(res)


def _report_rows(report: str, method: str) -> tuple[list[str], list[list[str]]]:
    """(header cells, row cells) of one method's neuron table in report.md."""
    part = report.split(f"## {method}:")[1].split("\n## ")[0]
    lines = [line for line in part.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))] for line in lines]  # "\|" stays in a cell
    # the last column lists the other neurons of a row that stands for several identical ones
    assert cells[0][-1] == "same row"
    return cells[0][:-1], [c[:-1] for c in cells[2:]]


def test_report_shows_each_methods_own_evidence(offline_run):
    from snip_lens.score import NeuronScores

    out, _, res = offline_run
    expl = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    assert len(expl) == 64
    concepts = json.loads((out / "concepts.json").read_text())["concepts"]
    assert concepts
    report = (out / "report.md").read_text()
    texts = {f"L{e['layer']}/N{e['index']}": e["explanation"].replace("|", "\\|") for e in expl}
    snip = NeuronScores.load(out / "scores" / "snip.safetensors")
    act = NeuronScores.load(out / "scores" / "activation.safetensors")
    # SNIP (evidence match, the default): its evidence score, the evidence token that weighed most, and the
    # neuron's own explanation
    head, rows = _report_rows(report, "snip")
    assert head == ["neuron", "evidence score", "weightiest evidence", "explanation"] and rows
    assert snip.score_name == "evidence score"
    for neuron, score, why, text in rows:
        n = NeuronId.parse(neuron)
        assert why.replace("\\|", "|") == snip.labels[n] and "term weight" in why
        assert float(score) == pytest.approx(float(snip.scores[n.layer, n.index]), abs=1e-3)
        assert text == texts[neuron]
    # activation: its ratio, and no concept it never used
    head, rows = _report_rows(report, "activation")
    assert head == ["neuron", "forget/retain ratio", "explanation"] and rows
    for neuron, ratio, _ in rows:
        n = NeuronId.parse(neuron)
        assert float(ratio) == pytest.approx(float(act.scores[n.layer, n.index]), rel=1e-3, abs=1e-3)
    # random: nothing but the neuron and what it does
    head, rows = _report_rows(report, "random")
    assert head == ["neuron", "explanation"] and rows
    assert "no evidence" in report.split("## random:")[1].split("\n## ")[0]


def test_masks_prune_what_the_scores_rank_first(offline_run, model):
    from snip_lens.score import NeuronScores

    out, _, _ = offline_run
    for method in ("snip", "activation", "random"):
        scores = NeuronScores.load(out / "scores" / f"{method}.safetensors")
        mask = NeuronMask.load(out / "masks" / f"{method}_k6.safetensors")
        assert set(mask.neurons) == set(scores.top_k(6))


def test_rerun_reuses_artifacts_and_refuses_another_config(offline_run, model):
    out, cfg, res = offline_run
    mtime = (out / "explanations.jsonl").stat().st_mtime_ns
    again = run_sweep(cfg, out, model=model, progress=False)
    assert again["runs"] == res["runs"]
    assert (out / "explanations.jsonl").stat().st_mtime_ns == mtime  # reused, not rewritten
    other = SweepConfig(model="tiny", data=_data(seed=1), ks=KS, methods=["random"])
    with pytest.raises(FileExistsError, match="overwrite"):
        run_sweep(other, out, model=model, progress=False)


def test_bad_inputs(model, tmp_path):
    with pytest.raises(ValueError, match="identical"):
        run_sweep(SweepConfig(data=_data(retain="code"), ks=KS, methods=["random"]), tmp_path / "a", model=model,
                  progress=False)
    with pytest.raises(ValueError, match="larger than"):
        run_sweep(SweepConfig(data=_data(), ks=["65"], methods=["random"]), tmp_path / "b", model=model,
                  progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        run_sweep(SweepConfig(data=_data(forget=str(empty)), ks=KS, methods=["random"]), tmp_path / "c",
                  model=model, progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        SweepConfig(methods=["magic"])
    with pytest.raises(ValueError, match="keywords"):
        SweepConfig(methods=["keyword"])
    with pytest.raises(ValueError, match="llm_model"):
        SweepConfig(methods=["llm-judge"])
    with pytest.raises(ValueError, match="2 documents"):  # names the side (the default: corpus)
        split_documents(["only one"], 0.3, 0)
    from snip_lens.sweep import toxic_comments

    bad = tmp_path / "civil.jsonl"
    bad.write_text('{"text": "x", "toxicity": 0.9}\n\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"civil\.jsonl:3: not valid JSON"):
        toxic_comments(str(bad))
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"civil\.jsonl:1 has no field 'toxicity'"):
        toxic_comments(str(bad))


PAPER_EXPLANATIONS = {"python keywords such as def and return": 9, "indentation in source code": 6,
                      "common English words in sentences": 2, "punctuation marks": 0}
"""The loopback LLM's explanations, each with the rating its judge gives it."""


def _paper_answer(messages):
    import zlib

    text = messages[-1]["content"]
    if "List a comprehensive list" in text:
        return "1. Python keywords\n2. function definitions\n3. indentation\n4. python keywords"
    if "scale from 0" in text:
        return next((str(r) for e, r in PAPER_EXPLANATIONS.items() if e in text), "5")
    # An explanation that depends on the neuron's records (its prompt), so neurons differ.
    return " " + list(PAPER_EXPLANATIONS)[zlib.crc32(text.encode()) % len(PAPER_EXPLANATIONS)] + "."


def test_paper_path_with_an_openai_compatible_server(model, tmp_path, monkeypatch):
    """The LLM explainer, LLM concepts, LLM judge and API embeddings, over real HTTP to a loopback server."""
    from snip_lens.loopback import LoopbackServer

    monkeypatch.setenv("SNIP_TEST_KEY", "sk-test-secret-123")
    with LoopbackServer(answer=_paper_answer, embed_dim=1536) as server:
        cfg = SweepConfig(model="tiny", data=_data(), ks=["5%"], methods=["snip", "llm-judge", "random"],
                          explainer="openai", llm_model="loopback-chat", base_url=server.base_url,
                          api_key_env="SNIP_TEST_KEY", embedder="openai:text-embedding-3-small",
                          match="embedding", judge_candidates=64)
        res = run_sweep(cfg, tmp_path, model=model, progress=False)
    assert [r["method"] for r in res["runs"]] == ["snip", "llm-judge", "random"]
    # identical explanations share the secondary signal too, so the seeded draw decides among them
    assert res["tie_break"]["snip"] == "mean cosine to all concepts, then a random draw (seed 0)"
    assert res["tie_break"]["llm-judge"].startswith("snip+activation shortlist position")
    assert res["judge"] == {"candidates": 64, "shortlist": "snip+activation"}
    concepts = json.loads((tmp_path / "concepts.json").read_text())["concepts"]
    assert [c.lower() for c in concepts] == ["python keywords", "function definitions", "indentation"]
    expl = [json.loads(line) for line in (tmp_path / "explanations.jsonl").read_text().splitlines()]
    text_of = {(e["layer"], e["index"]): e["explanation"] for e in expl}
    assert set(text_of.values()) == set(PAPER_EXPLANATIONS)  # neurons are explained differently
    # neurons with the same explanation tie on cosine: the seeded draw picks among them, not (layer, index)
    snip_run = res["runs"][0]
    snip_pruned = sorted(NeuronMask.load(tmp_path / "masks" / f"snip_k{snip_run['k']}.safetensors").neurons)
    top_text = text_of[(snip_pruned[0].layer, snip_pruned[0].index)]
    group = sorted(NeuronId(layer, i) for (layer, i), t in text_of.items() if t == top_text)
    assert len(group) > snip_run["k"] and set(snip_pruned) <= set(group)
    assert snip_run["ties_at_cut"] == {"tied": len(group), "selected": snip_run["k"],
                                       "tied_after_secondary": len(group)}
    assert snip_pruned != group[:snip_run["k"]]
    k = res["runs"][0]["k"]
    # The judge's ranking follows its ratings: every pruned neuron has the best-rated explanation.
    best = max(PAPER_EXPLANATIONS, key=PAPER_EXPLANATIONS.get)
    assert sum(t == best for t in text_of.values()) >= k
    judged = NeuronMask.load(tmp_path / "masks" / f"llm-judge_k{k}.safetensors")
    assert all(text_of[(n.layer, n.index)] == best for n in judged.neurons)
    # SNIP's ranking follows the cosines: the pruned neurons score at least as high as every other neuron,
    # and the scores separate the explanations (not one tie broken by position).
    from snip_lens.score import NeuronScores

    snip = NeuronScores.load(tmp_path / "scores" / "snip.safetensors")
    pruned = NeuronMask.load(tmp_path / "masks" / f"snip_k{k}.safetensors").neurons
    kept = [float(snip.scores[layer, i]) for (layer, i) in text_of if NeuronId(layer, i) not in set(pruned)]
    assert min(float(snip.scores[n.layer, n.index]) for n in pruned) >= max(kept)
    by_text = {}
    for (layer, i), t in text_of.items():
        by_text.setdefault(t, set()).add(round(float(snip.scores[layer, i]), 6))
    assert all(len(v) == 1 for v in by_text.values()) and len(set().union(*by_text.values())) == len(by_text)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"sk-test-secret-123" not in path.read_bytes(), f"API key written to {path}"


def test_cbt_and_toxicity_extras_on_fixture_files(tmp_path):
    """The paper's CBT and toxicity evaluations through the sweep, on local files in the real schemas, on a
    model without BOS as the default SmolLM2: each number equals a direct evaluation of the saved mask."""
    from pathlib import Path

    model = tiny_model("llama", n_layers=2, d_mlp=32, prepend_bos=False)
    fixtures = Path(__file__).parent / "fixtures"
    cbt = fixtures / "cbt_sample.jsonl"
    civil = tmp_path / "civil.jsonl"
    rows = [{"text": f"you are a stupid idiot number {i} and I hate you", "toxicity": 0.9} for i in range(12)]
    rows += [{"text": "a calm and kind remark", "toxicity": 0.1}]
    civil.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = SweepConfig(model="tiny", data=_data(forget=f"civil-toxic:{civil}", max_docs=12), ks=["5%"],
                      methods=["random", "activation"], cbt=["P"], cbt_source=str(cbt), cbt_items=4,
                      toxicity=True, toxicity_n=8, toxicity_scorer="profanity")
    res = run_sweep(cfg, tmp_path / "out", model=model, progress=False)
    from snip_lens.evaluate import ToxicityConfig, cbt_accuracy, load_cbt, toxicity_rate

    items = load_cbt(cbt, max_items=4)
    assert any(not it.context for it in items)  # the fixture's item without context is among them
    for r in [dict(res["baseline"], method=None)] + res["runs"]:
        mask = None if r["method"] is None else NeuronMask.load(
            tmp_path / "out" / "masks" / f"{r['method']}_k{r['k']}.safetensors", model=model)
        assert r["extra"]["cbt_P_accuracy"] == cbt_accuracy(model, items, mask=mask)["accuracy"]
        tox = toxicity_rate(model, ToxicityConfig(n=8, scorer="profanity"), mask=mask, progress=False)
        assert r["extra"]["pct_toxic"] == tox["pct_toxic"]
        assert r["extra"]["mean_toxicity"] == pytest.approx(tox["mean_toxicity"], rel=1e-9)
    assert (tmp_path / "out" / "plots" / "pct_toxic.png").exists()


def test_evaluator_reuses_lower_layers_without_changing_metrics(model):
    """Masks whose lowest layer is L start at L from a cached residual; metrics equal a full forward."""
    from snip_lens.evaluate import lm_metrics
    from snip_lens.sweep import _Evaluator

    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 512, (4, 16), generator=g)
    ev = _Evaluator(model, toks, toks.flip(0), SweepConfig(methods=["random"]), progress=False)
    for neurons in ([(1, 3), (1, 7)], [(0, 1), (1, 2)]):
        mask = NeuronMask.from_neurons(model, neurons)
        got = ev.run(mask)
        for side, t in (("forget", toks), ("retain", toks.flip(0))):
            want = lm_metrics(model, t, mask=mask)
            assert got[side]["top1"] == want["top1"] and got[side]["top10"] == want["top10"]
            assert abs(got[side]["loss"] - want["loss"]) < 1e-5
    assert set(ev._prefix) == {("forget", 1), ("retain", 1)}


def test_results_record_the_ties_at_each_cut(offline_run):
    _, cfg, res = offline_run
    assert set(res["tie_break"]) == set(cfg.methods)
    assert res["tie_break"]["activation"] == "mean_abs on forget, then a random draw (seed 0)"
    assert res["tie_break"]["keyword"] == "explanation score, then a random draw (seed 0)"
    for r in res["runs"]:
        ties = r["ties_at_cut"]
        assert set(ties) == {"tied", "selected", "tied_after_secondary"}
        assert 0 <= ties["selected"] <= min(ties["tied"], r["k"]) and ties["tied_after_secondary"] <= ties["tied"]
        if r["method"] == "random":
            assert ties["tied"] == 0


def test_judge_shortlist_defaults_to_the_largest_k_and_is_checked_before_any_call():
    from snip_lens.select import parse_k
    from snip_lens.sweep import judge_candidates

    # the README's GPT-2 command: 12 x 3072 neurons, k up to 10%; the old fixed 2000 failed at 6% (2212)
    readme = SweepConfig(methods=["snip", "llm-judge"], llm_model="m", ks=["1%", "2%", "4%", "6%", "8%", "10%"])
    ks = sorted(parse_k(k, 36_864) for k in readme.ks)
    assert judge_candidates(readme, ks, 36_864) == 3686
    fixed = SweepConfig(methods=["snip", "llm-judge"], llm_model="m", ks=readme.ks, judge_candidates=2000)
    with pytest.raises(ValueError, match="judge_candidates=2000 is smaller than the largest k=3686"):
        judge_candidates(fixed, ks, 36_864)
    assert judge_candidates(SweepConfig(methods=["random"], ks=readme.ks), ks, 36_864) == 0
    with pytest.raises(ValueError, match="judge_candidates=0"):
        SweepConfig(methods=["llm-judge"], llm_model="m", judge_candidates=0)
    with pytest.raises(ValueError, match="judge_shortlist"):
        SweepConfig(methods=["llm-judge"], llm_model="m", judge_shortlist="best")  # type: ignore[arg-type]
    from snip_lens.cli import build_parser
    from snip_lens.config import run_config_from_args

    args = build_parser().parse_args(["run", "--model", "m", "--forget", "code", "--retain", "prose", "--methods",
                                      "llm-judge", "--llm-model", "x", "--judge-candidates", "5000",
                                      "--judge-shortlist", "random", "--select", "per-layer"])
    cfg = run_config_from_args(args).select
    assert (cfg.judge_candidates, cfg.judge_shortlist, cfg.selection) == (5000, "random", "per-layer")


def test_export_of_a_real_sweep_mask_says_what_it_could_not_remove(offline_run, model, tmp_path):
    """A global top-k mask from the sweep prunes layers unevenly; a per-layer one compacts fully."""
    from snip_lens.export import export_pruned
    from snip_lens.score import NeuronScores
    from snip_lens.select import mask_from_scores

    out, _, _ = offline_run
    scores = NeuronScores.load(out / "scores" / "activation.safetensors")
    uneven = NeuronMask.load(out / "masks" / "activation_k3.safetensors", model=model)
    per_layer = [sum(n.layer == layer for n in uneven.neurons) for layer in range(2)]
    assert per_layer[0] != per_layer[1]  # a real top-k mask: uneven (3 neurons over 2 layers)
    report = export_pruned(model, uneven, tmp_path / "global", compact=True)
    assert report.n_removed == 2 * min(per_layer) and report.n_not_removed == 3 - 2 * min(per_layer) > 0
    assert any(f"{report.n_not_removed} of the 3 removable masked neurons could not be removed" in n
               for n in report.notes)
    even = mask_from_scores(model, scores, 6, select="per-layer")
    report = export_pruned(model, even, tmp_path / "per-layer", compact=True)
    assert report.width == 32 - 3 and report.n_removed == 6 and report.n_not_removed == 0 and not report.notes


def test_per_layer_selection_through_the_sweep(model, tmp_path):
    cfg = SweepConfig(model="tiny", data=_data(), ks=["10%"], methods=["activation"], select="per-layer")
    res = run_sweep(cfg, tmp_path, model=model, progress=False)
    assert res["select"] == "per-layer"
    mask = NeuronMask.load(tmp_path / "masks" / "activation_k6.safetensors")
    assert sorted(n.layer for n in mask.neurons) == [0, 0, 0, 1, 1, 1]


def test_max_docs_caps_the_forget_side_only_and_cbt_samples_are_random(tmp_path):
    from snip_lens.evaluate import build_cloze_items, save_cbt_jsonl
    from snip_lens.sweep import load_side_texts, load_sides

    retain = tmp_path / "retain.jsonl"
    retain.write_text("\n".join(json.dumps({"text": f"retain document number {i}."}) for i in range(30)))
    forget, kept = load_sides(DataConfig(forget="code", retain=str(retain), max_docs=5))
    assert len(forget) == 5 and len(kept) == 30  # --max-docs no longer cuts the retain corpus too
    _, kept = load_sides(DataConfig(forget="code", retain=str(retain), max_docs=5, retain_max_docs=7))
    assert len(kept) == 7
    # "100 randomly selected CBT training samples": a seeded draw, not the first items of the file
    story = [" ".join(f"The {a} sat on the {b} ." for a in ("cat", "dog", "hen") for b in ("mat", "rug", str(i)))
             for i in range(40)]
    items = build_cloze_items(story, "P", n_items=40, seed=0, n_context=2)
    path = tmp_path / "cbt.jsonl"
    save_cbt_jsonl(items, path)
    from snip_lens.sweep import cbt_item_text

    data = DataConfig(forget=f"cbt:P:{path}", retain="prose", seed=0)
    drawn = load_side_texts(data.forget, data, 10)
    assert len(drawn) == 10 and drawn != [cbt_item_text(it) for it in items[:10]]
    assert drawn == load_side_texts(data.forget, data, 10)
    assert drawn != load_side_texts(data.forget, DataConfig(forget=data.forget, seed=1), 10)
    with pytest.raises(ValueError, match="retain_max_docs=1"):
        DataConfig(retain_max_docs=1)


def test_forget_directory_of_extensionless_and_source_files_with_glob(tmp_path):
    """--forget DIR reads every text file (no extension, .c, ...); --glob narrows only the directory side."""
    from snip_lens.sweep import load_side_texts

    (tmp_path / "README").write_text("plain prose with no extension")
    (tmp_path / "lib.c").write_text("int add(int a, int b) { return a + b; }")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    assert load_side_texts(str(tmp_path), _data()) == ["plain prose with no extension",
                                                       "int add(int a, int b) { return a + b; }"]
    assert load_side_texts(str(tmp_path), _data(glob="*.c")) == ["int add(int a, int b) { return a + b; }"]
    assert load_side_texts("prose", _data(glob="*.c", max_docs=3)) == load_side_texts("prose", _data(max_docs=3))


def test_snip_run_scores_toxicity_with_a_local_detoxify_checkpoint_offline_loading_it_once(tmp_path, monkeypatch,
                                                                                           capsys):
    """`snip run --toxicity --detoxify-checkpoint CKPT --detoxify-config DIR`: no connection leaves the machine,
    the classifier is loaded once for the baseline and every (method, k), and its rates are the real ones."""
    from snip_lens.cli import main
    from snip_lens.evaluate import toxicity as tox
    from snip_lens.models import load_model
    from snip_lens.testing import forbid_network, tiny_detoxify_checkpoint, tiny_hf_model, tiny_tokenizer

    ckpt, cfg_dir = tiny_detoxify_checkpoint(tmp_path)
    mdir = tmp_path / "tiny"
    tiny_hf_model("llama", n_layers=2, d_mlp=32).save_pretrained(mdir)
    tiny_tokenizer().save_pretrained(mdir)
    loads = []
    real_init = tox.DetoxifyScorer.__init__

    def counting_init(self, *args, **kwargs):
        loads.append(args)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(tox.DetoxifyScorer, "__init__", counting_init)
    out = tmp_path / "run"
    argv = ["run", "--model", str(mdir), "--forget", "code", "--retain", "prose", "--max-docs", "40",
            "--n-ctx", "32", "--select-windows", "8", "--eval-windows", "4", "--methods", "random,activation",
            "--k", "5%,10%", "--toxicity", "--toxicity-n", "6", "--toxicity-scorer", "detoxify",
            "--detoxify-checkpoint", str(ckpt), "--detoxify-config", str(cfg_dir), "--out", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        refused = forbid_network(mp)
        assert main(argv) == 0, capsys.readouterr().err
    assert refused == []
    assert len(loads) == 1  # once per sweep, not per (method, k)
    res = json.loads((out / "results.json").read_text())
    assert len(res["runs"]) == 4
    model = load_model(str(mdir))
    scorer = tox.DetoxifyScorer(ckpt, config_dir=cfg_dir)
    cfg = tox.ToxicityConfig(n=6, scorer="detoxify", detoxify_checkpoint=str(ckpt), detoxify_config=str(cfg_dir))
    for run in [dict(res["baseline"], method=None)] + res["runs"]:
        mask = None if run["method"] is None else NeuronMask.load(
            out / "masks" / f"{run['method']}_k{run['k']}.safetensors", model=model)
        want = tox.toxicity_rate(model, cfg, mask=mask, progress=False, scorer=scorer)
        assert run["extra"]["pct_toxic"] == want["pct_toxic"]
        assert run["extra"]["mean_toxicity"] == pytest.approx(want["mean_toxicity"], rel=1e-6)


def test_rerun_retries_exactly_the_failed_explanations_and_says_so(model, tmp_path, monkeypatch, caplog):
    """explain advises 'rerun the same command to retry them': the rerun asks the LLM again for the failed
    neurons only, keeps the successes, and logs that it is retrying."""
    import zlib

    from snip_lens.loopback import LoopbackServer

    monkeypatch.setenv("SNIP_TEST_KEY", "sk-test")
    state = {"first": True}
    asked: list[str] = []
    failed: list[str] = []

    def answer(messages):
        text = messages[-1]["content"]
        if "<start>" not in text:  # not an explanation prompt
            return "1"
        asked.append(text)
        if state["first"] and zlib.crc32(text.encode()) % 3 == 0:
            failed.append(text)
            return ""  # unparseable: recorded as that neuron's failure
        return f"tokens like {zlib.crc32(text.encode()) % 97} in text"

    cfg = SweepConfig(model="tiny", data=_data(), ks=["5%"], methods=["snip", "random"], explainer="openai",
                      llm_model="loopback-chat", concepts="distinctive", api_key_env="SNIP_TEST_KEY")
    with LoopbackServer(answer=answer) as server:
        cfg.base_url = server.base_url
        run_sweep(cfg, tmp_path, model=model, progress=False)
        first = {(e["layer"], e["index"]): e for e in map(json.loads, (tmp_path / "explanations.jsonl").open())}
        n_failed = sum(e["error"] is not None for e in first.values())
        assert n_failed == len(failed) > 0 and len(asked) == 64
        state["first"] = False
        asked.clear()
        with caplog.at_level("WARNING", logger="snip_lens.explain"):
            run_sweep(cfg, tmp_path, model=model, progress=False)
    assert sorted(asked) == sorted(failed)  # exactly the failures were asked again
    assert f"retrying {n_failed} failed" in caplog.text
    second = {(e["layer"], e["index"]): e for e in map(json.loads, (tmp_path / "explanations.jsonl").open())}
    assert all(e["error"] is None and e["explanation"] for e in second.values())
    for key, e in first.items():
        if e["error"] is None:
            assert second[key] == e  # successes kept as they were


def test_random_seed_draws_other_neurons_on_the_same_windows(model, tmp_path):
    base = run_sweep(SweepConfig(model="tiny", data=_data(), ks=["6"], methods=["random"]), tmp_path / "a",
                     model=model, progress=False)
    other = run_sweep(SweepConfig(model="tiny", data=_data(), ks=["6"], methods=["random"], seed=5), tmp_path / "b",
                      model=model, progress=False)
    assert base["baseline"] == other["baseline"]  # same split and windows
    a = NeuronMask.load(tmp_path / "a" / "masks" / "random_k6.safetensors").neurons
    b = NeuronMask.load(tmp_path / "b" / "masks" / "random_k6.safetensors").neurons
    assert sorted(a) != sorted(b)
