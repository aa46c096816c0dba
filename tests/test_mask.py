"""NeuronMask: hooks equal weight edits, exact cleanup, composition, validation and the file format."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import save_file

from snip_lens.mask import MaskHandle, NeuronMask
from snip_lens.models import hook_name, to_tokens
from snip_lens.testing import SAMPLE_TEXTS, hook_state, tiny_hf_model, tiny_model
from snip_lens.types import NeuronId

TEXTS = SAMPLE_TEXTS


@functools.lru_cache(maxsize=None)
def _model(arch: str):
    return tiny_model(arch)


@pytest.fixture(params=["gpt2", "llama"])
def arch(request):
    return request.param


def _tokens(model):
    return to_tokens(model, TEXTS)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)




def _out_proj(hf, arch: str, layer: int):
    """(weight, neuron axis) of the HF MLP output projection: GPT-2 Conv1D is [d_mlp, d_model]."""
    if arch == "gpt2":
        return hf.transformer.h[layer].mlp.c_proj, 0
    return hf.model.layers[layer].mlp.down_proj, 1


def _weight_edited_logits(arch, tokens, edits):
    """Reference: a fresh copy of the same HF model, neurons' output weights multiplied by a factor."""
    hf = tiny_hf_model(arch)  # same seed -> same weights as _model(arch)
    with torch.no_grad():
        for neuron, factor in edits.items():
            proj, axis = _out_proj(hf, arch, neuron.layer)
            if axis == 0:
                proj.weight[neuron.index, :] *= factor
            else:
                proj.weight[:, neuron.index] *= factor
        return hf(tokens).logits


NEURONS = [(2, 5), (0, 1), (1, 63), (0, 40), (2, 0)]


def test_zero_mask_equals_zeroed_output_weights(arch):
    model = _model(arch)
    tokens = _tokens(model)
    mask = NeuronMask.from_neurons(model, NEURONS)
    with mask.applied(model):
        masked = _logits(model, tokens)
    reference = _weight_edited_logits(arch, tokens, {NeuronId(*n): 0.0 for n in NEURONS})
    unmasked = _weight_edited_logits(arch, tokens, {})
    assert (masked - unmasked).abs().max() > 1e-4  # the mask does something
    torch.testing.assert_close(masked, reference, rtol=1e-5, atol=1e-5)


def test_scale_mask_equals_scaled_output_weights(arch):
    model = _model(arch)
    tokens = _tokens(model)
    factors = [0.5, 2.0, -1.0, 0.0, 3.0]
    mask = NeuronMask.from_neurons(model, NEURONS, mode="scale", values=factors)
    with mask.applied(model):
        masked = _logits(model, tokens)
    reference = _weight_edited_logits(arch, tokens, {NeuronId(*n): f for n, f in zip(NEURONS, factors)})
    torch.testing.assert_close(masked, reference, rtol=1e-5, atol=1e-5)


def test_mean_mask_sets_activation_to_value_in_given_order(arch):
    model = _model(arch)
    tokens = _tokens(model)
    values = [1.5, -2.0, 0.25, 7.0, -0.5]
    mask = NeuronMask.from_neurons(model, NEURONS, mode="mean", values=values)
    # The cache hook is registered after ours, so it sees the masked activation.
    with mask.applied(model), torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook_name(l) for l in range(3)])
    _, clean = model.run_with_cache(tokens, names_filter=[hook_name(l) for l in range(3)])
    for (layer, index), v in zip(NEURONS, values):
        act = cache[hook_name(layer)][..., index]
        assert torch.all(act == v), (layer, index)
    # Every other neuron of the first layer is untouched (later layers see the edit's effects).
    keep = [i for i in range(64) if (0, i) not in NEURONS]
    assert torch.equal(cache[hook_name(0)][..., keep], clean[hook_name(0)][..., keep])
    assert not torch.equal(cache[hook_name(1)], clean[hook_name(1)])


def test_mean_mask_equals_python_loop_reference(arch):
    model = _model(arch)
    tokens = _tokens(model)
    values = [1.5, -2.0, 0.25, 7.0, -0.5]
    mask = NeuronMask.from_neurons(model, NEURONS, mode="mean", values=values)
    with mask.applied(model):
        masked = _logits(model, tokens)

    def loop_hook(act, hook, layer):
        act = act.clone()
        for (lay, idx), v in zip(NEURONS, values):
            if lay == layer:
                act[:, :, idx] = v
        return act

    hooks = [(hook_name(l), functools.partial(loop_hook, layer=l)) for l in range(3)]
    with torch.no_grad():
        reference = model.run_with_hooks(tokens, fwd_hooks=hooks)
    torch.testing.assert_close(masked, reference, rtol=0, atol=0)


