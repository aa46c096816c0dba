"""RunConfig is composed of the stage configs, and the CLI's flags are derived from their fields."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from snip_lens.config import (
    STAGES,
    CollectionConfig,
    DataConfig,
    LLMServerConfig,
    ModelConfig,
    RunConfig,
    SelectionConfig,
    add_run_flags,
    add_stage_flags,
    flag_of,
    from_flat,
    run_config_from_args,
    stage_from_args,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_run_flags(p)
    return p


def test_cli_defaults_equal_the_api_defaults_and_every_field_has_a_flag():
    p = _parser()
    assert run_config_from_args(p.parse_args([])) == RunConfig()
    flags = {s for a in p._actions for s in a.option_strings}
    for cls in STAGES.values():
        for f in dataclasses.fields(cls):
            if not f.metadata.get("cli", True):  # nested configs (generation, relearn) have flags of their own
                continue
            assert flag_of(f) in flags, f"{cls.__name__}.{f.name} has no flag"


def test_flags_parse_into_the_stage_configs():
    args = _parser().parse_args(["--model", "gpt2", "--dtype", "bf16", "--device", "cuda:1", "--device-map", "auto",
                                 "--k", "1%,500", "--methods", "snip,random", "--max-doc-tokens", "0",
                                 "--api-key-env", "none", "--toxicity", "--cbt", "p,v", "--max-docs", "none"])
    cfg = run_config_from_args(args)
    assert cfg.model == ModelConfig("gpt2", device="cuda:1", dtype="bfloat16", device_map="auto")
    assert cfg.select.ks == ["1%", "500"] and cfg.select.methods == ["snip", "random"]
    assert cfg.data.max_doc_tokens is None and cfg.data.max_docs is None
    assert cfg.llm.api_key_env is None and cfg.evaluate.toxicity and cfg.evaluate.cbt == ["P", "V"]


def test_a_field_added_to_a_stage_config_becomes_a_flag_with_its_docstring_as_help():
    @dataclasses.dataclass
    class Extra:
        """A stage someone extends."""

        mask_mode: str = "zero"
        """How pruned neurons are removed: zero or mean."""
        per_layer: bool = False
        """Take k/L neurons in every layer."""

    p = argparse.ArgumentParser()
    add_stage_flags(p, Extra, "extra")
    helps = {a.option_strings[0]: a.help for a in p._actions if a.option_strings}
    assert helps["--mask-mode"].startswith("How pruned neurons are removed") and "--per-layer" in helps
    got = stage_from_args(Extra, p.parse_args(["--mask-mode", "mean", "--per-layer"]), "extra")
    assert got == Extra("mean", True)

    @dataclasses.dataclass
    class Undocumented:
        x: int = 1

    with pytest.raises(TypeError, match="Undocumented.x has no docstring"):
        add_stage_flags(argparse.ArgumentParser(), Undocumented, "u")


def test_every_sweepconfig_field_maps_into_the_run_config():
    """Guards merges: a field added to the flat SweepConfig must exist in some stage config."""
    from snip_lens.sweep import SweepConfig

    flat = SweepConfig(model="gpt2", ks=["3%"], methods=["snip", "keyword"], keywords=["a"], batch_size=4,
                       llm_model="m", api_key_env="none", cbt=["P"], toxicity=True, judge_candidates=7,
                       concepts="distinctive")
    cfg = flat.to_run_config()
    for f in dataclasses.fields(SweepConfig):
        if f.name not in ("data", "seed", "model", "concepts", "select"):  # these names are stage fields now
            got = getattr(cfg, f.name)  # the flat view resolves every old name
            want = getattr(flat, f.name)
            assert got == (None if f.name == "api_key_env" else want), f.name
    assert cfg.model.name == "gpt2" and cfg.model.batch_size == 4 and cfg.llm.model == "m"
    assert cfg.select.judge_candidates == 7 and cfg.concepts.mode == "distinctive"
    assert SweepConfig(select="per-layer").to_run_config().select.selection == "per-layer"
    with pytest.raises(ValueError, match="belongs to no stage config"):
        from_flat({"no_such_setting": 1})


def test_config_json_round_trip_and_old_flat_files():
    cfg = RunConfig(model=ModelConfig("gpt2", dtype="fp16"), select=SelectionConfig(ks=["2%"]))
    assert RunConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    from snip_lens.sweep import SweepConfig

    old = SweepConfig(model="gpt2", ks=["2%"]).to_json()  # a version-1 config.json
    assert RunConfig.from_json(old).select.ks == ["2%"]
    with pytest.raises(ValueError, match="version 99"):
        RunConfig.from_json({"version": 99})


@pytest.mark.parametrize("make, needle", [
    (lambda: ModelConfig(dtype="int4"), "int4"),
    (lambda: ModelConfig(device="cuda:a"), "cuda:a"),
    (lambda: DataConfig(n_ctx=0), "n_ctx"),
    (lambda: DataConfig(forget="x", retain="x"), "identical"),
    (lambda: SelectionConfig(ks=["200%"]), "200%"),
    (lambda: SelectionConfig(methods=[]), "no selection method"),
    (lambda: LLMServerConfig(base_url="ftp://x"), "ftp://x"),
    (lambda: RunConfig(select=SelectionConfig(methods=["llm-judge"])), "--llm-model"),
    (lambda: CollectionConfig(random_records=-1), "--random-records"),
    (lambda: CollectionConfig(top_k_records=0), "--top-k-records"),
])
def test_stage_validation_names_the_value(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_dtype_aliases():
    assert [ModelConfig(dtype=d).dtype for d in ("fp32", "bf16", "fp16", "torch.bfloat16")] == \
        ["float32", "bfloat16", "float16", "bfloat16"]


def test_dataset_concepts_save_load(tmp_path):
    from snip_lens.types import DatasetConcepts

    c = DatasetConcepts(["loops", "function definitions"], "distinctive")
    p = c.save(tmp_path / "c.json")
    assert json.loads(p.read_text())["format"] == "snip_lens.concepts"
    assert DatasetConcepts.load(p) == c
    (tmp_path / "old.json").write_text('{"concepts": ["a"], "source": "x"}')  # before format/version
    assert DatasetConcepts.load(tmp_path / "old.json") == DatasetConcepts(["a"], "x")
    (tmp_path / "bad.json").write_text('{"format": "snip_lens.scores", "concepts": ["a"]}')
    with pytest.raises(ValueError, match="not a concepts file"):
        DatasetConcepts.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="control characters"):
        DatasetConcepts(["\x00\x01"])


def test_results_schema_round_trip_keeps_unknown_keys(tmp_path):
    from snip_lens.results import RESULTS_VERSION, RunResult, SweepResults

    m = {"loss": 2.0, "top1": 0.5, "top10": 0.8}
    res = SweepResults("tiny", 64, RunResult.from_json({"forget": m, "retain": m, "extra": {}}, baseline=True),
                       [RunResult("snip", 3, 4.7, m, m, {"pct_toxic": 1.0}, more={"n_tied_at_cut": 2})])
    p = res.save(tmp_path / "results.json")
    d = json.loads(p.read_text())
    assert d["version"] == RESULTS_VERSION and d["runs"][0]["n_tied_at_cut"] == 2
    assert set(d["baseline"]) == {"forget", "retain", "extra"}
    assert SweepResults.load(p) == res
    d.pop("version")  # a version-1 file
    assert SweepResults.from_json(d).runs[0].k == 3


def test_flat_seed_seeds_the_random_baseline_and_leaves_the_split_alone():
    from snip_lens.sweep import DataConfig, SweepConfig

    cfg = SweepConfig(data=DataConfig(seed=0), methods=["random"], seed=2).to_run_config()
    assert cfg.data.seed == 0 and cfg.select.random_seed == 2
    assert SweepConfig(data=DataConfig(seed=3), methods=["random"], seed=3).to_run_config().select.random_seed is None
    import pytest

    from snip_lens.config import SelectionConfig

    with pytest.raises(ValueError, match="random_seed"):
        SelectionConfig(random_seed="1")  # type: ignore[arg-type]
