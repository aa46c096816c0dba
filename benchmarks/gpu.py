"""GPU check: collection on an accelerator equals the CPU result, masks restore exactly, and throughput.

One command on any CUDA machine::

    python benchmarks/gpu.py                                   # SmolLM2-135M (offline package), cuda, bf16
    python benchmarks/gpu.py --random-weights smollm2-135m     # its shapes, random weights: no weights needed
    python benchmarks/gpu.py --random-weights llama-1b         # a ~1B Llama (Llama-3.2-1B shapes)
    python benchmarks/gpu.py --device cpu --random-weights tiny  # what CI runs, in seconds

It checks, and exits 1 when a check fails:

1. ``collect`` on ``--device`` in ``--dtype`` equals ``collect`` on the CPU in the same dtype on the same
   windows: top-k positions exactly wherever the reference values leave no near-tie (a gap of at least the
   tolerance to the neighbouring rank), values and statistics within the tolerance (float32: 1e-4,
   bf16/fp16: 3%), errors measured against each neuron's largest |activation| but never against less than
   the median of those over its layer (a neuron that barely fires would turn rounding into a huge relative
   error). On ``--device cpu`` the accelerator code path (sync-free kernels) is forced, so CI compares that
   path with the CPU one. In bf16/fp16 it also prints, as information and not as a check, how far the run
   drifts from float32 (through 30 layers of bf16 residuals, far more than any tolerance of one layer).
2. A zero mask on 1% of the neurons changes the logits, and after ``applied`` exits (normally and by an
   exception) the hooks are exactly those found and the logits are bit-identical to the unmasked ones.

and prints (ratios measured in the same process, interleaved, best of ``--repeats``):
collection tokens/s and its ratio to a plain Hugging Face forward, the masked / unmasked forward ratio,
and ``lm_metrics`` tokens/s. ``--out FILE`` also writes them as JSON.

Dependencies: torch and transformers (already on a GPU machine), plus snip_lens and TransformerLens and
their small pure-Python dependencies (jaxtyping, einops, safetensors, tqdm); no network, no dataset. Windows
are seeded random token ids, and the tokenizer is the tiny one snip_lens builds from Python's own docs.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from snip_lens.collect import collect
from snip_lens.corpus import TokenWindows
from snip_lens.evaluate import lm_metrics
from snip_lens.mask import NeuronMask
from snip_lens.models import bridge_from_hf, load_model, parse_dtype

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(reference model on the CPU in float32, the same on the CPU in ``dtype`` (the float32 one again when
    ``dtype`` is float32), model under test on ``device`` in ``dtype``)."""
    from snip_lens.testing import tiny_tokenizer

    if args.random_weights:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(args.seed)
        cfg = LlamaConfig(max_position_embeddings=max(args.n_ctx, 256), **SHAPES[args.random_weights])
        hf = LlamaForCausalLM(cfg).eval()
        tok = tiny_tokenizer()
        name = f"random-{args.random_weights}"
        ref = bridge_from_hf(hf, tok, name=name)
        same = ref if dtype == torch.float32 else bridge_from_hf(copy.deepcopy(hf).to(dtype=dtype), tok, name=name)
        test = bridge_from_hf(copy.deepcopy(hf).to(device=device, dtype=dtype), tok, name=name)
        return ref, same, test
    ref = load_model(args.model)
    same = ref if dtype == torch.float32 else load_model(args.model, dtype=dtype)
    return ref, same, load_model(args.model, device=str(device), dtype=dtype)


def _windows(model, n: int, n_ctx: int, seed: int) -> TokenWindows:
    vocab = min(int(model.cfg.d_vocab), len(model.tokenizer))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, n_ctx), generator=g)
    return TokenWindows(tokens=tokens, documents=list(range(n)), name="random")


