"""An in-process transformers chat model behind the ``generate(messages)`` client interface."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class LocalChatClient:
    """An in-process transformers chat model behind the same ``generate(messages)`` interface.

    ``model`` is a built-in name (``"smollm2-135m"``: the offline SmolLM2-135M-Instruct, converted once by
    :mod:`snip_lens.models`), a directory written by ``save_pretrained``, or a hub name. Calls run one at a
    time on a worker thread (the CPU is the bottleneck); ``temperature=0`` decodes greedily.
    """

    def __init__(self, model: str = "smollm2-135m", *, max_new_tokens: int = 40, temperature: float = 0.0,
                 seed: int = 0, hf_model: Any = None, tokenizer: Any = None) -> None:
        self.name = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self._lock = threading.Lock()
        if hf_model is not None and tokenizer is not None:
            self.model, self.tokenizer = hf_model, tokenizer
        else:
            self.model, self.tokenizer = self._load(model)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"local model {model!r} has no chat template; use an instruction-tuned chat model "
                             "such as 'smollm2-135m'")

    @staticmethod
    def _load(model: str) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .. import models

        if model in models.BUILTIN_MODELS:
            path: str | Path = models._convert_builtin(models.BUILTIN_MODELS[model], torch.float32)
        else:
            path = model
        logger.info("loading local chat model from %s", path)
        tok = AutoTokenizer.from_pretrained(str(path))
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        hf.eval()
        return hf, tok

    def _generate_sync(self, messages: list[dict]) -> str:
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        input_ids = ids["input_ids"]
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with self._lock, torch.no_grad():
            if self.temperature > 0:
                torch.manual_seed(self.seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=ids.get("attention_mask"), **kwargs)
        return self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)

    async def generate(self, messages: list[dict]) -> str:
        return await asyncio.to_thread(self._generate_sync, messages)

