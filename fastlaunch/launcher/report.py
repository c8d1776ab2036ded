"""report.json and report.png, built by the launcher from metrics/rank<R>.jsonl (it outlives the ranks,
so a rank that died is named as missing and never blocks the report)."""
from __future__ import annotations

from collections.abc import Sequence

import json
from pathlib import Path

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


def _plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    memory_key = "cuda_reserved_mb" if any("cuda_reserved_mb" in r for r in records) else "rss_mb"
    panels = (("step_time", "step time (ms)", 1000.0), ("data_wait_frac", "data wait (% of step)", 100.0),
              (memory_key, "memory (MB, " + ("CUDA reserved" if memory_key != "rss_mb" else "RSS") + ")", 1.0))
    for ax, (key, title, scale) in zip(axes, panels):
        for rank in sorted({r["rank"] for r in records}):
            mine = [r for r in records if r["rank"] == rank]
            ax.plot(range(len(mine)), [r.get(key, 0) * scale for r in mine], marker="o", label=f"rank {rank}")
        ax.set_title(title)
        ax.set_xlabel("epoch (in order, attempts included)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


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
    (Path(run_dir) / "report.json").write_text(json.dumps(report, indent=1))
    if report["epochs"]:
        _plot(report["epochs"], Path(run_dir) / "report.png")
    return report


def render_text(report: dict) -> str:
    """The report for a person: the last epoch per rank, then the diagnoses."""
    lines = []
    last: dict[int, dict] = {}
    for r in report["epochs"]:
        last[r["rank"]] = r
    for rank, r in sorted(last.items()):
        designed = r.get("by_design_syncs_per_step", 0.0)
        lines.append(f"fastlaunch: rank {rank} (epoch {r['epoch']}, attempt {r.get('attempt', 0)}): "
                     f"step {r['step_time'] * 1000:.0f} ms, data wait {r['data_wait_frac']:.0%}, "
                     f"{r['syncs_per_step']:.1f} syncs/step{f' ({designed:.1f} by design)' if designed else ''}, "
                     f"RSS {r['rss_mb']:.0f} MB")
    if report.get("restarts"):
        lines.append(f"fastlaunch: {report['restarts']} automatic restart(s) after failures "
                     f"(each attempt's logs: logs/rank<R>.attempt<A>.log)")
    for text in report["diagnoses"] or ["nothing slows this run down that fastlaunch can see"]:
        lines.append(f"fastlaunch: diagnosis: {text}")
    return "\n".join(lines)