def _compare(ref, got, tol: float) -> dict:
    """Positions exact where no near-tie, values within ``tol`` of each neuron's largest |activation| (or of
    its layer's median of those, when larger)."""
    peak = ref.top_values[..., :1].abs()  # (layer, neuron, 1)
    typical = peak.median(dim=1, keepdim=True).values  # (layer, 1, 1)
    scale = torch.maximum(peak, typical).clamp(min=1e-6)
    vals = ref.top_values / scale
    gap_prev = torch.full_like(vals, float("inf"))
    gap_next = torch.full_like(vals, float("inf"))
    gap_prev[..., 1:] = vals[..., :-1] - vals[..., 1:]
    gap_next[..., :-1] = vals[..., :-1] - vals[..., 1:]
    clear = (gap_prev > tol) & (gap_next > tol)  # (layer, neuron, k) no near-tie around this rank
    if vals.shape[-1] > 1:
        clear[..., -1] = False  # the (k+1)-th value is unknown: the last rank can always be a near-tie
    same = (ref.top_window == got.top_window) & (ref.top_pos == got.top_pos)
    value_err = ((got.top_values - ref.top_values).abs() / scale).max().item()
    stats_err = 0.0
    for name, st in ref.stats.items():
        s = torch.maximum(st.max.abs(), st.max.abs().median(dim=1, keepdim=True).values).clamp(min=1e-6)
        for f in ("mean", "mean_abs", "std", "max"):
            stats_err = max(stats_err, ((getattr(got.stats[name], f) - getattr(st, f)).abs() / s).max().item())
    mismatched_clear = int((clear & ~same).sum())
    return {"positions_clear": int(clear.sum()), "positions_clear_mismatched": mismatched_clear,
            "positions_equal_fraction": float(same.float().mean()), "max_value_error": value_err,
            "max_stats_error": stats_err, "tolerance": tol,
            "ok": mismatched_clear == 0 and value_err <= tol and stats_err <= tol}


def _hook_state(model) -> dict:
    return {name: [id(h) for h in hp.fwd_hooks] for name, hp in model.hook_dict.items()}


