"""Interactive notebook sessions (`%load_ext fastlaunch`, `%fastlaunch --cpu 2`), driven through a real Jupyter
kernel: nbclient runs a tutorial-style vision notebook; jupyter_client drives a kernel cell by cell for the
interrupt button, errors, a rank that dies, bad input and the kernel's shutdown."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("nbclient", reason="needs the notebook extra (pip install 'fastlaunch[notebook]'; make test has it)")
pytest.importorskip("ipykernel", reason="needs the notebook extra (pip install 'fastlaunch[notebook]'; make test has it)")

import nbformat  # noqa: E402
from jupyter_client import KernelManager  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

START = "%load_ext fastlaunch\n%fastlaunch --cpu 2 --seed 1"
IMAGES = '''\
from fastai.vision.all import *
import numpy as np
from PIL import Image
path = Path("shapes")
rng = np.random.default_rng(0)
for cls, color in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
    (path / cls).mkdir(parents=True, exist_ok=True)
    for i in range(24):
        img = np.clip(np.array(color) + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path / cls / f"{i}.png")
'''
DATA = '''\
shapes = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=get_image_files, get_y=parent_label,
                   splitter=RandomSplitter(valid_pct=0.25, seed=42), item_tfms=Resize(32))
dls = shapes.dataloaders(path, bs=8, num_workers=0)
'''
SAVE = '''\
import torch.distributed as dist
if dist.get_rank() == 0:
    torch.save(learn.model.state_dict(), "weights.pt")
    json.dump(reported, open("values.json", "w"))
'''
CHECK = IMAGES + DATA + '''\
import json
learn = vision_learner(dls, resnet18, pretrained=False, metrics=error_rate)
learn.model.load_state_dict(torch.load("weights.pt"))
print(json.dumps([float(v) for v in learn.validate()]))
'''


def _session_processes(run_dir: Path) -> list[int]:
    """Live processes whose command line names the session's run directory (the launcher and its ranks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = next((ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("State:")), "")
            except OSError:
                continue
            if str(run_dir) in cmdline and "zombie" not in state:
                pids.append(int(proc.name))
    return pids


