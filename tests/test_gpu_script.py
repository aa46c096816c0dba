"""benchmarks/gpu.py keeps working: its CPU run (accelerator code path forced) passes on a tiny random model."""

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("snip_gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_runs_on_cpu_and_passes(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = _load().main(["--device", "cpu", "--random-weights", "tiny", "--dtype", "bf16", "--windows", "6",
                           "--n-ctx", "24", "--batch-size", "3", "--repeats", "1", "--out", str(tmp_path / "g.json")])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "all checks passed" in out and "collection" in out and "lm_metrics" in out
    res = json.loads((tmp_path / "g.json").read_text())
    assert res["ok"] and res["collect_check"]["positions_clear"] > 0 and res["mask_check"]["restored_exactly"]
    # the reference is the CPU in the same dtype; bf16's drift from float32 is reported beside it
    assert "both bfloat16" in out and res["dtype_drift_from_float32"]["positions_clear"] > 0
    assert res["performance"]["collect_tokens_per_s"] > 0


def test_gpu_check_refuses_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        return
    assert _load().main(["--device", "cuda", "--random-weights", "tiny"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
