"""`python -m benchmarks [--runs 5] [--gpus N] [--quick] [--out FILE]`: fastlaunch against what users would
run instead, interleaved in one run, written to benchmarks/RESULTS.md as ratios with their spread."""
from __future__ import annotations

import argparse
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

from .harness import fault_to_exit, left_after_sigkill, peer_commands, run_once
from .stats import _median, _ratio, _values, failures
from .tiny import run_tiny, tiny_failures, tiny_lines

FL, FL_OFF, TR_FASTAI, FLOOR = ("fastlaunch", "fastlaunch, no instrumentation", "torchrun + hand-wrapped fastai",
                                "torchrun + PyTorch DDP loop (floor)")


def _machine() -> list[str]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return [f"- machine: {cpu}, {len(__import__('os').sched_getaffinity(0))} usable cores, "
            f"{platform.system()} {platform.release()}",
            f"- versions: python {platform.python_version()}, torch {torch.__version__}, fastai {version('fastai')}, "
            f"fastlaunch {version('fastlaunch')}"]


def _hook_cost(result: dict, fl_speed: list[float | None], ranks: int) -> str:
    """The instrumentation's deterministic cost: hooked events per step x ns per event / step time."""
    hooks = result.get("hooks") if result.get("ok") else None
    if not isinstance(hooks, dict) or not [v for v in fl_speed if v]:
        return f"- instrumentation, per event: not measured ({result.get('error') or hooks})"
    step_ns = 64 * ranks / _median(fl_speed) * 1e9  # every rank takes one batch of 64 per step
    parts = ", ".join(f"{n:g} {what} x {hooks['ns_each'][what] / 1000:.2f} us" for what, n in hooks["per_step"].items())
    return (f"- instrumentation, per event: {hooks['ns_per_step'] / 1000:.0f} us of hooks per steady step ({parts}) "
            f"= {hooks['ns_per_step'] / step_ns:.2%} of a {step_ns / 1e6:.0f} ms step (counts exact, each cost the "
            "best of 7 timed rounds)\n- heartbeat for the hang watch (on with or without instrumentation): "
            f"{hooks['beats_per_step']} beats per step x {hooks['ns_per_beat'] / 1000:.2f} us = "
            f"{hooks['beats_per_step'] * hooks['ns_per_beat'] / step_ns:.2%} of the step")


