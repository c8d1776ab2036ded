"""The GPU paths of the instrumentation, on CPU against fakes: CUDA-event clock, CUDA's sync audit,
NVML missing or refusing, pinned non_blocking batch copies, GradScaler's syncs by design."""
from __future__ import annotations

import json
import types
import warnings

import pytest
import torch
from fastai.data.load import DataLoader

from conftest import SCRIPTS, only_run_dir, run_fastlaunch
from fastlaunch.rank.callbacks.placement import pin_batches
from fastlaunch.rank.instrument import memory, syncs
from fastlaunch.rank.instrument.audit import SYNC_WARNING, SyncAudit
from fastlaunch.rank.instrument.timing import Clock
from fastlaunch.launcher.diagnose import diagnose
from fastlaunch.rank.integrate.nosync import nonblocking_to_device


class FakeCuda:
    """Events on a fake device timeline (ms), counting every wait the host makes."""

    def __init__(self):
        self.now_ms, self.waits, self.modes = 0.0, 0, []
        cuda = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.at = None

            def record(self):
                self.at = cuda.now_ms

            def synchronize(self):
                cuda.waits += 1

            def elapsed_time(self, other):
                assert cuda.waits, "an event read before the host waited for it"
                return other.at - self.at

        self.Event = Event
        self.set_sync_debug_mode = self.modes.append


def _fake_torch():
    cuda = FakeCuda()
    return types.SimpleNamespace(cuda=cuda), cuda


def test_cuda_clock_sums_event_intervals_and_waits_once_per_read():
    torch_mod, cuda = _fake_torch()
    clock = Clock("cuda", torch_mod=torch_mod)
    clock.begin("window")
    for _ in range(5):  # five steps of 10 ms, 4 ms of which backward
        cuda.now_ms += 6
        clock.begin("backward")
        cuda.now_ms += 4
        clock.end("backward")
    clock.end("window")
    assert cuda.waits == 0  # recording never waits
    assert clock.totals() == {"window": pytest.approx(0.050), "backward": pytest.approx(0.020)}
    assert cuda.waits == 1
    clock.end("window")  # an end without a begin is ignored
    assert clock.totals() == {}


def test_host_clock_on_cpu_ranks():
    clock = Clock("cpu")
    clock.begin("window")
    clock.end("window")
    assert not clock.events and 0 <= clock.totals()["window"] < 1


@pytest.fixture
def counter():
    return syncs.SyncCounter("cuda")  # not installed: only its source is read by the audit


def test_sync_audit_counts_cuda_warnings_per_step_by_source_then_puts_everything_back(counter):
    torch_mod, cuda = _fake_torch()
    audit = SyncAudit("cuda", steps=2, torch_mod=torch_mod, source=lambda: counter.source)
    with warnings.catch_warnings(record=True) as seen:  # what shows warnings before the audit
        warnings.simplefilter("always")
        filters_before = list(warnings.filters)
        assert audit.start() and cuda.modes == ["warn"] and not audit.start()
        for _ in range(2):
            counter.override = "Probe.after_batch"
            warnings.warn(SYNC_WARNING)  # what torch raises from C++ at a sync (nonzero, masked indexing)
            counter.override = "DataLoader"
            warnings.warn(SYNC_WARNING)
            warnings.warn(SYNC_WARNING)
            warnings.warn("unrelated", DeprecationWarning)  # other warnings pass through
        assert not audit.step_done() and audit.step_done()
        got = audit.stop()
        assert warnings.filters == filters_before
    assert [str(w.message) for w in seen] == ["unrelated", "unrelated"]
    assert got == {"audit_steps": 2, "audit_syncs_per_step": 3.0,
                   "audit_sources": {"DataLoader": 2.0, "Probe.after_batch": 1.0}}
    assert cuda.modes == ["warn", "default"]
    assert audit.stop() == {} and cuda.modes == ["warn", "default"]


