"""Ratios of the same round with their spread, and medians: how every figure of the benchmark is made."""
from __future__ import annotations

import statistics
from collections.abc import Sequence


def _pairs(a: list, b: list) -> list[float]:
    return [x / y for x, y in zip(a, b) if x and y]  # a round where either failed is left out


def _ratio(a: list, b: list) -> str:
    """Median of the per-round ratios a/b, with their min-max spread (rounds ran side by side)."""
    pairs = _pairs(a, b)
    if not pairs:
        return "n/a"
    med = statistics.median(pairs)
    return f"{med:.2f}x (spread {min(pairs):.2f}-{max(pairs):.2f}, {len(pairs)} rounds)"


def _goal(a: list, b: list, limit: float, lower_is_better: bool = True) -> str:
    """The goal next to a ratio, and whether the median ratio meets it."""
    pairs = _pairs(a, b)
    if not pairs:
        return f"goal {'<=' if lower_is_better else '>='} {limit:g}x: not measured"
    med = statistics.median(pairs)
    met = med <= limit if lower_is_better else med >= limit
    return f"goal {'<=' if lower_is_better else '>='} {limit:g}x: {'met' if met else 'NOT met'}"


def _values(runs: dict, name: str, key: str) -> list[float | None]:
    """One value per round, None where the run failed (rounds stay aligned across peers)."""
    return [r.get(key) if r.get("ok") else None for r in runs[name]]


def _median(values: Sequence[float | None]) -> float:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else float("nan")


def failures(label: str, results: list[dict]) -> list[str]:
    """One line per failed run, and per run that aborted after writing its results: none is left out."""
    return [f"- {label}: {r.get('error') if not r.get('ok') else r['aborted']}" for r in results
            if not r.get("ok") or r.get("aborted")]
