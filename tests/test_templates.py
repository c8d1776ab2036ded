"""fastlaunch new: every template trains offline on 2 CPU ranks above chance; files are never clobbered."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO, run_fastlaunch
from fastlaunch.launcher.cli import main

# Validation accuracy a guess gets, and what one epoch must clearly beat.
CHANCE = {"minimal": (0.5, 0.75), "vision": (0.1, 0.5), "tabular": (0.63, 0.85), "text": (0.5, 0.75)}


def _last_accuracy(stdout: str) -> float:
    rows = re.findall(r"^\s*\d+\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+\d\d:\d\d", stdout.replace("\r", "\n"), re.M)
    assert rows, stdout[-2000:]
    return float(rows[-1])


# Each template's training runs once: as the script for two templates, as the notebook (a job) for the others.
RUN_AS = {"minimal": "train.py", "tabular": "train.py", "vision": "notebook.ipynb", "text": "notebook.ipynb"}


@pytest.mark.parametrize("template", list(CHANCE))
def test_new_project_trains_offline_above_chance(tmp_path, template):
    project = tmp_path / "proj"
    assert main(["new", str(project), "--template", template]) == 0
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "launch.yaml", "notebook.ipynb",
                                                         "test_smoke.py", "train.py"]
    doc = (project / "train.py").read_text().split('"""')[1]
    assert "fastlaunch --cpu 2 train.py" in doc and "fastlaunch --gpus 4" in doc and "fastlaunch slurm" in doc
    notebook = json.loads((project / "notebook.ipynb").read_text())
    code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    assert code[0] == "%load_ext fastlaunch\n%fastlaunch" and "def main()" in code[1] and code[2].endswith("main()")
    args = ["--epochs", "1"] if RUN_AS[template] == "train.py" else []
    proc = run_fastlaunch(["--cpu", "2", RUN_AS[template], *args], project, timeout=600,
                          env={"HF_HUB_OFFLINE": "1", "no_proxy": "*"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    chance, bar = CHANCE[template]
    assert _last_accuracy(proc.stdout) > bar > chance


def test_new_refuses_to_overwrite_and_force_touches_template_files_only(tmp_path, capsys):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "train.py").write_text("mine\n")
    (project / "notes.txt").write_text("keep\n")
    assert main(["new", str(project), "--template", "vision"]) == 2
    err = capsys.readouterr().err
    assert "already holds files of the template (got train.py)" in err and "HINT: " in err
    assert (project / "train.py").read_text() == "mine\n" and not (project / "README.md").exists()
    assert main(["new", str(project), "--template", "vision", "--force"]) == 0
    assert "small CNN" in (project / "train.py").read_text() and (project / "notes.txt").read_text() == "keep\n"


def test_unknown_template_is_a_hint_error(tmp_path, capsys):
    assert main(["new", str(tmp_path / "p"), "--template", "audio"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fastlaunch: error: unknown template (got audio). HINT: use one of: minimal, vision, tabular, text"
    assert not (tmp_path / "p").exists()


def test_templates_and_launch_configs_ship_in_the_wheel(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("fastlaunch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("fastlaunch/templates/vision/train.py", "fastlaunch/templates/_common/README.md",
                   "fastlaunch/launch_configs/slurm/job.sbatch", "fastlaunch/launch_configs/two_nodes.yaml"):
        assert needed in names
