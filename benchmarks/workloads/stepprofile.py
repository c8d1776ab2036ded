"""BENCH_PROFILE=1: rank 0's measured training steps under cProfile, timed by the main thread's CPU clock
(time.thread_time, as StepClock's CPU per step: a wait for the other rank or for the GIL costs none), own time
(tottime) per step grouped by where the code lives: each fastlaunch module (its path in the package), fastai,
fastcore, torch, torch.distributed (the collectives), the rest. A built-in (C) function counts with the Python
function that called it (torch's own count as torch), so `time.time()` called by a fastlaunch module is that
module's time. Inflated by the profiler: shares only."""
import cProfile
import importlib.util
import os
import pstats
import time

TOP = 5  # functions named per group


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)  # no import: the hand-wrapped peer never loads fastlaunch
    locations = list(spec.submodule_search_locations or []) if spec else []
    return os.path.realpath(locations[0]) + os.sep if locations else "\0"


_DIRS = {name: _package_dir(name) for name in ("fastlaunch", "fastai", "fastcore", "torch")}


def _group(filename: str, name: str) -> str | None:
    """Where (filename, function name) lives; None for a built-in that is not torch's (its caller's)."""
    if filename == "~":
        return "torch.distributed" if "c10d" in name else "torch" if "torch" in name else None
    path = os.path.realpath(filename)
    for package, folder in _DIRS.items():
        if path.startswith(folder):
            inside = path[len(folder):]
            if package == "torch" and inside.startswith("distributed" + os.sep):
                return "torch.distributed"
            return f"fastlaunch/{inside}" if package == "fastlaunch" else package
    return "rest"


class StepProfile:
    def __init__(self):
        self.profile = cProfile.Profile(time.thread_time)
        self.steps = 0

    def start(self):
        self.profile.enable()

    def stop(self, steps: int):
        self.profile.disable()
        self.steps = steps

    def summary(self) -> dict:
        """{"us_per_step": {group: us}, "calls_per_step": {group: n}, "top": {group: [[function, us], ...]}}."""
        stats = pstats.Stats(self.profile).stats  # type: ignore[attr-defined]
        steps = max(self.steps, 1)
        us: dict[str, float] = {}
        calls: dict[str, float] = {}
        funcs: dict[tuple[str, str], float] = {}

        def add(group: str, where: str, n: float, seconds: float):
            us[group] = us.get(group, 0.0) + seconds * 1e6 / steps
            calls[group] = calls.get(group, 0.0) + n / steps
            funcs[group, where] = funcs.get((group, where), 0.0) + seconds * 1e6 / steps

        for (filename, line, name), (_, ncalls, tottime, _, callers) in stats.items():
            group = _group(filename, name)
            where = f"{os.path.basename(filename)}:{line}({name})" if filename != "~" else name
            if group is not None:
                add(group, where, ncalls, tottime)
                continue
            split = 0.0
            for (c_file, _, c_name), caller in callers.items():  # caller -> (ncalls, primitive, tottime, cumtime)
                add(_group(c_file, c_name) or "rest", where, caller[0], caller[2])
                split += caller[2]
            if tottime > split:  # called from outside the profile (e.g. from C)
                add("rest", where, 0, tottime - split)
        top = {group: [[where, round(t, 2)] for (g, where), t in sorted(funcs.items(), key=lambda kv: -kv[1])
                       if g == group][:TOP] for group in us}
        return {"us_per_step": us, "calls_per_step": calls, "top": top, "steps": self.steps}
