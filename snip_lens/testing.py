"""Tiny randomly initialised models for tests, benchmarks and quick experiments, built with no download.

The tokenizer is a byte-level BPE trained in a second on ``pydoc_data.topics`` (English prose that ships
with Python), saved and reloaded (the bridge needs a saved tokenizer). Models are real HF architectures
(GPT-2: plain MLP; Llama: gated MLP) wrapped in a ``TransformerBridge`` exactly as ``load_model`` does;
``tiny_hooked_model`` builds the same shapes as a TransformerLens 2.x/3.x ``HookedTransformer``.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
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


def tiny_model(arch: Literal["gpt2", "llama"] = "llama", *, prepend_bos: bool | None = None, **kwargs: Any) -> Any:
    """A tiny ``TransformerBridge`` (default: 3 layers x 64 neurons) named ``tiny-<arch>``.

    ``prepend_bos=False`` makes a model that takes no BOS (as SmolLM2); the default prepends one.
    """
    hf = tiny_hf_model(arch, **kwargs)
    return bridge_from_hf(hf, tiny_tokenizer(kwargs.get("vocab_size", 512)), name=f"tiny-{arch}",
                          prepend_bos=prepend_bos)


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


DETOXIFY_CLASSES = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")
"""The class names of Detoxify's ``original`` checkpoint, in its order."""


def tiny_detoxify_checkpoint(directory: str | Path, *, seed: int = 0) -> tuple[Path, Path]:
    """A Detoxify-format checkpoint of a tiny random BERT and its config/tokenizer directory, built offline.

    The checkpoint has the layout of Detoxify's released ``original`` file (``config.arch.args`` naming
    ``bert-base-uncased``, ``config.dataset.args.classes``, ``state_dict``); the directory holds a BERT
    config (with the default two labels, as ``bert-base-uncased``'s own) and a WordPiece tokenizer.
    Returns ``(checkpoint file, config directory)``.
    """
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    root = Path(directory)
    cfg_dir = root / "bert-config"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "you", "are", "nice", "bad", "i", "hate", "the", "a"]
    (cfg_dir / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(cfg_dir / "vocab.txt")).save_pretrained(cfg_dir)
    small = dict(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=64)
    BertConfig(**small).save_pretrained(cfg_dir)  # num_labels 2, as the hub's bert-base-uncased config
    torch.manual_seed(seed)
    bert = BertForSequenceClassification(BertConfig(**small, num_labels=len(DETOXIFY_CLASSES))).eval()
    ckpt = root / "toxic_tiny.ckpt"
    torch.save({"config": {"arch": {"args": {"model_type": "bert-base-uncased",
                                             "model_name": "BertForSequenceClassification",
                                             "tokenizer_name": "BertTokenizer", "num_classes": len(DETOXIFY_CLASSES)}},
                           "dataset": {"args": {"classes": list(DETOXIFY_CLASSES)}}},
                "state_dict": bert.state_dict()}, ckpt)
    return ckpt, cfg_dir


def forbid_network(monkeypatch: Any, *, allow_loopback: bool = False) -> list[Any]:
    """Refuse every socket connection for the rest of a test; returns the list of refused addresses.

    ``monkeypatch`` is pytest's fixture (undone after the test). A test that something runs offline checks
    that the list stays empty (the refusal alone may be caught and retried by the code under test).
    ``allow_loopback`` keeps 127.0.0.1 / localhost open for local test servers.
    """
    import socket

    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def loopback(address: Any) -> bool:
        host = str(address[0]) if isinstance(address, tuple) else ""
        return allow_loopback and (host in ("localhost", "::1") or host.startswith("127."))

    def refuse(self: Any, address: Any, *args: Any, **kwargs: Any) -> Any:
        if loopback(address):
            return real_connect(self, address)
        attempts.append(address)
        raise OSError(f"network disabled in this test ({address})")

    real_create = socket.create_connection

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> Any:
        if loopback(address):
            return real_create(address, *args, **kwargs)
        return refuse(None, address)

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    return attempts


def tiny_hooked_model(arch: Literal["gpt2", "llama"] = "llama", *, n_layers: int = 3, d_model: int = 32,
                      d_mlp: int = 64, n_ctx: int = 256, seed: int = 0, vocab_size: int = 512,
                      device: str = "cpu") -> Any:
    """A tiny TransformerLens 2.x/3.x ``HookedTransformer`` built from a config (random weights, no download).

    ``"llama"``: RMSNorm, rotary, gated SiLU MLP; ``"gpt2"``: LayerNorm, learned positions, GELU MLP. Its
    tokenizer is ``tiny_tokenizer``; it is named ``tiny-hooked-<arch>``. Raises ``ImportError`` on
    TransformerLens 4.x, which has no ``HookedTransformer``.
    """
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as exc:
        raise ImportError("HookedTransformer needs TransformerLens 2.x/3.x (4.x is bridge-only); "
                          "`python3 dev.py test-hooked` runs these tests in such an environment") from exc
    common = dict(n_layers=n_layers, d_model=d_model, d_head=d_model // 4, n_heads=4, d_mlp=d_mlp,
                  d_vocab=vocab_size, n_ctx=n_ctx, seed=seed, device=device, default_prepend_bos=False,
                  model_name=f"tiny-hooked-{arch}")
    if arch == "llama":
        cfg = HookedTransformerConfig(act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                                      gated_mlp=True, rotary_dim=d_model // 4, final_rms=True, **common)
    elif arch == "gpt2":
        cfg = HookedTransformerConfig(act_fn="gelu_new", normalization_type="LN",
                                      positional_embedding_type="standard", **common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose 'gpt2' or 'llama'")
    return HookedTransformer(cfg, tokenizer=tiny_tokenizer(vocab_size)).eval()


SAMPLE_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Functions are defined with the def keyword"]
"""Two short texts (prose and a line about code) that the tests of masks, backends and export feed a tiny model."""


def hook_state(model: Any) -> dict[str, list[int]]:
    """Every hook handle of every hook point, by identity: what "exactly the hook state found" means when a
    test checks that a mask or a collection left no hook behind."""
    return {name: [id(h) for h in hp.fwd_hooks] for name, hp in model.hook_dict.items()}


def reference_cbt_scores(model: Any, item: Any) -> list[float]:
    """Brute-force CBT option scores (the reference of ``snip_lens.evaluate.cbt_scores``): each full text
    tokenised piecewise as documented (BOS where the model takes one, context left-truncated to fit, question
    stem, option completion), one plain forward per option, the inverse perplexity of the scored tokens."""
    import math

    from .models import encode, prepends_bos

    before, after = item.question.split("XXXXX")
    space = " " if before.endswith(" ") else ""
    before = before[:-1] if space else before
    bos = [model.tokenizer.bos_token_id] if prepends_bos(model) else []
    ctx = encode(model, " ".join(item.context)) if item.context else []
    stem = encode(model, (" " if item.context else "") + before)
    comps = [encode(model, space + opt + after) for opt in item.options]
    budget = model.cfg.n_ctx - len(bos) - len(stem) - max(map(len, comps))
    ctx = ctx[max(0, len(ctx) - budget):]  # the documented left truncation
    out = []
    for comp in comps:
        ids = torch.tensor([bos + ctx + stem + comp])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids)[0, :-1], -1)
        nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]  # loss of tokens 1.. (token 0 has no prediction)
        n_scored = min(len(stem) + len(comp), len(nll))
        out.append(math.exp(-float(nll[len(nll) - n_scored:].mean())))
    return out
