"""Diagnoses in plain words, each with its number and a fix, from the per-rank epoch records."""
from __future__ import annotations

from collections.abc import Sequence

from statistics import mean, median

from ..advice import data_wait_advice
from ..records import BY_DESIGN

__all__ = ["diagnose", "STRAGGLER_RATIO", "STRAGGLER_MIN_S"]

# A straggler works more than STRAGGLER_RATIO times the median rank's time per step AND at least STRAGGLER_MIN_S
# more: 21% of 3 ms is noise (a busy core, a timer's resolution), not a rank worth naming.
STRAGGLER_RATIO = 1.2
STRAGGLER_MIN_S = 0.005


def _by_rank(records: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in records:
        out.setdefault(r["rank"], []).append(r)
    return out


def _top(recs: list[dict], field: str, keep=lambda src: True) -> tuple[str, float]:
    """The source of most syncs per step over the records, and its number."""
    sources: dict[str, float] = {}
    for r in recs:
        for src, n in r.get(field, {}).items():
            if keep(src):
                sources[src] = sources.get(src, 0.0) + n / len(recs)
    return max(sources.items(), key=lambda kv: kv[1]) if sources else ("unknown", 0.0)


def _syncs(rank: int, recs: list[dict]) -> list[str]:
    """Avoidable syncs (with their main source), GradScaler's by design, and what only CUDA's audit saw."""
    found = []
    per_step = mean(r["syncs_per_step"] for r in recs)
    designed = mean(r.get("by_design_syncs_per_step", 0.0) for r in recs)
    if per_step - designed >= 0.5:
        top, n = _top(recs, "sync_sources", keep=lambda src: BY_DESIGN not in src)
        what = "avoidable syncs" if designed >= 0.5 else "syncs"
        found.append(f"rank {rank}: {per_step - designed:.1f} {what} per step, {n:.1f} from {top}: each one "
                     "waits for the GPU to finish; keep values on the device, read them once per epoch")
    if designed >= 0.5:
        found.append(f"rank {rank}: {designed:.1f} syncs per step from fp16's GradScaler (its inf check and scale "
                     "read), by design; bf16 needs no scaler: --precision bf16 where the GPUs support it")
    audited = [r for r in recs if "audit_syncs_per_step" in r]
    if audited:
        extra = mean(r["audit_syncs_per_step"] - r["syncs_per_step"] for r in audited)
        if extra >= 0.5:
            top, n = _top(audited, "audit_sources")
            found.append(f"rank {rank}: CUDA's sync audit ({audited[0]['audit_steps']} steps) found {extra:.1f} more "
                         f"syncs per step than the counters, {n:.1f} from {top}: operations such as nonzero, masked "
                         "indexing or a copy from pageable memory wait for the GPU; keep them out of the step")
    return found


def diagnose(records: list[dict], missing: Sequence[int] = (), last_epoch: dict | None = None,
             ranks_per_node: int | None = None) -> list[str]:
    """Why training is slow or short of memory, as far as the records tell."""
    last_epoch = last_epoch or {}

    def who(r: int) -> str:
        return f"rank {r} (node {r // ranks_per_node})" if ranks_per_node else f"rank {r}"

    found = [f"{who(r)} is missing from the report after epoch {last_epoch[r]}: it died (see its log)"
             if r in last_epoch else f"{who(r)} is missing from the report: it died or never trained (see its log)"
             for r in missing]
    ranks = _by_rank(records)
    if not ranks:
        return found
    for rank, recs in sorted(ranks.items()):
        wait = mean(r["data_wait_frac"] for r in recs)
        if wait > 0.2:
            found.append(data_wait_advice(rank, wait, recs[-1].get("num_workers", 0), recs[-1].get("cores") or 1,
                                          mean(r["step_time"] for r in recs)))
        found += _syncs(rank, recs)
        last = recs[-1]
        if last.get("cuda_reserved_mb") and last.get("fragmentation", 0) > 0.3:
            found.append(f"rank {rank}: reserved {last['cuda_reserved_mb'] / 1024:.1f} GB, allocated "
                         f"{last['cuda_allocated_mb'] / 1024:.1f} GB: {last['fragmentation']:.0%} fragmentation, "
                         f"{last.get('alloc_retries', 0)} allocation retries; try "
                         "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
        if last.get("device") == "cpu" and last.get("visible_gpus"):
            found.append(f"rank {rank} trained on cpu while {last['visible_gpus']} GPUs are visible: "
                         "use --gpus N (not --cpu)")
    if len(ranks) > 1:
        crowded = _oversubscribed(ranks)
        found += crowded.values()
        work = {rank: mean(r["work_time"] for r in recs) for rank, recs in ranks.items()}
        mid = median(work.values())
        for rank, value in sorted(work.items()):
            if ranks[rank][-1].get("node", 0) in crowded:
                continue  # ranks that take turns on too few cores: their times name no straggler
            if mid > 0 and value > STRAGGLER_RATIO * mid and value - mid >= STRAGGLER_MIN_S:
                found.append(f"rank {rank} steps {value / mid - 1:.0%} slower than the median "
                             f"({value * 1000:.1f} ms of work per step against {mid * 1000:.1f} ms): the others wait "
                             "for it at every gradient all-reduce; look at its machine, data or callbacks")
    return found


def _oversubscribed(ranks: dict[int, list[dict]]) -> dict[int, str]:
    """Machines whose CPU ranks outnumber its cores (node_cores, recorded by each rank): node -> the diagnosis."""
    nodes: dict[int, tuple[set[int], int]] = {}
    for rank, recs in ranks.items():
        last = recs[-1]
        if last.get("device") == "cpu" and last.get("node_cores"):
            seen, cores = nodes.get(last.get("node", 0), (set(), 0))
            nodes[last.get("node", 0)] = (seen | {rank}, max(cores, int(last["node_cores"])))
    several = len({r[-1].get("node", 0) for r in ranks.values()}) > 1
    out = {}
    for node, (seen, cores) in sorted(nodes.items()):
        local = max([len(seen)] + [int(ranks[r][-1].get("local_ranks") or 0) for r in seen])
        if local > cores:
            where = f"node {node} " if several else ""
            out[node] = (f"{where}oversubscribed: {local} ranks on {cores} cores: the ranks take turns on the cores, "
                         "so their step times vary and name no straggler; use --cpu "
                         f"{cores} or fewer on this machine")
    return out
