"""fastai integration in one process: callbacks on every Learner, and each patch doing what it claims."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import zipfile

import fastai.callback.all  # noqa: F401  (every module a patch changes, loaded: every patch applies at install)
import fastai.distributed  # noqa: F401
import pytest
import torch
from fastai.basics import Callback, Datasets, Learner
from torch import nn

from fastlaunch.rank import integrate
from fastlaunch.rank.callbacks import CALLBACKS, DistributedFit, RankZeroOutput
from fastlaunch.rank.context import RankContext
from fastlaunch.env import DistEnv


def _context() -> RankContext:
    return RankContext(DistEnv.from_environ({}))


@pytest.fixture
def ctx():
    """Every test installs fastlaunch into fastai for its own rank context, and takes it out after."""
    context = _context()
    installation = integrate.install(context)
    yield context
    installation.uninstall()


def _x(i): return torch.tensor([float(i % 3), float(i % 5)])
def _y(i): return i % 2


def _learner(*cbs):
    dsets = Datasets(range(64), tfms=[[_x], [_y]], splits=[list(range(48)), list(range(48, 64))])
    return Learner(dsets.dataloaders(bs=16), nn.Linear(2, 2), loss_func=nn.CrossEntropyLoss(), cbs=list(cbs))


class FitKinds(Callback):
    def __init__(self, ctx): self.ctx, self.kinds = ctx, []
    def before_fit(self):
        run = self.ctx.fit_of(self.learn)
        self.kinds.append(None if run is None else run.index)


def test_every_learner_gets_fastlaunch_callbacks_once_bound_to_the_context(ctx):
    learn = _learner()
    assert sum(isinstance(cb, DistributedFit) for cb in learn.cbs) == 1
    assert sum(isinstance(cb, RankZeroOutput) for cb in learn.cbs) == 1
    assert all(cb.ctx is ctx for cb in learn.cbs if isinstance(cb, CALLBACKS))


def test_real_fits_are_numbered_and_told_apart_from_validate_and_get_preds_and_nothing_stays_on_the_learner(ctx):
    probe = FitKinds(ctx)
    learn = _learner(probe)
    before = set(vars(learn))
    learn.fit(1)
    learn.validate()
    learn.get_preds()
    learn.fit(1)
    assert probe.kinds == [0, None, None, 1]
    assert ctx.fit_of(learn) is None  # the fit run is closed when fit returns
    assert not [k for k in set(vars(learn)) - before if "fastlaunch" in k]


def _fastai_names() -> dict:
    """Every attribute of every loaded fastai/fastcore/fastdownload module and of the classes they define,
    of torch.Tensor and torch.distributed: (owner, name) -> the object bound there."""
    import sys
    import types

    import torch.distributed as dist

    owners = [torch.Tensor, dist]
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] in ("fastai", "fastcore", "fastdownload") and isinstance(mod, types.ModuleType):
            owners.append(mod)
            owners += [v for v in vars(mod).values() if isinstance(v, type)]
    from fastcore.basics import defaults
    owners.append(defaults)
    names = {}
    for owner in owners:
        for key, value in list(vars(owner).items()):
            names[(id(owner), key)] = value
    return names


def test_install_then_uninstall_restores_every_name(tmp_path):
    from fastcore.basics import defaults

    fresh = RankContext(DistEnv.from_environ({"FASTLAUNCH_RUN_DIR": str(tmp_path)}))  # measured: syncs counted
    baseline, default_cbs = _fastai_names(), list(defaults.callbacks)
    installation = integrate.install(fresh)
    assert not installation.undeclared(), installation.undeclared()  # each patch sets only what it declares
    learn = _learner()
    learn.fit(1)
    assert fresh.syncs is not None and (tmp_path / "metrics" / "rank0.jsonl").exists()
    changed = {k for k, v in _fastai_names().items() if baseline.get(k, object()) is not v}
    assert len(changed) >= 30  # fastai's fit, dispatch, export, DistributedDL, maybe_gather, ...
    installation.uninstall()
    after = _fastai_names()
    assert {k for k in baseline if after.get(k, object()) is not baseline[k]} == set()
    assert set(after) == set(baseline)
    assert defaults.callbacks == default_cbs


@pytest.mark.parametrize("version, ok", [("2.8.0", True), ("2.8.12", True), ("2.7.19", False), ("2.9.0", False),
                                         ("3.0", False), ("dev", False)])
def test_an_unsupported_fastai_is_refused_with_a_hint(version, ok):
    from fastlaunch.errors import UsageError

    if ok:
        integrate.check_fastai_version(version)
        return
    with pytest.raises(UsageError) as err:
        integrate.check_fastai_version(version)
    assert f"fastai {version}" in str(err.value) and "pip install 'fastai>=2.8,<2.9'" in str(err.value)


def test_maybe_gather_keeps_tensors_local(ctx, monkeypatch):
    import fastai.torch_core as tc

    monkeypatch.setenv("WORLD_SIZE", "2")  # fastai's own version would all_gather here
    x = torch.arange(4)
    assert tc.maybe_gather(x) is x
    assert torch.equal(tc.to_detach(x), x)


def test_to_distributed_and_distrib_ctx_do_not_wrap_twice(ctx):
    learn = _learner()
    n = len(learn.cbs)
    assert learn.to_distributed() is learn and len(learn.cbs) == n
    with learn.distrib_ctx() as same:
        assert same is learn and len(learn.cbs) == n
    assert learn.detach_distributed() is learn


def test_distributed_dl_name_gives_sharded_dl(ctx):
    import fastai.distributed as fd

    from fastlaunch.rank.sharding import ShardedDL

    assert issubclass(fd.DistributedDL, ShardedDL) and fd.DistributedDL.ctx is ctx


def test_export_leaves_fastlaunch_out_and_load_learner_gets_it_back(ctx, tmp_path):
    learn = _learner()
    learn.path = tmp_path
    learn.export("model.pkl")
    assert sum(isinstance(cb, CALLBACKS) for cb in learn.cbs) == len(CALLBACKS)  # restored
    with zipfile.ZipFile(tmp_path / "model.pkl") as zf:
        pickled = b"".join(zf.read(n) for n in zf.namelist() if n.endswith(".pkl"))
    assert b"Learner" in pickled and b"cfastlaunch" not in pickled and b"DistributedFit" not in pickled
    from fastai.learner import load_learner

    loaded = load_learner(tmp_path / "model.pkl")  # fastai's own loader (an export is a pickle by design)
    assert not any(isinstance(cb, CALLBACKS) for cb in loaded.cbs)
    loaded.dls = learn.dls
    loaded.fit(1)  # the fit patch adds fastlaunch's callbacks to a Learner that skipped __init__
    assert sum(isinstance(cb, CALLBACKS) for cb in loaded.cbs) == len(CALLBACKS)


def test_fastlaunch_callbacks_skip_the_events_they_do_not_handle_and_run_the_rest():
    import types

    from fastlaunch.rank.callbacks import CALLBACKS, Instrument
    from fastlaunch.rank.callbacks.base import LeanCallback

    assert all(issubclass(cls, LeanCallback) for cls in CALLBACKS)
    assert Instrument._handles >= {"before_fit", "after_train", "after_fit"}
    assert "after_pred" not in Instrument._handles
    assert "after_batch" not in Instrument._handles  # per-batch events only while a fit is measured
    inst = Instrument()
    inst.listen("after_batch", "before_batch")
    assert inst._handles >= {"after_batch", "before_batch"} and "after_batch" not in Instrument._handles
    inst.listen("after_batch", on=False)
    assert "after_batch" not in inst._handles and "before_batch" in inst._handles

    class Probe(LeanCallback):
        def after_batch(self):
            self.seen = getattr(self, "seen", 0) + 1

    probe = Probe()
    probe.learn = types.SimpleNamespace(training=True)
    probe("after_pred")  # not handled: returns at once
    probe("after_batch")
    assert probe.seen == 1
    probe.run = False
    probe("after_batch")  # fastai's rules still apply to handled events: run=False skips them
    probe("after_fit")  # and the end of a fit sets run back, handled or not
    assert probe.seen == 1 and probe.run


def test_sync_bn_swaps_batchnorm_for_the_fit_and_puts_it_back():
    from torch import nn

    from fastlaunch.rank.callbacks.placement import restore_modules, to_sync_batchnorm

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    bn2d, bn1d = model[1], model[2][1]
    swapped = to_sync_batchnorm(model)
    assert [type(m).__name__ for m in (model[1], model[2][1])] == ["SyncBatchNorm", "SyncBatchNorm"]
    assert model[1].weight is bn2d.weight and model[1].running_mean is bn2d.running_mean  # shared, not copied
    restore_modules(swapped)
    assert model[1] is bn2d and model[2][1] is bn1d


def test_the_workers_torch_patches_undo_and_declare_what_they_replace():
    import torch.distributed as dist
    from torch.utils.data._utils import signal_handling

    from fastlaunch.rank.patching import Installation
    from fastlaunch.rank.torch_patches import TORCH_PATCHES

    before = dist.init_process_group, signal_handling._set_worker_signal_handlers
    installation = Installation(TORCH_PATCHES, _context())
    assert not installation.undeclared(), installation.undeclared()
    assert dist.init_process_group is not before[0] and signal_handling._set_worker_signal_handlers is not before[1]
    installation.uninstall()
    assert (dist.init_process_group, signal_handling._set_worker_signal_handlers) == before


def test_reset_forgets_the_fits_sequences_and_lines_of_a_context(ctx):
    learn = _learner()
    learn.fit(1)
    ctx.say("fastlaunch: a line said once", once=True)
    assert next(ctx.fit_numbers) == 1 and ctx.said
    ctx.resume_plan, ctx.resume_read = {"fit_index": 0}, True
    ctx.reset()
    assert next(ctx.fit_numbers) == 0 and next(ctx.loader_numbers) == 0
    assert not ctx.said and ctx.resume_plan is None and not ctx.resume_read and ctx.fit_of(learn) is None


DEFERRED = textwrap.dedent("""
    import sys
    from fastlaunch.env import DistEnv
    from fastlaunch.rank import integrate
    from fastlaunch.rank.context import RankContext

    installation = integrate.install(RankContext(DistEnv.from_environ({})))
    out = {"fastai loaded at install": "fastai" in sys.modules}
    from fastai.basics import Learner, defaults
    from fastai.learner import Learner as L2
    out["fit patched"] = hasattr(Learner.fit, "__wrapped__") and L2._call_one.__module__.startswith("fastlaunch")
    out["progress loaded"] = "fastai.callback.progress" in sys.modules
    out["default callbacks"] = [c.__name__ for c in defaults.callbacks]
    from fastai.callback.progress import CSVLogger
    out["csv patched"] = hasattr(CSVLogger.before_fit, "__wrapped__")
    import fastai.distributed as fd
    out["DistributedDL everywhere"] = fd.DistributedDL.__name__
    import fastai.vision.all  # noqa: F401  (loaded after fastai.learner was patched)
    gathers = {name: vars(m)["maybe_gather"].__module__ for name, m in list(sys.modules.items())
               if name.startswith("fastai") and "maybe_gather" in vars(m)}
    out["maybe_gather replaced in later modules"] = gathers.get("fastai.vision.all")
    installation.uninstall()
    gathers = {vars(m)["maybe_gather"].__module__ for name, m in list(sys.modules.items())
               if name.startswith("fastai") and "maybe_gather" in vars(m)}
    out["after uninstall"] = [hasattr(Learner.fit, "__wrapped__"), hasattr(CSVLogger.before_fit, "__wrapped__"),
                              fd.DistributedDL.__name__, sorted(gathers)]
    print(out)
