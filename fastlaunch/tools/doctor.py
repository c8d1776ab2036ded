"""`fastlaunch doctor`: what on this machine helps or breaks distributed fastai, each finding with a fix.

Every check takes what it reads (torch, NVML, the environment) as arguments, so that GPU findings are
tested with fakes on a machine without a GPU.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from ..advice import loader_workers, workers_reason
from ..env import launcher_environ

__all__ = ["Finding", "check_versions", "check_cuda", "check_gpu_memory", "check_cpu", "check_shm", "check_port",
           "check_slurm", "run_checks", "exit_status"]

GiB = 1024**3


@dataclass(frozen=True)
class Finding:
    """One thing the doctor found: level is ok, info, warn or error (an error breaks a launch)."""

    level: str
    topic: str
    message: str
    fix: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def check_versions(versions: Mapping[str, str | None] | None = None) -> list[Finding]:
    """torch, fastai and accelerate installed, and in the ranges fastlaunch is built for."""
    versions = versions or {name: _version(name) for name in ("torch", "fastai", "accelerate")}
    out = []
    for name, minimum in (("torch", (2, 4)), ("fastai", (2, 8)), ("accelerate", (0, 30))):
        found = versions.get(name)
        if found is None:
            out.append(Finding("error", name, f"{name} is not installed", f"pip install '{name}'"))
            continue
        numbers = tuple(int(p) for p in re.findall(r"\d+", found)[:2])
        if numbers < minimum:
            out.append(Finding("warn", name, f"{name} {found} is older than fastlaunch supports",
                               f"pip install '{name}>={'.'.join(map(str, minimum))}'"))
        else:
            out.append(Finding("ok", name, f"{name} {found}"))
    return out


def _cuda_from_path(text: str) -> str | None:
    match = re.search(r"cuda[-_/]?(\d+\.\d+)", text)
    return match.group(1) if match else None


def _nvml_gpus(nvml: Any) -> tuple[int | None, str | None]:
    """(GPUs the driver sees, the CUDA version the driver supports), or (None, None) without a driver."""
    if nvml is None:
        return None, None
    try:
        nvml.nvmlInit()
    except Exception:
        return None, None
    try:
        count = int(nvml.nvmlDeviceGetCount())
        driver = int(nvml.nvmlSystemGetCudaDriverVersion())
        return count, f"{driver // 1000}.{driver % 1000 // 10}"
    except Exception:
        return None, None


def check_cuda(environ: Mapping[str, str], torch_mod: Any, nvml: Any) -> list[Finding]:
    """Whether torch can use a GPU here, and if not, why."""
    out: list[Finding] = []
    built = getattr(torch_mod.version, "cuda", None)
    driver_count, driver_cuda = _nvml_gpus(nvml)
    if not built:
        if driver_count:
            out.append(Finding("warn", "cuda", f"this torch is a CPU-only build, but the driver sees {driver_count} "
                               "GPU(s)", "install a CUDA build of torch (see pytorch.org for the index URL)"))
        else:
            out.append(Finding("info", "cuda", "no GPU: this torch is a CPU-only build; fastlaunch runs CPU ranks",
                               "nothing to do for CPU ranks (--cpu N)"))
        return out
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        out.append(Finding("warn", "cuda", f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU",
                           "unset CUDA_VISIBLE_DEVICES, or list the GPUs to use"))
    for var in ("CUDA_HOME", "LD_LIBRARY_PATH"):
        other = _cuda_from_path(environ.get(var, ""))
        if other and other.split(".")[0] != built.split(".")[0]:
            out.append(Finding("warn", "cuda", f"{var} points at CUDA {other}; this torch was built for CUDA {built}",
                               f"unset {var} or point it at CUDA {built}"))
    try:
        count = int(torch_mod.cuda.device_count())
    except Exception:
        count = 0
    if count == 0:
        if driver_count is None:
            out.append(Finding("info", "cuda", "no NVIDIA driver found: no usable GPU here; fastlaunch runs CPU ranks",
                               "on a GPU machine, install the NVIDIA driver"))
        elif driver_count and driver_cuda and tuple(map(int, driver_cuda.split("."))) < \
                tuple(map(int, built.split(".")[:2])):
            out.append(Finding("error", "cuda", f"the driver supports CUDA {driver_cuda}, this torch needs CUDA {built}",
                               f"update the NVIDIA driver, or install a torch built for CUDA {driver_cuda}"))
        elif driver_count:
            out.append(Finding("warn", "cuda", f"the driver sees {driver_count} GPU(s) but torch cannot use them",
                               "check the driver with nvidia-smi and reinstall torch"))
        return out
    names = [torch_mod.cuda.get_device_name(i) for i in range(count)]
    out.append(Finding("ok", "cuda", f"{count} GPU(s): {', '.join(names)} (torch built for CUDA {built}"
                       + (f", driver supports {driver_cuda})" if driver_cuda else ")")))
    for i, name in enumerate(names):
        if torch_mod.cuda.get_device_capability(i)[0] < 8:
            out.append(Finding("info", "bf16", f"GPU {i} ({name}) has no bf16", "use --precision fp16 on it"))
    try:
        nccl = ".".join(map(str, torch_mod.cuda.nccl.version()))
        out.append(Finding("ok", "nccl", f"NCCL {nccl}"))
    except Exception:
        out.append(Finding("warn", "nccl", "this torch has no NCCL: GPU ranks cannot talk", "install a CUDA build of torch"))
    return out


def check_gpu_memory(nvml: Any) -> list[Finding]:
    """GPU memory held by other processes (they shrink what training can use)."""
    out: list[Finding] = []
    try:
        nvml.nvmlInit()
        count = nvml.nvmlDeviceGetCount()
    except Exception:
        return out
    for i in range(count):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        try:
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except Exception:
            continue
        for proc in procs:
            used = (getattr(proc, "usedGpuMemory", 0) or 0) / GiB
            if proc.pid != os.getpid():
                out.append(Finding("warn", "gpu memory", f"GPU {i}: pid {proc.pid} holds {used:.1f} GiB",
                                   "stop that process, or leave this GPU out with CUDA_VISIBLE_DEVICES"))
    return out


def check_cpu(cores: int, ranks: int) -> list[Finding]:
    """Cores against ranks and DataLoader workers."""
    per_rank = max(1, cores // max(1, ranks))
    level = "warn" if cores < ranks else "info"
    return [Finding(level, "cpu", f"{cores} usable core(s) for {ranks} rank(s): {workers_reason(per_rank)}",
                    f"use num_workers={loader_workers(per_rank)} per DataLoader "
                    f"(fastlaunch sets defaults.cpus={per_rank})")]


def check_shm(statvfs: Callable[[str], Any] = os.statvfs) -> list[Finding]:
    """DataLoader workers pass batches through /dev/shm."""
    try:
        st = statvfs("/dev/shm")
    except OSError:
        return [Finding("warn", "shm", "/dev/shm is missing", "DataLoader workers need it: mount a tmpfs there")]
    size = st.f_frsize * st.f_blocks / GiB
    if size < 1:
        return [Finding("warn", "shm", f"/dev/shm is {size:.2f} GiB", "give it more (docker: --shm-size=8g), or "
                        "use num_workers=0")]
    return [Finding("ok", "shm", f"/dev/shm is {size:.1f} GiB")]


def check_port() -> list[Finding]:
    """fastlaunch binds its rendezvous on 127.0.0.1 port 0; the conventional 29500 may be taken."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 0))
        except OSError as err:
            return [Finding("error", "port", f"cannot listen on 127.0.0.1 ({err.strerror})",
                            "check the loopback interface")]
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 29500))
            return [Finding("ok", "port", "a free rendezvous port is available (29500 is free too)")]
        except OSError:
            return [Finding("info", "port", "port 29500 is in use", "leave --port out: fastlaunch takes a free one")]


