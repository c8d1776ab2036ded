"""Two "nodes" on one machine: two fastlaunch processes, one CPU rank each, world size 2."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from conftest import SCRIPTS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_one_script_as_world_size_two(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    port = _free_port()
    env = {**os.environ, "FL_PROBE_OUT": str(out)}
    nodes = [subprocess.Popen([sys.executable, "-m", "fastlaunch", "--nnodes", "2", "--node-rank", str(r),
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--cpu", "1", str(SCRIPTS / "fastai_probe.py")],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    results = [n.communicate(timeout=240) for n in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert "this is node 0" in results[0][1] and "this is node 1" in results[1][1]
    assert results[0][0].count("train_loss") == 1 and "train_loss" not in results[1][0]  # rank 0 is on node 0
    r0, r1 = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert r0["weights"] == r1["weights"]
    assert r0["valid_split"] == r1["valid_split"]  # one seed for both nodes without --seed
    for epoch in range(2):
        a, b = set(r0["seen"][epoch]), set(r1["seen"][epoch])
        assert not a & b and a | b == set(r0["train_split"])


def test_rank_zeros_node_reports_the_whole_world_and_names_a_slow_rank_on_the_other_node(tmp_path):
    port = _free_port()
    env = {**os.environ, "FL_PROBE_OUT": str(tmp_path), "FL_MODE": "slow1"}  # rank 1 (node 1) sleeps per batch
    nodes = [subprocess.Popen([sys.executable, "-m", "fastlaunch", "--nnodes", "2", "--node-rank", str(r),
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--cpu", "1", "--run-dir", "job",
                               str(SCRIPTS / "instrument_probe.py")],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    results = [n.communicate(timeout=240) for n in nodes]
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stdout[-2000:] + stderr[-2000:]
    report = json.loads((tmp_path / "job" / "node0" / "report.json").read_text())
    assert report["world_size"] == 2 and report["ranks"] == [0, 1] and report["missing"] == []
    assert (tmp_path / "job" / "node0" / "metrics" / "rank1.jsonl").exists()  # node 1's records, sent to rank 0
    stragglers = [d for d in report["diagnoses"] if "slower than the median" in d]
    assert len(stragglers) == 1 and stragglers[0].startswith("rank 1 steps"), report["diagnoses"]
    assert "rank 1 steps" in results[0][1]  # said on node 0's console
    local = json.loads((tmp_path / "job" / "node1" / "report.json").read_text())  # node 1 keeps its own view
    assert local["ranks"] == [1] and local["missing"] == []
