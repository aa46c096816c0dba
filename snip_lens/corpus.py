"""Text corpora for probing a model, cut into fixed-length token windows (input of SNIP step 1).

SNIP explains every MLP neuron from the text snippets that activate it most, read off a *probe* corpus;
the activation-statistics baseline (Pochinkov & Schoots 2024) compares a *forget* and a *retain* corpus.
This module turns any of these sources into documents, then into token windows:

- ``"code"``: the source files of CPython's standard library (offline, sorted by path, deterministic);
- ``"prose"``: the 79 English help topics of ``pydoc_data.topics`` (offline);
- a local ``.txt`` file: one document per blank-line-separated paragraph;
- a local ``.jsonl`` file: one document per line, read from the ``text_field`` of each JSON object;
- a local directory: every text file under it (any name or extension: ``README``, ``.c``, ``.js``,
  ``.html``, ``.rst``, ``.tex``, ...) is one document, every ``.jsonl`` file contributes one document per
  line (files in sorted path order). Binary files (a NUL byte in their first 8 KiB) are skipped with a
  warning, hidden files and folders (``.git``) are not read, and ``glob`` narrows the files read;
- ``"hf:NAME[:CONFIG]"``: a Hugging Face dataset (``datasets.load_dataset``), online only.

Windows are made by *packing*: the documents, in a seeded random order, are tokenised (no special tokens)
and joined by the tokens of a blank line into one stream, which is cut into windows of ``n_ctx`` tokens
(the first of them BOS when the model wants one; never for SmolLM2). Packing keeps short documents
(paragraphs, forget-set sentences) that per-document windows would drop. The order of the windows is
then shuffled by the same seed, so the same source, model and seed always give the same windows.
"""

from __future__ import annotations

import logging
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from . import models
from ._io import iter_jsonl

logger = logging.getLogger(__name__)

BUILTIN_SOURCES = {
    "code": "the source files of Python's standard library",
    "prose": "the English help topics of pydoc_data.topics",
}
"""Offline corpora that need no file and no network."""

BINARY_SNIFF_BYTES = 8192
"""Bytes read from the start of a file to tell text from binary (a NUL byte among them: binary, as git does)."""


@dataclass
class TokenWindows:
    """A corpus cut into fixed-length token windows, ready to be fed to the model in batches."""

    tokens: Int[Tensor, "window pos"]
    """Token ids of each window (BOS first when the model wants one)."""
    documents: list[int]
    """Index, in the list of documents, of the document the first text token of each window comes from."""
    name: str = ""
    """Name of the corpus (the source it was loaded from, or a role such as ``"forget"``)."""

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2:
            raise ValueError(f"TokenWindows.tokens must be 2-d [window, pos]; got shape {tuple(self.tokens.shape)}")
        if len(self.documents) != self.tokens.shape[0]:
            raise ValueError(
                f"TokenWindows has {self.tokens.shape[0]} windows but {len(self.documents)} document indices; "
                "give one document index per window"
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_ctx(self) -> int:
        """Tokens per window."""
        return int(self.tokens.shape[1])

    @property
    def n_tokens(self) -> int:
        """Total number of tokens over all windows."""
        return int(self.tokens.numel())

    def select(self, indices: list[int], name: str | None = None) -> "TokenWindows":
        """The windows at ``indices``, in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TokenWindows(self.tokens[idx].clone(), [self.documents[i] for i in indices],
                            self.name if name is None else name)

    def take(self, n: int) -> "TokenWindows":
        """The first ``n`` windows (all of them if there are fewer)."""
        if n < 0:
            raise ValueError(f"take(n) needs n >= 0; got {n}")
        return self.select(list(range(min(n, len(self))))) if n < len(self) else self

    def split(self, fraction: float, seed: int = 0) -> tuple["TokenWindows", "TokenWindows"]:
        """Split into two disjoint sets of windows; the first holds ``round(fraction * len)`` of them.

        The windows are assigned at random, reproducibly for a given ``seed``.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"split fraction must be strictly between 0 and 1; got {fraction}")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        n_first = round(fraction * len(self))
        if n_first == 0 or n_first == len(self):
            raise ValueError(
                f"splitting {len(self)} windows at fraction {fraction} leaves one side empty; "
                "use more windows or a fraction closer to 0.5"
            )
        first, second = sorted(order[:n_first]), sorted(order[n_first:])
        return self.select(first), self.select(second)