def _probe_lines(counts: dict, probed: dict) -> list[str]:
    """Section 4's independent count: what torch's dispatcher saw in each steady step (dispatch_probe.py)."""
    got = {f"{FL}, no instrumentation": counts[FL], TR_FASTAI: counts[TR_FASTAI], FL: probed[FL]}
    c = {name: r.get("counts", {}) if r.get("ok") else {} for name, r in got.items()}
    lines = ["Counted again at torch's dispatcher by a probe that shares nothing with fastlaunch (a TorchDispatchMode "
             "over each steady step: scalar reads that wait for the device, GPU-to-host copies, every c10d "
             "collective, DDP's gradient all-reduce included; scalar reads of host tensors, which wait for no device, "
             "are listed as host reads and not counted as syncs; fastlaunch's are DDP's reducer under "
             "static_graph reading a host-side counter per parameter inside backward):", ""]
    for name, figures in c.items():
        detail = ", ".join(f"{k}: {v:g}" for k, v in sorted(figures.get("probe_detail", {}).items())) or "none"
        lines.append(f"- probe, {name}: {figures['probe_syncs_per_step']:g} syncs, "
                     f"{figures['probe_collectives_per_step']:g} collectives, "
                     f"{figures.get('probe_host_reads_per_step', 0):g} host reads per step over {figures['probe_steps']} "
                     f"steps ({detail})" if "probe_steps" in figures else
                     f"- probe, {name}: not measured ({got[name].get('error') or 'no probe figures'})")
    hand = c[TR_FASTAI].get("probe_detail", {}).get("c10d::allreduce_")
    for name in (FL, f"{FL}, no instrumentation"):
        if "probe_steps" in c[name] and hand is not None:
            lines.append(f"- probe, {name} beyond hand-wrapped DDP's gradient all-reduces ({hand:g} per step): "
                         f"{c[name]['probe_collectives_per_step'] - hand:g} collectives, "
                         f"{c[name]['probe_syncs_per_step']:g} syncs per step (goal 0 and 0)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds of A B A B ... (at least 5 for a result)")
    parser.add_argument("--gpus", type=int, default=0, help="ranks are GPUs (default: 2 CPU processes)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one round: checks the harness runs")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS.md"))
    args = parser.parse_args(argv)
    ranks, device = (args.gpus, "gpus") if args.gpus else (2, "cpu")
    items, rounds = (512, 1) if args.quick else (2048, args.runs)
    tiny_steps = 60 if args.quick else 1500
    started = time.time()

    two, one = peer_commands(ranks, device), peer_commands(1, device)
    runs: dict[str, list[dict]] = {name: [] for name in two}
    scale: dict[str, list[dict]] = {FL: [], FLOOR: []}
    for _ in range(rounds):  # interleaved: every peer once per round
        for name, (cmd, extra) in two.items():
            runs[name].append(run_once(cmd, extra, items))
        for name in scale if not args.quick else ():  # --quick: the 1-rank runs are the same harness path
            scale[name].append(run_once(*one[name], items))
    # Counted without fastlaunch's instrumentation, which would share the counters.
    counts = {FL: run_once(two[FL_OFF][0], {**two[FL_OFF][1], "BENCH_COUNT": "1"}, items),
              TR_FASTAI: run_once(two[TR_FASTAI][0], {**two[TR_FASTAI][1], "BENCH_COUNT": "1"}, items)}
    probed = {FL: run_once(two[FL][0], {**two[FL][1], "BENCH_PROBE": "1", **({"BENCH_HOOKS": "1"} if args.quick else {})},
                           items)}  # instrumentation on; --quick: the hook costs from the same run (figures unchecked)
    hooks = probed[FL] if args.quick else run_once(two[FL][0], {**two[FL][1], "BENCH_HOOKS": "1"}, items)
    fault_peers = (FL,) if args.quick else (FL, TR_FASTAI)  # --quick checks the harness: fastlaunch's side is enough
    faults = {name: [fault_to_exit(*two[name], max(items, 2048)) for _ in range(rounds)] for name in fault_peers}
    orphans = {name: left_after_sigkill(*two[name], items) for name in fault_peers}
    tiny = run_tiny(ranks, device, rounds, tiny_steps)

    lines = ["# Benchmarks", "", f"Written by `python -m benchmarks{' --quick' if args.quick else ''}"
             f"{f' --runs {args.runs}' if not args.quick else ''}{f' --gpus {args.gpus}' if args.gpus else ''}` in "
             f"{time.time() - started:.0f} s, {rounds} interleaved round(s), {ranks} {device} rank(s), "
             f"{items} images of 3x32x32, batch 64 per rank, OMP_NUM_THREADS=1, fixed seeds, first 3 steps left "
             "out. Ratios are medians of per-round ratios with their min-max spread; identical runs on 2 shared "
             "cores spread about 8%.", ""] + _machine() + ["", "Peers (exact commands, from benchmarks/harness.py):",
                                                           ""]
    lines += [f"- {name}: `{' '.join(Path(a).name if a.endswith('.py') else a for a in cmd)}`"
              + (f" with {extra}" if extra else "") for name, (cmd, extra) in two.items()]
    lines += ["- fastai's own `distrib_ctx` on CPU ranks: cannot run here (its DistributedDL calls `.cuda()` and "
              "DistributedTrainer reads `model.device`).",
              "- `accelerate launch --cpu --num_processes 2`: starts one process on CPU, so it is no 2-rank peer.", ""]
    first = {n: _values(runs, n, "first_step") for n in runs}
    speed = {n: _values(runs, n, "samples_per_s") for n in runs}
    rss = {n: _values(runs, n, "peak_rss_mb") for n in runs}
    s1 = {n: _values(scale, n, "samples_per_s") for n in scale}
    lines += ["## 1. Launch to first training step (2 ranks)", "",
              f"- fastlaunch / torchrun + hand-wrapped fastai: {_ratio(first[FL], first[TR_FASTAI])} "
              f"(medians {_median(first[FL]):.1f} s and "
              f"{_median(first[TR_FASTAI]):.1f} s)", "",
              "## 2. Throughput (samples/s, small CNN, batch 64 per rank)", "",
              f"- fastlaunch / floor: {_ratio(speed[FL], speed[FLOOR])}",
              f"- fastlaunch / torchrun + hand-wrapped fastai: {_ratio(speed[FL], speed[TR_FASTAI])}",
              f"- instrumentation on / off: {_ratio(speed[FL], speed[FL_OFF])}",
              _hook_cost(hooks, speed[FL], ranks), "",
              "## 3. Scaling (2 ranks / 1 rank, samples/s)", "",
              f"- fastlaunch: {_ratio(speed[FL], s1[FL])}", f"- floor: {_ratio(speed[FLOOR], s1[FLOOR])}", "",
              "## 4. Syncs and collectives per steady-state training step (exact counts, rank 0)", ""]
    for name, result in counts.items():
        c = result.get("counts", {}) if result.get("ok") else {}
        detail = ", ".join(f"{k}: {v:g}" for k, v in sorted(c.get("syncs", {}).items())) or "none"
        lines.append(f"- {name}: {c.get('collectives_per_step', 'n/a')} Python-level collectives, "
                     f"{c.get('syncs_per_step', 'n/a')} sync calls per step ({detail})"
                     if c else f"- {name}: not measured ({result.get('error')})")
    lines += ["  (DDP's own gradient all-reduce is not a Python-level call and is not counted.)", ""]
    lines += _probe_lines(counts, probed)
    lines += ["",
              "## 5. Peak memory per rank (RSS, MB)", "",
              f"- fastlaunch / floor: {_ratio(rss[FL], rss[FLOOR])} (medians "
              f"{_median(rss[FL]):.0f} and "
              f"{_median(rss[FLOOR]):.0f})",
              f"- fastlaunch / torchrun + hand-wrapped fastai: {_ratio(rss[FL], rss[TR_FASTAI])} (medians "
              f"{_median(rss[FL]):.0f} and {_median(rss[TR_FASTAI]):.0f})", "",
              "## 6. Faults", ""]
    ok = {name: _values(faults, name, "seconds") for name in faults}
    ok.setdefault(TR_FASTAI, [])
    left = {name: r["left"] if r.get("ok") else "n/a (failed)" for name, r in orphans.items()}
    lines += [f"- crash of rank 1 to exit: fastlaunch / torchrun: {_ratio(ok[FL], ok[TR_FASTAI])} (medians "
              f"{_median(ok[FL]):.1f} s and "
              f"{_median(ok[TR_FASTAI]):.1f} s)",
              f"- processes left 5 s after SIGKILL of the launcher: fastlaunch {left[FL]}, "
              f"torchrun {left.get(TR_FASTAI, 'not run (--quick)')}", ""]
    lines += tiny_lines(tiny)
    # Every failed run of every section, none dropped.
    failed = [line for how, group in ((f"{ranks} ranks", runs), ("1 rank", scale)) for name, rs in group.items()
              for line in failures(f"{name} ({how})", rs)]
    failed += [line for name, r in counts.items() for line in failures(f"{name} (counting syncs)", [r])]
    failed += failures(f"{FL} (timing hooks)", [hooks])
    failed += failures(f"{FL} (dispatch probe)", [probed[FL]])
    failed += [line for name, rs in faults.items() for line in failures(f"{name} (crash of rank 1)", rs)]
    failed += [line for name, r in orphans.items() for line in failures(f"{name} (SIGKILL of the launcher)", [r])]
    failed += tiny_failures(tiny)
    if failed:
        lines += ["## Runs that failed", ""] + failed + [""]
    Path(args.out).write_text("\n".join(lines))
    print(f"benchmarks: wrote {args.out} in {time.time() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
