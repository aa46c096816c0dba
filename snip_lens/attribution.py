"""Attribution selection: each neuron's ablation effect on forget and retain loss, to first order.

The Taylor criterion of Molchanov et al. (2017), also known as attribution patching: zeroing neuron ``n``
changes its activation at ``blocks.{l}.mlp.hook_post`` from ``a`` to 0, so the loss changes by about

    effect(n) = sum over tokens of  -a * dL/da        (L = mean next-token cross-entropy)

and one forward and one backward pass per batch give the effect of every neuron at once. The method
``attribution`` prunes first the neurons whose removal raises forget loss most relative to retain loss:

    selectivity(n) = effect on forget windows - effect on retain windows

It is a causal, non-interpretable baseline: the reference for how close explanation-based selection gets.
``ablation_effect`` measures the true effect of zeroing one neuron, to check the approximation against.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from . import models as M
from .score import NeuronScores
from .types import NeuronId

logger = logging.getLogger(__name__)


def _check_tokens(tokens: Any, what: str) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
        raise ValueError(f"{what} must be an integer token tensor of shape (window, pos), got "
                         f"{type(tokens).__name__}{tuple(getattr(tokens, 'shape', ()))}")
    if tokens.shape[0] == 0 or tokens.shape[1] < 2:
        raise ValueError(f"{what} has shape {tuple(tokens.shape)}: need at least one window of 2 or more tokens "
                         "(every position but the last predicts the next token)")
    return tokens


def attribution_effects(model: Any, tokens: Int[Tensor, "window pos"], *, batch_size: int = 8,
                        progress: bool = False, desc: str = "attribution") -> Float[Tensor, "layer neuron"]:
    """First-order change of the mean next-token loss on ``tokens`` when each MLP neuron is zeroed.

    Positive = removing the neuron raises the loss (the model needs it here). One forward and one backward
    pass per batch; the loss is the same mean cross-entropy over all predicted positions as
    ``evaluate.lm_metrics``, so the effects are in nats of that metric. Returns float64 on the CPU.
    """
    tokens = _check_tokens(tokens, "attribution tokens")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n_layers, d_mlp = M.n_layers(model), M.d_mlp(model)
    total = torch.zeros((n_layers, d_mlp), dtype=torch.float64)
    n_predicted = tokens.shape[0] * (tokens.shape[1] - 1)
    device = model.cfg.device
    acts: dict[int, Tensor] = {}

    def make_hook(layer: int) -> Callable:
        def hook(act: Tensor, hook: Any) -> None:
            if not act.requires_grad:
                # Weights that do not require grad leave the graph untracked: make the first hooked
                # activation a leaf that does, so every later one is tracked through it.
                act.requires_grad_(True)
            acts[layer] = act
            return None

        return hook

    fwd_hooks = [(M.hook_name(layer), make_hook(layer)) for layer in range(n_layers)]
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd_hooks):
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc=desc, disable=not progress):
            acts.clear()
            batch = tokens[start:start + batch_size].to(device)
            logits = model(batch, return_type="logits")[:, :-1].float()  # (B, pos-1, vocab)
            logprobs = torch.log_softmax(logits, dim=-1)
            # Sum over this batch / all predicted positions: the batches' gradients add up to the gradient
            # of the mean loss over every window.
            loss = -logprobs.gather(-1, batch[:, 1:, None]).sum() / n_predicted
            layers = sorted(acts)
            if len(layers) != n_layers:
                raise RuntimeError(f"attribution hooks fired on layers {layers}, expected all {n_layers}")
            grads = torch.autograd.grad(loss, [acts[layer] for layer in layers], allow_unused=True)
            for layer, act, grad in zip(layers, (acts[layer] for layer in layers), grads):
                if grad is None:  # the activation does not reach the loss (cannot happen in an LM)
                    continue
                # effect of a -> 0 is -a * dL/da, summed over (batch, pos)
                total[layer] -= (act.detach() * grad).double().reshape(-1, d_mlp).sum(0).cpu()
    acts.clear()
    return total


def attribution_scores(model: Any, forget_tokens: Int[Tensor, "window pos"],
                       retain_tokens: Int[Tensor, "window pos"], *, batch_size: int = 8, progress: bool = False
                       ) -> NeuronScores:
    """Method ``attribution``: forget effect - retain effect of zeroing each neuron (first order).

    Higher = prune first. ``labels`` is empty (the method explains nothing); the two effects are logged
    summary-wise and recoverable with ``attribution_effects``.
    """
    forget = attribution_effects(model, _check_tokens(forget_tokens, "forget tokens"), batch_size=batch_size,
                                 progress=progress, desc="attribution forget")
    retain = attribution_effects(model, _check_tokens(retain_tokens, "retain tokens"), batch_size=batch_size,
                                 progress=progress, desc="attribution retain")
    logger.info("attribution: largest forget effect %.4f, largest retain effect %.4f nats",
                float(forget.max()), float(retain.max()))
    return NeuronScores(scores=forget - retain, method="attribution", labels={}, model_name=M.model_name(model))


def ablation_effect(model: Any, tokens: Int[Tensor, "window pos"], neuron: NeuronId | tuple[int, int], *,
                    batch_size: int = 8, baseline: float | None = None) -> float:
    """True change of mean next-token loss on ``tokens`` when ``neuron`` is zeroed (pass ``baseline`` to
    reuse the unpruned loss). The exact counterpart of one entry of ``attribution_effects``."""
    from .evaluate import lm_metrics
    from .mask import NeuronMask

    tokens = _check_tokens(tokens, "ablation tokens")
    if baseline is None:
        baseline = lm_metrics(model, tokens, batch_size=batch_size)["loss"]
    mask = NeuronMask.from_neurons(model, [neuron], mode="zero")
    return lm_metrics(model, tokens, batch_size=batch_size, mask=mask)["loss"] - baseline
