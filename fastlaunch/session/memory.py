"""Memory across a session's cells: after each cell that trained, every rank's allocated and reserved memory
and its growth since the session began go to RUN_DIR/session_memory.jsonl; when reserved GPU memory grows
after each of several trainings in a row, the session says so once, with the fix."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["MemoryLog", "STREAK", "GROWTH"]

STREAK = 3  # trainings in a row, each leaving more reserved memory than the one before
GROWTH = 0.10  # ...and by at least this fraction in all


class MemoryLog:
    def __init__(self, path: Path):
        self.path = path
        self.first: dict[int, float] = {}
        self.history: list[dict[int, float]] = []  # reserved MB per rank after each training cell
        self.warned = False

    def baseline(self, facts: list[dict]) -> None:
        """Each rank's reserved memory when the session began (its first cell)."""
        for fact in facts:
            if "reserved_mb" in fact:
                self.first.setdefault(int(fact["rank"]), float(fact["reserved_mb"]))

    def record(self, cell: int, facts: list[dict]) -> str | None:
        """Keep one training cell's figures; the advice, the first time growth keeps on."""
        rows = {}
        with open(self.path, "a") as out:
            for fact in facts:
                if "reserved_mb" not in fact:
                    continue
                rank, reserved = int(fact["rank"]), float(fact["reserved_mb"])
                self.first.setdefault(rank, reserved)
                rows[rank] = reserved
                out.write(json.dumps({"cell": cell, "rank": rank, "memory": fact.get("memory"),
                                      "allocated_mb": fact.get("allocated_mb"), "reserved_mb": reserved,
                                      "growth_mb": round(reserved - self.first[rank], 1)}) + "\n")
        if facts and all(f.get("memory") == "CUDA" for f in facts if f):  # a process's RSS is not the allocator's
            self.history.append(rows)
            return self.advice()
        return None

    def growth(self, rank: int, reserved: float) -> float:
        return reserved - self.first.get(rank, reserved)

    def advice(self) -> str | None:
        if self.warned or len(self.history) < STREAK + 1:
            return None
        recent = self.history[-(STREAK + 1):]
        for rank in sorted(recent[-1]):
            values = [row.get(rank, 0.0) for row in recent]
            rising = all(b > a for a, b in zip(values, values[1:]))
            if rising and values[-1] - values[0] >= GROWTH * max(values[0], 1.0):
                self.warned = True
                return (f"fastlaunch: reserved GPU memory grew after each of the last {STREAK} trainings (rank {rank}: "
                        f"{values[0]:.0f} -> {values[-1]:.0f} MB): earlier Learners, models or predictions are still "
                        f"referenced. HINT: `del` the ones you no longer need and run `%fastlaunch free`, or "
                        f"`%fastlaunch restart` for a fresh world")
        return None