# ---- documents --------------------------------------------------------------------------------------


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ValueError(f"cannot read corpus file {str(path)!r}: {exc.strerror or exc}. "
                         "Check the path and its permissions.") from exc


def _is_binary(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return b"\0" in fh.read(BINARY_SNIFF_BYTES)
    except OSError as exc:
        raise ValueError(f"cannot read corpus file {str(path)!r}: {exc.strerror or exc}. "
                         "Check the path and its permissions.") from exc


def _directory_files(root: Path, glob: str | None) -> list[Path]:
    """Files under ``root`` in sorted relative-path order: all of them, or those ``glob`` matches.

    A pattern with a ``/`` is matched against the path relative to ``root`` (``docs/*.rst``,
    ``**/*.c``); one without is matched against file names at any depth (``*.c``).
    """
    if glob is None:
        found = root.rglob("*")
    else:
        found = root.glob(glob) if "/" in glob else root.rglob(glob)
    files = []
    for p in found:
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _directory_texts(root: Path, source: str, text_field: str, glob: str | None) -> list[str]:
    files = _directory_files(root, glob)
    texts: list[str] = []
    binary: list[str] = []
    for f in files:
        if _is_binary(f):
            binary.append(f.relative_to(root).as_posix())
            continue
        texts += _file_texts(f, text_field, in_directory=True)
    if binary:
        shown = ", ".join(binary[:5]) + (f" and {len(binary) - 5} more" if len(binary) > 5 else "")
        logger.warning("corpus directory %r: skipped %d binary file(s): %s", source, len(binary), shown)
    if not texts:
        what = f"files matching {glob!r}" if glob is not None else "files"
        extra = f" ({len(binary)} binary file(s) skipped)" if binary else ""
        raise ValueError(f"corpus directory {source!r} holds no text {what}{extra}; give a folder of text "
                         "files" + (" or another --glob" if glob is not None else ""))
    return texts


def _paragraphs(text: str) -> list[str]:
    paras: list[str] = []
    cur: list[str] = []
    for line in text.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            paras.append("\n".join(cur))
            cur = []
    if cur:
        paras.append("\n".join(cur))
    return paras


def _jsonl_texts(path: Path, text_field: str) -> list[str]:
    texts = []
    for lineno, obj in iter_jsonl(path, _read_text(path)):
        if not isinstance(obj, dict) or text_field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{str(path)!r} line {lineno} has no field {text_field!r} (it has {keys}); "
                             "name the field that holds the text with --text-field (API: text_field=)")
        texts.append(str(obj[text_field]))
    return texts


def _file_texts(path: Path, text_field: str, *, in_directory: bool) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_texts(path, text_field)
    if in_directory:
        return [_read_text(path)]
    if suffix in (".txt", ".md"):
        return _paragraphs(_read_text(path))
    if suffix == ".py":
        return [_read_text(path)]
    raise ValueError(f"unsupported corpus file {str(path)!r}: use a .txt file (one document per "
                     "blank-line-separated paragraph), a .jsonl file, or a directory")


