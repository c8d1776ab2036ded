"""The instrumentation's cost as a count, not a clock: hooked events per steady-state training step
(counted exactly in the real run) times nanoseconds per event (each hook timed alone, best of many
repeats), against the step time. Identical whole runs on 2 shared cores spread about 8%; this does not."""
import time
import timeit

import torch
from fastai.basics import Callback

from fastlaunch.rank.callbacks.instrument import Instrument, TimedLoader

_TENSOR = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


def _best_ns(stmt, number: int = 20_000, repeat: int = 7) -> float:
    """Nanoseconds per call of stmt, the best of `repeat` rounds (the least disturbed by the machine)."""
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e9


class _StepEnd(Callback):
    order = 10_000  # after every other after_batch

    def __init__(self, cost): self.cost = cost
    def after_batch(self): self.cost.active = False


class HookCost(Callback):
    """Counts, in steady-state training steps (the first 3 left out), the events the Instrument callback
    receives, the callbacks fastlaunch's dispatch names as sync sources, and the calls that go through the
    sync counter's tensor wrappers."""

    order = -1000

    def __init__(self, learn):
        self.learn_ref, self.steps, self.active = learn, 0, False
        self.events: list[str] = []
        self.tensor_calls = 0
        cost = self
        original_call = Instrument.__call__

        def counted_call(inst, event_name):
            if cost.active:
                cost.events.append(event_name)
            return original_call(inst, event_name)

        Instrument.__call__ = counted_call
        self.wrapped_item = torch.Tensor.item  # fastlaunch's counter wrapper (functools.wraps keeps the original)
        for name in _TENSOR:
            wrapped = getattr(torch.Tensor, name)

            def counted(tensor, *args, _wrapped=wrapped, **kwargs):
                cost.tensor_calls += cost.active
                return _wrapped(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        learn.add_cbs([self, _StepEnd(self)])

    def before_batch(self):
        self.active = self.training and self.iter >= 3
        self.steps += self.active

    def measure(self) -> dict:
        """The counts per step, each hook's cost in ns, and their product (call after the fit)."""
        steps = max(self.steps, 1)
        step_events = self.events[: len(self.events) // steps]  # one step's sequence of events
        learn = self.learn_ref
        inst = next((cb for cb in learn.cbs if isinstance(cb, Instrument)), None)
        if inst is None or not getattr(inst, "_on", False):
            return {"hooks": "instrumentation off"}
        learn.training, inst._started = True, True

        def one_step():
            for event in step_events:
                inst(event)

        ns_events = _best_ns(one_step, number=2_000)
        inst._clock.reset()
        scalar = torch.tensor(1.0)
        wrapped, plain = self.wrapped_item, getattr(self.wrapped_item, "__wrapped__", self.wrapped_item)
        ns_wrapper = max(0.0, _best_ns(lambda: wrapped(scalar)) - _best_ns(lambda: plain(scalar)))
        items = list(range(1000))
        ns_next = max(0.0, (_best_ns(lambda: sum(1 for _ in TimedLoader(items, [])), number=200)
                            - _best_ns(lambda: sum(1 for _ in items), number=200)) / len(items))
        dispatched = (len(learn.cbs) - 2) * len(step_events)  # callback calls per step, less these two
        site = getattr(inst.ctx, "site", None)
        if site is not None:  # the dispatch stores the running callback per call, the event and a reset per event
            label, stores, ns_store = ("call-site stores", dispatched + 2 * len(step_events),
                                       _best_ns(lambda: setattr(site, "cb", None)))
        else:  # the dispatch names the sync source before and after each callback call
            counter = inst._counter
            label, stores, ns_store = ("sync-source names set", 2 * dispatched,
                                       _best_ns(lambda: setattr(counter, "source", "x")))
        per_step = {"instrument events": len(step_events), "tensor wrapper calls": self.tensor_calls / steps,
                    "loader next calls": 1, label: stores}
        ns_each = {"instrument events": ns_events / max(len(step_events), 1), "tensor wrapper calls": ns_wrapper,
                   "loader next calls": ns_next, label: ns_store}
        total = sum(per_step[k] * ns_each[k] for k in per_step)
        # Not instrumentation, on with or without it: the heartbeat the hang watch reads.
        try:  # one per batch (at its start) and one per event between batches
            from fastlaunch.rank.integrate.dispatch import IN_BATCH

            beats = sum(event not in IN_BATCH for event in step_events)
        except ImportError:  # one per callback call
            beats = dispatched
        beat = inst.ctx.beats.beat
        ns_beat = _best_ns(lambda: beat("Recorder.after_batch", 0, 1))
        return {"hooks": {"per_step": per_step, "ns_each": ns_each, "ns_per_step": total, "beats_per_step": beats,
                          "ns_per_beat": ns_beat, "when": time.time()}}
