"""The whole pipeline end to end on a tiny model: collect -> explain -> concepts -> embed -> score -> sweep."""

from __future__ import annotations

import json

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
    from snip_lens.sweep import load_side_texts

    d = cfg.data
    out = {}
    for side, spec in (("forget", d.forget), ("retain", d.retain)):
        _, held = split_documents(load_side_texts(spec, d), d.eval_fraction, d.seed)
        out[side] = make_windows(model, held, n_ctx=d.n_ctx, max_windows=d.eval_windows, seed=d.seed + 1,
                                 max_doc_tokens=d.max_doc_tokens).tokens
    return out


@pytest.fixture(scope="module")
def offline_run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    cfg = SweepConfig(model="tiny", data=_data(), ks=KS, keywords=["code", "python"],
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
    assert "<table>" in html and "matched concept" in html
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["version"] == 2 and cfg_json["select"]["methods"] == cfg.methods
    assert "(none)" in summary_table(res)


def test_report_shows_explanations_and_concepts_of_snip_neurons(offline_run):
    out, _, res = offline_run
    expl = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    assert len(expl) == 64
    concepts = json.loads((out / "concepts.json").read_text())["concepts"]
    assert concepts
    report = (out / "report.md").read_text()
    snip_part = report.split("## snip")[1].split("## ")[0]
    rows = [line for line in snip_part.splitlines() if line.startswith("| L")]
    assert rows, "the report lists the neurons SNIP pruned"
    # every listed SNIP neuron names a concept of the forget set and its own explanation
    texts = {f"L{e['layer']}/N{e['index']}": e["explanation"] for e in expl}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3] in concepts
        assert cells[2] == texts[cells[0]].replace("|", "\\|")


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
                          judge_candidates=64)
        res = run_sweep(cfg, tmp_path, model=model, progress=False)
    assert [r["method"] for r in res["runs"]] == ["snip", "llm-judge", "random"]
    concepts = json.loads((tmp_path / "concepts.json").read_text())["concepts"]
    assert [c.lower() for c in concepts] == ["python keywords", "function definitions", "indentation"]
    expl = [json.loads(line) for line in (tmp_path / "explanations.jsonl").read_text().splitlines()]
    text_of = {(e["layer"], e["index"]): e["explanation"] for e in expl}
    assert set(text_of.values()) == set(PAPER_EXPLANATIONS)  # neurons are explained differently
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
