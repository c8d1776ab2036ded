"""The small device layer: how many GPUs are usable and why not, cores, a rank's device.

Every GPU question goes through here so that tests can answer it with fakes on a CPU machine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["GpuProbe", "probe_gpus", "bf16_supported", "usable_cores", "rank_device"]


@dataclass(frozen=True)
class GpuProbe:
    """How many CUDA devices torch can use here, and in plain words why none when zero."""

    count: int
    reason: str = ""


def _nvml_device_count(nvml: Any) -> tuple[int | None, str]:
    """GPUs the NVIDIA driver sees (None when NVML is absent or the driver is not loaded)."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]  # provided by nvidia-ml-py
        except ImportError:
            return None, "nvidia-ml-py is not installed"
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None, f"no NVIDIA driver found ({exc})"
    try:
        return int(nvml.nvmlDeviceGetCount()), ""
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass


def probe_gpus(environ: Mapping[str, str] | None = None, torch_mod: Any = None, nvml: Any = None) -> GpuProbe:
    """Count the CUDA devices torch can use; explain a zero (CPU-only build, hidden, no driver)."""
    if environ is None:
        from .env import launcher_environ

        environ = launcher_environ()
    if torch_mod is None:
        import torch as torch_mod
    cuda_version = getattr(torch_mod.version, "cuda", None)
    if not cuda_version:
        return GpuProbe(0, f"this torch ({torch_mod.__version__}) is a CPU-only build")
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return GpuProbe(0, f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU")
    try:
        count = int(torch_mod.cuda.device_count())
    except Exception as exc:  # a broken driver can raise here
        count, error = 0, str(exc)
    else:
        error = ""
    if count > 0:
        return GpuProbe(count)
    driver_count, why = _nvml_device_count(nvml)
    if driver_count is None:
        return GpuProbe(0, why)
    if driver_count > 0:
        return GpuProbe(0, f"the driver sees {driver_count} GPU(s) but torch (CUDA {cuda_version}) cannot use them"
                           f"{': ' + error if error else ''}; the driver may be older than CUDA {cuda_version} needs")
    return GpuProbe(0, "the NVIDIA driver reports no GPU")


def bf16_supported(torch_mod: Any = None) -> bool:
    """Whether every visible GPU supports bf16 (asked only when GPUs and bf16 are both in play)."""
    if torch_mod is None:
        import torch as torch_mod
    try:
        return all(torch_mod.cuda.get_device_capability(i)[0] >= 8 for i in range(torch_mod.cuda.device_count()))
    except Exception:
        return False


def usable_cores() -> int:
    """Cores this process may run on (respects Slurm and cgroup CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def rank_device(device_type: str, local_rank: int, torch_mod: Any = None) -> Any:
    """Select and return this rank's torch.device: its own GPU by LOCAL_RANK, or the CPU."""
    if torch_mod is None:
        import torch as torch_mod
    if device_type == "cuda":
        torch_mod.cuda.set_device(local_rank)
        return torch_mod.device("cuda", local_rank)
    return torch_mod.device("cpu")
