"""report.json and report.png, built by the launcher from metrics/rank<R>.jsonl (it outlives the ranks,
so a rank that died is named as missing and never blocks the report)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import BinaryIO

import json
import os
from statistics import mean, median
from pathlib import Path

from ..heartbeat import space_left
from ..lines import launcher_line
from .rundir import attempt_of
from .diagnose import diagnose

__all__ = ["read_records", "assemble_report", "build_report", "render_text", "SCHEMA"]

SCHEMA = "fastlaunch.report/1"


def read_records(run_dir: Path) -> list[dict]:
    """Every epoch record of every rank (a torn last line from a killed rank is skipped)."""
    records = []
    for path in sorted((Path(run_dir) / "metrics").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


_PANELS = (("step_time", "step time (ms)", 1000.0, None), ("data_wait_frac", "waiting for data (% of step)", 100.0, 100.0))


def _slots(records: list[dict]) -> list[tuple[int, int, int]]:
    """Each (fit, attempt, epoch) of the run once, in the order the run reached it: the x axis."""
    seen: dict[tuple[int, int, int], float] = {}
    for r in records:
        key = (int(r.get("fit", 0)), int(r.get("attempt", 0)), int(r["epoch"]))
        seen[key] = min(seen.get(key, float("inf")), float(r.get("time", 0.0)))
    return sorted(seen, key=lambda k: (seen[k], k))


def _plot(records: list[dict], path: Path | BinaryIO, title: str = "", diagnoses: Sequence[str] = ()) -> None:
    """report.png: step time, data wait and memory per epoch; one labelled line per rank (past 8 ranks, the
    spread as a band with the median and the slowest rank); y axes from zero; whole epoch numbers as the run
    numbered them (a resumed run keeps its own); fits and restarts marked; the diagnoses written below."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    memory_key = "cuda_reserved_mb" if any("cuda_reserved_mb" in r for r in records) else "rss_mb"
    panels = (*_PANELS, (memory_key, "memory (MB, " + ("CUDA reserved" if memory_key != "rss_mb" else "RSS") + ")",
                         1.0, None))
    slots = _slots(records)
    where = {key: i for i, key in enumerate(slots)}
    ranks = sorted({r["rank"] for r in records})
    notes = [textwrap.fill(f"- {d}", 150) for d in diagnoses] or ["- nothing slows this run down that fastlaunch can see"]
    note_lines = sum(n.count("\n") + 1 for n in notes)
    fig = plt.figure(figsize=(13, 4.0 + 0.17 * note_lines))
    bottom = (0.55 + 0.17 * note_lines) / fig.get_figheight()
    axes = fig.subplots(1, 3, gridspec_kw={"left": 0.05, "right": 0.99, "top": 0.8, "bottom": bottom + 0.08})
    fig.suptitle(title, fontsize=11)
    slowest = max(ranks, key=lambda k: mean(r["step_time"] for r in records if r["rank"] == k))
    for ax, (key, label, scale, top) in zip(axes, panels):
        lines = {rank: sorted(((where[(int(r.get("fit", 0)), int(r.get("attempt", 0)), int(r["epoch"]))],
                                r.get(key, 0.0) * scale) for r in records if r["rank"] == rank)) for rank in ranks}
        if len(ranks) <= 8:
            for rank, points in lines.items():
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o", ms=3, label=f"rank {rank}")
        else:
            xs = sorted({x for points in lines.values() for x, _ in points})
            values = [[y for points in lines.values() for x, y in points if x == at] for at in xs]
            ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], alpha=0.25,
                            label=f"{len(ranks)} ranks, min to max")
            ax.plot(xs, [median(v) for v in values], label="median")
            points = lines[slowest]
            ax.plot([x for x, _ in points], [y for _, y in points], marker="o", ms=3, label=f"rank {slowest} (slowest)")
        highest = max((y for points in lines.values() for _, y in points), default=0.0)
        ax.set_ylim(0, top if top is not None else max(highest * 1.15, 1e-9))
        ax.set_xlim(-0.5, len(slots) - 0.5)
        step = max(1, len(slots) // 12)
        ax.set_xticks(range(0, len(slots), step), [str(slots[i][2]) for i in range(0, len(slots), step)])
        ax.set_xlabel("epoch")
        ax.set_title(label, fontsize=10)
        for i in range(1, len(slots)):
            if slots[i][0] != slots[i - 1][0]:
                ax.axvline(i - 0.5, color="grey", ls="--", lw=0.8)
                ax.text(i - 0.45, ax.get_ylim()[1] * 0.97, f"fit {slots[i][0] + 1}", fontsize=7, va="top")
            elif slots[i][1] != slots[i - 1][1]:
                ax.axvline(i - 0.5, color="red", ls=":", lw=0.8)
                ax.text(i - 0.45, ax.get_ylim()[1] * 0.97, "restart", fontsize=7, va="top", color="red")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.text(0.01, 0.02, "\n".join(notes), fontsize=8, va="bottom", family="monospace")
    try:
        fig.savefig(path, dpi=90, format="png")
    finally:
        plt.close(fig)


def _title(run_dir: Path, records: list[dict], world_size: int) -> str:
    """The script, the run, ranks x device, nodes, and the time the epochs took."""
    import yaml

    try:
        script = Path(str(yaml.safe_load((run_dir / "launch.yaml").read_text())["script"])).name
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        script = "script"
    device = records[0].get("device", "cpu") if records else "cpu"
    nodes = len({r.get("node", 0) for r in records}) or 1
    span = max(r["time"] for r in records) - min(r["time"] - r["step_time"] * r.get("steps", 0) for r in records)
    ranks = world_size or len({r["rank"] for r in records})
    return (f"{script}, run {run_dir.name}: {ranks} rank{'s' if ranks != 1 else ''} x {device}"
            f"{f' on {nodes} nodes' if nodes > 1 else ''}, {len(_slots(records))} epoch(s) "
            f"recorded over {span:.0f} s")


def assemble_report(run_dir: Path, world_size: int, failed: Sequence[int] = (), ranks_per_node: int | None = None,
                    records: list[dict] | None = None) -> dict:
    """The report of `records` (default: every record of the run), written nowhere."""
    run_dir = Path(run_dir)
    records = read_records(run_dir) if records is None else records
    present = sorted({r["rank"] for r in records})
    # nothing trained (a script that exits without a fit, a crash before the first epoch's end): no rank is
    # "missing" (the failure summary has named the culprit)
    missing = sorted({r for r in range(world_size) if r not in present} | set(failed)) if records else []
    last_epoch = {r: max(x["epoch"] for x in records if x["rank"] == r) for r in present}
    restarts = max((attempt_of(p) for p in (run_dir / "logs").glob("rank*.log")), default=0)
    return {"schema": SCHEMA, "world_size": world_size, "ranks": present, "missing": missing,
            "last_epoch": last_epoch, "attempts": sorted({r.get("attempt", 0) for r in records}),
            "restarts": restarts,
            "epochs": records, "diagnoses": diagnose(records, missing, last_epoch, ranks_per_node)}


def build_report(run_dir: Path, world_size: int, failed: Sequence[int] = (), ranks_per_node: int | None = None) -> dict:
    """Write report.json and report.png; return the report. `failed`: ranks the launcher saw die;
    `ranks_per_node` (several nodes): missing ranks are named with their node."""
    report = assemble_report(run_dir, world_size, failed, ranks_per_node)
    run_dir = Path(run_dir)
    written = _write_whole(run_dir / "report.json", lambda fh: fh.write(json.dumps(report, indent=1).encode()))
    if written and report["epochs"]:  # (a disk too full for report.json has no room for the picture)
        title = _title(run_dir, report["epochs"], world_size)
        _write_whole(run_dir / "report.png", lambda fh: _plot(report["epochs"], fh, title, report["diagnoses"]))
    return report


def _write_whole(path: Path, write: Callable[[BinaryIO], object]) -> bool:
    """Write path under a temporary name, then rename it: on a write error (a full disk) the file is left as
    it was, no temporary file stays, and one line says so."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
        return True
    except OSError as err:
        tmp.unlink(missing_ok=True)
        launcher_line(f"fastlaunch: could not write {path}: {err.strerror or err} ({space_left(path.parent)}); "
                      "the report is on the console only")
        return False


def render_text(report: dict) -> str:
    """The report for a person: the last epoch per rank, then the diagnoses."""
    lines = []
    last: dict[tuple[int, int], dict] = {}  # (fit, rank): its last epoch
    for r in report["epochs"]:
        last[(int(r.get("fit", 0)), r["rank"])] = r
    several = len({fit for fit, _ in last}) > 1  # a script that trains more than once: one block per fit
    for (fit, rank), r in sorted(last.items()):
        designed = r.get("by_design_syncs_per_step", 0.0)
        lines.append(f"fastlaunch: {f'fit {fit + 1}, ' if several else ''}rank {rank} (epoch {r['epoch']}, "
                     f"attempt {r.get('attempt', 0)}): "
                     f"step {r['step_time'] * 1000:.0f} ms, data wait {r['data_wait_frac']:.0%}, "
                     f"{r['syncs_per_step']:.1f} syncs/step{f' ({designed:.1f} by design)' if designed else ''}, "
                     f"RSS {r['rss_mb']:.0f} MB")
    if report.get("restarts"):
        lines.append(f"fastlaunch: {report['restarts']} automatic restart(s) after failures "
                     f"(each attempt's logs: logs/rank<R>.attempt<A>.log)")
    for text in report["diagnoses"] or ["nothing slows this run down that fastlaunch can see"]:
        lines.append(f"fastlaunch: diagnosis: {text}")
    return "\n".join(lines)
