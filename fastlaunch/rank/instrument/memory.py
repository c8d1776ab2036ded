"""Memory of a rank: process RSS always; CUDA allocator stats and NVML device use on GPUs.

One torch.cuda.memory_stats() call per sample; NVML handles are found by the GPU's UUID, never by index
(CUDA_VISIBLE_DEVICES renumbers devices, NVML does not).
"""
from __future__ import annotations

import functools
import resource
from typing import Any

__all__ = ["sample", "open_nvml", "MB"]

MB = 2**20


def _cuda(stats: dict) -> dict:
    reserved = stats.get("reserved_bytes.all.current", 0)
    return {
        "cuda_allocated_mb": stats.get("allocated_bytes.all.current", 0) / MB,
        "cuda_reserved_mb": reserved / MB,
        "cuda_peak_allocated_mb": stats.get("allocated_bytes.all.peak", 0) / MB,
        "cuda_peak_reserved_mb": stats.get("reserved_bytes.all.peak", 0) / MB,
        "fragmentation": stats.get("inactive_split_bytes.all.current", 0) / reserved if reserved else 0.0,
        "alloc_retries": stats.get("num_alloc_retries", 0),
        "ooms": stats.get("num_ooms", 0),
    }


@functools.cache
def open_nvml(importer: Any = None) -> Any:
    """NVML (nvidia-ml-py) ready for use, or None when it is missing or the driver refuses: the CUDA
    figures are reported without the device's own view then. Initialised once per process."""
    try:
        if importer is None:
            import pynvml as nvml
        else:
            nvml = importer()
        nvml.nvmlInit()
    except Exception:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return None
    return nvml


def _nvml(torch_mod: Any, nvml: Any, index: int, own_reserved_mb: float) -> dict:
    try:
        uuid = str(torch_mod.cuda.get_device_properties(index).uuid)
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception:
        return {}
    used, total = info.used / MB, info.total / MB
    return {"gpu_used_mb": used, "gpu_total_mb": total, "gpu_others_mb": max(0.0, used - own_reserved_mb)}


def sample(device_type: str, index: int = 0, torch_mod: Any = None, nvml: Any = None, rss_bytes: int | None = None) -> dict:
    """One memory sample of this rank."""
    if rss_bytes is None:
        import psutil

        rss_bytes = psutil.Process().memory_info().rss
    # the kernel's high-water mark lags the current figure (it is updated at some events only): peak >= now
    rss_mb = rss_bytes / MB
    out = {"rss_mb": rss_mb, "peak_rss_mb": max(rss_mb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if device_type == "cuda":
        if torch_mod is None:
            import torch as torch_mod
        out.update(_cuda(torch_mod.cuda.memory_stats(index)))
        if nvml is not None:
            out.update(_nvml(torch_mod, nvml, index, out["cuda_reserved_mb"]))
    return out
