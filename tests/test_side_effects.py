"""Importing or running snip_lens leaves the user's process as it found it (umask, torch's thread count)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# A fresh interpreter, so that no earlier import of snip_lens hides an import-time side effect. Calls to the
# process-wide setters are recorded with the file that made them; only calls from snip_lens count.
_CHILD = textwrap.dedent("""
    import json, os, sys, traceback
    import torch

    calls = []

    def recorder(name, real):
        def wrapped(*args):
            frame = traceback.extract_stack()[-2]
            calls.append([name, frame.filename, frame.lineno])
            return real(*args)
        return wrapped

    os.umask = recorder("os.umask", os.umask)
    torch.set_num_threads = recorder("torch.set_num_threads", torch.set_num_threads)
    real_umask = os.umask
    real_umask(0o027)
    before_threads = torch.get_num_threads()
    calls.clear()

    import importlib, pkgutil
    import snip_lens
    for mod in pkgutil.walk_packages(snip_lens.__path__, "snip_lens."):
        importlib.import_module(mod.name)
    from snip_lens.collect import collect
    from snip_lens.corpus import make_windows
    from snip_lens.embed import LocalEmbedder
    from snip_lens.testing import tiny_model
    model = tiny_model("llama", n_layers=2, d_model=32, d_mlp=32)
    tw = make_windows(model, ["some text to read " * 40, "and another document " * 40], n_ctx=16, name="t")
    collect(model, tw, top_k=3, context=(2, 1), n_random=2, progress=False)
    emb = LocalEmbedder(num_threads=1, progress=False)
    emb.embed(["a sentence", "another one"])
    print(json.dumps({"calls": [c for c in calls if os.sep + "snip_lens" + os.sep in c[1]],
                      "umask": real_umask(0o027), "threads": torch.get_num_threads(),
                      "threads_before": before_threads}))
""")


def test_importing_and_running_leaves_umask_and_threads_alone():
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["umask"] == 0o027
    assert got["threads"] == got["threads_before"]
    # The embedder's explicit num_threads is the one allowed setter: set for its call, then restored.
    unexpected = [c for c in got["calls"] if not (c[0] == "torch.set_num_threads" and c[1].endswith("embed.py"))]
    assert unexpected == [], unexpected
