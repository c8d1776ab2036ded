"""`python -m benchmarks.session [--rounds 3] [--quick] [--out FILE]`: notebook sessions against scripts.

Each round, side by side: the fastai benchmark script under `fastlaunch --cpu 2` (launch to first step,
samples/s), then a real Jupyter kernel with `%fastlaunch --cpu 2` (session start to ready), trivial cells
(`x = 1`: the round trip as the notebook's client sees it), and the same script run as one cell (samples/s).
Writes benchmarks/RESULTS-notebook.md as ratios of the same round, with their spread.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .harness import WORK, _env, run_once

TRIVIAL_CELLS = 30


def _execute(kc, code: str, guard_s: float = 900) -> dict:
    msg_id = kc.execute(code, allow_stdin=False)
    deadline = time.monotonic() + guard_s
    while time.monotonic() < deadline:
        try:
            reply = kc.get_shell_msg(timeout=1)
        except Exception:
            continue
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply["content"]
    raise RuntimeError(f"cell did not end within {guard_s} s: {code[:60]}")


def session_once(items: int) -> dict:
    """One session: ready time, trivial round trips, the benchmark script as a cell."""
    from jupyter_client import KernelManager

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        km = KernelManager(kernel_name="python3")
        km.start_kernel(cwd=tmp, env=_env(out, "session", {"BENCH_ITEMS": str(items)}))
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=120)
            _execute(kc, "%load_ext fastlaunch")
            start = time.monotonic()
            reply = _execute(kc, "%fastlaunch --cpu 2")
            ready = time.monotonic() - start
            if reply["status"] != "ok":
                return {"ok": False, "error": f"{reply.get('ename')}: {reply.get('evalue')}"}
            trips = []
            for _ in range(TRIVIAL_CELLS):
                t0 = time.monotonic()
                _execute(kc, "x = 1")
                trips.append((time.monotonic() - t0) * 1000)
            script = WORK / "fastai_cnn.py"
            reply = _execute(kc, f"__file__ = {str(script)!r}\nexec(compile(open(__file__).read(), __file__, 'exec'))")
            ranks = [json.loads(p.read_text()) for p in sorted(out.glob("session-rank*.json"))]
            if reply["status"] != "ok" or not ranks:
                return {"ok": False, "error": f"training cell: {reply.get('ename')}: {reply.get('evalue')}"}
            return {"ok": True, "ready": ready, "trip_ms": statistics.median(trips),
                    "samples_per_s": ranks[0]["samples_per_s"]}
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=False)


def _ratio(pairs: list[float]) -> str:
    if not pairs:
        return "n/a"
    return f"{statistics.median(pairs):.2f}x (spread {min(pairs):.2f}-{max(pairs):.2f}, {len(pairs)} rounds)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 round, few items (keeps the benchmark working)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-notebook.md")))
    args = parser.parse_args(argv)
    rounds, items = (1, 512) if args.quick else (args.rounds, 4096)
    script_argv = [sys.executable, "-m", "fastlaunch", "--cpu", "2", str(WORK / "fastai_cnn.py")]
    scripts, sessions = [], []
    for n in range(rounds):
        print(f"round {n + 1}/{rounds}: script", flush=True)
        scripts.append(run_once(script_argv, {}, items))
        print(f"round {n + 1}/{rounds}: session", flush=True)
        sessions.append(session_once(items))
    both = [(a, b) for a, b in zip(scripts, sessions) if a.get("ok") and b.get("ok")]
    failed = [f"- round {i + 1}: script {a.get('error', 'ok')}; session {b.get('error', 'ok')}"
              for i, (a, b) in enumerate(zip(scripts, sessions)) if not (a.get("ok") and b.get("ok"))]
    trips = [b["trip_ms"] for _, b in both]
    lines = [
        "# Notebook sessions against scripts", "",
        f"`python -m benchmarks.session --rounds {rounds}`: 2 CPU ranks, the fastai benchmark script "
        f"(benchmarks/workloads/fastai_cnn.py, {items} images, batch 64 per rank), each round a script launch and "
        "then a session in a real Jupyter kernel, side by side.", "",
        f"- session start to ready / script launch to first step: {_ratio([b['ready'] / a['first_step'] for a, b in both])}"
        " (goal <= 1.2x)",
        f"- a trivial cell's round trip (`x = 1`, {TRIVIAL_CELLS} per round, as the notebook's client sees it): median "
        + (f"{statistics.median(trips):.1f} ms (rounds' medians {min(trips):.1f}-{max(trips):.1f} ms)" if trips else "n/a")
        + " (goal <= 50 ms)",
        f"- training throughput, the script as one cell / the same script under fastlaunch: "
        f"{_ratio([b['samples_per_s'] / a['samples_per_s'] for a, b in both])} (goal >= 0.98x)",
        "", "Absolute figures per round (script first step s, session ready s, samples/s script vs cell):",
        *[f"- {a['first_step']:.1f} s vs {b['ready']:.1f} s; {a['samples_per_s']:.0f} vs {b['samples_per_s']:.0f}"
          for a, b in both],
    ]
    if failed:
        lines += ["", "## Rounds that failed", *failed]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if both else 1


if __name__ == "__main__":
    sys.exit(main())
