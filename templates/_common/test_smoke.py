"""Smoke test: one short epoch of train.py on 2 CPU ranks through fastlaunch."""
import subprocess
import sys
from pathlib import Path


def test_trains_one_epoch_on_two_cpu_ranks(tmp_path):
    here = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-m", "fastlaunch", "--cpu", "2", "--run-dir", str(tmp_path / "run"),
                           str(here / "train.py"), "--epochs", "1"], cwd=here, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train_loss" in proc.stdout
