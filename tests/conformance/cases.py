"""The conformance cases: each is a small fastai script of the shape users write, on generated data.

`python cases.py CASE[,CASE...]` runs the cases in order, as one script: under `fastlaunch --cpu 2` each
rank writes what it saw to $FL_CONF_OUT/<case>-rank<R>.json and rank 0 saves the final weights; with
FL_CONF_MODE=validate (one plain process, no launcher) each case rebuilds its final Learner, loads those
weights and writes what one process computes from them (validate, predictions) to <case>-validate.json.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

MODE = os.environ.get("FL_CONF_MODE", "train")
OUT = Path(os.environ.get("FL_CONF_OUT", "."))
RANK = int(os.environ.get("RANK", 0))

from registry import CASES  # noqa: E402

import case_apps  # noqa: E402,F401  (registers the application cases)
import case_callbacks  # noqa: E402,F401  (registers the callback cases)
import case_shapes  # noqa: E402,F401  (registers the script-shape cases)


def _recorder(learn) -> dict:
    rec = learn.recorder
    return {"values": [[float(v) for v in row] for row in getattr(rec, "values", [])],
            "losses": [round(float(v), 6) for v in getattr(rec, "losses", [])],
            "lrs": [float(v) for v in getattr(rec, "lrs", [])],
            "metric_names": list(getattr(rec, "metric_names", []))}


def main(names: list[str]) -> None:
    for name in names:
        c = CASES[name]
        meta = {"covers": list(c.covers), "note": c.note, "upstream": c.upstream}
        (OUT / f"{name}-meta.json").write_text(json.dumps(meta))
        if MODE == "validate":
            if c.final is None:  # its data depend on the run (e.g. an unseeded split): checked across ranks only
                continue
            learn = c.final()
            learn.model.load_state_dict(torch.load(OUT / f"{name}.pth"))
            out = {"validate": [float(v) for v in learn.validate()]}
        else:
            torch.manual_seed(0)  # every case starts alike, whatever ran before it in this process
            learn = c.run()
            out = {"rank": RANK, **_recorder(learn),
                   **(getattr(learn, "conformance", None) or {})}  # a case's own "values": its fit's record
            if RANK == 0:
                torch.save(learn.model.state_dict(), OUT / f"{name}.pth")
            print(f"CONFORMANCE {name}: done", flush=True)
        if c.probes is not None:
            out["probes"] = c.probes(learn)
        suffix = "validate" if MODE == "validate" else f"rank{RANK}"
        (OUT / f"{name}-{suffix}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1].split(","))