def test_no_sync_audit_on_cpu_ranks():
    audit = SyncAudit("cpu")
    assert not audit.start() and not audit.step_done() and audit.stop() == {}


class FakeNvml:
    def __init__(self, init_error=None):
        self.init_error = init_error

    def nvmlInit(self):
        if self.init_error:
            raise self.init_error


def _missing():
    raise ImportError("No module named 'pynvml'")


def test_nvml_missing_or_refusing_means_cuda_figures_without_the_devices_view():
    assert memory.open_nvml(_missing) is None
    assert memory.open_nvml(lambda: FakeNvml(RuntimeError("NVML_ERROR_DRIVER_NOT_LOADED"))) is None
    nvml = FakeNvml()
    assert memory.open_nvml(lambda: nvml) is nvml
    stats = {"allocated_bytes.all.current": 2**30, "reserved_bytes.all.current": 2 * 2**30}
    torch_mod = types.SimpleNamespace(cuda=types.SimpleNamespace(memory_stats=lambda i: stats))
    got = memory.sample("cuda", 0, torch_mod=torch_mod, nvml=None, rss_bytes=2**20)
    assert got["cuda_allocated_mb"] == 1024 and got["cuda_reserved_mb"] == 2048
    assert not [k for k in got if k.startswith("gpu_")]


def test_batches_copy_to_a_gpu_non_blocking_and_nowhere_else():
    calls = []
    to_device = nonblocking_to_device(lambda b, device=None, non_blocking=False: calls.append((device, non_blocking)))
    to_device("b", torch.device("cuda", 1))
    to_device("b", "cuda")
    to_device("b", torch.device("cpu"))
    to_device("b", None)
    to_device("b", "cpu", non_blocking=True)  # asked for by the caller: kept
    assert [nb for _, nb in calls] == [True, True, False, False, True]


def test_loaders_pin_their_batches_on_gpu_ranks_only():
    on_gpu, on_cpu = DataLoader(list(range(8)), bs=4), DataLoader(list(range(8)), bs=4)
    assert pin_batches([on_gpu], torch.device("cuda", 0)) == [on_gpu]
    assert on_gpu.pin_memory and on_gpu.fake_l.pin_memory
    assert pin_batches([on_gpu], torch.device("cuda", 0)) == []  # already pinned
    assert pin_batches([on_cpu], torch.device("cpu")) == [] and not on_cpu.fake_l.pin_memory


def _record(**kw):
    base = {"rank": 0, "epoch": 0, "data_wait_frac": 0.0, "syncs_per_step": 0.0, "work_time": 0.01,
            "device": "cuda", "visible_gpus": None}
    return dict(base, **kw)


def test_gradscaler_syncs_are_reported_by_design_not_as_avoidable():
    designed = _record(syncs_per_step=2.0, by_design_syncs_per_step=2.0,
                       sync_sources={"DevicePrecision.before_step (item in GradScaler)": 2.0})
    text = " | ".join(diagnose([designed]))
    assert "2.0 syncs per step from fp16's GradScaler" in text and "by design" in text
    assert "waits for the GPU to finish" not in text
    both = dict(designed, syncs_per_step=3.0, sync_sources={**designed["sync_sources"], "Mine.after_batch (item)": 1.0})
    text = " | ".join(diagnose([both]))
    assert "1.0 avoidable syncs per step, 1.0 from Mine.after_batch (item)" in text


def test_what_only_the_cuda_audit_sees_is_diagnosed():
    audited = _record(audit_steps=3, audit_syncs_per_step=2.0, audit_sources={"Mine.after_batch": 2.0})
    text = " | ".join(diagnose([audited, _record(epoch=1)]))
    assert "CUDA's sync audit (3 steps) found 2.0 more syncs per step than the counters, 2.0 from Mine.after_batch" in text
    assert not [d for d in diagnose([_record(audit_steps=3, audit_syncs_per_step=0.0, audit_sources={})]) if "audit" in d]


