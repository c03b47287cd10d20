"""The speed and memory targets of `lattn bench attention`, checked on a run's results.

The targets are a table (:data:`TARGETS`): each row says what is claimed, which points it reads (cases,
modes and a range of N) and the bound the measurement must keep; its *rule* says how those points become
a measurement. :func:`evaluate_targets` applies every row with one evaluator. The targets hold for fp32
results of batch 1, head size 64 and width 256 (:data:`TARGET_SETTINGS`); a target whose points were not
measured (e.g. after ``--quick``) has ``passed = None``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .measure import DTYPES
from .reference import REFERENCES
from .settings import MODES

# Targets compare the fastest call of each point: other processes on a shared machine only ever add time,
# so the fastest call is the steadiest estimate of a point's own cost (the tables show the median too).
TARGET_TIME = "time_fastest_s"
TARGET_DTYPE = "float32"
TARGET_SETTINGS = {"batch_size": 1, "head_dim": 64, "width": 256}
REFERENCE_TIME_TOLERANCE = 0.05  # timings of equal work differ by a few % between runs on a shared machine

# Mechanisms whose time is linear in N (the registry's complexity), checked for N^1.15 growth.
LINEAR_CASES = ("efficient", "efficient-scaling", "op:efficient", "performer", "linformer", "nystrom", "care",
                "care-block", "mixer")
# fnet is O(N C log(N C)) (FFTs): its growth is shown as a supplementary line, not held to N^1.15 (the log
# factor alone makes N^1.11 from N=1024 to 65536). coupling, O(N (H + W) d) = O(N^1.5) on square grids,
# is not listed.
SUPPLEMENTARY_GROWTH_CASES = ("fnet",)
# Every registered mechanism as a module, held to "no cliffs" (steps no steeper than their cost predicts).
MECHANISM_CASES = ("efficient", "performer", "linformer", "nystrom", "care", "coupling", "fnet", "mixer", "softmax")

Record = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """One row of the target table."""

    name: str
    statement: str  # the claim as printed; "{ratio_of}" is filled in with how the run timed its pairs
    rule: str  # a key of RULES: how the points become a measurement and a verdict
    bound: float  # the threshold the rule compares the measurement with
    cases: tuple[str, ...]  # the cases whose points it reads, in the order the rule expects them
    modes: tuple[str, ...] = MODES
    n_min: int = 0  # the range of N whose points it reads
    n_max: float = math.inf
    supplementary: bool = False  # shown, but not counted among the targets that must hold


# ----------------------------------------------------------------------------- what rules read


def growth_exponent(points: Sequence[tuple[int, float]]) -> float:
    """The least-squares slope of log(time) against log(N): time ~ N^slope. Every size counts, so one
    point slowed by the load of a shared machine moves it less than it moves a ratio of two points."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(seconds) for _, seconds in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def memory_floor_bytes(record: Record) -> int:
    """A floor under any true peak of a point's call: the output it returns (B x N x width elements, for
    every case) and, with the backward pass, the gradients it writes (one per input and weight, so that
    output + gradients = half of the essential bytes). A lower reading means the CPU profiler lost
    allocation events; such a reading is not compared."""
    output = record["batch_size"] * record["n"] * record["width"] * torch.finfo(DTYPES[record["dtype"]]).bits // 8
    return output if record["mode"] == "forward" else record["bytes"] // 2


def memory_is_trusted(record: Record) -> bool:
    """Whether the point's peak memory reading reaches its floor (:func:`memory_floor_bytes`)."""
    return record.get("peak_memory_bytes") is not None and record["peak_memory_bytes"] >= memory_floor_bytes(record)


# ------------------------------------------------------------------------------------------ rules
# A rule gets the target and, per case of the target, its points (ok fp32 results in the target's modes
# and range of N, in the order of the results); it returns the measurement as text and whether the bound
# holds, or None when the points needed were not measured.

Measurement = tuple[str, bool] | None


def measure_speedup(target: Target, points: list[list[Record]]) -> Measurement:
    """The time of the first case's point over the second's: at least `bound` times."""
    slow, fast = points
    if not slow or not fast:
        return None
    a, b = slow[0], fast[0]
    ratio = a[TARGET_TIME] / b[TARGET_TIME]
    return f"{ratio:.1f}x ({a[TARGET_TIME] * 1e3:.0f} ms / {b[TARGET_TIME] * 1e3:.1f} ms)", ratio >= target.bound


def measure_growth(target: Target, points: list[list[Record]]) -> Measurement:
    """The exponent of the time's growth in N, fitted over every size from n_min to n_max (both measured):
    at most `bound`."""
    (case_points,) = points
    times = sorted((r["n"], r[TARGET_TIME]) for r in case_points)
    if len(times) < 2 or times[0][0] != target.n_min or times[-1][0] != target.n_max:
        return None
    exponent = growth_exponent(times)
    endpoints = math.log(times[-1][1] / times[0][1]) / math.log(target.n_max / target.n_min)
    measured = f"N^{exponent:.2f} (fit over {len(times)} sizes; endpoints alone N^{endpoints:.2f})"
    return measured, exponent <= target.bound


