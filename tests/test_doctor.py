"""fastlaunch doctor: this machine for real, GPU findings with fakes of torch.cuda and NVML, the dry run."""
from __future__ import annotations

import json
import subprocess
import sys
import types

import torch

from conftest import SCRIPTS, run_fastlaunch
from fastlaunch.tools.doctor import check_cuda, check_gpu_memory, exit_status
from fastlaunch.tools.dryrun import first_unexportable


def fake_torch(cuda="12.4", count=2, capability=(9, 0), names=("H100",)):
    return types.SimpleNamespace(
        version=types.SimpleNamespace(cuda=cuda),
        cuda=types.SimpleNamespace(device_count=lambda: count, get_device_name=lambda i: names[i % len(names)],
                                   get_device_capability=lambda i: capability,
                                   nccl=types.SimpleNamespace(version=lambda: (2, 21, 5))))


class FakeNvml:
    def __init__(self, count=2, driver=12040, procs=(), fail=False):
        self.count, self.driver, self.procs, self.fail = count, driver, procs, fail

    def nvmlInit(self):
        if self.fail:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self): return self.count
    def nvmlSystemGetCudaDriverVersion(self): return self.driver
    def nvmlDeviceGetHandleByIndex(self, i): return i
    def nvmlDeviceGetComputeRunningProcesses(self, handle): return list(self.procs) if handle == 0 else []


def _topics(findings, level=None):
    return [(f.topic, f.message) for f in findings if level is None or f.level == level]


def test_cpu_only_build_while_nvml_sees_gpus():
    found = check_cuda({}, fake_torch(cuda=None), FakeNvml(count=4))
    assert found[0].level == "warn" and "CPU-only build, but the driver sees 4 GPU(s)" in found[0].message
    assert "CUDA build of torch" in found[0].fix


def test_driver_older_than_torch_needs_is_an_error():
    found = check_cuda({}, fake_torch(cuda="13.0", count=0), FakeNvml(count=2, driver=12040))
    assert found[-1].level == "error" and "driver supports CUDA 12.4, this torch needs CUDA 13.0" in found[-1].message
    assert exit_status(found) == 1


def test_memory_held_by_another_process():
    proc = types.SimpleNamespace(pid=4242, usedGpuMemory=3 * 1024**3)
    found = check_gpu_memory(FakeNvml(procs=[proc]))
    assert _topics(found, "warn") == [("gpu memory", "GPU 0: pid 4242 holds 3.0 GiB")]


def test_bf16_unsupported_and_hidden_or_mismatched_cuda():
    found = check_cuda({"CUDA_HOME": "/usr/local/cuda-11.8"}, fake_torch(capability=(7, 5), names=("T4",)), FakeNvml())
    messages = " | ".join(f.message for f in found)
    assert "GPU 0 (T4) has no bf16" in messages and "CUDA_HOME points at CUDA 11.8" in messages
    assert "2 GPU(s): T4, T4" in messages and "NCCL 2.21.5" in messages
    hidden = check_cuda({"CUDA_VISIBLE_DEVICES": ""}, fake_torch(count=0), FakeNvml())
    assert "hides every GPU" in hidden[0].message


def test_no_driver_is_said_plainly():
    found = check_cuda({}, fake_torch(count=0), FakeNvml(fail=True))
    assert found[-1].level == "info" and "no NVIDIA driver found" in found[-1].message


def test_doctor_on_this_machine_and_its_json(tmp_path):
    human = run_fastlaunch(["doctor"], tmp_path, timeout=120)
    assert human.returncode == 0, human.stderr
    as_json = run_fastlaunch(["doctor", "--json"], tmp_path, timeout=120)
    data = json.loads(as_json.stdout)
    assert data["exit_status"] == 0
    topics = [f["topic"] for f in data["findings"]]
    assert {"torch", "fastai", "cuda", "cpu", "shm", "port"} <= set(topics)
    for f in data["findings"]:  # the same findings, in both forms
        assert f"{f['topic']}: {f['message']}" in human.stdout
    if torch.cuda.device_count() == 0:
        cuda = next(f for f in data["findings"] if f["topic"] == "cuda")
        assert cuda["level"] in ("info", "warn") and ("no" in cuda["message"] or "hides" in cuda["message"])


def test_dry_run_names_the_module_that_does_not_export(tmp_path):
    proc = run_fastlaunch(["doctor", SCRIPTS / "unexportable.py"], tmp_path, timeout=180)
    assert "first module that does not export: 1 (Gate)" in proc.stdout, proc.stdout + proc.stderr
    assert "placement: model on cpu, batch on cpu" in proc.stdout
    assert "stopped after one training batch" in proc.stdout
    assert "torch.jit.script" not in proc.stdout + proc.stderr  # dependency noise the user cannot act on


def test_dependency_noise_is_filtered_and_nothing_else():
    code = ("import warnings, numpy as np, torch\n"
            "from fastlaunch.quiet import quiet_dependency_warnings\n"
            "quiet_dependency_warnings()\n"
            "a = np.zeros(3); a.flags.writeable = False; torch.as_tensor(a)\n"
            "warnings.warn('`torch.jit.script` is deprecated. Please switch', FutureWarning)\n"
            "warnings.warn('the script speaks', UserWarning)\n")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "not writable" not in proc.stderr and "torch.jit.script" not in proc.stderr
    assert "the script speaks" in proc.stderr


def test_an_exportable_model_passes():
    ok, module, _ = first_unexportable(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()),
                                       (torch.randn(4, 3),))
    assert ok and module is None
