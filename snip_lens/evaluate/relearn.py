"""Relearning attack: does what pruning removed come back after a few fine-tuning steps on the forget data?

Hu et al. 2024 ("Jogging the memory of unlearned LLMs") and Deeb & Roger 2024 showed that a few steps of
fine-tuning on small or loosely related data restore most of what unlearning removed. This module runs
that attack on a pruned model and re-measures the forget / retain metrics (``lm_metrics``) after each of
several step counts. It attacks both forms a user can ship:

- ``exported``: the model with the mask baked into its weights (``snip_lens.export.export_pruned``: the pruned
  neurons' output weights are zero), reloaded as a plain model; **every** weight is trainable, the zeroed
  ones included, so the attack can regrow the pruned neurons;
- ``masked``: a copy of the model with the mask's hooks attached for the whole attack; all weights are
  trainable, but the pruned neurons' activations stay exactly zero, so their weights get no gradient.

Each target is compared at equal steps with the unpruned model fine-tuned the same way, and (in the sweep
and ``snip relearn``) with a random mask of the same size. ``recovery = (acc_relearned - acc_unlearned) /
(acc_original - acc_unlearned)`` on forget top-1, where ``acc_original`` is the unpruned model before any
step and ``acc_unlearned`` the target before any step; it is None when pruning lowered forget top-1 by less
than ``MIN_DROP`` (nothing to recover, the ratio would be noise).

The attack (``RelearnConfig``): AdamW (betas 0.9/0.999, eps 1e-8, weight decay ``weight_decay``), constant
learning rate ``lr``, gradients clipped to norm ``grad_clip``, next-token cross-entropy on batches of
``batch_size`` windows of the relearn split. Batches are a seeded permutation of the relearn windows, cycled,
identical for every target, so all targets see the same data in the same order. The model stays in eval
mode (no dropout): a step depends only on the data and the weights. Training happens on a copy (a deep copy,
or the exported directory reloaded); the user's model object is never modified and keeps no hook.

The relearn split is taken from the forget *selection* documents, and ``relearn_documents`` drops any that
is also an evaluation document (same text), then ``check_disjoint`` verifies, by document text, that no
relearn document is an evaluation document.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from ..models import hook_name, model_name
from ._common import hooked_names
from .lm import lm_metrics

logger = logging.getLogger(__name__)

FORMS = ("exported", "masked")
"""The forms of a pruned model the attack can target."""

MIN_DROP = 0.005
"""Recovery is reported only when pruning lowered forget top-1 by at least this much."""


@dataclass
class RelearnConfig:
    """How the relearning attack fine-tunes (see the module docstring for what is fixed)."""

    steps: list[int] = field(default_factory=lambda: [5, 10, 20])
    """Optimiser steps after which the metrics are measured again (step 0, before any, always is)."""
    lr: float = 5e-5
    """AdamW learning rate (constant)."""
    batch_size: int = 4
    """Relearn windows per optimiser step."""
    weight_decay: float = 0.0
    """AdamW weight decay (0: the pruned weights of the masked form stay exactly where they are)."""
    grad_clip: float | None = 1.0
    """Clip the gradient to this global norm (None: no clipping)."""
    seed: int = 0
    """Seed of the batch order."""
    forms: list[str] = field(default_factory=lambda: list(FORMS))
    """Forms attacked: "exported" and/or "masked"."""
    relearn_windows: int = 32
    """Windows of the relearn split (cycled when the attack takes more)."""
    n_ctx: int | None = None
    """Tokens per relearn window (None: the sweep's window length)."""
    ks: list[str] = field(default_factory=list)
    """In a sweep: which of its k values to attack (empty: the largest)."""

    def __post_init__(self) -> None:
        if isinstance(self.steps, str):
            self.steps = [int(s) for s in self.steps.split(",") if s.strip()]
        if not self.steps or any(not isinstance(s, int) or s < 1 for s in self.steps):
            raise ValueError(f"RelearnConfig.steps {self.steps!r} must be a non-empty list of positive step counts, "
                             "e.g. 5,10,20")
        self.steps = sorted(set(self.steps))
        if not self.lr > 0:
            raise ValueError(f"RelearnConfig.lr must be > 0, got {self.lr!r}")
        for name in ("batch_size", "relearn_windows"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"RelearnConfig.{name} must be a positive integer, got {v!r}")
        if self.n_ctx is not None and self.n_ctx < 2:
            raise ValueError(f"RelearnConfig.n_ctx must be at least 2 tokens (or None), got {self.n_ctx!r}")
        if self.weight_decay < 0:
            raise ValueError(f"RelearnConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"RelearnConfig.grad_clip must be > 0 or None, got {self.grad_clip!r}")
        if isinstance(self.forms, str):
            self.forms = [f.strip() for f in self.forms.split(",") if f.strip()]
        bad = [f for f in self.forms if f not in FORMS]
        if bad or not self.forms:
            raise ValueError(f"RelearnConfig.forms {self.forms!r} must be a non-empty subset of {list(FORMS)}")

    def to_json(self) -> dict:
        return asdict(self)


# ---- the relearn split -------------------------------------------------------------------------------


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def relearn_documents(selection: list[str], evaluation: list[str]) -> list[str]:
    """The selection documents whose text is not also an evaluation document (duplicates dropped)."""
    held = {_digest(t) for t in evaluation}
    keep = [t for t in selection if _digest(t) not in held]
    if len(keep) < len(selection):
        logger.info("relearn split: dropped %d selection document(s) that are also evaluation documents",
                    len(selection) - len(keep))
    if not any(t.strip() for t in keep):
        raise ValueError("no forget document is left for relearning once the evaluation documents are excluded; "
                         "give more forget documents or a smaller eval_fraction")
    return keep


def check_disjoint(relearn: list[str], evaluation: list[str]) -> None:
    """Raise ``ValueError`` if any relearn document is (by text) an evaluation document."""
    held = {_digest(t) for t in evaluation}
    both = [i for i, t in enumerate(relearn) if _digest(t) in held]
    if both:
        raise ValueError(f"{len(both)} relearn document(s) (indices {both[:5]}) are also evaluation documents; the "
                         "attack would train on the text it is measured on. Build the relearn split with "
                         "relearn_documents(selection, evaluation)")


# ---- targets -----------------------------------------------------------------------------------------


@dataclass
class RelearnTarget:
    """One model to attack: a mask (None: the unpruned model) in one form."""

    name: str
    """Label, e.g. "snip" or "unpruned"."""
    mask: Any | None
    """The ``NeuronMask`` (None: unpruned)."""
    form: str = "masked"
    """"exported" or "masked" (ignored for the unpruned model)."""
    k: int = 0
    """Neurons pruned."""


def _pruned_out_columns(hf: Any, mask: Any) -> list[tuple[Tensor, int, Tensor]]:
    """(output-projection parameter, neuron axis, pruned indices) of each layer the mask touches."""
    from ..export import _layer_mlps

    params = {k.replace("._original_component", ""): p for k, p in hf.named_parameters()}
    layers, _ = _layer_mlps(list(params), mask.n_layers, type(hf).__name__)
    out = []
    for layer, idx in mask.per_layer().items():
        key, axis = layers[layer].out_weight
        out.append((params[key], axis, idx))
    return out


def _norm(cols: list[tuple[Tensor, int, Tensor]], grad: bool = False) -> float:
    total = 0.0
    for p, axis, idx in cols:
        t = p.grad if grad else p
        if t is None:
            continue
        total += float(t.detach().index_select(axis, idx.to(t.device)).double().pow(2).sum())
    return math.sqrt(total)


def _trainable_copy(model: Any, target: RelearnTarget, tmp: Path) -> tuple[Any, Any]:
    """A copy of ``model`` in the target's form, and the mask handle that stays attached (masked form)."""
    if target.mask is not None and target.form == "exported":
        from ..export import export_pruned
        from ..models import load_model

        out = tmp / f"export-{target.name}-{target.k}"
        export_pruned(model, target.mask, out, overwrite=True)
        dtype = next(model.original_model.parameters()).dtype
        attacked = load_model(str(out), device=str(model.cfg.device), dtype=dtype)
        attacked.cfg.model_name = model_name(model)
        attacked.cfg.default_prepend_bos = model.cfg.default_prepend_bos
        return attacked, None
    attacked = copy.deepcopy(model)
    handle = target.mask.attach(attacked) if target.mask is not None else None
    return attacked, handle


def _metrics(model: Any, forget: Tensor, retain: Tensor, batch_size: int) -> dict:
    f = lm_metrics(model, forget, batch_size=batch_size)
    r = lm_metrics(model, retain, batch_size=batch_size)
    return {"forget_top1": f["top1"], "forget_loss": f["loss"], "retain_top1": r["top1"], "retain_loss": r["loss"]}


def attack(model: Any, target: RelearnTarget, relearn_tokens: Int[Tensor, "window pos"],
           forget_eval: Int[Tensor, "window pos"], retain_eval: Int[Tensor, "window pos"],
           config: RelearnConfig | None = None, *, eval_batch_size: int = 8, progress: bool = False,
           start_metrics: dict | None = None, on_step: Callable[[int, Any], None] | None = None) -> dict:
    """Fine-tune a copy of ``model`` in the target's form and measure it after each of ``config.steps``.

    Returns ``{"method", "form", "k", "steps": [0, ...], "forget_top1": [...], "forget_loss", "retain_top1",
    "retain_loss", "train_loss": [per step], "seconds"}`` and, for a mask, ``pruned_out_norm`` (norm of the
    pruned neurons' output weights at each measured step), ``pruned_out_grad_norm`` (their gradient norm at
    each optimiser step) and, in the masked form, ``masked_max_abs_act`` (the largest |activation| of a
    pruned neuron leaving its hook point in each step's forward pass: 0.0 while the mask holds).
    ``start_metrics`` (the step-0 metrics, when already measured on the same windows) skips that evaluation.
    ``on_step(step, attacked_model)`` is called after each optimiser step.
    """
    config = config or RelearnConfig()
    if relearn_tokens.ndim != 2 or relearn_tokens.shape[0] == 0:
        raise ValueError(f"relearn_tokens must be a non-empty [window, pos] tensor, got shape "
                         f"{tuple(relearn_tokens.shape)}")
    hooked = hooked_names(model, "model")
    if hooked:
        raise ValueError(f"the model has hooks attached ({', '.join(hooked[:3])}); the attack copies the model "
                         "and would copy them too. Remove them and pass the mask as a target instead")
    t0 = time.perf_counter()
    steps = sorted(set(config.steps))
    res: dict[str, Any] = {"method": target.name, "form": target.form if target.mask is not None else "none",
                           "k": target.k, "steps": [0] + steps, "train_loss": []}
    with tempfile.TemporaryDirectory(prefix="snip-relearn-") as tmp:
        attacked, handle = _trainable_copy(model, target, Path(tmp))
        probes: list[tuple[Any, Any]] = []
        try:
            params = [p for p in attacked.parameters()]
            for p in params:
                p.requires_grad_(True)
            cols = _pruned_out_columns(attacked.original_model, target.mask) if target.mask is not None else []
            seen: list[float] = []
            if target.mask is not None and handle is not None:
                # A hook after the mask's sees exactly what leaves the hook point (hooks chain in order).
                for layer, idx in target.mask.per_layer().items():
                    def probe(act: Tensor, hook: Any, idx: Tensor = idx) -> None:
                        seen.append(float(act.detach()[..., idx.to(act.device)].abs().max()))
                    point = attacked.hook_dict[hook_name(layer)]
                    probes.append((point, point.add_hook(probe, dir="fwd", is_permanent=True)))
            opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=config.weight_decay)
            order = torch.randperm(relearn_tokens.shape[0], generator=torch.Generator().manual_seed(config.seed))
            device = attacked.cfg.device

            def measure() -> None:
                m = _metrics(attacked, forget_eval, retain_eval, eval_batch_size)
                for key, v in m.items():
                    res.setdefault(key, []).append(v)
                if cols:
                    res.setdefault("pruned_out_norm", []).append(_norm(cols))

            if start_metrics is not None:
                for key in ("forget_top1", "forget_loss", "retain_top1", "retain_loss"):
                    res[key] = [start_metrics[key]]
                if cols:
                    res["pruned_out_norm"] = [_norm(cols)]
            else:
                measure()
            bar = tqdm(total=steps[-1], desc=f"relearn {target.name} ({res['form']})", disable=not progress)
            for step in range(1, steps[-1] + 1):
                pick = [(int(order[((step - 1) * config.batch_size + i) % len(order)]))
                        for i in range(config.batch_size)]
                batch = relearn_tokens[pick].to(device)  # (B, pos)
                seen.clear()
                logits = attacked(batch, return_type="logits")[:, :-1]  # (B, pos-1, vocab)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                         batch[:, 1:].reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cols:
                    res.setdefault("pruned_out_grad_norm", []).append(_norm(cols, grad=True))
                if probes:
                    res.setdefault("masked_max_abs_act", []).append(max(seen) if seen else float("nan"))
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                res["train_loss"].append(float(loss.detach()))
                if on_step is not None:
                    on_step(step, attacked)
                if step in steps:
                    with torch.no_grad():
                        measure()
                bar.update(1)
            bar.close()
        finally:
            for point, lens_handle in probes:
                lens_handle.hook.remove()
                point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not lens_handle]
            if handle is not None:
                handle.remove()
            del attacked
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def add_recovery(runs: list[dict], original_top1: float) -> None:
    """Add ``recovery`` (one value per measured step, None when undefined) to every pruned run, in place."""
    for r in runs:
        if r["form"] == "none":
            continue
        unlearned = r["forget_top1"][0]
        drop = original_top1 - unlearned
        r["forget_drop"] = drop
        r["recovery"] = [None if drop < MIN_DROP else (a - unlearned) / drop for a in r["forget_top1"]]