def measure_roofline(target: Target, points: list[list[Record]]) -> Measurement:
    """Time over the roofline minimum at every N measured: at most `bound` at each."""
    (case_points,) = points
    ratios = [(r["n"], r[TARGET_TIME] / r["roofline_s"]) for r in case_points if r.get("roofline_s")]
    if not ratios:
        return None
    measured = ", ".join(f"{ratio:.2f}x at N={n}" for n, ratio in ratios)
    return measured, all(ratio <= target.bound for _, ratio in ratios)


def measure_against_reference(target: Target, points: list[list[Record]]) -> Measurement:
    """lattn's case against its reference formulation at every N and mode both ran: time at most `bound`
    times the reference's (within REFERENCE_TIME_TOLERANCE), peak memory at most the reference's."""
    ours_points, reference_points = points
    ours_at: dict[tuple[int, str], Record] = {}
    for record in ours_points:
        ours_at.setdefault((record["n"], record["mode"]), record)
    pairs, lost = [], []
    for record in reference_points:
        ours = ours_at.get((record["n"], record["mode"]))
        if ours is None:
            continue
        if record.get("paired_time_ratio") is not None:
            time_ratio = record["paired_time_ratio"]
        elif record.get("paired_ours_fastest_s") is not None:  # a run from before the median of rounds
            time_ratio = record["paired_ours_fastest_s"] / record["paired_reference_fastest_s"]
        else:
            time_ratio = ours[TARGET_TIME] / record[TARGET_TIME]
        if memory_is_trusted(ours) and memory_is_trusted(record):
            memory_ratio = ours["peak_memory_bytes"] / record["peak_memory_bytes"]
        else:
            memory_ratio = None
            lost.append(f"N={record['n']} {record['mode']}")
        pairs.append((record["n"], record["mode"], time_ratio, memory_ratio))
    if not pairs:
        return None
    worst_time = max(pairs, key=lambda p: p[2])
    measured = (f"time {min(p[2] for p in pairs):.2f}-{worst_time[2]:.2f}x (worst at N={worst_time[0]} "
                f"{worst_time[1]})")
    compared = [p for p in pairs if p[3] is not None]
    if compared:
        worst_memory = max(compared, key=lambda p: p[3])
        measured += (f", memory {min(p[3] for p in compared):.2f}-{worst_memory[3]:.2f}x "
                     f"(worst at N={worst_memory[0]} {worst_memory[1]})")
    if lost:
        measured += f"; memory not compared at {', '.join(lost)} (a reading below its floor: events lost)"
    passed = (worst_time[2] <= target.bound * (1 + REFERENCE_TIME_TOLERANCE)
              and all(p[3] <= 1.0 for p in compared))
    return measured, passed


def modelled_cost(record: Record) -> float | None:
    """A point's cost as the benchmark models it: its FLOP count. FNet's FFTs are not counted there, so
    theirs is N C log(N C) (a Fourier transform over the tokens and the channels); None where unknown."""
    if record.get("flops"):
        return float(record["flops"])
    if record["case"] == "fnet":
        size = record["n"] * record["width"]
        return size * math.log2(size)
    return None


def measure_steps(target: Target, points: list[list[Record]]) -> Measurement:
    """Each step from one measured N to the next (in each mode): its time ratio over the ratio its cost model
    predicts (the points' own FLOP counts, so N for a linear mechanism, N (H + W) for coupling's row and
    column maps, N^2 for softmax). The worst step at most `bound`: no cliff."""
    (case_points,) = points
    steps = []
    for mode in target.modes:
        series = sorted((r["n"], r[TARGET_TIME], modelled_cost(r)) for r in case_points
                        if r["mode"] == mode and modelled_cost(r) is not None)
        for (n1, t1, f1), (n2, t2, f2) in zip(series, series[1:]):
            steps.append(((t2 / t1) / (f2 / f1), n1, n2, mode, t2 / t1, f2 / f1))
    if not steps:
        return None
    worst = max(steps)
    measured = (f"worst step {worst[0]:.2f}x its prediction (N={worst[1]} -> {worst[2]} {worst[3]}: time "
                f"{worst[4]:.2f}x, cost {worst[5]:.2f}x; {len(steps)} steps)")
    return measured, worst[0] <= target.bound


@dataclass(frozen=True)
class Rule:
    """How a target's points are measured, and its bound as printed (formatted with ``bound``)."""

    measure: Callable[[Target, list[list[Record]]], Measurement]
    threshold: str


RULES = {
    "speedup": Rule(measure_speedup, ">= {bound:g}x"),
    "growth": Rule(measure_growth, "<= {bound:g}"),
    "roofline": Rule(measure_roofline, "<= {bound:.1f}x"),
    "reference": Rule(measure_against_reference, "time <= {bound:g}x, memory <= 1x"),
    "steps": Rule(measure_steps, "every step <= {bound:g}x its cost's"),
}


