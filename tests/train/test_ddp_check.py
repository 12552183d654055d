"""``benchmarks/ddp_check.py`` (issue 12's equal-loss and scaling script) on CPU with gloo: two
processes with the global batch split give the one-process losses, and the row says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo is exercised on Linux")


@pytest.mark.slow
def test_ddp_check_on_cpu_equal_losses(tmp_path):
    out = tmp_path / "ddp.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ddp_check.py"), "--device", "cpu", "--procs", "2",
                        "--d-model", "32", "--layers", "1", "--heads", "2", "--length", "32", "--batch", "4",
                        "--steps", "3", "--skip", "1", "transformer_pp", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ok"] and row["steps_compared"] == 3
    assert row["max_abs_loss_diff"] <= 1e-4
    assert len(row["loss_1"]) == len(row["loss_2"]) == 3


def test_ddp_check_refuses_a_batch_the_processes_cannot_split():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ddp_check.py"), "--procs", "3", "--batch", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "multiple of --procs" in r.stderr
