"""export_pruned: plain transformers reloads reproduce the masked bridge; compaction really shrinks the MLPs."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from snip_lens.export import MASK_FILE, REPORT_FILE, export_pruned
from snip_lens.mask import NeuronMask
from snip_lens.models import to_tokens
from snip_lens.testing import SAMPLE_TEXTS, tiny_model

TEXTS = SAMPLE_TEXTS
D_MODEL, D_MLP, N_LAYERS = 32, 64, 3


@functools.lru_cache(maxsize=None)
def _model(arch: str):
    return tiny_model(arch)


def _uneven_neurons(seed: int = 0):
    """10, 30 and all 64 neurons of layers 0, 1, 2: layer 0 limits how far compaction can go."""
    g = torch.Generator().manual_seed(seed)
    return [(l, i) for l, k in enumerate((10, 30, 64)) for i in torch.randperm(D_MLP, generator=g)[:k].tolist()]


def _rel_err(got, want):
    return ((got - want).norm() / want.norm()).item()


def _masked_and_exported(model, mask, out_dir, compact):
    tokens = to_tokens(model, TEXTS)
    with torch.no_grad(), mask.applied(model):
        want = model(tokens)
    report = export_pruned(model, mask, out_dir, compact=compact)
    hf = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        got = hf(tokens).logits
    return want, got, report, hf


CASES = [("gpt2", "zero"), ("gpt2", "scale"), ("gpt2", "mean"), ("llama", "zero"), ("llama", "scale")]


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("arch, mode", CASES)
def test_reloaded_logits_equal_masked_bridge(tmp_path, arch, mode, compact):
    model = _model(arch)
    neurons = _uneven_neurons()
    g = torch.Generator().manual_seed(1)
    values = {"zero": None, "scale": torch.rand(len(neurons), generator=g) * 2 - 0.5,
              "mean": torch.randn(len(neurons), generator=g)}[mode]
    if mode == "scale":
        values[::3] = 0.0  # factor 0 = removable
    mask = NeuronMask.from_neurons(model, neurons, mode=mode, values=values)
    before = {k: v.clone() for k, v in model.original_model.state_dict().items()}
    want, got, report, hf = _masked_and_exported(model, mask, tmp_path / "out", compact)

    assert _rel_err(got, want) < 1e-4
    with torch.no_grad():
        unmasked = model(to_tokens(model, TEXTS))
    assert _rel_err(unmasked, want) > 1e-3  # the mask matters, so the equality above means something
    # The live model is untouched.
    after = model.original_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    removable = [D_MLP - k for k in report.kept_per_layer]
    if mode == "scale":
        zeros = values == 0
        assert sum(removable) == int(zeros.sum())
    else:
        assert removable == [10, 30, 64]
    if compact and mode != "scale":
        assert report.width == D_MLP - 10 and report.padded_per_layer == [0, 20, 54]
        assert report.notes and "one" in report.notes[0]
    if not compact:
        assert report.width == D_MLP and report.params_after == report.params_before


def test_reloaded_tokenizer_mask_and_report(tmp_path):
    model = _model("llama")
    mask = NeuronMask.from_neurons(model, [(0, 3), (2, 9)])
    report = export_pruned(model, mask, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    for text in TEXTS:
        assert tok(text, add_special_tokens=False)["input_ids"] == model.tokenizer(
            text, add_special_tokens=False)["input_ids"]
    assert NeuronMask.load(tmp_path / "out" / MASK_FILE, model=model) == mask
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["n_masked"] == 2
    assert report.out_dir == str(tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temp dir left behind


@pytest.mark.parametrize("arch, per_neuron", [("llama", 3 * D_MODEL), ("gpt2", 2 * D_MODEL + 1)])
def test_compact_removes_parameters_exactly(tmp_path, arch, per_neuron):
    model = _model(arch)
    g = torch.Generator().manual_seed(3)
    neurons = [(l, i) for l in range(N_LAYERS) for i in torch.randperm(D_MLP, generator=g)[:16].tolist()]
    mask = NeuronMask.from_neurons(model, neurons)
    want, got, report, hf = _masked_and_exported(model, mask, tmp_path / "out", compact=True)
    assert _rel_err(got, want) < 1e-4
    assert report.width == 48 and report.padded_per_layer == [0, 0, 0] and not report.notes
    assert report.removed == 48
    assert report.params_before - report.params_after == N_LAYERS * 16 * per_neuron
    assert hf.num_parameters() == report.params_after
    width_attr = "n_inner" if arch == "gpt2" else "intermediate_size"
    assert getattr(hf.config, width_attr) == 48


def test_mean_mask_without_output_bias_is_refused(tmp_path):
    model = _model("llama")
    mask = NeuronMask.from_neurons(model, [(0, 1)], mode="mean", values=[0.5])
    with pytest.raises(ValueError, match=r"cannot export a 'mean' mask for LlamaForCausalLM.*no bias"):
        export_pruned(model, mask, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_and_checks_shape(tmp_path):
    model = _model("gpt2")
    mask = NeuronMask.from_neurons(model, [(0, 1)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"out.*not empty.*overwrite=True"):
        export_pruned(model, mask, out)
    export_pruned(model, mask, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    other = tiny_model("gpt2", d_mlp=32)
    with pytest.raises(ValueError, match=r"3 layers x 64 neurons.*3 layers x 32"):
        export_pruned(other, mask, tmp_path / "other")
    with pytest.raises(TypeError, match=r"takes a NeuronMask, got list"):
        export_pruned(model, [(0, 1)], tmp_path / "x")  # type: ignore[arg-type]


def test_cli_export(tmp_path, capsys):
    from snip_lens.cli import main
    from snip_lens.models import load_model
    from snip_lens.testing import tiny_hf_model, tiny_tokenizer

    src = tmp_path / "src"
    tiny_hf_model("gpt2").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    model = load_model(str(src))
    mask = NeuronMask.from_neurons(model, [(l, i) for l in range(N_LAYERS) for i in range(0, D_MLP, 4)])
    mask.save(tmp_path / "mask.safetensors")
    argv = ["export", "--model", str(src), "--mask", str(tmp_path / "mask.safetensors"), "--out",
            str(tmp_path / "out"), "--compact"]
    assert main(argv) == 0
    assert "MLP width 64 -> 48" in capsys.readouterr().out
    tokens = to_tokens(model, TEXTS)
    with torch.no_grad(), mask.applied(model):
        want = model(tokens)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(tokens).logits
    assert _rel_err(got, want) < 1e-4
    assert main(argv) == 2  # refuses to overwrite
    assert "overwrite" in capsys.readouterr().err
    assert main([*argv[:4], str(tmp_path / "missing.safetensors"), *argv[5:]]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_cli_export_from_scores_per_layer_compacts_fully_and_global_says_what_is_left(tmp_path, capsys):
    from snip_lens.cli import main
    from snip_lens.models import load_model
    from snip_lens.score import NeuronScores
    from snip_lens.testing import tiny_hf_model, tiny_tokenizer

    src = tmp_path / "src"
    tiny_hf_model("llama").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    g = torch.Generator().manual_seed(0)
    raw = torch.rand(N_LAYERS, D_MLP, generator=g, dtype=torch.float64)
    raw[2] += 1.0  # a global top-k takes layer 2 first: uneven
    scores = NeuronScores(raw, "activation").save(tmp_path / "scores")
    base = ["export", "--model", str(src), "--scores", str(scores), "--k", "30", "--compact"]
    assert main([*base, "--out", str(tmp_path / "global")]) == 0
    out = capsys.readouterr().out
    assert "MLP width 64 -> 64" in out and "removed 0 of the 30 masked neurons" in out
    assert "30 could not be removed" in out and "--select per-layer" in out
    assert main([*base, "--select", "per-layer", "--out", str(tmp_path / "per-layer")]) == 0
    out = capsys.readouterr().out
    assert "MLP width 64 -> 54" in out and "removed 30 of the 30 masked neurons" in out
    assert "0 could not be removed" in out and "note:" not in out
    model = load_model(str(src))
    mask = NeuronMask.load(tmp_path / "per-layer" / MASK_FILE, model=model)
    assert sorted(n.layer for n in mask.neurons) == [0] * 10 + [1] * 10 + [2] * 10
    tokens = to_tokens(model, TEXTS)
    with torch.no_grad(), mask.applied(model):
        want = model(tokens)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "per-layer")(tokens).logits
    assert _rel_err(got, want) < 1e-4
    assert main(["export", "--model", str(src), "--out", str(tmp_path / "x")]) == 2
    assert "either --mask FILE, or --scores FILE" in capsys.readouterr().err