def test_applied_restores_exact_state_on_exit_and_on_exception(arch):
    model = _model(arch)
    tokens = _tokens(model)
    base = _logits(model, tokens)
    state = hook_state(model)
    mask = NeuronMask.from_neurons(model, NEURONS)
    with mask.applied(model):
        assert hook_state(model) != state
        assert not torch.equal(_logits(model, tokens), base)
    assert hook_state(model) == state
    assert torch.equal(_logits(model, tokens), base)

    with pytest.raises(RuntimeError, match="boom"):
        with mask.applied(model):
            raise RuntimeError("boom")
    assert hook_state(model) == state
    assert torch.equal(_logits(model, tokens), base)


def test_nested_and_overlapping_masks(arch):
    model = _model(arch)
    tokens = _tokens(model)
    base = _logits(model, tokens)
    a = NeuronMask.from_neurons(model, [(0, 1), (1, 2), (2, 3)])
    b = NeuronMask.from_neurons(model, [(1, 2), (2, 4), (2, 30)])  # overlaps a on L1/N2
    with a.applied(model):
        only_a = _logits(model, tokens)
    with (a | b).applied(model):
        union = _logits(model, tokens)
    with a.applied(model):
        with b.applied(model):
            assert torch.equal(_logits(model, tokens), union)
        assert torch.equal(_logits(model, tokens), only_a)
    assert torch.equal(_logits(model, tokens), base)
    # Removal out of order removes exactly the named mask.
    ha, hb = a.attach(model), b.attach(model)
    ha.remove()
    with b.applied(model):  # b twice is b (zeroing is idempotent)
        pass
    with b.applied(model):
        b_only = _logits(model, tokens)
    assert torch.equal(_logits(model, tokens), b_only)
    hb.remove()
    hb.remove()  # idempotent
    assert not hb.active
    assert torch.equal(_logits(model, tokens), base)


def test_user_hooks_survive_and_mask_survives_tl_resets(arch):
    model = _model(arch)
    tokens = _tokens(model)
    base = _logits(model, tokens)
    calls: list[str] = []
    name = hook_name(1)
    model.add_hook(name, lambda act, hook: calls.append("temp"))
    model.add_hook(name, lambda act, hook: calls.append("perm"), is_permanent=True)
    try:
        before = hook_state(model)
        mask = NeuronMask.from_neurons(model, [(1, 3), (1, 9)])
        handle = mask.attach(model)
        masked = _logits(model, tokens)
        # TransformerLens's own hook contexts call reset_hooks(); a permanent mask stays attached.
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(hook_name(0), lambda act, hook: None)])
        assert torch.equal(_logits(model, tokens), masked)
        handle.remove()
        after = hook_state(model)
        # run_with_hooks resets non-permanent hooks, so compare permanent user hooks; ours are gone.
        perm_before = [h for h in model.hook_dict[name].fwd_hooks if h.is_permanent]
        assert len(perm_before) == 1 and id(perm_before[0]) in before[name]
        assert set(after[name]) <= set(before[name])
        calls.clear()
        _logits(model, tokens)
        assert "perm" in calls
    finally:
        model.reset_hooks(including_permanent=True)
    assert torch.equal(_logits(model, tokens), base)


def test_user_temporary_hook_survives_applied():
    model = _model("llama")
    tokens = _tokens(model)
    calls: list[int] = []
    model.add_hook(hook_name(2), lambda act, hook: calls.append(1))
    try:
        before = hook_state(model)
        with NeuronMask.from_neurons(model, [(2, 1)]).applied(model):
            _logits(model, tokens)
        assert hook_state(model) == before
        calls.clear()
        _logits(model, tokens)
        assert calls == [1]
    finally:
        model.reset_hooks(including_permanent=True)


def test_from_neurons_accepts_forms_and_sorts():
    model = _model("llama")
    mask = NeuronMask.from_neurons(model, [NeuronId(2, 1), (0, 5), "L1/N7", (torch.tensor(0), 2)],
                                   mode="scale", values=0.5)
    assert mask.neurons == (NeuronId(0, 2), NeuronId(0, 5), NeuronId(1, 7), NeuronId(2, 1))
    assert len(mask) == 4 and (1, 7) in mask and (1, 8) not in mask
    assert torch.equal(mask.values, torch.full((4,), 0.5))
    assert mask.layers == [0, 1, 2]
    assert {k: v.tolist() for k, v in mask.per_layer().items()} == {0: [2, 5], 1: [7], 2: [1]}
    assert (mask.model_name, mask.n_layers, mask.d_mlp) == ("tiny-llama", 3, 64)
    m2 = NeuronMask.from_neurons(model, [(2, 1), (0, 5)], mode="mean", values=[10.0, 20.0])
    assert m2.values.tolist() == [20.0, 10.0]  # realigned with the sorted neurons
    assert len(NeuronMask.from_neurons(model, [])) == 0


