"""LLM explanation quality: OpenAI's all-at-once neuron simulator (Bills et al. 2023) through any
OpenAI-compatible chat server.

The simulator is shown an explanation and a window's tokens listed as ``token<tab>unknown`` and answers
the same lines with an activation from 0 to 10. Its prediction for a token is not the number it wrote but
the *expected value* over the probabilities it gave "0".."10" at that position (``top_logprobs`` of the
chat completion), as in OpenAI's ``ExplanationNeuronSimulator``. The score is the correlation between the
expected values and the true activations over the neuron's top and random windows together
(``ev_correlation_score``). Calls go through :class:`~snip_lens.llm.OpenAIChatClient` (its retry policy and
concurrency bound); an answer that fails or does not parse is a failed result, never a score.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..explain.prompts import EXPLANATION_PREFIX, FEW_SHOT_EXAMPLES, _token_text, format_activation_records, \
    max_activation_of
from ..llm import LLMConfig, LLMError, OpenAIChatClient, _MalformedResponse, run_all
from ..types import ActivationRecord, NeuronExplanation
from .base import QualityResult, iter_neuron_records

logger = logging.getLogger(__name__)

SIMULATOR_PROMPT_VERSION = "oai-all-at-once-simulator/chat-logprobs/v1"

SIMULATOR_SYSTEM_PROMPT = (
    "We're studying neurons in a neural network.\nEach neuron looks for some particular thing in a short "
    "document.\nLook at  an explanation of what the neuron does, and try to predict its activations on each "
    "token.\n\nThe activation format is token<tab>activation, activations go from 0 to 10, \"unknown\" "
    "indicates an unknown activation. Most activations will be 0.\n"
)
"""OpenAI's simulator system message, verbatim (including its double space)."""

SIMULATOR_INSTRUCTION = ("Replace every \"unknown\" by the activation, from 0 to 10: answer with the same "
                         "token<tab>activation lines, in the same order, and nothing else.")
"""Appended to the last user message: a chat model answers in turn instead of continuing an echoed prompt."""


def format_unknown(tokens: Sequence[str]) -> str:
    """``<start>`` / ``token<tab>unknown`` lines / ``<end>`` (OpenAI ``format_sequences_for_simulation``)."""
    return "\n<start>\n" + "\n".join(f"{_token_text(t)}\tunknown" for t in tokens) + "\n<end>\n"


def build_simulation_prompt(explanation: str, tokens: Sequence[str], *, few_shot: bool = True) -> list[dict]:
    """Chat messages asking the simulator for one window's activations under ``explanation``."""
    if not tokens:
        raise ValueError("the simulator needs a window with at least one token")
    msgs: list[dict] = [{"role": "system", "content": SIMULATOR_SYSTEM_PROMPT}]
    examples = FEW_SHOT_EXAMPLES if few_shot else []
    for i, (records, expl) in enumerate(examples):
        msgs.append({"role": "user", "content": f"\n\nNeuron {i + 1}\nExplanation of neuron {i + 1} behavior: "
                                                f"{EXPLANATION_PREFIX} {expl}"})
        msgs.append({"role": "assistant", "content":
                     f"\nActivations: {format_activation_records(records, max_activation_of(records))}\n"})
    n = len(examples) + 1
    msgs.append({"role": "user", "content": f"\n\nNeuron {n}\nExplanation of neuron {n} behavior: "
                                            f"{EXPLANATION_PREFIX} {explanation.strip()}\nActivations: "
                                            f"{format_unknown(tokens)}\n{SIMULATOR_INSTRUCTION}"})
    return msgs


_NUMBERS = {str(i): i for i in range(11)}


def expected_values(logprobs: Sequence[dict], n_tokens: int) -> list[float]:
    """Expected activation at each ``token<tab>N`` line of a chat answer, from its ``logprobs.content``.

    A number position is the first answer token after a tab; its expected value is
    ``sum_k p(k) k / sum_k p(k)`` over the top-logprob candidates "0".."10". Raises ``ValueError`` when the
    answer holds another number of lines than ``n_tokens`` or a position has no number candidate.
    """
    out: list[float] = []
    text = ""
    for i, entry in enumerate(logprobs):
        tok = str(entry.get("token", ""))
        if text.endswith("\t"):
            cands = entry.get("top_logprobs") or [{"token": tok, "logprob": entry.get("logprob", 0.0)}]
            ps = {}
            for c in cands:
                key = str(c.get("token", "")).strip()
                if key in _NUMBERS and key not in ps:
                    ps[key] = math.exp(float(c.get("logprob", -math.inf)))
            total = sum(ps.values())
            if total <= 0:
                raise ValueError(f"answer token {i} ({tok!r}) after a tab has no candidate among '0'..'10'")
            out.append(sum(p * _NUMBERS[k] for k, p in ps.items()) / total)
        text += tok
    if len(out) != n_tokens:
        raise ValueError(f"the simulator answered {len(out)} activation lines for {n_tokens} tokens")
    return out


