"""Section 7 of RESULTS.md, the tiny step: a 1-layer model at batch 8 per rank, so a step is nearly all the
framework's own work. Interleaved rounds of the peers in harness.tiny_commands, then one profiled run each
of fastlaunch and the hand-wrapped fastai script for the breakdown by component."""
from __future__ import annotations

import statistics
from pathlib import Path

from .harness import run_once, tiny_commands
from .stats import _goal, _median, _ratio, _values, failures
from .workloads.common import TINY_WARMUP

FL, FL_OFF, HAND, DDP, FL_DDP = ("fastlaunch", "fastlaunch, no instrumentation", "torchrun + hand-wrapped fastai",
                                 "torchrun + PyTorch DDP loop", "fastlaunch + PyTorch DDP loop")
GOAL_OFF, GOAL_ON, GOAL_LAUNCH = 1.01, 1.03, 1.1
SMALL_US = 0.5  # fastlaunch modules under this many us per step are summed in one line


def run_tiny(ranks: int, device: str, rounds: int, steps: int) -> dict:
    """Every peer once per round (A B C D E, A B C D E, ...), then the two profiled runs."""
    peers = tiny_commands(ranks, device)
    env = {"BENCH_STEPS": str(steps)}
    runs: dict[str, list[dict]] = {name: [] for name in peers}
    for _ in range(rounds):
        for name, (cmd, extra) in peers.items():
            runs[name].append(run_once(cmd, {**extra, **env}, 0))
    profiles = {}
    for name in (FL, HAND):
        cmd, extra = peers[name]
        result = run_once(cmd, {**extra, **env, "BENCH_PROFILE": "1"}, 0)
        if result.get("ok") and not isinstance(result.get("profile"), dict):
            result = {"ok": False, "error": "rank 0 wrote no profile"}
        profiles[name] = result
    return {"peers": peers, "runs": runs, "profiles": profiles, "steps": steps, "ranks": ranks, "device": device}


def tiny_failures(tiny: dict) -> list[str]:
    """Every failed run of the section, the profiled ones included."""
    lines = [line for name, results in tiny["runs"].items() for line in failures(f"{name} (tiny step)", results)]
    return lines + [line for name, result in tiny["profiles"].items()
                    for line in failures(f"{name} (tiny step, profiled)", [result])]


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole > 0 else "n/a"


def _top(profile: dict, group: str, n: int = 3) -> str:
    return ", ".join(f"{where} {us:.0f} us" for where, us in profile["top"].get(group, [])[:n]) or "none"


def _breakdown(profiles: dict, cpu: dict) -> list[str]:
    lines = ["Rank 0's measured training steps under cProfile (one run of each peer), timed by the thread's own CPU "
             "clock like the CPU figures above (a wait for the other rank or for the GIL costs none): own time "
             "(tottime) per step, grouped by where the code lives (a built-in C function counts with its Python "
             "caller, torch's own as torch; torch.distributed: the collectives). Profiler figures are inflated by "
             "the profiler (every Python call pays for being timed, so code that makes many small calls looks "
             "costlier) and are shares, not wall times: the CPU and wall-clock figures above are the measurements.",
             ""]
    bad = [f"{name}: {r.get('error')}" for name, r in profiles.items() if not r.get("ok")]
    if bad:
        return lines + [f"- not measured ({'; '.join(bad)})", ""]
    a, b = profiles[FL]["profile"], profiles[HAND]["profile"]
    us_a, us_b = a["us_per_step"], b["us_per_step"]
    all_a, all_b = sum(us_a.values()), sum(us_b.values())
    diff = all_a - all_b
    measured = [(x - y) * 1000 for x, y in zip(cpu[FL], cpu[HAND]) if x and y]
    inflated = [f"{name} {total / 1000 / _median(cpu[name]):.1f}x" for name, total in ((FL, all_a), (HAND, all_b))
                if _median(cpu[name]) > 0]  # nan where every round failed: left out
    ours = sorted(((g, v) for g, v in us_a.items() if g.startswith("fastlaunch/")), key=lambda kv: -kv[1])
    own = sum(v for _, v in ours)
    lines += [f"- profiled main-thread CPU per step: fastlaunch {all_a:.0f} us, hand-wrapped fastai {all_b:.0f} us, "
              f"difference {diff:+.0f} us (unprofiled: "
              + (f"{statistics.median(measured):+.0f} us per step, median of the rounds" if measured else "n/a")
              + f"; the profiler inflates the step {', '.join(inflated) or 'n/a'})",
              f"- fastlaunch's added time per step, by component: its own modules {own:.0f} us/step "
              + (f"({_share(own, diff)} of the difference), " if diff > 0 else
                 f"({_share(own, all_a)} of its profiled step; no difference to share: its step is the shorter), ")
              + f"{sum(a['calls_per_step'].get(g, 0) for g, _ in ours):.0f} calls/step:"]
    lines += [f"  - {g}: {v:.1f} us/step ({_share(v, diff if diff > 0 else all_a)}), "
              f"{a['calls_per_step'].get(g, 0):.1f} calls/step; "
              f"top: {_top(a, g, 2)}" for g, v in ours if v >= SMALL_US]
    small = [v for _, v in ours if v < SMALL_US]
    if small:
        lines.append(f"  - {len(small)} other fastlaunch modules: {sum(small):.1f} us/step together")
    for group in ("fastai", "fastcore", "torch", "torch.distributed", "rest"):
        x, y = us_a.get(group, 0.0), us_b.get(group, 0.0)
        lines.append(f"  - {group}: {x - y:+.0f} us/step ({_share(x - y, diff)}): {x:.0f} us/step in fastlaunch "
                     f"({_share(x, all_a)} of its profiled step), {y:.0f} us/step hand-wrapped ({_share(y, all_b)}); "
                     f"top: fastlaunch {_top(a, group, 2)}; hand-wrapped {_top(b, group, 2)}")
    lines += [f"- fastai's own share of the profiled step: fastlaunch {_share(us_a.get('fastai', 0), all_a)}, "
              f"hand-wrapped {_share(us_b.get('fastai', 0), all_b)} (with fastcore, the toolkit fastai is written "
              f"in: {_share(us_a.get('fastai', 0) + us_a.get('fastcore', 0), all_a)} and "
              f"{_share(us_b.get('fastai', 0) + us_b.get('fastcore', 0), all_b)})"]
    return lines + [""]