@pytest.mark.parametrize(
    "neurons, kwargs, match",
    [
        ([(3, 0)], {}, r"layer 3.*3 layers"),
        ([(-1, 0)], {}, r"layer -1"),
        ([(0, 64)], {}, r"index 64.*64 neurons"),
        ([(0, -2)], {}, r"index -2"),
        ([(0, 1), (1, 2), (0, 1)], {}, r"duplicate neurons: L0/N1"),
        ([(0, 1)], {"mode": "prune"}, r"unknown mask mode 'prune'"),
        ([(0, 1), (0, 2)], {"mode": "mean", "values": [1.0, float("nan")]}, r"L0/N2 is nan"),
        ([(0, 1)], {"mode": "scale", "values": [float("inf")]}, r"L0/N1 is inf"),
        ([(0, 1), (0, 2)], {"mode": "mean", "values": [1.0]}, r"\(1,\) values for 2 neurons"),
        ([(0, 1)], {"mode": "mean"}, r"mode 'mean' needs values"),
        ([(0, 1)], {"mode": "mean", "values": 1.0}, r"single number 1.0"),
        ([(0, 1)], {"mode": "zero", "values": [1.0]}, r"'zero' takes no values"),
        ([(0, 1.5)], {}, r"non-integer index 1.5"),
        ([(0,)], {}, r"cannot read neuron \(0,\)"),
    ],
)
def test_bad_inputs_name_the_value(neurons, kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuronMask.from_neurons(_model("llama"), neurons, **kwargs)


def test_union_rules():
    model = _model("llama")
    a = NeuronMask.from_neurons(model, [(0, 1), (1, 2)], mode="mean", values=[1.0, 2.0])
    b = NeuronMask.from_neurons(model, [(1, 2), (2, 3)], mode="mean", values=[2.0, 3.0])
    u = a | b
    assert u.neurons == (NeuronId(0, 1), NeuronId(1, 2), NeuronId(2, 3))
    assert u.values.tolist() == [1.0, 2.0, 3.0]
    c = NeuronMask.from_neurons(model, [(1, 2)], mode="mean", values=[5.0])
    with pytest.raises(ValueError, match=r"L1/N2 has mean value 2.0 in one mask and 5.0"):
        a | c
    with pytest.raises(ValueError, match=r"cannot merge a 'mean' mask with a 'zero' mask"):
        a | NeuronMask.from_neurons(model, [(0, 1)])
    other = tiny_model("llama", d_mlp=32)
    with pytest.raises(ValueError, match=r"different model shapes.*3 layers x 64.*3 x 32"):
        a | NeuronMask.from_neurons(other, [(0, 1)], mode="mean", values=[1.0])


def test_save_load_roundtrip(tmp_path, arch):
    model = _model(arch)
    for mask in (NeuronMask.from_neurons(model, NEURONS),
                 NeuronMask.from_neurons(model, NEURONS, mode="mean", values=[1, 2, 3, 4, 5]),
                 NeuronMask.from_neurons(model, NEURONS, mode="scale", values=0.25)):
        path = mask.save(tmp_path / f"{mask.mode}.safetensors")
        loaded = NeuronMask.load(path, model=model)
        assert loaded == mask
        assert not list(tmp_path.glob("*.tmp"))
        assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
        tokens = _tokens(model)
        with mask.applied(model):
            want = _logits(model, tokens)
        with loaded.applied(model):
            assert torch.equal(_logits(model, tokens), want)


def test_load_errors(tmp_path):
    model = _model("llama")
    mask = NeuronMask.from_neurons(model, NEURONS)
    path = mask.save(tmp_path / "m.safetensors")

    other = tiny_model("llama", n_layers=2, d_mlp=64)
    with pytest.raises(ValueError, match=r"made for 'tiny-llama' \(3 layers x 64 neurons\).*2 layers x 64"):
        NeuronMask.load(path, model=other)
    with pytest.raises(ValueError, match=r"2 layers x 64"):
        mask.attach(other)

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match=r"truncated\.safetensors.*not a readable NeuronMask file"):
        NeuronMask.load(truncated)

    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"PK\x03\x04 this is a zip, not a mask" * 4)
    with pytest.raises(ValueError, match=r"foreign\.bin.*not a readable NeuronMask"):
        NeuronMask.load(foreign)

    other_st = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, str(other_st), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weights\.safetensors.*not a NeuronMask \(format 'pt'"):
        NeuronMask.load(other_st)

    bad = tmp_path / "bad.safetensors"
    save_file({"layers": torch.tensor([0, 7]), "indices": torch.tensor([1, 2])}, str(bad),
              metadata={"format": "snip_lens.neuron_mask", "version": "1", "mode": "zero", "model_name": "x",
                        "n_layers": "3", "d_mlp": "64", "n_neurons": "2"})
    with pytest.raises(ValueError, match=r"bad\.safetensors.*invalid NeuronMask.*layer 7"):
        NeuronMask.load(bad)

    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        NeuronMask.load(tmp_path / "nope.safetensors")


def test_handle_is_context_manager():
    model = _model("gpt2")
    state = hook_state(model)
    with NeuronMask.from_neurons(model, [(0, 0)]).attach(model) as handle:
        assert isinstance(handle, MaskHandle) and handle.active
    assert hook_state(model) == state
