"""Tiny randomly initialised models for tests, benchmarks and quick experiments, built with no download.

The tokenizer is a byte-level BPE trained in a second on ``pydoc_data.topics`` (English prose that ships
with Python), saved and reloaded (the bridge needs a saved tokenizer). Models are real HF architectures
(GPT-2: plain MLP; Llama: gated MLP) wrapped in a ``TransformerBridge`` exactly as ``load_model`` does.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .models import bridge_from_hf


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A saved-and-reloaded byte-level BPE tokenizer with ``<|endoftext|>`` as BOS/EOS/pad."""
    import pydoc_data.topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    tmp = tempfile.mkdtemp(prefix="snip-tiny-tok-")
    fast.save_pretrained(tmp)
    return PreTrainedTokenizerFast.from_pretrained(tmp)


def tiny_hf_model(arch: Literal["gpt2", "llama"] = "llama", *, n_layers: int = 3, d_model: int = 32,
                  d_mlp: int = 64, n_ctx: int = 256, seed: int = 0, vocab_size: int = 512) -> Any:
    """A randomly initialised HF causal LM of the given architecture, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp,
                          num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=n_ctx, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_inner=d_mlp, n_layer=n_layers, n_head=4,
                         n_positions=n_ctx)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose 'gpt2' or 'llama'")
    return model.eval()


def tiny_model(arch: Literal["gpt2", "llama"] = "llama", **kwargs: Any) -> Any:
    """A tiny ``TransformerBridge`` (default: 3 layers x 64 neurons) named ``tiny-<arch>``."""
    hf = tiny_hf_model(arch, **kwargs)
    return bridge_from_hf(hf, tiny_tokenizer(kwargs.get("vocab_size", 512)), name=f"tiny-{arch}")


@dataclass(frozen=True)
class TinyModelFactory:
    """A picklable recipe for :func:`tiny_model`, for worker processes (Ray actors) that build their own copy.

    Same arguments, same weights: the tiny models are seeded. ``pause_file`` is for crash-recovery tests:
    once the file ``pause_file + ".arm"`` exists, the next process to run a forward pass creates
    ``pause_file``, writes its pid into it and then blocks (for at most ``pause_s`` seconds), so that the
    test can kill it in the middle of a shard; processes that find ``pause_file`` already there run on.
    """

    arch: Literal["gpt2", "llama"] = "llama"
    """Architecture of :func:`tiny_model`."""
    kwargs: tuple[tuple[str, Any], ...] = ()
    """Keyword arguments of :func:`tiny_model`, as (name, value) pairs."""
    pause_file: str | None = None
    """File whose creation marks the one process that pauses mid-shard, once armed (None: never pause)."""
    pause_s: float = 120.0
    """Longest pause, so that a test that fails to kill the process does not hang forever."""

    def __call__(self) -> Any:
        model = tiny_model(self.arch, **dict(self.kwargs))
        if self.pause_file is not None:
            model.add_hook("blocks.0.hook_resid_pre", _PauseOnce(self.pause_file, self.pause_s), is_permanent=True)
        return model


class _PauseOnce:
    def __init__(self, path: str, pause_s: float) -> None:
        self.path, self.pause_s = path, pause_s

    def __call__(self, act: Any, hook: Any) -> None:
        if not os.path.exists(self.path + ".arm"):
            return None
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return None
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        time.sleep(self.pause_s)
        return None
