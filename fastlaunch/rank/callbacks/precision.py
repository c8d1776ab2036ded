"""Mixed precision on the rank's own device: fastai's MixedPrecision hard-codes autocast('cuda').

Rule: a script's own to_fp16()/to_bf16() wins over `--precision`; a conflict is reported once on
rank 0; a Learner never carries two MixedPrecision callbacks. Loaded only with fastai's fp16 module (the
script's to_fp16, or --precision): see asked_precision.py.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastcore.foundation import L

from ...errors import UsageError

__all__ = ["DevicePrecision", "use_script_precision", "bf16_check", "rnns_outside_autocast"]


def bf16_check(device_type: str, supported=None) -> None:
    """bf16 asked on a GPU without bf16 support: a clear error before any training."""
    if device_type != "cuda":
        return
    ok = torch.cuda.is_bf16_supported() if supported is None else supported
    if not ok:
        raise UsageError("this GPU does not support bf16", torch.cuda.get_device_name(),
                         "use --precision fp16 (or to_fp16() in the script) on this GPU")


def _as_fp32(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x


def rnns_outside_autocast(model, device_type: str) -> list:
    """CPU autocast sends nn.LSTM/GRU/RNN to oneDNN's low-precision RNN primitive, which most CPUs lack
    (fp16 almost everywhere, bf16 without AVX512-BF16): "could not create a primitive descriptor for the
    LSTM forward propagation primitive". On CPU every RNN runs outside autocast, in fp32, as it does in
    one process (fastai's own MixedPrecision autocasts nothing on CPU). Returns the hook handles."""
    if device_type != "cpu":
        return []
    handles = []
    for module in model.modules():
        if not isinstance(module, nn.RNNBase):
            continue
        entered: list = []

        def before(mod, args, kwargs, _entered=entered):
            off = torch.autocast("cpu", enabled=False)
            off.__enter__()
            _entered.append(off)
            return tree_map(_as_fp32, args), tree_map(_as_fp32, kwargs)

        def after(mod, args, output, _entered=entered):
            if _entered:
                _entered.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, always_call=True))  # also when forward raises
    return handles


class DevicePrecision(MixedPrecision):
    """fastai's MixedPrecision with autocast and GradScaler for the device the model is on."""

    @property
    def name(self):
        return "mixed_precision"  # where fastai looks for it (load_learner, to_fp32)

    def before_fit(self):
        param = next(self.learn.model.parameters(), None)
        device_type = param.device.type if param is not None else "cpu"
        bf16 = AMPMode(self.amp_mode) == AMPMode.BF16
        if bf16:
            bf16_check(device_type)
        dtype = torch.bfloat16 if bf16 else torch.float16
        self.kwargs["enabled"] = dtype == torch.float16  # bf16 has fp32's range: no scaler needed
        self.autocast = torch.autocast(device_type, dtype=dtype)
        self.learn.scaler = torch.amp.GradScaler(device_type, **self.kwargs)
        self.scales = L()
        self._rnn_hooks = rnns_outside_autocast(self.learn.model, device_type)

    def after_fit(self):
        for handle in getattr(self, "_rnn_hooks", ()):
            handle.remove()
        self._rnn_hooks = []
        super().after_fit()


def _precision_of(cb) -> str:
    return AMPMode(cb.amp_mode).value


def use_script_precision(ctx, learn, cb: MixedPrecision):
    """The script asked for a precision: it replaces any other, and a differing --precision is reported."""
    asked = ctx.env.precision
    if asked not in ("no", _precision_of(cb)):
        ctx.say(f"fastlaunch: the script sets {_precision_of(cb)} itself and --precision {asked} was given: "
                f"the script's {_precision_of(cb)} is used")
    learn.remove_cbs([c for c in learn.cbs if isinstance(c, MixedPrecision)])
    learn.add_cb(cb)
    return learn