def relearn_attack(model: Any, masks: dict[str, Any], relearn_tokens: Int[Tensor, "window pos"],
                   forget_eval: Int[Tensor, "window pos"], retain_eval: Int[Tensor, "window pos"],
                   config: RelearnConfig | None = None, *, eval_batch_size: int = 8, progress: bool = False,
                   start_metrics: dict[str, dict] | None = None) -> dict:
    """Attack the unpruned model and every mask in ``masks`` (label -> ``NeuronMask``) in each configured form.

    Returns ``{"config", "original_forget_top1", "runs": [attack results, unpruned first]}`` with recovery
    added to each pruned run. ``start_metrics`` maps a label ("unpruned" included) to its step-0 metrics
    (``forget_top1``, ``forget_loss``, ``retain_top1``, ``retain_loss``) measured on the same windows.
    """
    config = config or RelearnConfig()
    start_metrics = start_metrics or {}
    targets = [RelearnTarget("unpruned", None, "none", 0)]
    for label, mask in masks.items():
        for form in config.forms:
            targets.append(RelearnTarget(label, mask, form, len(mask)))
    runs = []
    for t in targets:
        key = t.name if t.mask is None else f"{t.name}@{t.k}"
        runs.append(attack(model, t, relearn_tokens, forget_eval, retain_eval, config,
                           eval_batch_size=eval_batch_size, progress=progress, start_metrics=start_metrics.get(key)))
        logger.info("relearn %s (%s): forget top1 %s", t.name, runs[-1]["form"],
                    ", ".join(f"{v:.3f}" for v in runs[-1]["forget_top1"]))
    original = runs[0]["forget_top1"][0]
    add_recovery(runs, original)
    return {"config": config.to_json(), "original_forget_top1": original, "runs": runs}


