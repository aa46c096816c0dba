"""The sweep's generation-level evaluation and relearning attack, and ``snip relearn``, on a tiny model."""

from __future__ import annotations

import json

import pytest

from snip_lens.cli import main
from snip_lens.evaluate.generation import GenerationConfig
from snip_lens.evaluate.relearn import RelearnConfig
from snip_lens.sweep import DataConfig, SweepConfig, run_sweep
from snip_lens.testing import tiny_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2, d_mlp=32)


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("forgetting")
    cfg = SweepConfig(model="tiny", data=DataConfig(forget="code", retain="prose", n_ctx=32, select_windows=8,
                                                    eval_windows=4, max_docs=40),
                      methods=["activation"], ks=["5%", "10%"],
                      generation=GenerationConfig(n_prompts=4, prompt_tokens=8, max_new_tokens=6, batch_size=4),
                      relearn=RelearnConfig(steps=[1, 2], batch_size=2, relearn_windows=4, lr=1e-3))
    return out, cfg, run_sweep(cfg, out, model=model, progress=False)


def test_sweep_reports_generation_for_baseline_and_every_run(run):
    out, cfg, res = run
    assert res["generation"]["detector"]["name"] == "python"  # auto: stdlib code vs pydoc prose
    for entry in [res["baseline"]] + res["runs"]:
        assert set(entry["generation"]) == {"greedy", "sampled"}
        assert 0 <= entry["extra"]["generation_greedy_forget_in_domain"] <= 1
    assert (out / "plots" / "generation_greedy_forget_in_domain.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "## Generation-level forgetting" in report and "document's own continuation" in report
    assert json.loads((out / "config.json").read_text())["evaluate"]["generation"]["n_prompts"] == 4


def test_sweep_relearn_attacks_every_method_and_random_in_both_forms(run):
    out, cfg, res = run
    rel = res["relearn"]
    got = [(r["method"], r["form"], r["k"]) for r in rel["runs"]]
    assert got == [("unpruned", "none", 0), ("activation", "exported", 6), ("activation", "masked", 6),
                   ("random", "exported", 6), ("random", "masked", 6)]  # the largest k, random added
    act = next(r for r in res["runs"] if r["method"] == "activation" and r["k"] == 6)
    assert rel["runs"][1]["forget_top1"][0] == act["forget"]["top1"]  # step 0 is the sweep's own measurement
    assert rel["runs"][0]["forget_top1"][0] == res["baseline"]["forget"]["top1"]
    assert (out / "plots" / "relearn_forget_top1.png").stat().st_size > 1000
    assert "## Relearning attack" in (out / "report.md").read_text()
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["relearn"]["runs"][2]["masked_max_abs_act"] == [0.0, 0.0]


def test_config_round_trips_through_json(run):
    _, cfg, _ = run
    again = SweepConfig(**json.loads(json.dumps(cfg.to_json())))
    assert again.generation == cfg.generation and again.relearn == cfg.relearn


def test_cli_eval_and_relearn_flags_and_bad_values(tmp_path, monkeypatch):
    from snip_lens import cli

    args = cli.build_parser().parse_args(["run", "--model", "m", "--forget", "code", "--retain", "prose",
                                          "--eval", "generation", "--detector", "language:de",
                                          "--relearn", "3,1", "--relearn-forms", "masked"])
    cfg = cli._sweep_config(args)
    assert cfg.generation.detector == "language:de" and cfg.relearn.steps == [1, 3] and cfg.relearn.forms == ["masked"]
    plain = cli._sweep_config(cli.build_parser().parse_args(["run", "--model", "m", "--forget", "code",
                                                             "--retain", "prose"]))
    assert plain.generation is None and plain.relearn is None
    for extra, match in ((["--eval", "beam"], "unknown --eval"), (["--eval", "generation", "--detector", "x"],
                                                                 "unknown detector")):
        bad = cli.build_parser().parse_args(["run", "--model", "m", "--forget", "code", "--retain", "prose", *extra])
        with pytest.raises(ValueError, match=match):
            cli._sweep_config(bad)


def test_snip_relearn_command(model, tmp_path, monkeypatch, capsys):
    from snip_lens import models as M
    from snip_lens.mask import NeuronMask

    mask_path = NeuronMask.from_neurons(model, [(0, 1), (1, 4)]).save(tmp_path / "m.safetensors")
    monkeypatch.setattr(M, "load_model", lambda name, **kw: model)
    argv = ["relearn", "--model", "tiny", "--mask", str(mask_path), "--label", "snip", "--forget", "code",
            "--retain", "prose", "--max-docs", "30", "--steps", "1", "--batch-size", "2", "--relearn-windows", "2",
            "--n-ctx", "24", "--eval-windows", "2", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    res = json.loads((tmp_path / "r" / "relearn.json").read_text())
    assert [(r["method"], r["form"]) for r in res["runs"]] == [("unpruned", "none"), ("snip", "exported"),
                                                               ("snip", "masked"), ("random", "exported"),
                                                               ("random", "masked")]
    assert "recovery @1" in capsys.readouterr().out
    assert main(argv) == 2  # refuses to overwrite without --overwrite
