"""The device layer, answered by fakes of torch and NVML."""
from __future__ import annotations

import types

import pytest
import torch

from fastlaunch.device import probe_gpus, rank_device, usable_cores


def fake_torch(cuda="12.4", count=0, raises=None):
    def device_count():
        if raises:
            raise RuntimeError(raises)
        return count
    return types.SimpleNamespace(__version__="2.9.0", version=types.SimpleNamespace(cuda=cuda),
                                 cuda=types.SimpleNamespace(device_count=device_count))


class FakeNvml:
    def __init__(self, count=None, init_error=None):
        self.count, self.init_error, self.shut = count, init_error, False

    def nvmlInit(self):
        if self.init_error:
            raise RuntimeError(self.init_error)

    def nvmlDeviceGetCount(self): return self.count
    def nvmlShutdown(self): self.shut = True


def test_gpus_found():
    assert probe_gpus({}, fake_torch(count=4), FakeNvml(4)).count == 4


def test_cpu_only_build():
    probe = probe_gpus({}, fake_torch(cuda=None), FakeNvml(8))
    assert probe.count == 0 and "CPU-only build" in probe.reason


@pytest.mark.parametrize("value", ["", "-1", " "])
def test_hidden_by_cuda_visible_devices(value):
    probe = probe_gpus({"CUDA_VISIBLE_DEVICES": value}, fake_torch(count=0), FakeNvml(2))
    assert probe.count == 0 and "CUDA_VISIBLE_DEVICES" in probe.reason and "hides every GPU" in probe.reason


def test_no_driver():
    probe = probe_gpus({}, fake_torch(count=0), FakeNvml(init_error="Driver Not Loaded"))
    assert probe.count == 0 and probe.reason == "no NVIDIA driver found (Driver Not Loaded)"


def test_driver_sees_gpus_torch_cannot_use():
    nvml = FakeNvml(2)
    probe = probe_gpus({}, fake_torch(cuda="13.0", raises="CUDA driver version is insufficient"), nvml)
    assert probe.count == 0 and "driver sees 2 GPU(s)" in probe.reason and "insufficient" in probe.reason
    assert nvml.shut


def test_this_machine_answers_without_a_gpu():
    probe = probe_gpus()
    if torch.cuda.device_count() == 0:
        assert probe.count == 0 and probe.reason
    else:
        assert probe.count == torch.cuda.device_count()


def test_cores_and_cpu_device():
    assert usable_cores() >= 1
    assert rank_device("cpu", 3) == torch.device("cpu")


def test_cuda_device_selected_by_local_rank():
    chosen = []
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(set_device=chosen.append), device=torch.device)
    assert rank_device("cuda", 3, fake) == torch.device("cuda", 3)
    assert chosen == [3]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() == 0, reason="needs a CUDA device; none is visible here")
def test_real_gpu_probe():
    assert probe_gpus().count == torch.cuda.device_count()
