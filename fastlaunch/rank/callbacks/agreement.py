"""Agreed stops: where fastai's events meet the stop channel (stopchannel.py states the protocol).

A cancel (CancelFit/Epoch/TrainException) raised by any callback on any rank is held as a request by
the event dispatch (integrate/dispatch.py); this callback acts on the flags every rank received: after
each backward (the flags that rode on the gradients) and once per epoch after the trackers have spoken.
"""
from __future__ import annotations

from fastai.callback.core import CancelBatchException, CancelFitException

from ..stopchannel import Preempted
from .base import LeanCallback

__all__ = ["AgreedStop"]


class AgreedStop(LeanCallback):
    """Acts on agreed flags after each backward, and once per epoch after the trackers have spoken."""

    order = 200  # after EarlyStopping, SaveModelCallback and every other tracker
    quiet = frozenset({"after_backward"})  # listened to during a distributed fit only
    _channel = None

    def before_fit(self):
        # the fit's channel (DistributedFit, earlier, opened it); validate() inside a fit finds the same one,
        # and a closed channel is inactive: nothing to undo at after_fit
        self._channel = self.ctx.stop_of(self.learn)
        self.listen("after_backward", on=self._channel is not None)

    def after_backward(self):
        channel = self._channel
        if channel is not None and channel.active:
            flags = channel.take_received()
            if flags is not None:
                try:
                    channel.agree(flags)
                except CancelBatchException:  # a batch cancelled on some rank: no rank keeps its gradients
                    self.learn.opt.zero_grad()
                    raise

    def after_epoch(self):
        channel = self.ctx.stop_of(self.learn)
        if channel is not None:
            channel.agree(channel.exchange(), allowed=(Preempted, CancelFitException), position="epoch_end")
