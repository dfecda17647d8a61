"""bench/gpu_check.py is the one command for the day a GPU is lent: its plumbing (server per mode, graph, report
parsing) is run here on the CPU with the tiny model, so it works when that day comes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_run_passes_and_reports(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    assert gpu_check.main(["--smoke", "--work-dir", str(tmp_path)]) == 0
    report = json.loads((ROOT / "bench" / "out" / "gpu_check_smoke.json").read_text())
    runs = {r["run"]: r for r in report["results"]}
    assert set(runs) == set(gpu_check.RUNS)
    legacy = runs.pop("legacy")
    assert legacy["ok"] is True and legacy["s_per_it"] > 0, legacy
    assert "trained 2 steps" in legacy["report"] and "trained on cpu in fp32" in legacy["report"]
    assert all(r["skipped"] == "smoke runs one mode" for r in runs.values())


def test_gpu_check_without_cuda_says_so(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_check would run for real")
    assert gpu_check.main([]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