def _hf_texts(spec: str, split: str, text_field: str, max_docs: int | None) -> list[str]:
    parts = spec.split(":")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    if not name:
        raise ValueError(f"corpus {('hf:' + spec)!r} names no dataset; write 'hf:NAME' or 'hf:NAME:CONFIG'")
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ValueError("corpus 'hf:...' needs the `datasets` package: pip install datasets") from exc
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - offline, missing dataset and bad split all land here
        raise ValueError(
            f"cannot load Hugging Face dataset {name!r} (config {config!r}, split {split!r}): {exc}. "
            "Loading 'hf:' corpora needs network access to the hub (or the dataset in the local HF cache); "
            "offline, use 'code', 'prose', or a local file or directory."
        ) from exc
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {text_field!r} (columns: {ds.column_names}); "
                         "pass text_field= one of them")
    n = len(ds) if max_docs is None else min(max_docs, len(ds))
    return [str(t) for t in ds.select(range(n))[text_field]]


def load_texts(source: str, *, split: str = "train", text_field: str = "text", max_docs: int | None = None,
               seed: int = 0, glob: str | None = None) -> list[str]:
    """The documents of ``source`` (see the module docstring for the accepted sources).

    ``glob`` (directories only) reads just the files it matches, e.g. ``"*.c"`` or ``"docs/**/*.rst"``.

    With ``max_docs``, a reproducible random subset of that many documents (chosen by ``seed``), kept in
    source order; Hugging Face datasets take their first ``max_docs`` rows instead (no full download).
    Raises ``ValueError`` naming the source when it cannot be read or holds no text.
    """
    if max_docs is not None and max_docs <= 0:
        raise ValueError(f"max_docs must be a positive number of documents or None; got {max_docs}")
    if not isinstance(source, str) or not source:
        raise ValueError(f"corpus source must be a non-empty string; got {source!r}. "
                         f"Use {', '.join(map(repr, BUILTIN_SOURCES))}, a file, a directory or 'hf:NAME'")
    texts: list[str]
    if source == "code":
        files = _stdlib_files()
        if max_docs is not None and max_docs < len(files):
            keep = sorted(random.Random(seed).sample(range(len(files)), max_docs))
            files = [files[i] for i in keep]
        texts = [_read_text(f) for f in files]
        # The stdlib ships a few test files of non-UTF-8 or binary bytes (encoding tests): not source text.
        from .checks import looks_binary

        texts = [t for t in texts if not looks_binary(t)]
        max_docs = None
    elif source == "prose":
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        texts = [topics[k] for k in sorted(topics)]
    elif source.startswith("hf:"):
        return _hf_texts(source[3:], split, text_field, max_docs)
    else:
        path = Path(source).expanduser()
        if glob is not None and not path.is_dir():
            raise ValueError(f"glob {glob!r} narrows a corpus directory, but {source!r} is not a directory; "
                             "drop the glob (--glob) or give a directory")
        if path.is_dir():
            texts = _directory_texts(path, source, text_field, glob)
        elif path.is_file():
            if _is_binary(path):
                raise ValueError(f"corpus file {source!r} is binary (it holds NUL bytes), not text; give a "
                                 "text file (.txt, .jsonl, ...) or a directory of them")
            texts = _file_texts(path, text_field, in_directory=False)
        elif path.exists():
            raise ValueError(f"corpus source {source!r} is neither a regular file nor a directory")
        else:
            raise ValueError(
                f"unknown corpus source {source!r}: not a built-in name ({', '.join(map(repr, BUILTIN_SOURCES))}), "
                "not an existing file or directory, and not 'hf:NAME[:CONFIG]'"
            )
    if max_docs is not None and max_docs < len(texts):
        keep = sorted(random.Random(seed).sample(range(len(texts)), max_docs))
        texts = [texts[i] for i in keep]
    if not any(t.strip() for t in texts):
        raise ValueError(f"corpus {source!r} holds no text ({len(texts)} empty documents)")
    return texts


# ---- windows ----------------------------------------------------------------------------------------


