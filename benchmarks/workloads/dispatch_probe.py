"""An independent count of syncs and collectives per steady-state training step, at torch's dispatcher.

fastlaunch's own sync counter wraps Tensor methods in Python; this probe shares nothing with fastlaunch.
A TorchDispatchMode, active from each steady step's before_batch to its last after_batch, sees every
operator torch runs on this thread: the scalar reads that wait for the device (`_local_scalar_dense`,
behind item(), float(), bool(); `nonzero`, `equal`), copies from a GPU to the host, and every c10d
collective (DDP's gradient all-reduce included, however it is issued). On CPU ranks a host copy is not an
operator, so `.cpu()`/`.tolist()` are seen on GPU ranks only; the scalar reads are seen on both.

A scalar read of a host tensor is no device wait: on GPU ranks a read of a CPU tensor, on CPU ranks one
issued from C++ inside autograd's engine (DDP's reducer reading its per-parameter counters under
static_graph; a Python hook's own read is issued from its own frame and still counts) is listed apart as a
host read, not counted as a sync.
"""
import sys
from collections import Counter

import torch
from fastai.basics import Callback
from torch.utils._python_dispatch import TorchDispatchMode

WARMUP = 3
_SCALAR_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::equal"}
_COPIES = {"aten::_to_copy", "aten::copy_"}
_MACHINERY = ("torch/_dynamo/", "torch/_compile.py", "torch/utils/_python_dispatch.py")


def _from_gpu_to_host(name: str, args, kwargs) -> bool:
    if name not in _COPIES:
        return False
    source = args[1] if name == "aten::copy_" and len(args) > 1 else (args[0] if args else None)
    target = args[0] if name == "aten::copy_" else kwargs.get("device")
    on_gpu = isinstance(source, torch.Tensor) and source.device.type == "cuda"
    to_host = (target.device.type if isinstance(target, torch.Tensor) else str(target or "")).startswith("cpu")
    return on_gpu and to_host


def _from_autograd_engine() -> bool:
    """Whether the operator was issued from C++ inside backward: the innermost Python frame, past the
    dispatch machinery, is autograd's engine call."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or any(m in frame.f_code.co_filename for m in _MACHINERY)):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_name == "_engine_run_backward"


class _Mode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: Counter = Counter()
        self.collectives: Counter = Counter()
        self.host_reads: Counter = Counter()
        self.on_gpu = False  # where the model trains, set by DispatchProbe

    def _host_read(self, args) -> bool:
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is None or tensor.device.type != "cpu":
            return False
        return self.on_gpu or _from_autograd_engine()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("c10d::"):
            self.collectives[name] += 1
        elif name in _SCALAR_READS and self._host_read(args):
            self.host_reads[f"{name} (host)"] += 1
        elif name in _SCALAR_READS or _from_gpu_to_host(name, args, kwargs):
            self.syncs[name] += 1
        return func(*args, **kwargs)


class _StepEnd(Callback):
    order = 10_000  # after every other after_batch callback

    def __init__(self, probe): self.probe = probe
    def after_batch(self): self.probe.end_step()


class DispatchProbe(Callback):
    """Counts, for steady training steps (the first WARMUP left out), the syncs and collectives the
    dispatcher sees on the main thread."""

    order = -1000

    def __init__(self, learn):
        self.mode, self.steps, self.active = _Mode(), 0, False
        learn.add_cbs([self, _StepEnd(self)])

    def before_batch(self):
        if self.training and self.iter >= WARMUP:
            self.mode.on_gpu = any(p.is_cuda for p in self.learn.model.parameters())
            self.active = True
            self.mode.__enter__()

    def end_step(self):
        if self.active:
            self.mode.__exit__(None, None, None)
            self.steps += 1
            self.active = False

    def per_step(self) -> dict:
        steps = max(self.steps, 1)
        return {"probe_steps": self.steps,
                "probe_syncs_per_step": sum(self.mode.syncs.values()) / steps,
                "probe_collectives_per_step": sum(self.mode.collectives.values()) / steps,
                "probe_host_reads_per_step": sum(self.mode.host_reads.values()) / steps,
                "probe_detail": {k: v / steps for k, v in
                                 (self.mode.syncs + self.mode.collectives + self.mode.host_reads).items()}}