def correlation(pred: Sequence[float], true: Sequence[float]) -> float:
    """Pearson correlation; NaN when either side is constant."""
    a = np.asarray(pred, dtype=np.float64)
    b = np.asarray(true, dtype=np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


class LogprobChatClient(OpenAIChatClient):
    """:class:`OpenAIChatClient` asking for per-token logprobs of the answer (same retries and concurrency)."""

    async def generate_logprobs(self, messages: list[dict], *, top_logprobs: int = 15) -> list[dict]:
        """The answer's ``choices[0].logprobs.content``: one ``{token, logprob, top_logprobs}`` per token."""
        cfg = self.config

        async def call(client: Any) -> list[dict]:
            body = await client.post("/chat/completions", cast_to=str, body={
                "model": cfg.model, "messages": messages, "temperature": 0.0, "max_tokens": cfg.max_tokens,
                "logprobs": True, "top_logprobs": top_logprobs})
            data = json.loads(body)
            try:
                content = data["choices"][0]["logprobs"]["content"]
            except (KeyError, IndexError, TypeError):
                raise _MalformedResponse(f"response has no choices[0].logprobs.content (does the server "
                                         f"return logprobs?): {body[:200]!r}") from None
            if not isinstance(content, list):
                raise _MalformedResponse(f"logprobs.content is not a list: {body[:200]!r}")
            return content

        return await self._with_retries(f"chat completion with logprobs ({cfg.model})", call)


class SimulatorScorer:
    """OpenAI's all-at-once simulator score (``ev_correlation_score``) of each explanation."""

    name = "simulator"
    chance = 0.0

    def __init__(self, llm: LLMConfig | Any, *, n_top: int = 5, n_random: int = 5, few_shot: bool = True,
                 top_logprobs: int = 15) -> None:
        if isinstance(llm, LLMConfig):
            import dataclasses

            # every activation line costs a few answer tokens: a 41-token window needs ~200
            self.client: Any = LogprobChatClient(dataclasses.replace(llm, max_tokens=max(llm.max_tokens, 1024)))
        else:
            self.client = llm
        if not callable(getattr(self.client, "generate_logprobs", None)):
            raise ValueError("the simulator needs an LLMConfig or a client with generate_logprobs(messages)")
        self.n_top, self.n_random, self.few_shot, self.top_logprobs = n_top, n_random, few_shot, top_logprobs

    async def _simulate(self, explanation: str, record: ActivationRecord) -> list[float]:
        msgs = build_simulation_prompt(explanation, record.tokens, few_shot=self.few_shot)
        content = await self.client.generate_logprobs(msgs, top_logprobs=self.top_logprobs)
        return expected_values(content, len(record.tokens))

    def __call__(self, explanations: Sequence[NeuronExplanation], records: Any, *,
                 progress: bool = False) -> list[QualityResult]:
        usable = [e for e in explanations if e.ok]
        recs = iter_neuron_records(records, [e.neuron for e in usable])

        async def one(e: NeuronExplanation) -> QualityResult:
            r = recs.get(e.neuron)
            windows = [x for x in ((r.top[: self.n_top] + r.random[: self.n_random]) if r else []) if x.tokens]
            if not windows:
                return QualityResult(e.neuron, self.name, None, error="no activation records to simulate")
            pred: list[float] = []
            true: list[float] = []
            try:
                for w in windows:
                    pred.extend(await self._simulate(e.explanation or "", w))
                    true.extend(float(a) for a in w.activations)
            except (LLMError, ValueError) as exc:
                return QualityResult(e.neuron, self.name, None, error=f"simulation failed: {exc}")
            score = correlation(pred, true)
            if math.isnan(score):
                return QualityResult(e.neuron, self.name, None, details={"n_windows": len(windows)},
                                     error="constant predictions or activations: correlation undefined")
            return QualityResult(e.neuron, self.name, score, details={"n_windows": len(windows),
                                                                       "n_tokens": len(true)})

        out = [QualityResult(e.neuron, self.name, None, error=f"no usable explanation: {e.error or 'empty'}")
               for e in explanations if not e.ok]
        out.extend(run_all(usable, one, desc="simulating", progress=progress))
        return out