def make_windows(model: Any, texts: list[str], *, n_ctx: int = 128, max_windows: int | None = None,
                 seed: int = 0, name: str = "", max_doc_tokens: int | None = None) -> TokenWindows:
    """Tokenise ``texts`` and pack them into windows of ``n_ctx`` tokens (see the module docstring).

    Documents are taken in an order shuffled by ``seed``; with ``max_windows``, tokenisation stops as soon
    as enough tokens are in hand, so a large corpus costs only what is used. The incomplete tail of the
    stream is dropped, except when the whole corpus is shorter than one window: then it becomes a single,
    shorter window (with a warning). Empty documents are skipped; if all are empty, ``ValueError``.
    ``max_doc_tokens`` keeps only the first that many tokens of each document, so that a few long
    documents (a 6,000-token source file) cannot fill a small probe corpus on their own.
    """
    label = name or "<texts>"
    if isinstance(texts, str):
        raise ValueError(f"make_windows takes a list of documents, got a single string for corpus {label!r}; "
                         "wrap it in a list")
    if n_ctx < 2:
        raise ValueError(f"n_ctx must be at least 2 tokens; got {n_ctx}")
    if max_windows is not None and max_windows <= 0:
        raise ValueError(f"max_windows must be a positive number of windows or None; got {max_windows}")
    if max_doc_tokens is not None and max_doc_tokens <= 0:
        raise ValueError(f"max_doc_tokens must be a positive number of tokens or None; got {max_doc_tokens}")
    if not texts:
        raise ValueError(f"corpus {label!r} is empty (no documents); give at least one non-empty text")
    bos = models.prepends_bos(model)
    bos_id = model.tokenizer.bos_token_id
    body = n_ctx - 1 if bos else n_ctx  # text tokens per window
    sep = models.encode(model, "\n\n")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    need = None if max_windows is None else max_windows * body

    stream: list[int] = []
    owner: list[int] = []  # document index of every stream token
    n_empty = 0
    for i in order:
        ids = models.encode(model, texts[i]) if texts[i] else []
        if max_doc_tokens is not None:
            ids = ids[:max_doc_tokens]
        if not ids:
            n_empty += 1
            continue
        if stream:
            stream.extend(sep)
            owner.extend([owner[-1]] * len(sep))
        stream.extend(ids)
        owner.extend([i] * len(ids))
        if need is not None and len(stream) >= need:
            break
    if not stream:
        raise ValueError(f"corpus {label!r}: all {len(texts)} documents are shorter than one token; "
                         "give documents with text in them")
    if n_empty:
        logger.warning("corpus %r: skipped %d empty document(s)", label, n_empty)
    n_win = len(stream) // body
    if n_win == 0:
        logger.warning("corpus %r has only %d tokens, fewer than n_ctx=%d: using one window of %d tokens",
                       label, len(stream), n_ctx, len(stream) + int(bos))
        n_win, body = 1, len(stream)
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    flat = torch.tensor(stream[: n_win * body], dtype=torch.long).view(n_win, body)  # (window, body)
    if bos:
        flat = torch.cat([torch.full((n_win, 1), int(bos_id), dtype=torch.long), flat], dim=1)
    docs = [owner[w * body] for w in range(n_win)]
    perm = list(range(n_win))
    random.Random(seed + 1).shuffle(perm)
    return TokenWindows(flat[torch.tensor(perm)].contiguous(), [docs[p] for p in perm], name)


def load_corpus(model: Any, source: str, *, n_ctx: int = 128, max_windows: int | None = None, seed: int = 0,
                split: str = "train", text_field: str = "text", max_docs: int | None = None,
                name: str | None = None, max_doc_tokens: int | None = None, glob: str | None = None) -> TokenWindows:
    """``load_texts`` then ``make_windows``: a source name or path straight to token windows."""
    texts = load_texts(source, split=split, text_field=text_field, max_docs=max_docs, seed=seed, glob=glob)
    return make_windows(model, texts, n_ctx=n_ctx, max_windows=max_windows, seed=seed,
                        name=source if name is None else name, max_doc_tokens=max_doc_tokens)
