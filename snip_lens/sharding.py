"""Sharded activation collection on a Ray cluster (SNIP step 1 at the scale of many GPUs).

``collect(model, corpus, ..., executor=RayExecutor(spec))`` cuts every corpus into shards of
``shard_windows`` windows and hands them to Ray actors. Each actor rebuilds the model once from a
:class:`ModelSpec` (on its own GPU when the cluster has GPUs: ``num_gpus`` per actor; on CPU otherwise)
and collects whole shards with the same per-batch code as a single-process run
(``collect._collect_windows``), starting from an empty state. The driver merges the shard states with
``_State.merge``: top-k and random records are merged by (value descending, token index ascending), the
order a single pass keeps, and the moments with Chan's formula, so the merged result is the single-process
result on the same windows (records exact, statistics within float rounding).

Nothing is scheduled here beyond handing shards to idle actors (``ray.util.ActorPool``). Failure handling
is Ray's: an actor process that dies is restarted (``max_restarts``) and its shard is run again
(``max_task_retries``); the shard's partial work died with the process, so nothing is counted twice.
With ``out_dir`` each finished shard's state is written atomically to ``out_dir/shards/`` before the next
is merged, so a driver started again after a crash collects only the shards that are missing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from . import models
from ._io import atomic_write

logger = logging.getLogger(__name__)

SHARD_DIR = "shards"
"""Sub-directory of ``out_dir`` holding one safetensors file per finished shard."""
_SHARD_RE = re.compile(r"^c(\d+)-w(\d+)-(\d+)\.safetensors$")


@dataclass
class ModelSpec:
    """How a worker process rebuilds the subject model (a loaded model cannot travel between machines)."""

    name: str | None = None
    """Name or directory for :func:`snip_lens.load_model` (a built-in name, a hub name, a local directory)."""
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for ``load_model`` (such as ``dtype``); ``device`` defaults to the actor's GPU or CPU."""
    factory: Callable[[], Any] | None = None
    """Instead of ``name``: a picklable callable with no arguments that returns the model (tiny test models)."""

    def __post_init__(self) -> None:
        if (self.name is None) == (self.factory is None):
            raise ValueError(f"ModelSpec needs exactly one of name (for load_model) and factory; got "
                             f"name={self.name!r}, factory={self.factory!r}")
        if self.factory is not None and not callable(self.factory):
            raise ValueError(f"ModelSpec.factory must be callable (it is called with no arguments); got "
                             f"{self.factory!r}")

    def load(self) -> Any:
        """Build the model in this process, on the GPU Ray assigned to it when there is one."""
        if self.factory is not None:
            return self.factory()
        kwargs = dict(self.load_kwargs)
        kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        return models.load_model(self.name, **kwargs)


def check_actor_model(want: tuple[str, int, int], infos: list[dict[str, Any]]) -> None:
    """Refuse actors whose model is not the driver's (name, layers, neurons): their shards would not merge."""
    for info in infos:
        got = (info["model_name"], info["n_layers"], info["d_mlp"])
        if got != tuple(want):
            raise ValueError(f"the actors' model is {got[0]!r} ({got[1]} layers x {got[2]} neurons) but the model "
                             f"given to collect is {want[0]!r} ({want[1]} x {want[2]}); give RayExecutor the spec "
                             "of the same model")