def test_fp16_gradscaler_makes_two_syncs_per_step_by_design(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_fastlaunch(["--cpu", "2", "--precision", "fp16", SCRIPTS / "instrument_probe.py"], tmp_path,
                          env={"FL_PROBE_OUT": str(out), "FL_MODE": "plain"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads((only_run_dir(tmp_path) / "report.json").read_text())
    for rec in report["epochs"]:  # GradScaler.step's inf check and get_scale: 2 .item() per step
        assert rec["syncs_per_step"] == pytest.approx(2.0) and rec["by_design_syncs_per_step"] == pytest.approx(2.0)
        assert rec["sync_sources"] == {"DevicePrecision.before_step (item in GradScaler)": pytest.approx(2.0)}
        assert rec["clock"] == "host" and "audit_steps" not in rec
    assert "syncs per step from fp16's GradScaler" in proc.stderr and "avoidable" not in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() == 0, reason="needs a CUDA device; none is visible here")
def test_real_gpu_run_times_with_events_and_audits_without_syncs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_fastlaunch(["--gpus", "1", SCRIPTS / "instrument_probe.py"], tmp_path,
                          env={"FL_PROBE_OUT": str(out), "FL_MODE": "plain"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads((only_run_dir(tmp_path) / "report.json").read_text())
    first = report["epochs"][0]
    assert first["clock"] == "cuda events" and first["cuda_reserved_mb"] > 0
    assert first["audit_steps"] == 3 and first["syncs_per_step"] == 0
    assert first["audit_syncs_per_step"] == 0, first["audit_sources"]  # pinned, non_blocking batch copies


def test_instrument_on_a_fake_gpu_rank_times_with_events_and_audits_only_the_first_epoch(counter):
    from fastlaunch.rank.callbacks.instrument import Instrument

    torch_mod, cuda = _fake_torch()
    inst = Instrument()
    inst.learn = types.SimpleNamespace(training=True, dl=list(range(6)), epoch=0)
    inst._on, inst._audit_due, inst._counter = True, True, counter
    inst._clock = Clock("cuda", torch_mod=torch_mod)
    inst._audit = SyncAudit("cuda", steps=3, torch_mod=torch_mod, source=lambda: counter.source)
    records = []
    for epoch in range(2):
        inst.before_train()
        for step, _ in enumerate(inst.learn.dl):  # the TimedLoader: each next is a data wait
            inst.before_batch()
            cuda.now_ms += 7
            inst.before_backward()
            cuda.now_ms += 3
            if epoch == 0 and step in (1, 2):  # a C++ sync inside the audited steps (1-3 follow the first)
                warnings.warn(SYNC_WARNING)
            inst.after_backward()
            inst.after_batch()
        waits_before_read = cuda.waits
        inst.after_train()
        assert cuda.waits == waits_before_read + 1  # the events are read once per epoch
        records.append(inst._train)
    first, second = records
    assert first["clock"] == "cuda events" and first["steps"] == 5
    assert first["step_time"] == pytest.approx(0.010) and first["work_time"] == pytest.approx(0.007)
    assert first["audit_steps"] == 3 and first["audit_syncs_per_step"] == pytest.approx(2 / 3)
    assert first["audit_sources"] == {"fastai": pytest.approx(2 / 3)}
    assert "audit_steps" not in second and second["step_time"] == pytest.approx(0.010)
    assert cuda.modes == ["warn", "default"]  # one window, closed
    assert inst.learn.dl == list(range(6))  # the loader is given back unwrapped


def test_on_several_nodes_a_missing_rank_is_named_with_its_node():
    found = diagnose([_record(rank=0), _record(rank=1)], missing=[3, 2], last_epoch={2: 1}, ranks_per_node=2)
    assert "rank 3 (node 1) is missing from the report: it died or never trained (see its log)" in found
    assert "rank 2 (node 1) is missing from the report after epoch 1: it died (see its log)" in found
    assert any(d.startswith("rank 3 is missing") for d in diagnose([_record()], missing=[3]))  # one node: no node