def _gone(run_dir: Path, guard_s: float = 60.0) -> list[int]:
    deadline = time.monotonic() + guard_s
    while _session_processes(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _session_processes(run_dir)


def _run_dir(cwd: Path) -> Path:
    dirs = sorted((cwd / "runs").glob("*-notebook*"))
    assert len(dirs) >= 1, list((cwd / "runs").iterdir()) if (cwd / "runs").exists() else "no runs/"
    return dirs[-1]


def test_a_tutorial_vision_notebook_runs_on_two_ranks_with_each_output_once(tmp_path):
    cells = [START, IMAGES, DATA + "dls.show_batch(max_n=4)",
             "learn = vision_learner(dls, resnet18, pretrained=False, metrics=error_rate)\nlearn.lr_find(num_it=12)",
             "learn.fine_tune(1, 1e-3)\nreported = [float(v) for v in learn.recorder.values[-1]]",
             "learn.show_results(max_n=4)",
             "interp = ClassificationInterpretation.from_learner(learn)\ninterp.plot_confusion_matrix()",
             SAVE, "undefined_name + 1", "print('still here:', len(learn.recorder.values))",
             "%%local\nimport sys\nprint('notebook kernel imported torch:', 'torch' in sys.modules)",
             "%fastlaunch status", "%fastlaunch stop", "import sys\nprint('local again:', 'torch' in sys.modules)"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = [c.outputs for c in nb.cells]
    streams = ["".join(o.text for o in cell if o.output_type == "stream") for cell in out]
    images = [sum("image/png" in o.get("data", {}) for o in cell) for cell in out]
    errors = [[(o.ename, o.evalue) for o in cell if o.output_type == "error"] for cell in out]
    assert "2 ranks on cpu ready" in streams[0], streams[0]
    assert images[2] == 1 and images[3] == 1 and images[5] == 1 and images[6] == 1  # batch, lr, results, matrix
    assert [e for e in errors[:8] if e] == [], errors
    # rank 0's output once: fastai's results table once per fit of fine_tune (2), each epoch's line once
    tables = [o for o in out[4] if "text/html" in o.get("data", {}) and "error_rate" in o["data"]["text/html"]]
    assert len(tables) == 2 and streams[4].count("epoch 0 per rank") == 2, streams[4]
    assert [o for o in out[3] if o.output_type == "execute_result"][0]["data"]["text/plain"].startswith("SuggestedLRs")
    assert errors[8] == [("NameError", "name 'undefined_name' is not defined")]  # the rank's own error, shown
    assert "still here: 1" in streams[9]  # ...and the ranks kept their state
    assert "notebook kernel imported torch: False" in streams[10]
    assert streams[11].count("fit(s); RSS now") == 2 and "rank 1 (pid" in streams[11]
    assert "session stopped (status 0)" in streams[12], streams[12]
    assert "local again: False" in streams[13], streams[13]  # cells run in the notebook's kernel again
    # the recorded metrics are what one process computes on the final weights
    values = json.loads((tmp_path / "values.json").read_text())
    (tmp_path / "check.py").write_text(CHECK)
    one = subprocess.run([sys.executable, "check.py"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    valid_loss, error_rate = json.loads(one.stdout.strip().splitlines()[-1])
    assert values[1] == pytest.approx(valid_loss, abs=1e-4) and values[2] == pytest.approx(error_rate, abs=1e-4)
    # the kernel is gone (nbclient shut it down): so is every process of the session
    assert _gone(_run_dir(tmp_path)) == []


class Kernel:
    """A real IPython kernel, cell by cell."""

    def __init__(self, cwd: Path):
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(cwd))
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def send(self, code: str) -> str:
        return self.kc.execute(code, allow_stdin=False)

    def collect(self, msg_id: str, until_text: str | None = None, guard_s: float = 400) -> tuple[dict, str]:
        """(reply, the text the cell showed) once it ends; or, with until_text, as soon as that text shows."""
        text, deadline = "", time.monotonic() + guard_s
        while time.monotonic() < deadline:
            try:
                msg = self.kc.get_iopub_msg(timeout=1)
            except Exception:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                text += content["text"]
            elif kind == "error":
                text += f"[error {content['ename']}: {content['evalue']}]"
            elif kind in ("execute_result", "display_data"):
                text += content["data"].get("text/plain", "")
            if until_text is not None and until_text in text:
                return {}, text
            if kind == "status" and content["execution_state"] == "idle":
                return self.kc.get_shell_msg(timeout=60)["content"], text
        raise AssertionError(f"the cell did not end within {guard_s} s; it showed: {text[-2000:]}")

    def run(self, code: str) -> tuple[dict, str]:
        return self.collect(self.send(code))

    def shutdown(self) -> None:
        self.kc.stop_channels()
        if self.km.is_alive():
            self.km.shutdown_kernel(now=False)
        else:
            self.km.cleanup_resources()


TABULAR = '''\
from fastai.tabular.all import *
import time
import numpy as np, pandas as pd, torch.distributed as dist
rng = np.random.default_rng(0)
df = pd.DataFrame({"a": rng.normal(size=512), "b": rng.normal(size=512), "g": rng.integers(0, 3, 512)})
df["y"] = ((df.a + df.b * (df.g - 1)) > 0).astype(int)
dls = TabularDataLoaders.from_df(df, cat_names=["g"], cont_names=["a", "b"], y_names="y", y_block=CategoryBlock(),
                                 procs=[Categorify, Normalize], valid_idx=list(range(384, 512)), bs=16)
learn = tabular_learner(dls, layers=[16], metrics=accuracy)

class Started(Callback):
    def after_batch(self):
        if self.training and self.iter == 3 and self.epoch == 1 and dist.get_rank() == 0:
            print("training is under way", flush=True)
        time.sleep(0.02)
'''


FAILS = '''
class Fails(Callback):
    def after_batch(self):
        if self.iter == 2 and dist.get_rank() in {ranks}:
            raise ValueError(f"fails in a fit on rank {{dist.get_rank()}}")
'''


def _nobody_shut_out(kernel: "Kernel") -> Path:
    """The ranks' kernels listen in a private folder: no connection key left on disk once connected, and
    another local user (nobody) can neither list it nor connect to a rank's sockets. Returns the folder."""
    reply, text = kernel.run("import sys, os\nprint('kernels:', sys.argv[1], sorted(os.listdir(sys.argv[1])))")
    assert reply["status"] == "ok", text
    line = next(ln for ln in text.splitlines() if ln.startswith("kernels:"))
    folder = Path(line.split()[1])
    names = eval(line.split(" ", 2)[2])  # the list printed above
    assert (folder.stat().st_mode & 0o777) == 0o700 and folder.stat().st_uid == os.geteuid()
    assert not [n for n in names if n.endswith(".kernel.json")], names  # keys: in memory only
    sockets = [folder / n for n in names if n.startswith("rank0-")]
    assert len(sockets) == 5, names  # shell, iopub, stdin, control, heartbeat: ipc, no TCP port
    if os.geteuid() == 0 and Path("/usr/bin/python3").exists():
        probe = ("import os, socket, sys\ntry:\n    os.listdir(sys.argv[1])\nexcept PermissionError:\n    print('no list')\n"
                 "for path in sys.argv[2:]:\n    s = socket.socket(socket.AF_UNIX)\n    try:\n        s.connect(path)\n"
                 "        print('connected')\n    except PermissionError:\n        print('refused')\n")
        other = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                                "/usr/bin/python3", "-c", probe, str(folder), *map(str, sockets)],
                               capture_output=True, text=True, timeout=60)
        assert other.stdout.split() == ["no", "list", *["refused"] * 5], (other.stdout, other.stderr)
    return folder


def test_interrupt_errors_bad_input_a_dying_rank_and_shutdown_in_one_session(tmp_path):
    kernel = Kernel(tmp_path)
    try:
        reply, text = kernel.run("%load_ext fastlaunch\n%fastlaunch --cpu 2 train.py")
        assert reply["status"] == "error" and "not a script" in text and "HINT" in text, text
        reply, text = kernel.run("%fastlaunch --cpu 2 --nnodes 2")
        assert reply["status"] == "error" and "--nnodes is not for notebook sessions" in text, text
        reply, text = kernel.run("%fastlaunch --cpu 2 --precision fp64")  # refused by the launcher itself
        assert reply["status"] == "error" and "fastlaunch: error:" in text and "HINT" in text, text
        assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # nothing left
        reply, text = kernel.run("print('before any session')")
        assert reply["status"] == "ok" and "before any session" in text  # no session: cells stay local

        reply, text = kernel.run("%fastlaunch --cpu 2 --run-dir rd")
        assert reply["status"] == "ok" and "2 ranks on cpu ready" in text, text
        run_dir = tmp_path / "rd"
        reply, text = kernel.run("%fastlaunch --cpu 2")
        assert reply["status"] == "error" and "a session is already running" in text, text
        kernels = _nobody_shut_out(kernel)
        reply, text = kernel.run(TABULAR + "learn.fit(2)")
        assert reply["status"] == "ok", text
        # the same error on every rank inside a fit: the cell's error, as in one process; the session lives on
        reply, text = kernel.run(FAILS.format(ranks="(0, 1)") + "learn.fit(1, cbs=Fails())")
        assert reply["status"] == "error" and "fails in a fit on rank 0" in text, text

        # the interrupt button during a fit: every rank stops at one batch, the ranks live on
        msg_id = kernel.send("learn.fit(40, cbs=Started())")
        kernel.collect(msg_id, until_text="training is under way")
        kernel.km.interrupt_kernel()
        reply, text = kernel.collect(msg_id)
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt", text
        reply, text = kernel.run(
            "where = torch.tensor([float(learn.epoch), float(learn.iter)])\n"
            "together = [torch.zeros(2) for _ in range(2)]\n"
            "dist.all_gather(together, where)\n"
            "print('same batch:', bool((together[0] == together[1]).all()), 'epoch', int(learn.epoch),"
            " type(learn.model).__name__)")
        assert reply["status"] == "ok" and "same batch: True" in text and "TabularModel" in text, text
        assert "epoch 39" not in text  # stopped early
        reply, text = kernel.run("learn.fit(1)\nprint('trains again:', len(learn.recorder.values))")
        assert reply["status"] == "ok" and "trains again: 1" in text, text

        # the interrupt button while rank 0 waits in a collective for rank 1 (busy outside any fit): rank 1
        # stops, rank 0 cannot (no signal reaches Python inside gloo); the world ends instead of freezing
        msg_id = kernel.send("if dist.get_rank() == 1:\n    print('rank 1 busy', flush=True)\n    time.sleep(600)\n"
                             "dist.barrier()")
        time.sleep(3)
        kernel.km.interrupt_kernel()
        reply, text = kernel.collect(msg_id, guard_s=120)
        assert reply["status"] == "error" and "ranks are gone" in text and "rank(s) 0 still waited" in text, text
        assert "%fastlaunch restart" in text
        assert _gone(run_dir) == []
        reply, text = kernel.run("%fastlaunch restart")
        assert reply["status"] == "ok" and "2 ranks on cpu ready" in text, text
        assert "run dir " + str(tmp_path / "rd-2") in text  # --run-dir's folder holds the last world's run
        reply, text = kernel.run("import torch.distributed as dist\ndist.get_world_size() * 21")
        assert reply["status"] == "ok" and "42" in text, text
        # an error on rank 1 alone inside a fit: rank 0 waits in the all-reduce; the world ends at once,
        # naming rank 1 with its traceback (not the waiting rank, not at the hang timeout)
        reply, text = kernel.run(TABULAR + FAILS.format(ranks="(1,)") + "learn.fit(3, cbs=Fails())")
        assert reply["status"] == "error" and "ranks are gone" in text and "rank 1 failed" in text, text
        assert "fails in a fit on rank 1" in text and "in after_batch" in text and "hung" not in text, text
        assert _gone(tmp_path / "rd-2") == [] and not kernels.exists()
        reply, text = kernel.run("print('not here')")  # the next cell does not run in the notebook's kernel
        assert reply["status"] == "error" and "ranks are gone" in text, text
        reply, text = kernel.run("%fastlaunch restart")
        assert reply["status"] == "ok" and "run dir " + str(tmp_path / "rd-3") in text, text
        run_dir = tmp_path / "rd-3"
        assert _session_processes(run_dir)
        os.kill(kernel.km.provisioner.process.pid, signal.SIGKILL)  # the kernel dies with no chance to clean up
    finally:
        kernel.shutdown()
    assert _gone(run_dir) == []  # the kernel's death leaves no process behind


def test_the_memory_advice_comes_once_when_reserved_memory_keeps_growing(tmp_path):
    from fastlaunch.session.memory import STREAK, MemoryLog

    log = MemoryLog(tmp_path / "memory.jsonl")
    facts = lambda mb: [{"rank": 0, "memory": "CUDA", "allocated_mb": mb / 2, "reserved_mb": mb},  # noqa: E731
                        {"rank": 1, "memory": "CUDA", "allocated_mb": 10.0, "reserved_mb": 1000.0}]
    log.baseline(facts(1000.0))
    said = [log.record(cell, facts(1000.0 + 100 * cell)) for cell in range(STREAK + 2)]
    assert said[:STREAK] == [None] * STREAK and said[STREAK] is not None and said[STREAK + 1] is None
    assert "rank 0" in said[STREAK] and "%fastlaunch free" in said[STREAK]
    assert log.growth(0, 1400.0) == 400.0
    rows = [json.loads(line) for line in (tmp_path / "memory.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (STREAK + 2) and rows[-2]["growth_mb"] == 100 * (STREAK + 1)
    steady = MemoryLog(tmp_path / "steady.jsonl")  # a stable footprint, or RSS on CPU ranks: no advice
    assert all(steady.record(c, facts(1000.0)) is None for c in range(6))
    cpu = MemoryLog(tmp_path / "cpu.jsonl")
    assert all(cpu.record(c, [{"rank": 0, "memory": "RSS", "reserved_mb": 100.0 * c}]) is None for c in range(6))


def test_the_extension_needs_an_ipython_shell():
    import fastlaunch
    from fastlaunch.errors import UsageError

    with pytest.raises(UsageError, match="need an IPython kernel.*HINT"):
        fastlaunch.load_ipython_extension(object())


def test_a_new_kernel_folder_is_private_and_dead_sessions_folders_go(tmp_path, monkeypatch):
    import tempfile

    from fastlaunch.session.folder import new_kernel_folder

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = tmp_path / "fastlaunch-session-old", tmp_path / "fastlaunch-session-live"
    for folder, pid in ((stale, dead.pid), (live, os.getpid())):
        folder.mkdir()
        (folder / "rank0.ready.json").write_text(json.dumps({"pid": pid, "connection_file": "x"}))
    made = new_kernel_folder()
    assert made.parent == tmp_path and (made.stat().st_mode & 0o777) == 0o700 and not list(made.iterdir())
    assert not stale.exists() and live.exists()


def test_a_rank_kernel_refuses_a_folder_others_could_have_prepared(tmp_path):
    """A rank's kernel adopts a connection file it finds (with the key in it): it listens only in a private
    folder of this user's (a directory, not a link, mode 0700) where no connection file is there yet."""
    import tempfile

    from fastlaunch.errors import UsageError
    from fastlaunch.rank.kernel import fresh_connection_file, private_folder

    good = Path(tempfile.mkdtemp(dir=tmp_path))
    assert private_folder(good) == good and fresh_connection_file(good, 1) == good / "rank1.kernel.json"
    (good / "rank1.kernel.json").write_text(json.dumps({"key": "theirs", "transport": "tcp"}))  # planted
    with pytest.raises(UsageError, match="already holds a connection file"):
        fresh_connection_file(good, 1)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(good)
    for bad in (shared, link, tmp_path / "missing"):
        with pytest.raises(UsageError) as err:
            private_folder(bad)
        assert "HINT" in str(err.value) and str(bad) in str(err.value)
    if os.geteuid() == 0:  # another user's folder, closed to everyone else: still not this user's
        theirs = Path(tempfile.mkdtemp(dir=tmp_path))
        os.chown(theirs, 65534, 65534)
        with pytest.raises(UsageError, match="owner uid 65534"):
            private_folder(theirs)
