"""Activation collection on the real offline model (SmolLM2-135M) against a plain HF forward.

1. Time: ``collect`` over all 30 layers, and over the first half only, against the Hugging Face model's own
   forward over the same windows and batches (goals: <= 1.05x for all layers, <= 0.6x for the first half,
   whose later layers and unembedding are skipped). Measurements are interleaved in the same process, the
   order rotated each repeat; ``ratio_*`` compare the fastest repeats (load from other processes hurts
   them least) and ``median_paired_ratio_*`` the median of each repeat's own ratio. Collection stops after
   the last layer it hooks, so it skips the unembedding the HF forward pays for: ``*_vs_layers_only``
   compares it with the decoder stack's own forward (``hf.model``, no unembedding), which is what the
   hooks and their reductions cost on top of the layers they observe.
2. Memory: peak RSS of a fresh process collecting 10k and 100k tokens (goal: growth < 300 MB, since the
   running state does not depend on the number of tokens), and the highest RSS sampled while ``collect``
   runs (the process peak itself is set by loading the model). These runs collect layers 0-2 so that
   100k tokens take minutes, not an hour; the state of every layer is the same size whatever the count.

3. With ``--ray``: sharded collection on a local Ray cluster (``--ray-actors`` CPU actors, one torch thread
   each) against ``collect`` in this process (as many threads) over the same windows, shards and batches.
   Reports the first sharded run (actor start and model load included), then ``--repeats`` interleaved
   pairs of single-process and warm-actor runs (best of each), the ratio of each to the single-process time, per-actor tokens/s, and checks the records are identical.

Warm-up: before anything is timed, one ``collect`` of layer 0 runs the whole collection path once. On the CPU
that compiles the fused kernels of ``snip_lens.kernels.fused`` (numba; or loads them from numba's on-disk
cache when an earlier run compiled them), so compile time is in no measured run; it is reported as
``warmup_collect_s``, next to ``fused_kernels`` (whether the kernels ran or the torch path did).

Writes benchmarks/results/collect.json with only what this run measured (a skipped part is absent).

    python benchmarks/collect.py [--windows 32] [--repeats 3] [--skip-memory] [--skip-timing] [--threads N]
    python benchmarks/collect.py --profile [--windows 16] [--threads 1]
    python benchmarks/collect.py --torch-path ...   # the same, collecting through the torch path
    python benchmarks/collect.py --ray --skip-timing --skip-memory [--ray-windows 16] [--ray-actors 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from snip_lens import load_model
from snip_lens.collect import collect
from snip_lens.corpus import load_corpus

_MEMORY_CHILD = """
import json, resource, sys, threading, time
import psutil
from snip_lens import load_model
from snip_lens.collect import collect
from snip_lens.corpus import load_corpus
n_tokens = int(sys.argv[1])
model = load_model("smollm2-135m")
tw = load_corpus(model, "code", n_ctx=128, max_windows=n_tokens // 128, seed=0)
proc = psutil.Process()
before = proc.memory_info().rss
high = [before]
stop = threading.Event()
def sample():
    while not stop.is_set():
        high[0] = max(high[0], proc.memory_info().rss)
        time.sleep(0.02)
th = threading.Thread(target=sample, daemon=True)
th.start()
collect(model, tw, layers=[0, 1, 2], top_k=20, batch_size=8, progress=False)
stop.set(); th.join()
high[0] = max(high[0], proc.memory_info().rss)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"tokens": tw.n_tokens, "peak_rss_mb": peak / 1024, "rss_before_collect_mb": before / 2**20,
                  "max_rss_during_collect_mb": high[0] / 2**20, "collect_increase_mb": (high[0] - before) / 2**20}))