def _check_mask(model, tokens: torch.Tensor, seed: int) -> dict:
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n_layers * d_mlp, generator=g)[:max(1, n_layers * d_mlp // 100)].tolist()
    mask = NeuronMask.from_neurons(model, [(i // d_mlp, i % d_mlp) for i in flat])
    state = _hook_state(model)
    with torch.no_grad():
        base = model(tokens)
        with mask.applied(model):
            masked = model(tokens)
        after = model(tokens)
        raised = False
        try:
            with mask.applied(model):
                raise RuntimeError("inside")
        except RuntimeError:
            raised = True
        after_error = model(tokens)
    return {"n_neurons": len(mask), "changed": bool((masked - base).abs().max() > 0),
            "restored_exactly": bool(torch.equal(after, base) and torch.equal(after_error, base) and raised
                                     and _hook_state(model) == state)}


def _best(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a load_model name or directory (ignored with --random-weights)")
    ap.add_argument("--random-weights", choices=sorted(SHAPES), help="build a Llama of these shapes with random weights")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", help="fp32, bf16 or fp16 for the model under test")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="also write the results here as JSON")
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here (torch.cuda.is_available() is False); use --device cpu", file=sys.stderr)
        return 2
    fp32_model, ref_model, model = _build(args, device, dtype)
    tw = _windows(model, args.windows, args.n_ctx, args.seed)
    tol = 1e-4 if dtype == torch.float32 else 0.03
    print(f"model {model.cfg.model_name} ({model.cfg.n_layers} layers x {model.cfg.d_mlp} neurons) on {device} "
          f"in {dtype}; {tw.n_tokens} tokens ({args.windows} x {args.n_ctx}); torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))

    # 1. collect on the device equals collect on the CPU.
    kw = dict(top_k=args.top_k, context=(8, 2), n_random=2, batch_size=args.batch_size, progress=False)
    reference = collect(ref_model, tw, **kw)
    collect_mod = importlib.import_module("snip_lens.collect")
    init = collect_mod._State.__init__
    if device.type == "cpu":  # exercise the accelerator code path here
        collect_mod._State.__init__ = lambda self, *a, **k: init(self, *a, **{**k, "sync_free": True})
    try:
        on_device = collect(model, tw, **kw)
    finally:
        collect_mod._State.__init__ = init
    cmp = _compare(reference, on_device, tol)
    dname = str(dtype).replace("torch.", "")
    print(f"collect on {device} vs CPU, both {dname}: {cmp['positions_clear_mismatched']} of "
          f"{cmp['positions_clear']} clear top-k positions differ ({100 * cmp['positions_equal_fraction']:.2f}% of "
          f"all positions equal); max value error {cmp['max_value_error']:.2e}, max stats error "
          f"{cmp['max_stats_error']:.2e} (tolerance {tol:g}) -> {'OK' if cmp['ok'] else 'FAIL'}")
    drift = None
    if fp32_model is not ref_model:
        drift = _compare(collect(fp32_model, tw, **kw), on_device, tol)
        print(f"  (information: {dname} on {device} against CPU float32: {100 * drift['positions_equal_fraction']:.2f}% "
              f"of top-k positions equal, max value error {drift['max_value_error']:.2e}, max stats error "
              f"{drift['max_stats_error']:.2e}: the dtype's own drift, not a check)")

    # 2. masks restore exactly.
    tokens = tw.tokens[:args.batch_size].to(device)
    mk = _check_mask(model, tokens, args.seed)
    print(f"zero mask of {mk['n_neurons']} neurons: changes logits {mk['changed']}, restores exactly "
          f"{mk['restored_exactly']} -> {'OK' if mk['changed'] and mk['restored_exactly'] else 'FAIL'}")

    # 3. throughput, interleaved in this process.
    hf = model.original_model
    batches = [tw.tokens[b:b + args.batch_size].to(device) for b in range(0, len(tw), args.batch_size)]

    def plain() -> None:
        with torch.inference_mode():
            for b in batches:
                hf(input_ids=b)

    def bridge_forward() -> None:
        with torch.inference_mode():
            for b in batches:
                model(b)

    def collecting() -> None:
        collect(model, tw, **kw)

    mask = NeuronMask.from_neurons(model, [(l, i) for l in range(int(model.cfg.n_layers))
                                           for i in range(0, int(model.cfg.d_mlp), 100)])

    def masked_forward() -> None:
        with mask.applied(model), torch.inference_mode():
            for b in batches:
                model(b)

    def metrics() -> None:
        lm_metrics(model, tw.tokens, batch_size=args.batch_size)

    for fn in (plain, bridge_forward, masked_forward):  # warm-up
        fn()
    times = {k: [] for k in ("hf_forward", "collect", "bridge_forward", "masked_forward", "lm_metrics")}
    fns = {"hf_forward": plain, "collect": collecting, "bridge_forward": bridge_forward,
           "masked_forward": masked_forward, "lm_metrics": metrics}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(_best(fn, 1, device))
    best = {k: min(v) for k, v in times.items()}
    n = tw.n_tokens
    perf = {"collect_tokens_per_s": n / best["collect"], "hf_forward_tokens_per_s": n / best["hf_forward"],
            "collect_over_hf_forward": best["collect"] / best["hf_forward"],
            "masked_over_unmasked_forward": best["masked_forward"] / best["bridge_forward"],
            "lm_metrics_tokens_per_s": n / best["lm_metrics"], "seconds": times}
    print(f"collection {perf['collect_tokens_per_s']:.0f} tok/s = {perf['collect_over_hf_forward']:.3f}x a plain "
          f"HF forward ({perf['hf_forward_tokens_per_s']:.0f} tok/s); masked / unmasked forward "
          f"{perf['masked_over_unmasked_forward']:.3f}x ({len(mask)} neurons); lm_metrics "
          f"{perf['lm_metrics_tokens_per_s']:.0f} tok/s (best of {args.repeats}, interleaved)")

    ok = cmp["ok"] and mk["changed"] and mk["restored_exactly"]
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype), "model": str(model.cfg.model_name), "tokens": n, "collect_check": cmp,
            "dtype_drift_from_float32": drift,
            "mask_check": mk, "performance": perf, "ok": ok}, indent=2))
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
