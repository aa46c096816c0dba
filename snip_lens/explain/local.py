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
    time on a worker thread; ``temperature=0`` decodes greedily. ``device`` and ``dtype`` (CLI ``--device``,
    ``--dtype``) place the chat model, e.g. on a GPU in bfloat16.
    """

    def __init__(self, model: str = "smollm2-135m", *, max_new_tokens: int = 40, temperature: float = 0.0,
                 seed: int = 0, hf_model: Any = None, tokenizer: Any = None, device: Any = None,
                 dtype: Any = None) -> None:
        """``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"auto"``) and ``dtype`` (``float32``,
        ``bfloat16``, ``float16`` or their short names, or a ``torch.dtype``) say where and in which precision
        the chat model runs; by default a loaded model runs on the CPU in float32 and a given ``hf_model``
        stays as it is (it is moved or cast only when they are given)."""
        from .. import models
        from ..config import normalise_device, normalise_dtype, resolve_device

        # Checked before anything loads: a typo fails at once, naming the value and the flag.
        dev = None if device is None else models.parse_device(resolve_device(normalise_device(device)))
        dt = None if dtype is None else models.parse_dtype(normalise_dtype(dtype))
        self.name = model
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self._lock = threading.Lock()
        if hf_model is not None and tokenizer is not None:
            self.model, self.tokenizer = hf_model, tokenizer
            if dev is not None or dt is not None:
                self.model = self.model.to(**{k: v for k, v in (("device", dev), ("dtype", dt)) if v is not None})
        else:
            import torch

            self.model, self.tokenizer = self._load(model, dev if dev is not None else torch.device("cpu"),
                                                    dt if dt is not None else torch.float32)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"local model {model!r} has no chat template; use an instruction-tuned chat model "
                             "such as 'smollm2-135m'")

    @property
    def device(self) -> Any:
        """Where the chat model's weights are."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> Any:
        """The chat model's weight dtype."""
        return next(self.model.parameters()).dtype

    @staticmethod
    def _load(model: str, device: Any, dtype: Any) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .. import models

        if model in models.BUILTIN_MODELS:
            # Converted once in float32; the dtype is applied when loading.
            path: str | Path = models._convert_builtin(models.BUILTIN_MODELS[model], torch.float32)
        else:
            path = model
        logger.info("loading local chat model from %s (%s, %s)", path, dtype, device)
        tok = AutoTokenizer.from_pretrained(str(path))
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        hf.to(device)
        hf.eval()
        return hf, tok

    def _generate_sync(self, messages: list[dict]) -> str:
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        input_ids = ids["input_ids"].to(self.device)
        mask = ids.get("attention_mask")
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens,
                                  "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with self._lock, torch.no_grad():
            if self.temperature > 0:
                torch.manual_seed(self.seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=None if mask is None else mask.to(self.device),
                                      **kwargs)
        return self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)

    async def generate(self, messages: list[dict]) -> str:
        return await asyncio.to_thread(self._generate_sync, messages)