"""


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def profile(args: argparse.Namespace) -> None:
    """Print the operators one all-layer collect spends its time in, and its total against a plain forward."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    collect_mod = importlib.import_module("snip_lens.collect")  # (`snip_lens.collect` is the function)

    model = load_model("smollm2-135m")
    hf = model.original_model
    tw = load_corpus(model, "code", n_ctx=args.n_ctx, max_windows=args.windows, seed=0)
    warmup = _time(lambda: collect(model, tw, layers=[0], progress=False))  # compiles the fused kernels
    with torch.no_grad():
        hf(tw.tokens[: args.batch_size])
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(tw.tokens), args.batch_size):
            hf(tw.tokens[s:s + args.batch_size])
    forward = time.perf_counter() - t
    # The fused kernels are numba code, invisible to torch.profiler: their time is taken around each call.
    in_kernels = [0.0, 0]
    real_update = collect_mod._State.update_batch

    def timed_update(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return real_update(self, *a, **kw)
        finally:
            in_kernels[0] += time.perf_counter() - t0
            in_kernels[1] += 1

    collect_mod._State.update_batch = timed_update
    try:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            collect(model, tw, batch_size=args.batch_size, progress=False)
            total = time.perf_counter() - t
    finally:
        collect_mod._State.update_batch = real_update
    print(f"{len(tw.tokens)} windows of {args.n_ctx} tokens, {torch.get_num_threads()} torch thread(s): plain forward "
          f"{forward:.2f} s, collect (profiled, all layers) {total:.2f} s = {total / forward:.2f}x; warm-up "
          f"(compiles or loads the fused kernels) {warmup:.2f} s")
    if in_kernels[1]:
        print(f"fused CPU kernels (update_batch): {in_kernels[0]:.2f} s in {in_kernels[1]} layer-batches "
              f"= {1e3 * in_kernels[0] / in_kernels[1]:.2f} ms each")
    else:
        print("fused CPU kernels not used (torch path): see the operators below")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the timing (default: torch's own, e.g. from OMP_NUM_THREADS)")
    ap.add_argument("--profile", action="store_true",
                    help="only print where one all-layer collect spends its time (torch.profiler, top operators "
                         "by self CPU time) next to a plain forward over the same windows; writes nothing")
    ap.add_argument("--torch-path", action="store_true",
                    help="collect with the torch path instead of the fused CPU kernels (the comparison before them)")
    ap.add_argument("--ray", action="store_true", help="also measure sharded collection on a local Ray cluster")
    ap.add_argument("--ray-windows", type=int, default=16)
    ap.add_argument("--ray-actors", type=int, default=2)
    ap.add_argument("--ray-shard-windows", type=int, default=4)
    args = ap.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.torch_path:
        collect_mod = importlib.import_module("snip_lens.collect")  # (`snip_lens.collect` is the function)

        collect_mod.FUSED_KERNEL = False

    if args.profile:
        profile(args)
        return
    out = Path(__file__).parent / "results" / "collect.json"
    # Only what this run measured: nothing is carried over from an earlier file.
    result: dict = {"command": "python benchmarks/collect.py " + " ".join(sys.argv[1:]),
                    "torch_threads": torch.get_num_threads(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "load_average_before": _loadavg()}
    if not args.skip_timing:
        model = load_model("smollm2-135m")
        hf = model.original_model
        tw = load_corpus(model, "code", n_ctx=args.n_ctx, max_windows=args.windows, seed=0)
        n_layers = model.cfg.n_layers
        half = list(range(n_layers // 2))

        def hf_forward() -> None:
            with torch.inference_mode():
                for b in range(0, len(tw), args.batch_size):
                    hf(input_ids=tw.tokens[b:b + args.batch_size])

        def collect_all() -> None:
            collect(model, tw, batch_size=args.batch_size, progress=False)

        def collect_half() -> None:
            collect(model, tw, layers=half, batch_size=args.batch_size, progress=False)

        body = getattr(hf, "model", None)  # the decoder stack without the unembedding (LlamaModel)

        def hf_layers_only() -> None:
            with torch.inference_mode():
                for b in range(0, len(tw), args.batch_size):
                    body(input_ids=tw.tokens[b:b + args.batch_size])

        runs = {"hf_forward": hf_forward, "collect_all_layers": collect_all, "collect_first_half": collect_half}
        if body is not None:
            # Collection stops after the last hooked layer, so it never pays for the unembedding (49k x 576
            # here): against the forward of the decoder stack alone, the ratio is what the hooks cost.
            runs["hf_layers_only"] = hf_layers_only
        hf(input_ids=tw.tokens[:1, :16])  # warm-up
        # Warm-up of the collection path; on the CPU it compiles (or loads) the fused kernels: not timed below.
        collect_mod = importlib.import_module("snip_lens.collect")  # (`snip_lens.collect` is the function)

        result["warmup_collect_s"] = _time(lambda: collect(model, tw, layers=[0], progress=False))
        result["fused_kernels"] = bool(collect_mod.FUSED_KERNEL and collect_mod._fused_kernels() is not None)
        times: dict[str, list[float]] = {k: [] for k in runs}
        order = list(runs)
        for r in range(args.repeats):
            # Interleaved, the order rotated every repeat, so drifting load from other processes hits every
            # measurement alike; each collect ratio is paired with the HF forward of its own repeat.
            for name in order[r % len(order):] + order[:r % len(order)]:
                times[name].append(_time(runs[name]))
        ratios_all = [c / h for c, h in zip(times["collect_all_layers"], times["hf_forward"])]
        ratios_half = [c / h for c, h in zip(times["collect_first_half"], times["hf_forward"])]
        best = {k: min(v) for k, v in times.items()}
        result.update({
            "model": "smollm2-135m", "tokens": tw.n_tokens, "windows": len(tw), "n_ctx": args.n_ctx,
            "batch_size": args.batch_size, "repeats": args.repeats, "seconds": times, "best_seconds": best,
            "hf_tokens_per_s": tw.n_tokens / best["hf_forward"],
            "collect_tokens_per_s": tw.n_tokens / best["collect_all_layers"],
            "ratio_all_layers": best["collect_all_layers"] / best["hf_forward"],
            "ratio_first_half": best["collect_first_half"] / best["hf_forward"],
            "paired_ratios_all_layers": ratios_all, "paired_ratios_first_half": ratios_half,
            "median_paired_ratio_all_layers": statistics.median(ratios_all),
            "median_paired_ratio_first_half": statistics.median(ratios_half),
            "goal_ratio_all_layers": 1.05, "goal_ratio_first_half": 0.6,
        })
        if "hf_layers_only" in times:
            paired = [c / h for c, h in zip(times["collect_all_layers"], times["hf_layers_only"])]
            result.update({"ratio_all_layers_vs_layers_only": best["collect_all_layers"] / best["hf_layers_only"],
                           "median_paired_ratio_all_layers_vs_layers_only": statistics.median(paired),
                           "unembedding_share_of_forward": 1 - best["hf_layers_only"] / best["hf_forward"]})
            print(f"against the decoder stack alone (no unembedding, {best['hf_layers_only']:.2f}s): collect all "
                  f"layers {result['ratio_all_layers_vs_layers_only']:.3f}x best-of (median paired "
                  f"{result['median_paired_ratio_all_layers_vs_layers_only']:.3f}x)")
        print(f"{tw.n_tokens} tokens, {args.repeats} interleaved repeats: HF forward {best['hf_forward']:.2f}s "
              f"({result['hf_tokens_per_s']:.0f} tok/s); collect all {n_layers} layers "
              f"{best['collect_all_layers']:.2f}s = {result['ratio_all_layers']:.3f}x best-of "
              f"(median paired {result['median_paired_ratio_all_layers']:.3f}x; goal <= 1.05); first {len(half)} "
              f"layers {best['collect_first_half']:.2f}s = {result['ratio_first_half']:.3f}x (median paired "
              f"{result['median_paired_ratio_first_half']:.3f}x; goal <= 0.6)")

    if not args.skip_memory:
        mem = {}
        for n in (10_000, 100_000):
            child = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(n)], check=True, capture_output=True,
                                   text=True)
            mem[n] = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"{mem[n]['tokens']} tokens (layers 0-2): process peak RSS {mem[n]['peak_rss_mb']:.0f} MB, "
                  f"max RSS during collect {mem[n]['max_rss_during_collect_mb']:.0f} MB "
                  f"(+{mem[n]['collect_increase_mb']:.0f} MB over the RSS before it)")
        growth = mem[100_000]["peak_rss_mb"] - mem[10_000]["peak_rss_mb"]
        growth_collect = mem[100_000]["max_rss_during_collect_mb"] - mem[10_000]["max_rss_during_collect_mb"]
        result["memory"] = {"runs": list(mem.values()), "growth_mb_10k_to_100k": growth,
                            "growth_during_collect_mb_10k_to_100k": growth_collect, "goal_growth_mb": 300}
        print(f"peak RSS growth 10k -> 100k tokens: {growth:.0f} MB; of the max RSS during collect: "
              f"{growth_collect:.0f} MB (goal < 300)")
    if args.ray:
        result["ray"] = ray_overhead(args)
    result["load_average_after"] = _loadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"-> {out}")


def ray_overhead(args: argparse.Namespace) -> dict:
    """Sharded (Ray actors) vs single-process collection of the same windows; records checked identical."""
    import ray

    from snip_lens.sharding import ModelSpec, RayExecutor

    n = args.ray_actors
    torch.set_num_threads(n)  # the single process gets the cores the actors share
    model = load_model("smollm2-135m")
    tw = load_corpus(model, "code", n_ctx=args.n_ctx, max_windows=args.ray_windows, seed=0)
    kw = dict(batch_size=args.batch_size, shard_windows=args.ray_shard_windows, progress=False)
    collect(model, tw, layers=[0], **kw)  # warm-up

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False)
    singles, warms, ones = [], [], []
    try:
        with RayExecutor(ModelSpec(name="smollm2-135m"), n_actors=n) as ex:
            t_first, first = timed(lambda: collect(model, tw, executor=ex, **kw))
            # Interleaved, best of --repeats each: load from other processes on the machine moves both alike.
            for _ in range(args.repeats):
                dt, single = timed(lambda: collect(model, tw, **kw))
                singles.append(dt)
                dt, warm = timed(lambda: collect(model, tw, executor=ex, **kw))
                warms.append(dt)
                torch.set_num_threads(1)  # one actor's share: n of these side by side is the ideal sharded run
                ones.append(timed(lambda: collect(model, tw, **kw))[0])
                torch.set_num_threads(n)
    finally:
        ray.shutdown()
    t_single, t_warm, t_one = min(singles), min(warms), min(ones)
    same = all(torch.equal(getattr(r, f), getattr(single, f)) for r in (first, warm)
               for f in ("top_window", "top_pos", "top_values", "random_window", "random_pos"))
    res = {"model": "smollm2-135m", "actors": n, "threads_per_actor": 1, "single_process_threads": n,
           "windows": len(tw), "n_ctx": tw.n_ctx, "tokens": tw.n_tokens, "shard_windows": args.ray_shard_windows,
           "batch_size": args.batch_size, "single_s": t_single, "ray_first_s": t_first, "ray_warm_s": t_warm,
           "single_s_runs": singles, "ray_warm_s_runs": warms, "single_1_thread_s": t_one,
           "single_1_thread_s_runs": ones, "ideal_sharded_s": t_one / n,
           "ratio_warm_vs_ideal": t_warm / (t_one / n),
           "ratio_first_run": t_first / t_single, "ratio_warm": t_warm / t_single,
           "single_tokens_per_s": tw.n_tokens / t_single, "ray_warm_tokens_per_s": tw.n_tokens / t_warm,
           "ray_warm_tokens_per_s_per_actor": tw.n_tokens / t_warm / n, "records_identical": same,
           "load_average_1min": os.getloadavg()[0]}
    print(f"Ray, {n} actors x 1 thread vs one process x {n} threads, {tw.n_tokens} tokens "
          f"({len(tw)} windows, shards of {args.ray_shard_windows}): single {t_single:.1f} s; sharded "
          f"{t_first:.1f} s first run (actors start, load the model) = {res['ratio_first_run']:.2f}x, "
          f"{t_warm:.1f} s on warm actors = {res['ratio_warm']:.2f}x; one thread alone {t_one:.1f} s, so {n} "
          f"actors with no overhead would take {t_one / n:.1f} s: sharded / ideal = {res['ratio_warm_vs_ideal']:.2f}x;"
          f" records identical: {same}")
    return res


if __name__ == "__main__":
    main()