# ------------------------------------------------------------------------------------------ table
# The rows' statements are written from the rows' own numbers, so that wording and check cannot drift.


def _speedup_target(name: str, slow: str, fast: str, bound: float, slow_words: str | None = None,
                    fast_words: str | None = None) -> Target:
    n = 16384
    statement = f"forward+backward at N={n}: {fast_words or fast} at least {bound:g}x faster than {slow_words or slow}"
    return Target(name, statement, "speedup", bound, (slow, fast), modes=("forward+backward",), n_min=n, n_max=n)


def _growth_target(case: str, mode: str, supplementary: str | None = None) -> Target:
    n_min, n_max, bound = 1024, 65536, 1.15
    statement = f"{case} {mode}: time grows at most as N^{bound:g} from N={n_min} to N={n_max}"
    if supplementary:
        statement += f" (supplementary: {supplementary})"
    return Target(f"growth {case} {mode}", statement, "growth", bound, (case,), modes=(mode,), n_min=n_min,
                  n_max=n_max, supplementary=supplementary is not None)


def _roofline_target(case: str, supplementary: str | None = None) -> Target:
    n_min, bound = 16384, 2.0
    statement = f"{case} forward within {bound:g}x of the roofline minimum at N >= {n_min}"
    if supplementary:
        statement += f" (supplementary: {supplementary})"
    return Target(f"roofline {case}", statement, "roofline", bound, (case,), modes=("forward",), n_min=n_min,
                  supplementary=supplementary is not None)


def _steps_target(case: str) -> Target:
    n_min, n_max, bound = 1024, 65536, 1.3
    statement = (f"{case}: no cliff, each step from one N to the next (N={n_min} to {n_max}, both modes) takes at "
                 f"most {bound:g}x the time its FLOP count predicts")
    return Target(f"no cliffs {case}", statement, "steps", bound, (case,), n_min=n_min, n_max=n_max)


def _reference_target(key: str) -> Target:
    ours = REFERENCES[key].ours
    statement = (f"{ours} at least as fast (within {REFERENCE_TIME_TOLERANCE:.0%} timing noise) and no hungrier "
                 f"than reference:{key}, every N and mode (timed in alternation: {{ratio_of}})")
    return Target(f"reference {key}", statement, "reference", 1.0, (ours, f"reference:{key}"))


TARGETS: tuple[Target, ...] = (
    _speedup_target("efficient op vs fused softmax", "op:softmax-fused", "op:efficient", 50),
    _speedup_target("efficient module vs softmax module", "softmax", "efficient", 20,
                    slow_words="the softmax module", fast_words="the efficient module"),
    *(_growth_target(case, mode) for case in LINEAR_CASES for mode in MODES),
    *(_growth_target(case, mode, "O(N log N), not a linear mechanism")
      for case in SUPPLEMENTARY_GROWTH_CASES for mode in MODES),
    # "efficient forward" is the registered mechanism, i.e. the module. The bare operation is reported next
    # to it as a supplementary line: its products have an inner size of d = 64, at which no BLAS reaches
    # the large square matrix product's FLOP/s that the roofline assumes.
    _roofline_target("efficient"),
    _roofline_target("op:efficient", "the operation without its projections"),
    *(_reference_target(key) for key in REFERENCES),
    *(_steps_target(case) for case in MECHANISM_CASES),
)


# -------------------------------------------------------------------------------------- evaluator


def _points(records: Sequence[Record], case: str, target: Target) -> list[Record]:
    return [r for r in records if r["case"] == case and r["status"] == "ok" and r["dtype"] == TARGET_DTYPE
            and r["mode"] in target.modes and target.n_min <= r["n"] <= target.n_max]


def evaluate_targets(records: list[Record], targets: Sequence[Target] = TARGETS) -> list[dict[str, Any]]:
    """Every target of `targets` checked on `records`: its statement, threshold, what was measured and
    whether it holds (None: not measured)."""
    records = [r for r in records if all(r[key] == value for key, value in TARGET_SETTINGS.items())]
    # Runs from before the rounds' ratios were recorded are compared by their fastest alternated calls.
    by_rounds = any(record.get("paired_time_ratio") is not None for record in records)
    ratio_of = "the median of the rounds' ratios" if by_rounds else "the ratio of the fastest calls"
    results = []
    for target in targets:
        rule = RULES[target.rule]
        measurement = rule.measure(target, [_points(records, case, target) for case in target.cases])
        measured, passed = measurement if measurement is not None else ("not measured", None)
        results.append({"target": target.name, "statement": target.statement.format(ratio_of=ratio_of),
                        "threshold": rule.threshold.format(bound=target.bound), "measured": measured,
                        "passed": passed, "supplementary": target.supplementary})
    return results