""")


def test_patches_wait_for_their_module_and_nothing_is_loaded_that_the_script_did_not_import():
    proc = subprocess.run([sys.executable, "-c", DEFERRED], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = eval(proc.stdout.strip().splitlines()[-1])
    assert out["fastai loaded at install"] is False
    assert out["fit patched"] is True
    assert out["progress loaded"] is False  # fastai.basics has no progress bar: none added
    assert "ProgressCallback" not in out["default callbacks"] and "DistributedFit" in out["default callbacks"]
    assert out["csv patched"] is True and out["DistributedDL everywhere"] == "ShardedDL"
    assert out["maybe_gather replaced in later modules"] == "fastlaunch.rank.integrate.core"
    # put back everywhere, in the modules loaded after the patch too
    assert out["after uninstall"] == [False, False, "DistributedDL", ["fastai.torch_core"]]


def test_callbacks_idle_at_an_event_are_not_called_and_the_rest_are(ctx, monkeypatch):
    from fastcore.basics import GetAttr

    looked_up: list[str] = []
    original = GetAttr.__getattr__

    def spy(self, name):
        looked_up.append(name)
        return original(self, name)

    monkeypatch.setattr(GetAttr, "__getattr__", spy)

    class OnlyAfterBatch(Callback):
        def __init__(self): self.calls = 0
        def after_batch(self): self.calls += 1

    instance_hook = Callback()
    hits: list[int] = []
    instance_hook.after_loss = lambda: hits.append(1)  # an event given to one instance still runs
    only = OnlyAfterBatch()
    learn = _learner(only, instance_hook)
    learn.fit(1)
    n_batches = len(learn.dls.train) + len(learn.dls.valid)
    assert only.calls == n_batches and len(hits) == n_batches
    from fastai.callback.core import event

    # no event name looked up through the Learner per call: whether the Learner answers it is asked at its
    # first event (after_create) and at each fit's start
    looked = [name for name in looked_up if hasattr(event, name)]
    assert looked and max(looked.count(name) for name in looked) == 2
    OnlyAfterBatch.before_epoch = lambda self: setattr(self, "calls", -100)  # given a method between fits
    learn.fit(1)
    assert only.calls == -100 + n_batches