def tiny_lines(tiny: dict) -> list[str]:
    runs, steps = tiny["runs"], tiny["steps"]
    cpu, sps, proc, first, rss = ({n: _values(runs, n, key) for n in runs} for key in (
        "cpu_ms_per_step", "steps_per_s", "process_cpu_ms_per_step", "first_step", "peak_rss_mb"))
    launcher = f"fastlaunch --{tiny['device']} {tiny['ranks']}"
    lines = [f"## 7. Tiny step (1-layer model, batch 8 per rank, {steps} steps)", "",
             f"nn.Linear(16, 2) on 16 features, batch 8 per rank, one epoch of {steps} training steps per rank, "
             f"the first {TINY_WARMUP} left out: a step is nearly all the framework's own work (the training loop, "
             "callbacks, loader, DDP). Both fastai peers run the same script with the same fastai DataLoader (the "
             "hand-wrapped one in fastai's DistributedDL, its index broadcast on the CPU) and the same callbacks, "
             "no progress bar. Main-thread CPU per step: time.thread_time() of the training thread from step to "
             "step (a wait for the other rank costs none; the higher of the ranks); steps/s: rank 0's wall clock. "
             "Peers:", ""]
    lines += [f"- {name}: `{' '.join(Path(a).name if a.endswith('.py') else a for a in cmd)}`"
              + (f" with {extra}" if extra else "") for name, (cmd, extra) in tiny["peers"].items()]
    lines += ["", f"- main-thread CPU per step, fastlaunch / hand-wrapped fastai: {_ratio(cpu[FL], cpu[HAND])} "
                  f"({_goal(cpu[FL], cpu[HAND], GOAL_ON)})",
              f"- main-thread CPU per step, fastlaunch --no-instrument / hand-wrapped fastai: "
              f"{_ratio(cpu[FL_OFF], cpu[HAND])} ({_goal(cpu[FL_OFF], cpu[HAND], GOAL_OFF)})",
              f"- main-thread CPU per step, plain DDP loop / hand-wrapped fastai: {_ratio(cpu[DDP], cpu[HAND])}",
              f"- steps/s, fastlaunch / hand-wrapped fastai: {_ratio(sps[FL], sps[HAND])}",
              f"- steps/s, fastlaunch --no-instrument / hand-wrapped fastai: {_ratio(sps[FL_OFF], sps[HAND])}",
              f"- steps/s, plain DDP loop / hand-wrapped fastai: {_ratio(sps[DDP], sps[HAND])}",
              f"- launch to first step of a plain PyTorch DDP script, `{launcher}` / torchrun: "
              f"{_ratio(first[FL_DDP], first[DDP])} ({_goal(first[FL_DDP], first[DDP], GOAL_LAUNCH)}) (medians "
              f"{_median(first[FL_DDP]):.1f} s and {_median(first[DDP]):.1f} s)",
              f"- peak memory per rank, fastlaunch / hand-wrapped fastai: {_ratio(rss[FL], rss[HAND])} (medians "
              f"{_median(rss[FL]):.0f} and {_median(rss[HAND]):.0f} MB)",
              "- medians of each peer (main-thread CPU per step, the whole process's CPU per step with its other "
              "threads, steps/s, peak RSS per rank):"]
    lines += [f"  - {name}: {_median(cpu[name]):.3f} ms/step, {_median(proc[name]):.3f} ms/step whole process, "
              f"{_median(sps[name]):.0f} steps/s, {_median(rss[name]):.0f} MB" for name in runs]
    return lines + ["", "### fastlaunch's added time per step, by component", ""] + _breakdown(tiny["profiles"], cpu)