class _ShardWorker:
    """A Ray actor's body: the model, loaded once, and the per-shard collection."""

    def __init__(self, spec: ModelSpec, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.model = spec.load()

    def info(self) -> dict[str, Any]:
        return {"model_name": models.model_name(self.model), "n_layers": models.n_layers(self.model),
                "d_mlp": models.d_mlp(self.model), "pid": os.getpid()}

    def run(self, cfg: Any, n_corpora: int, rec_ci: int, batch_size: int, ci: int, first: int,
            tokens: Tensor) -> tuple[int, int, dict[str, Tensor]]:
        from .collect import _collect_windows, _State

        state = _State(cfg, models.d_mlp(self.model), [str(i) for i in range(n_corpora)])
        _collect_windows(self.model, state, rec_ci, [(ci, tokens, first, first)], batch_size, None, None)
        return ci, first, state.part(ci, records=ci == rec_ci)


@dataclass
class RayExecutor:
    """Runs ``collect``'s shards on Ray actors; pass it as ``collect(..., executor=RayExecutor(spec))``.

    The actors start (and load the model) at the first run and serve every later run of this executor;
    ``close()`` (or leaving a ``with`` block) stops them. After a run, ``shards_computed`` and ``shards_reused`` say how many shards the actors collected and how
    many were read back from ``out_dir`` (finished by an earlier, interrupted run).
    """

    model: ModelSpec | str
    """How actors build the model: a :class:`ModelSpec`, or a name/directory for ``load_model``."""
    address: str | None = None
    """Ray cluster to join (``"auto"``, ``"ray://host:10001"``); None joins the one this process already
    started, or ``$RAY_ADDRESS``, or starts a local one."""
    n_actors: int | None = None
    """Model replicas; default one per GPU (with ``num_gpus`` GPUs each), else one per ``num_cpus`` CPUs."""
    num_gpus: float | None = None
    """GPUs per actor (a replica spread over several GPUs by ``device_map`` needs that many); default 1 when
    the cluster has GPUs, else 0."""
    num_cpus: float = 1
    """CPUs per actor (and its torch threads)."""
    max_retries: int = 3
    """Restarts of a dead actor and re-runs of its shard before the collection fails."""
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for ``ray.init`` when this executor starts or joins the cluster."""
    shards_computed: int = field(default=0, init=False)
    shards_reused: int = field(default=0, init=False)
    _live: list[Any] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            self.model = ModelSpec(name=self.model)
        if not isinstance(self.model, ModelSpec):
            raise ValueError(f"RayExecutor.model must be a ModelSpec or a model name; got {self.model!r}")
        if self.n_actors is not None and self.n_actors < 1:
            raise ValueError(f"n_actors must be >= 1; got {self.n_actors}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0; got {self.num_gpus}")
        if self.num_cpus <= 0:
            raise ValueError(f"num_cpus must be > 0; got {self.num_cpus}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0; got {self.max_retries}")

    # -- cluster --

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise ImportError("sharded collection needs Ray: pip install 'snip-lens[ray]' (or pip install ray)"
                              ) from None
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_kwargs)
        return ray

    def close(self) -> None:
        """Stop the actors (a later run starts new ones)."""
        if self._live:
            import ray

            for a in self._live:
                ray.kill(a)
            self._live = []

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _actors(self, ray: Any, want: tuple[str, int, int]) -> list[Any]:
        if self._live:
            return self._live
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        num_gpus = self.num_gpus if self.num_gpus is not None else (1.0 if gpus else 0.0)
        if self.n_actors is not None:
            n = self.n_actors
        elif num_gpus:
            n = max(1, int(gpus // num_gpus))
        else:
            n = max(1, int(float(resources.get("CPU", 1)) // self.num_cpus))
        cls = ray.remote(num_cpus=self.num_cpus, num_gpus=num_gpus, max_restarts=self.max_retries,
                         max_task_retries=self.max_retries)(_ShardWorker)
        logger.info("starting %d Ray actors (%s CPUs, %s GPUs each)", n, self.num_cpus, num_gpus)
        actors = [cls.remote(self.model, int(max(1, self.num_cpus))) for _ in range(n)]
        try:
            check_actor_model(want, ray.get([a.info.remote() for a in actors]))
        except BaseException:
            for a in actors:
                ray.kill(a)
            raise
        self._live = actors
        return actors

    # -- the run (called by collect) --

    def run(self, model: Any, state: Any, corpora: dict[str, Any], *, rec_ci: int, config_hash: str,
            batch_size: int, shard_windows: int, out_dir: Path | None, overwrite: bool, progress: bool,
            on_shard: Callable[[int], None] | None) -> None:
        """Collect every shard of ``corpora`` on the actors and merge it into ``state`` (in shard order)."""
        names = list(corpora)
        plan = [(ci, lo, min(lo + shard_windows, len(corpora[n])))
                for ci, n in enumerate(names) for lo in range(0, len(corpora[n]), shard_windows)]
        shard_dir = out_dir / SHARD_DIR if out_dir is not None else None
        finished = self._finished(shard_dir, config_hash, plan, overwrite)
        todo = [s for s in plan if (s[0], s[1]) not in finished]
        self.shards_computed, self.shards_reused = 0, len(plan) - len(todo)
        if self.shards_reused:
            logger.info("%d of %d shards already collected in %s; collecting the other %d", self.shards_reused,
                        len(plan), shard_dir, len(todo))
        # Shards are merged in plan order whatever order they finish in (the float64 moments then round the
        # same way on every run), each as soon as all before it are in: the driver holds few shard states.
        ready: dict[tuple[int, int], dict[str, Tensor] | None] = {key: None for key in finished}
        merged = 0

        def arrived(key: tuple[int, int] | None, part: dict[str, Tensor] | None) -> None:
            """Note a finished shard (None: read it back from its file), then merge all that can be."""
            nonlocal merged
            if key is not None:
                ready[key] = part
            while merged < len(plan) and plan[merged][:2] in ready:
                ci, lo, _ = plan[merged]
                got = ready.pop((ci, lo))
                state.merge(got if got is not None else self._load(shard_dir, ci, lo))
                merged += 1

        if todo:
            self._collect(model, state, corpora, names, rec_ci, config_hash, batch_size, todo, shard_dir, arrived,
                          progress, on_shard)
        arrived(None, None)
        assert merged == len(plan), (merged, len(plan))

    def _collect(self, model: Any, state: Any, corpora: dict[str, Any], names: list[str], rec_ci: int,
                 config_hash: str, batch_size: int, todo: list[tuple[int, int, int]], shard_dir: Path | None,
                 arrived: Callable[[tuple[int, int], Any], None], progress: bool,
                 on_shard: Callable[[int], None] | None) -> None:
        ray = self._ray()
        from ray.util import ActorPool

        actors = self._actors(ray, (models.model_name(model), models.n_layers(model), models.d_mlp(model)))
        cfg_ref = ray.put(state.cfg)
        n_ctx = {ci: corpora[names[ci]].n_ctx for ci in range(len(names))}
        bar = tqdm(total=sum((hi - lo) * n_ctx[ci] for ci, lo, hi in todo), unit="tok", unit_scale=True,
                   desc=f"collect ({len(actors)} Ray actors)", disable=not progress, dynamic_ncols=True)
        pool = ActorPool(actors)
        try:
            for ci, lo, part in pool.map_unordered(
                    lambda a, s: a.run.remote(cfg_ref, len(names), rec_ci, batch_size, s[0], s[1],
                                              corpora[names[s[0]]].tokens[s[1]:s[2]].clone()), todo):
                hi = next(h for c, w, h in todo if (c, w) == (ci, lo))
                if shard_dir is not None:
                    self._save(shard_dir, config_hash, ci, lo, hi, part)
                self.shards_computed += 1
                # A saved shard is read back when its turn to merge comes, so waiting ones cost no memory.
                arrived((ci, lo), None if shard_dir is not None else part)
                bar.update((hi - lo) * n_ctx[ci])
                if on_shard is not None:
                    on_shard(hi)
        finally:
            bar.close()

    # -- shard files --

    @staticmethod
    def _path(shard_dir: Path, ci: int, lo: int, hi: int) -> Path:
        return shard_dir / f"c{ci}-w{lo:09d}-{hi:09d}.safetensors"

    def _save(self, shard_dir: Path, config_hash: str, ci: int, lo: int, hi: int, part: dict[str, Tensor]) -> None:
        meta = {"config_hash": config_hash, "corpus": str(ci), "first_window": str(lo), "end_window": str(hi)}
        atomic_write(self._path(shard_dir, ci, lo, hi), lambda tmp: save_file(part, tmp, metadata=meta))

    def _load(self, shard_dir: Path | None, ci: int, lo: int) -> dict[str, Tensor]:
        assert shard_dir is not None
        path = next(shard_dir.glob(f"c{ci}-w{lo:09d}-*.safetensors"))
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}

    def finished(self, out_dir: Path | None) -> None:
        """Called once the merged records are saved in ``out_dir``: the shard files are no longer needed."""
        if out_dir is not None:
            shutil.rmtree(out_dir / SHARD_DIR, ignore_errors=True)

    def _finished(self, shard_dir: Path | None, config_hash: str, plan: list[tuple[int, int, int]],
                  overwrite: bool) -> set[tuple[int, int]]:
        """Shards of this plan already on disk for this very config; foreign ones are refused (removed with
        ``overwrite``)."""
        if shard_dir is None or not shard_dir.is_dir():
            return set()
        for stale in shard_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        planned = {(ci, lo, hi) for ci, lo, hi in plan}
        done: set[tuple[int, int]] = set()
        for path in sorted(shard_dir.iterdir()):
            m = _SHARD_RE.match(path.name)
            if m is None:
                continue
            key = tuple(int(x) for x in m.groups())
            with safe_open(str(path), framework="pt") as fh:
                found = (fh.metadata() or {}).get("config_hash")
            if found != config_hash and overwrite:
                path.unlink()
                continue
            if found != config_hash:
                raise ValueError(f"{str(path)!r} is a shard of a different model, config or corpus; choose another "
                                 "output directory or pass overwrite=True (--overwrite)")
            if key not in planned:
                raise ValueError(f"{str(path)!r} covers windows {key[1]}..{key[2]} of corpus {key[0]}, which is not "
                                 f"a shard of this run: rerun with the shard_windows of the interrupted run, or "
                                 f"delete {str(shard_dir)!r}")
            done.add((key[0], key[1]))
        return done
