"""A notebook run as a job: every rank runs the code cells in order in one IPython shell (magics, display and
matplotlib's inline figures as in Jupyter); rank 0 records each cell's outputs as it runs and writes
RUN_DIR/<name>.executed.ipynb after every cell, so a failing cell's error is there too. A cell that raises
stops the rank as a script's exception would: the launcher names the culprit with its traceback.

A job has no live notebook to draw HTML into: fastai's progress bars are its console bars, so the console and
the executed copy show the results table as text (as a script's run does)."""
from __future__ import annotations

import base64
import sys
import time
import types
import uuid
import warnings
from pathlib import Path
from typing import Any

from ..notebooks import executed_path, session_lines_removed
from .patching import AfterImport, loaded

__all__ = ["run_notebook"]

_OTHERS_WAIT_S = 2.0  # a failing cell on another rank waits this long before it fails the job


class _Tee:
    """A stream that writes through and records what a cell printed, as notebook stream outputs."""

    def __init__(self, stream: Any, name: str, outputs: list):
        self._stream, self._name, self._outputs = stream, name, outputs

    def write(self, text: str) -> int:
        self._stream.write(text)
        last = self._outputs[-1] if self._outputs else None
        if last is not None and last.get("output_type") == "stream" and last["name"] == self._name:
            last["text"] += text
        else:
            self._outputs.append({"output_type": "stream", "name": self._name, "text": text})
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _jsonable(data: dict) -> dict:
    return {k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in data.items()}


class _Recorder:
    """Where rank 0's outputs of the running cell go (None on other ranks: nothing is kept)."""

    def __init__(self, keep: bool):
        self.keep = keep
        self.outputs: list[dict] = []
        self._shown: dict[str, int] = {}  # display_id -> its place in this cell's outputs

    def display(self, data: dict, metadata: dict | None, display_id: str | None = None, update: bool = False) -> None:
        """A display; an update of one shown earlier in this cell replaces it, as in Jupyter (a progress bar
        leaves its final state, not one output per redraw)."""
        if not self.keep:
            return
        output = {"output_type": "display_data", "data": _jsonable(data), "metadata": metadata or {}}
        if update:
            if display_id in self._shown:
                self.outputs[self._shown[display_id]] = output
            return
        if display_id:
            self._shown[display_id] = len(self.outputs)
        self.outputs.append(output)

    def clear(self) -> None:
        self.outputs.clear()  # in place: the cell's streams write into this list
        self._shown = {}

    def start_cell(self) -> None:
        self.outputs, self._shown = [], {}

    def result(self, data: dict, metadata: dict | None) -> None:
        if self.keep:  # its execution_count is the cell's, set when the cell ends
            self.outputs.append({"output_type": "execute_result", "data": _jsonable(data),
                                 "metadata": metadata or {}, "execution_count": None})

    def error(self, ename: str, evalue: str, traceback: list[str]) -> None:
        if self.keep:
            self.outputs.append({"output_type": "error", "ename": ename, "evalue": evalue, "traceback": traceback})


def _shell(recorder: _Recorder):
    """An IPython shell whose display, results and tracebacks go to the recorder (and the rank's log)."""
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    class JobShell(InteractiveShell):
        def enable_gui(self, gui=None):  # the inline backend draws into the outputs: no GUI event loop
            pass

    shell = JobShell.instance()

    class Publisher(DisplayPublisher):
        def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
            recorder.display(data, metadata, (transient or {}).get("display_id"), update)

        def clear_output(self, wait=False):
            recorder.clear()

    shell.display_pub = Publisher(shell=shell)

    def write_format_data(hook, format_dict, md_dict=None):
        recorder.result(format_dict, md_dict)
        print(format_dict.get("text/plain", ""), file=sys.__stdout__, flush=True)  # the log, not the cell's stream

    shell.displayhook.write_format_data = types.MethodType(write_format_data, shell.displayhook)

    def show(etype, evalue, stb):
        recorder.error(etype.__name__, str(evalue), list(stb))
        print(shell.InteractiveTB.stb2text(stb), file=sys.__stderr__, flush=True)

    shell._showtraceback = show  # type: ignore[method-assign]
    try:
        shell.enable_matplotlib("inline")  # figures shown at the end of each cell, as in Jupyter
    except Exception:  # no matplotlib: nothing to draw
        pass
    return shell


def _console_progress_bars(name: str = "fastprogress.fastprogress") -> None:
    """fastprogress picks HTML bars inside an IPython shell: a job's are its console bars."""
    if not loaded(name):
        sys.meta_path.insert(0, AfterImport(_console_progress_bars, {name}))
        return
    fp = sys.modules[name]
    fp.master_bar, fp.progress_bar = fp.ConsoleMasterBar, fp.ConsoleProgressBar  # type: ignore[attr-defined]


def _read(path: str):
    """The notebook, with an id for every cell (nbformat 4.5 wants them; Jupyter adds them on save)."""
    import nbformat

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a missing cell id: filled in below
        notebook = nbformat.read(path, as_version=4)
    if (notebook.nbformat, notebook.nbformat_minor) >= (4, 5):
        for cell in notebook.cells:
            cell.setdefault("id", uuid.uuid4().hex[:8])
    return notebook


def run_notebook(path: str, args: list[str], run_dir: Path | None, rank_zero: bool) -> None:
    """Run the notebook's code cells in order; raise the exception of a cell that fails."""
    import nbformat

    notebook = _read(path)
    _console_progress_bars()
    sys.argv = [path, *args]
    recorder = _Recorder(keep=rank_zero and run_dir is not None)
    shell = _shell(recorder)
    shell.user_ns["__name__"] = "__main__"
    out = executed_path(run_dir, Path(path)) if recorder.keep and run_dir is not None else None
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        recorder.start_cell()
        streams = sys.stdout, sys.stderr
        if recorder.keep:
            sys.stdout, sys.stderr = (_Tee(streams[0], "stdout", recorder.outputs),
                                      _Tee(streams[1], "stderr", recorder.outputs))
        try:
            result = shell.run_cell(session_lines_removed(cell.source), store_history=True)
        finally:
            sys.stdout, sys.stderr = streams
        if out is not None:
            cell.execution_count = result.execution_count
            for output in recorder.outputs:
                if output["output_type"] == "execute_result":
                    output["execution_count"] = result.execution_count
            cell.outputs = [nbformat.from_dict(o) for o in recorder.outputs]
            nbformat.write(notebook, str(out))
        error = result.error_before_exec or result.error_in_exec
        if error is not None:
            if not rank_zero:  # the same cell fails on every rank: rank 0 writes its error output first
                time.sleep(_OTHERS_WAIT_S)
            raise error