def check_slurm(environ: Mapping[str, str], gpus: int, which: Callable[[str], str | None] = shutil.which) -> list:
    """A Slurm login node has the tools but no GPUs: jobs belong on the compute nodes."""
    if which("sbatch") and not environ.get("SLURM_JOB_ID") and gpus == 0:
        return [Finding("info", "slurm", "Slurm is installed but this is not a job, and it has no GPU "
                        "(a login node?)", "render a job with `fastlaunch slurm ... > job.sbatch` and sbatch it")]
    return []


def run_checks(environ: Mapping[str, str] | None = None, torch_mod: Any = None, nvml: Any = None,
               cores: int | None = None) -> list[Finding]:
    """Every check, on this machine unless told otherwise."""
    environ = launcher_environ() if environ is None else environ
    if torch_mod is None:
        import torch as torch_mod
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError:
            nvml = None
    if cores is None:
        from ..device import usable_cores

        cores = usable_cores()
    try:
        gpus = int(torch_mod.cuda.device_count()) if getattr(torch_mod.version, "cuda", None) else 0
    except Exception:
        gpus = 0
    findings = check_versions() + check_cuda(environ, torch_mod, nvml)
    if nvml is not None and gpus:
        findings += check_gpu_memory(nvml)
    findings += check_cpu(cores, gpus or 2) + check_shm() + check_port() + check_slurm(environ, gpus)
    return findings


def exit_status(findings: list[Finding]) -> int:
    """1 when a finding breaks a launch, else 0."""
    return 1 if any(f.level == "error" for f in findings) else 0
