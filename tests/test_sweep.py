"""The whole pipeline end to end on a tiny model: collect -> explain -> concepts -> embed -> score -> sweep."""

from __future__ import annotations

import json

import pytest
import torch

from snip_lens.mask import NeuronMask
from snip_lens.sweep import DataConfig, SweepConfig, run_sweep, split_documents, summary_table
from snip_lens.testing import tiny_model

KS = ["5%", "10%"]


def _data(**kw):
    base = dict(forget="code", retain="prose", n_ctx=32, select_windows=8, eval_windows=4, max_docs=40, seed=0)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2, d_mlp=32)


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
    for r in res["runs"]:
        assert 0.0 <= r["forget"]["top1"] <= r["forget"]["top10"] <= 1.0
        assert r["retain"]["loss"] > 0
        mask = NeuronMask.load(out / "masks" / f"{r['method']}_k{r['k']}.safetensors", model=model)
        assert len(mask) == r["k"]
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


def _paper_answer(messages):
    text = messages[-1]["content"]
    if "List a comprehensive list" in text:
        return "1. Python keywords\n2. function definitions\n3. indentation\n4. python keywords"
    if "scale from 0" in text:
        return "7" if "code" in text else "1"
    return " code tokens in programs."


def test_paper_path_with_an_openai_compatible_server(model, tmp_path, monkeypatch):
    """The LLM explainer, LLM concepts, LLM judge and API embeddings, over real HTTP to a loopback server."""
    from snip_lens.loopback import LoopbackServer

    monkeypatch.setenv("SNIP_TEST_KEY", "sk-test-secret-123")
    with LoopbackServer(answer=_paper_answer, embed_dim=1536) as server:
        cfg = SweepConfig(model="tiny", data=_data(), ks=["5%"], methods=["snip", "llm-judge", "random"],
                          explainer="openai", llm_model="loopback-chat", base_url=server.base_url,
                          api_key_env="SNIP_TEST_KEY", embedder="openai:text-embedding-3-small",
                          judge_candidates=20)
        res = run_sweep(cfg, tmp_path, model=model, progress=False)
    assert [r["method"] for r in res["runs"]] == ["snip", "llm-judge", "random"]
    concepts = json.loads((tmp_path / "concepts.json").read_text())["concepts"]
    assert [c.lower() for c in concepts] == ["python keywords", "function definitions", "indentation"]
    expl = [json.loads(line) for line in (tmp_path / "explanations.jsonl").read_text().splitlines()]
    assert all(e["explanation"] == "code tokens in programs" for e in expl)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"sk-test-secret-123" not in path.read_bytes(), f"API key written to {path}"


def test_cbt_and_toxicity_extras_on_fixture_files(model, tmp_path):
    """The paper's CBT and toxicity evaluations through the sweep, on local files in the real schemas."""
    from pathlib import Path

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
    for r in [res["baseline"]] + res["runs"]:
        assert 0.0 <= r["extra"]["cbt_P_accuracy"] <= 1.0
        assert 0.0 <= r["extra"]["pct_toxic"] <= 100.0
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
