"""Sharded collection: merged shard states equal one pass; on a local Ray cluster (2 CPUs, tiny model) the
sharded run equals the single-process run, survives an actor killed mid-shard, and a restarted driver
collects only the missing shards."""

import importlib
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from snip_lens.collect import ActivationRecords, NeuronStats, collect
from snip_lens.corpus import make_windows
from snip_lens.testing import TinyModelFactory

collect_mod = importlib.import_module("snip_lens.collect")
KW = dict(top_k=4, context=(3, 2), n_random=3, batch_size=2, shard_windows=4, progress=False)
FACTORY = TinyModelFactory("llama", (("n_layers", 3), ("d_model", 32), ("d_mlp", 64), ("seed", 0)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return FACTORY()


def _texts(lo, hi):
    import pydoc_data.topics

    t = pydoc_data.topics.topics
    return [t[k] for k in sorted(t)[lo:hi]]


@pytest.fixture(scope="module")
def corpora(model):
    return {"records": make_windows(model, _texts(0, 12), n_ctx=24, max_windows=14, seed=0, name="records"),
            "retain": make_windows(model, _texts(12, 24), n_ctx=24, max_windows=6, seed=0, name="retain")}


@pytest.fixture(scope="module")
def single(model, corpora):
    return collect(model, corpora, **KW)


def assert_same_records(a: ActivationRecords, b: ActivationRecords) -> None:
    for name in ("top_window", "top_pos", "random_window", "random_pos", "windows"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("top_values", "top_context", "random_values", "random_context"):
        assert torch.equal(getattr(a, name), getattr(b, name)) or torch.allclose(
            getattr(a, name), getattr(b, name), equal_nan=True, rtol=0, atol=0), name
    assert list(a.stats) == list(b.stats)
    for corpus in a.stats:
        for f in NeuronStats.FIELDS:
            torch.testing.assert_close(getattr(a.stats[corpus], f), getattr(b.stats[corpus], f), rtol=1e-5,
                                       atol=1e-6, msg=f"{corpus}.{f}")
    assert a.config_hash == b.config_hash


def test_merging_shard_states_in_any_order_equals_one_pass(model, corpora, single):
    names = list(corpora)
    cfg = collect_mod.CollectConfig(layers=(0, 1, 2), top_k=4, context=(3, 2), n_random=3, seed=0)
    shards = [(ci, lo, min(lo + 4, len(corpora[n]))) for ci, n in enumerate(names)
              for lo in range(0, len(corpora[n]), 4)]
    random.Random(0).shuffle(shards)
    merged = collect_mod._State(cfg, 64, names)
    for ci, lo, hi in shards:
        part = collect_mod._State(cfg, 64, names)
        collect_mod._collect_windows(model, part, 0, [(ci, corpora[names[ci]].tokens[lo:hi], lo, lo)], 2, None,
                                     None)
        merged.merge(part.part(ci, records=ci == 0))
    out = collect_mod._finish(merged, cfg, single.model_name, 64, names, 0, corpora, single.config_hash, model,
                              None)
    assert_same_records(out, single)
    # Not vacuous: the shards' own top-k differ from the merged one.
    assert not torch.equal(part.t["top_i"], merged.t["top_i"])


# ---- on a local Ray cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pause_file(tmp_path_factory):
    return tmp_path_factory.mktemp("pause") / "paused.pid"


@pytest.fixture(scope="module")
def executor(pause_file):
    """Two CPU actors on a local 2-CPU Ray cluster, started once for all the Ray tests (they take seconds)."""
    ray = pytest.importorskip("ray")
    from snip_lens.sharding import ModelSpec, RayExecutor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    factory = TinyModelFactory(FACTORY.arch, FACTORY.kwargs, pause_file=str(pause_file))
    with RayExecutor(ModelSpec(factory=factory), n_actors=2) as ex:
        yield ex
    ray.shutdown()


class _DriverCrash(Exception):
    pass


N_SHARDS = math.ceil(14 / 4) + math.ceil(6 / 4)


def test_ray_sharded_equals_single_process_and_a_restarted_driver_skips_finished_shards(
        executor, model, corpora, single, tmp_path):
    out = tmp_path / "records"

    def crash(_end):
        if executor.shards_computed == 2:
            raise _DriverCrash

    with pytest.raises(_DriverCrash):
        collect(model, corpora, out_dir=out, executor=executor, on_shard=crash, **KW)
    saved = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.safetensors")}
    assert len(saved) == 2 and not (out / "records.json").exists()

    seen = []
    rec = collect(model, corpora, out_dir=out, executor=executor, on_shard=seen.append, **KW)
    assert (executor.shards_reused, executor.shards_computed, len(seen)) == (2, N_SHARDS - 2, N_SHARDS - 2)
    assert_same_records(rec, single)
    assert_same_records(ActivationRecords.load(out), single)
    assert not (out / "shards").exists()  # merged and saved: the shard files are gone
    # A third run finds the finished records and collects nothing.
    assert_same_records(collect(model, corpora, out_dir=out, executor=executor, **KW), single)


def test_ray_actor_killed_mid_shard_still_gives_the_identical_result(executor, model, corpora, single,
                                                                    pause_file):
    killed: list[int] = []
    done = threading.Event()

    def killer():
        while not done.is_set():
            try:
                pid = int(pause_file.read_text())
            except (FileNotFoundError, ValueError):
                time.sleep(0.05)
                continue
            os.kill(pid, signal.SIGKILL)  # the actor process, blocked inside a forward pass of its shard
            killed.append(pid)
            return

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    Path(str(pause_file) + ".arm").touch()
    try:
        rec = collect(model, corpora, executor=executor, **KW)
    finally:
        done.set()
        th.join(5)
    assert killed, "no actor reached the pause point"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)
    assert_same_records(rec, single)
    assert executor.shards_computed == N_SHARDS


def test_actors_with_another_model_are_refused():
    from snip_lens.sharding import check_actor_model

    info = {"model_name": "tiny-llama", "n_layers": 3, "d_mlp": 64, "pid": 1}
    check_actor_model(("tiny-llama", 3, 64), [info])
    with pytest.raises(ValueError, match="actors' model is 'tiny-llama' \\(2 layers"):
        check_actor_model(("tiny-llama", 3, 64), [info, info | {"n_layers": 2}])


def test_model_spec_needs_exactly_one_source():
    from snip_lens.sharding import ModelSpec, RayExecutor

    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec()
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec(name="smollm2-135m", factory=FACTORY)
    with pytest.raises(ValueError, match="n_actors"):
        RayExecutor("smollm2-135m", n_actors=0)
    assert RayExecutor("smollm2-135m").model == ModelSpec(name="smollm2-135m")


def test_cli_collect_ray_equals_the_single_process_command(executor, tmp_path):
    from snip_lens.cli import main
    from snip_lens.testing import tiny_hf_model, tiny_tokenizer

    executor.close()  # its actors hold the cluster's 2 CPUs; the command starts its own (the next user restarts these)

    model_dir = tmp_path / "tiny"  # a directory load_model reads, as the actors must rebuild the model by name
    tiny_hf_model("llama", n_layers=2, d_model=32, d_mlp=64, seed=0).save_pretrained(model_dir)
    tiny_tokenizer(512).save_pretrained(model_dir)
    args = ["collect", "--model", str(model_dir), "--corpus", "prose", "--windows", "6", "--n-ctx", "24",
            "--top-k", "3", "--context", "2,1", "--batch-size", "2", "--shard-windows", "2", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert main(args + ["--out", str(tmp_path / "ray"), "--ray", "--ray-actors", "1"]) == 0
    assert_same_records(ActivationRecords.load(tmp_path / "ray"), ActivationRecords.load(tmp_path / "one"))