# ---- plots and report --------------------------------------------------------------------------------


def plot_relearn(result: dict, out_dir: str | Path, *, title: str = "") -> Path:
    """``relearn_forget_top1.png``: forget top-1 vs optimiser steps, one line per method and form, one panel per k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = result["runs"]
    base = [r for r in runs if r["form"] == "none"]
    ks = sorted({r["k"] for r in runs if r["form"] != "none"}) or [0]
    fig, axes = plt.subplots(1, len(ks), figsize=(5.5 * len(ks), 4), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for r in base:
            ax.plot(r["steps"], r["forget_top1"], color="black", linestyle="--", marker="o", label="unpruned")
        for r in runs:
            if r["form"] != "none" and r["k"] == k:
                ax.plot(r["steps"], r["forget_top1"], marker="o", linestyle="-" if r["form"] == "exported" else ":",
                        label=f"{r['method']} ({r['form']})")
        ax.set_xlabel("relearning steps")
        ax.set_ylabel("forget top-1 accuracy")
        ax.set_title(f"k = {k} neurons" if k else "unpruned")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = out / "relearn_forget_top1.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def relearn_table(result: dict) -> list[list[str]]:
    """Rows (method, form, k, then forget top-1 / recovery at each step, retain top-1 at the last step)."""
    runs = result["runs"]
    steps = runs[0]["steps"]
    head = ["method", "form", "k"] + [f"forget top-1 @{s}" for s in steps] + \
        [f"recovery @{s}" for s in steps[1:]] + [f"retain top-1 @{steps[0]}", f"retain top-1 @{steps[-1]}"]
    rows = [head]
    for r in runs:
        rec = r.get("recovery") or [None] * len(steps)
        rows.append([r["method"], r["form"], str(r["k"])] + [f"{v:.3f}" for v in r["forget_top1"]] +
                    ["n/a" if v is None else f"{v:.2f}" for v in rec[1:]] +
                    [f"{r['retain_top1'][0]:.3f}", f"{r['retain_top1'][-1]:.3f}"])
    return rows


def report_section(result: dict, plot: Path | None = None, base: Path | None = None) -> tuple[str, str]:
    """(markdown, html) of the relearning attack for the sweep report."""
    import html as _html

    rows = relearn_table(result)
    c = result["config"]
    intro = (f"Relearning attack: AdamW, lr {c['lr']}, batch {c['batch_size']} windows, seed {c['seed']}, on "
             f"{c['relearn_windows']} windows of forget selection documents (none of them an evaluation document). "
             "recovery = (top-1 relearned - top-1 unlearned) / (top-1 original - top-1 unlearned); n/a when pruning "
             f"lowered forget top-1 by less than {MIN_DROP}.")
    src = None if plot is None else (plot.relative_to(base) if base is not None and plot.is_relative_to(base) else plot)
    md = ["## Relearning attack", "", intro, "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]] + [""]
    if src is not None:
        md += [f"![relearn]({src})", ""]
    e = _html.escape
    h = ["<h2>Relearning attack</h2>", f"<p>{e(intro)}</p><table>",
         "<tr>" + "".join(f"<th>{e(x)}</th>" for x in rows[0]) + "</tr>"]
    h += ["<tr>" + "".join(f"<td>{e(x)}</td>" for x in r) + "</tr>" for r in rows[1:]]
    h.append("</table>")
    if src is not None:
        h.append(f"<img src='{e(str(src))}' alt='relearn'>")
    return "\n".join(md), "\n".join(h)


def sweep_relearn(model: Any, config: RelearnConfig, *, scores: dict[str, Any], methods: list[str], ks: list[int],
                  n_neurons: int, forget_sel: list[str], forget_eval_texts: list[str], forget_eval: Tensor,
                  retain_eval: Tensor, runs: list[dict], baseline: dict, n_ctx: int, data_seed: int,
                  random_seed: int, batch_size: int = 8, progress: bool = False) -> dict:
    """The attack as the sweep runs it: every method (plus random) at ``config.ks`` (default: the largest k).

    Step-0 metrics are taken from the sweep's own evaluation of the same masks on the same windows.
    """
    from ..corpus import make_windows
    from ..select import mask_from_scores, parse_k, random_scores

    attack_ks = sorted({parse_k(k, n_neurons) for k in config.ks}) if config.ks else [max(ks)]
    docs = relearn_documents(forget_sel, forget_eval_texts)
    check_disjoint(docs, forget_eval_texts)
    windows = make_windows(model, docs, n_ctx=config.n_ctx or n_ctx, max_windows=config.relearn_windows,
                           seed=data_seed + 2, name="relearn")
    scores = dict(scores)
    if "random" not in scores:
        first = next(iter(scores.values()))
        scores["random"] = random_scores(*first.scores.shape, seed=random_seed, model_name=model_name(model))
    labels = list(dict.fromkeys([m for m in methods if m in scores] + ["random"]))

    def step0(side: dict) -> dict:
        return {"forget_top1": side["forget"]["top1"], "forget_loss": side["forget"]["loss"],
                "retain_top1": side["retain"]["top1"], "retain_loss": side["retain"]["loss"]}

    start = {"unpruned": step0(baseline)}
    start.update({f"{r['method']}@{r['k']}": step0(r) for r in runs})
    masks = {}
    for k in attack_ks:
        for label in labels:
            masks[(label, k)] = mask_from_scores(model, scores[label], k)
    all_runs: list[dict] = []
    first_unpruned = True
    for k in attack_ks:
        sub = {label: masks[(label, k)] for label in labels}
        res = relearn_attack(model, sub, windows.tokens, forget_eval, retain_eval, config, eval_batch_size=batch_size,
                             progress=progress, start_metrics=start) if first_unpruned else None
        if res is None:  # the unpruned model is attacked once, not once per k
            pruned = []
            for label, mask in sub.items():
                for form in config.forms:
                    pruned.append(attack(model, RelearnTarget(label, mask, form, len(mask)), windows.tokens,
                                         forget_eval, retain_eval, config, eval_batch_size=batch_size,
                                         progress=progress, start_metrics=start.get(f"{label}@{len(mask)}")))
            add_recovery(pruned, all_runs[0]["forget_top1"][0])
            all_runs += pruned
        else:
            all_runs += res["runs"]
            first_unpruned = False
    return {"config": config.to_json(), "original_forget_top1": all_runs[0]["forget_top1"][0],
            "relearn_documents": len(docs), "relearn_windows": len(windows), "runs": all_runs}


def relearn_mask(model: Any, mask: Any, data: Any, config: RelearnConfig | None = None, *, label: str = "mask",
                 out_dir: str | Path | None = None, random_seed: int = 0, batch_size: int = 8,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """``snip relearn``: attack one saved mask, the unpruned model and a random mask of the same size.

    ``data`` is a ``snip_lens.sweep.DataConfig``: the forget / retain documents are split exactly as the sweep
    splits them (same seed and fraction), so a mask from a sweep is measured on that sweep's held-out windows.
    With ``out_dir``, writes ``relearn.json`` and ``relearn_forget_top1.png`` there.
    """
    from ..corpus import make_windows
    from ..select import mask_from_scores, random_scores
    from ..sweep import load_side_texts, split_documents

    from .._io import atomic_write_json

    config = config or RelearnConfig()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and (out / "relearn.json").exists() and not overwrite:
        raise FileExistsError(f"{out / 'relearn.json'} already exists; choose another --out or pass --overwrite")
    mask.check_model(model)
    forget, retain = load_side_texts(data.forget, data), load_side_texts(data.retain, data)
    f_sel, f_eval = split_documents(forget, data.eval_fraction, data.seed)
    _, r_eval = split_documents(retain, data.eval_fraction, data.seed)
    kw = dict(n_ctx=data.n_ctx, max_windows=data.eval_windows, seed=data.seed + 1, max_doc_tokens=data.max_doc_tokens)
    forget_eval = make_windows(model, f_eval, name="forget-eval", **kw).tokens
    retain_eval = make_windows(model, r_eval, name="retain-eval", **kw).tokens
    docs = relearn_documents(f_sel, f_eval)
    check_disjoint(docs, f_eval)
    windows = make_windows(model, docs, n_ctx=config.n_ctx or data.n_ctx, max_windows=config.relearn_windows,
                           seed=data.seed + 2, name="relearn")
    rand = mask_from_scores(model, random_scores(mask.n_layers, mask.d_mlp, seed=random_seed,
                                                 model_name=model_name(model)), len(mask))
    result = relearn_attack(model, {label: mask, "random": rand}, windows.tokens, forget_eval, retain_eval, config,
                            eval_batch_size=batch_size, progress=progress)
    result.update(relearn_documents=len(docs), relearn_windows=len(windows), data=asdict(data))
    if out is not None:
        atomic_write_json(out / "relearn.json", result)
        plot_relearn(result, out, title=f"{model_name(model)}: relearning attack")
    return result
