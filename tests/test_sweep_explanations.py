"""The sweep's --explanations input|output|both: each kind reaches the explanations file with its evidence."""

from __future__ import annotations

import json

import pytest

from snip_lens.cli import main
from snip_lens.explain import load_explanations
from snip_lens.sweep import DataConfig, SweepConfig, run_sweep
from snip_lens.testing import tiny_model


@pytest.mark.parametrize("kind", ["output", "both"])
def test_sweep_explains_with_the_chosen_evidence(kind, tmp_path):
    model = tiny_model("llama", n_layers=2, d_mlp=16)
    data = DataConfig(forget="code", retain="prose", n_ctx=32, select_windows=6, eval_windows=3, max_docs=30)
    cfg = SweepConfig(model="tiny", data=data, ks=["10%"], methods=["snip", "random"], explanations=kind)
    res = run_sweep(cfg, tmp_path, model=model, progress=False)
    assert {r["method"] for r in res["runs"]} == {"snip", "random"}
    expl = load_explanations(tmp_path / "explanations.jsonl")
    assert len(expl) == 32 and all(e.ok and e.kind == kind for e in expl)
    for e in expl:
        assert e.evidence.output is not None and len(e.evidence.output.promoted) == 12
        assert (e.evidence.input is not None) == (kind == "both")
        assert "raises the next token" in e.explanation
    assert json.loads((tmp_path / "config.json").read_text())["explain"]["explanations"] == kind


def test_cli_flag_and_bad_value(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--explanations", "outputs", "--forget", "code"])
    assert "invalid choice: 'outputs'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="explanations must be 'input', 'output' or 'both'"):
        SweepConfig(explanations="neither")  # type: ignore[arg-type]


def test_sweep_quality_weight_scores_every_prunable_neuron_and_saves_it(tmp_path):
    import torch

    from snip_lens.quality import quality_weight
    from snip_lens.score import NeuronScores

    model = tiny_model("llama", n_layers=2, d_mlp=16)
    data = DataConfig(forget="code", retain="prose", n_ctx=32, select_windows=6, eval_windows=3, max_docs=30)
    cfg = SweepConfig(model="tiny", data=data, ks=["5%", "10%"], methods=["snip"], quality_weight="embedding")
    run_sweep(cfg, tmp_path, model=model, progress=False)
    expl = load_explanations(tmp_path / "explanations.jsonl")
    scored = [e for e in expl if "embedding" in e.quality]
    assert len(scored) == 2 * 3  # twice the largest k (3 neurons), saved with the explanations
    assert all(0.0 <= e.quality["embedding"] <= 1.0 for e in scored)
    s = NeuronScores.load(tmp_path / "scores" / "snip.safetensors")
    for e in expl:
        v = float(s.scores[e.neuron.layer, e.neuron.index])
        if "embedding" not in e.quality:
            assert v == 0.0
        elif quality_weight("embedding", e.quality["embedding"]) == 0.0:
            assert v == 0.0
    assert torch.isfinite(s.scores).all()
    report = (tmp_path / "report.md").read_text()
    assert "[quality embedding " in report
