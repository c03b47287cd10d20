"""Crossover with fused softmax attention: from which token count N a mechanism is faster than fused softmax
attention, and from which N it needs less peak memory, read off the points of `lattn bench attention`.

    lattn bench crossover --from benchmarks/attention-cpu-float32/attention.json [--markdown]

measures nothing: it reads saved results (``lattn bench attention`` also computes the table after a sweep
and writes it into its attention.md and attention.json, under "crossover").

How a crossing is found. For each case, pass (forward, forward+backward) and metric (time, peak extra
memory), the ratio case / baseline is taken at every N at which both ran. The baseline is fused softmax of
the same kind: the ``softmax`` module (PyTorch's fused ``scaled_dot_product_attention``, projections
included) for the modules, ``op:softmax-fused`` for the bare operations (``op:``) - never the materialised
N x N map, which is a case of its own. The case is *cheaper* at an N where its ratio is below 1. The
crossing is the N after which it stays cheaper, interpolated log-log between the two measured N that
bracket it (log ratio taken as linear in log N between them):

- ``always``: cheaper already at the smallest N compared;
- ``never (up to N=...)``: not cheaper at the largest N compared (its ratio there is shown);
- a number: the interpolated N. Where the ratio crosses 1 more than once (noise, or a real bump), the
  number is the last crossing, after which the case stays cheaper, and a note says so.

Only N at which the baseline ran are compared: where fused softmax was skipped (predicted too slow) or ran
out of memory, nothing is extrapolated. A case that ran out of memory where the baseline ran counts as not
cheaper at that N. Memory readings below their floor (allocation events lost, see
:func:`.targets.memory_is_trusted`) are not compared. Times are the fastest call of each point, as for
the targets (:data:`.targets.TARGET_TIME`); ``--time median`` uses the median call instead. The reference
formulations (``reference:``) are left out: they are other code for the same mechanisms.

One table per dtype, head size (and width, batch size, device) found in the results: a run of
``lattn bench attention --head-dim 32`` gives the head-32 table, and several JSON files may be read at once.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import format_markdown, format_table, machine_line
from .settings import MODES
from .targets import REFERENCE_TIME_TOLERANCE, TARGET_TIME, memory_is_trusted

Record = dict[str, Any]
Point = tuple[int, "float | None"]  # (N, case / baseline); None: the case ran out of memory there

MODULE_BASELINE = "softmax"
OPERATION_BASELINE = "op:softmax-fused"
METRICS = ("time", "memory")
TIME_KEYS = {"fastest": TARGET_TIME, "median": "time_median_s"}
# What makes one table: points of different shapes, dtypes or machines are not compared with each other.
GROUP_KEYS = ("device", "dtype", "batch_size", "width", "head_dim")


def baseline_of(case: str) -> str | None:
    """The fused-softmax case that `case` is compared with; None for the baselines themselves and for the
    reference formulations."""
    if case.startswith("reference:") or case in (MODULE_BASELINE, OPERATION_BASELINE):
        return None
    return OPERATION_BASELINE if case.startswith("op:") else MODULE_BASELINE


def find_crossing(points: Sequence[Point]) -> dict[str, Any] | None:
    """The crossing of the ratios `points` ((N, case / baseline), in any order; a ratio of None counts as
    not cheaper) through 1: a dict with

    - ``verdict``: "always", "from" or "never";
    - ``n``: for "from", the interpolated N from which the case stays cheaper (None otherwise);
    - ``between``: for "from", the two measured N that bracket it;
    - ``compared_from``, ``compared_up_to``: the smallest and largest N compared;
    - ``ratios``: the points, as [N, ratio] in order of N;
    - ``ratio_at_largest``: the ratio at the largest N;
    - ``sign_changes``: how often the ratio crosses 1 between consecutive N;
    - ``cheaper_before``: for "from" and "never", the N before the last crossing at which it was cheaper
      already (non-empty only where the ratio crosses 1 more than once, or crosses back).

    None when there is no point."""
    points = sorted(points, key=lambda point: point[0])  # by N only: a ratio may be None
    if not points:
        return None
    cheaper = [ratio is not None and ratio < 1 for _, ratio in points]
    result: dict[str, Any] = {
        "verdict": "", "n": None, "between": None, "compared_from": points[0][0],
        "compared_up_to": points[-1][0], "ratios": [[n, ratio] for n, ratio in points],
        "ratio_at_largest": points[-1][1],
        "sign_changes": sum(a != b for a, b in itertools.pairwise(cheaper)), "cheaper_before": [],
    }
    if all(cheaper):
        result["verdict"] = "always"
        return result
    last_dearer = max(index for index, is_cheaper in enumerate(cheaper) if not is_cheaper)
    result["cheaper_before"] = [n for (n, _), is_cheaper in zip(points[:last_dearer], cheaper) if is_cheaper]
    if last_dearer == len(points) - 1:
        result["verdict"] = "never"
        return result
    (n1, r1), (n2, r2) = points[last_dearer], points[last_dearer + 1]
    if r1 is None:  # out of memory at n1: nothing to interpolate from, the first N it is cheaper at
        crossing = float(n2)
    else:
        # r1 >= 1 > r2 > 0, so the fraction lies in [0, 1): the crossing is in [n1, n2).
        fraction = math.log(r1) / (math.log(r1) - math.log(r2))
        crossing = math.exp(math.log(n1) + fraction * (math.log(n2) - math.log(n1)))
    result.update(verdict="from", n=crossing, between=[n1, n2])
    return result


def _group(record: Record) -> tuple[Any, ...]:
    return tuple(record.get(key) for key in GROUP_KEYS)


def _ratio(case_value: float | None, baseline_value: float | None) -> float | None:
    if not case_value or not baseline_value:
        return None
    return case_value / baseline_value


def crossovers(records: Sequence[Record], time: str = "fastest") -> list[dict[str, Any]]:
    """The crossover rows of a sweep's `records`: one per group (dtype, head size, ...), case, mode and
    metric, in the order of the records. Each row is :func:`find_crossing`'s dict with the group's
    settings, the case, its baseline, the mode, the metric, the time key used, its table cell ("text") and
    a note ("" when none). Cases without a baseline point to compare with give no row."""
    time_key = TIME_KEYS[time]
    at: dict[tuple[Any, ...], Record] = {}
    for record in records:
        key = (_group(record), record["case"], record["mode"], record["n"])
        if key in at:
            raise ValueError(f"two results for {record['case']} {record['mode']} N={record['n']} with the same "
                             f"settings {dict(zip(GROUP_KEYS, key[0]))}: read one sweep per setting")
        at[key] = record
    rows = []
    groups = dict.fromkeys(_group(r) for r in records)
    for group in groups:
        chosen = [r for r in records if _group(r) == group]
        sizes = sorted({r["n"] for r in chosen})
        for case in dict.fromkeys(r["case"] for r in chosen):
            baseline = baseline_of(case)
            if baseline is None:
                continue
            for mode in [m for m in MODES if any(r["mode"] == m for r in chosen)]:
                for metric in METRICS:
                    points, uncompared = [], []
                    for n in sizes:
                        base, ours = at.get((group, baseline, mode, n)), at.get((group, case, mode, n))
                        if base is None or ours is None or base["status"] != "ok":
                            continue
                        if ours["status"] == "oom":
                            points.append((n, None))
                        elif ours["status"] != "ok":
                            continue
                        elif metric == "time":
                            points.append((n, _ratio(ours[time_key], base[time_key])))
                        elif memory_is_trusted(ours) and memory_is_trusted(base):
                            points.append((n, _ratio(ours["peak_memory_bytes"], base["peak_memory_bytes"])))
                        else:
                            uncompared.append(n)
                    crossing = find_crossing(points)
                    if crossing is None:
                        continue
                    row = {**dict(zip(GROUP_KEYS, group)), "case": case, "baseline": baseline, "mode": mode,
                           "metric": metric, "time_key": time_key, **crossing}
                    row["text"] = crossing_text(row)
                    row["note"] = crossing_note(row, at, group, uncompared, sizes)
                    rows.append(row)
    return rows


def format_n(n: float) -> str:
    """An interpolated N to 2 significant digits: the measured N are a factor 2 to 5 apart, so more digits
    would claim a precision the interpolation does not have."""
    return f"{float(f'{n:.2g}'):,.0f}"


def crossing_text(row: dict[str, Any]) -> str:
    """The table cell of a crossover row; " *" marks a row with a note on crossings."""
    if row["verdict"] == "always":
        text = "always"
    elif row["verdict"] == "never":
        ratio = row["ratio_at_largest"]
        there = "out of memory there" if ratio is None else f"{ratio:.2f}x there"
        text = f"never (up to N={row['compared_up_to']:,}; {there})"
    else:
        low, high = row["between"]
        text = f"{format_n(row['n'])} ({low:,}-{high:,})"
    return text + (" *" if row["cheaper_before"] else "")


def crossing_note(row: dict[str, Any], at: dict[tuple[Any, ...], Record], group: tuple[Any, ...],
                  uncompared: Sequence[int], sizes: Sequence[int]) -> str:
    """What the cell does not say: several crossings, a verdict resting on a time ratio within timing noise,
    equal peak memory, points left out, the case running out of memory."""
    notes = []
    listed = ", ".join(f"{n:,}" for n in row["cheaper_before"])
    if row["cheaper_before"] and row["verdict"] == "from":
        # No "; " inside a note's part: format_crossover splits the note there.
        notes.append(f"the ratio crosses 1 {row['sign_changes']} times (also cheaper at N={listed}): the "
                     f"number is the last crossing, after which it stays cheaper")
    elif row["cheaper_before"]:
        notes.append(f"cheaper at N={listed}, but not from there on")
    ratios = {n: ratio for n, ratio in row["ratios"]}
    if row["metric"] == "time":
        # Timings of equal work differ by a few % between runs on a shared machine: a verdict read off a
        # ratio that close to 1 could go the other way on a second run.
        decisive = {"always": [row["compared_from"]], "never": [row["compared_up_to"]],
                    "from": row["between"] or []}[row["verdict"]]
        close = [n for n in decisive if ratios[n] is not None and abs(ratios[n] - 1) < REFERENCE_TIME_TOLERANCE]
        if close:
            notes.append("within timing noise (" + f"{REFERENCE_TIME_TOLERANCE:.0%}) of fused softmax at "
                         + ", ".join(f"N={n:,} ({ratios[n]:.3f}x)" for n in close))
    else:
        equal = [n for n, ratio in ratios.items() if ratio == 1]
        if equal:
            notes.append("the same peak memory as fused softmax, to the byte, at N=" + ", ".join(f"{n:,}" for n in equal))
    out_of_memory = [n for n in sizes if (at.get((group, row["case"], row["mode"], n)) or {}).get("status") == "oom"]
    if out_of_memory:
        notes.append(f"out of memory from N={out_of_memory[0]:,}")
    if uncompared:
        notes.append("memory not compared at N=" + ", ".join(f"{n:,}" for n in uncompared)
                     + " (a reading below its floor: events lost)")
    return "; ".join(notes)


def _group_title(row: dict[str, Any]) -> str:
    heads = row["width"] // row["head_dim"] if row.get("width") and row.get("head_dim") else "?"
    title = f"{row['dtype']}, head size {row['head_dim']} ({heads} heads, width {row['width']}), batch {row['batch_size']}"
    return title + (f", {row['device']}" if row.get("device") else "")


def _baseline_coverage(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Where each baseline was compared up to, per mode: the largest N at which it ran."""
    lines = []
    for baseline in dict.fromkeys(r["baseline"] for r in rows):
        reach = {}
        for row in rows:
            if row["baseline"] == baseline:
                reach[row["mode"]] = max(reach.get(row["mode"], 0), row["compared_up_to"])
        lines.append(f"`{baseline}` ran up to N=" + ", ".join(f"{n:,} ({mode})" for mode, n in reach.items()))
    return lines


def format_crossover(rows: Sequence[dict[str, Any]], markdown: bool = False, heading: str = "###") -> str:
    """The crossover rows as tables, one per group, a row per case: the N from which it is faster than
    fused softmax and from which it needs less peak memory, forward and forward+backward; notes below.
    In Markdown, each table's title is a heading of level `heading`."""
    parts = []
    for group in dict.fromkeys(tuple(r[key] for key in GROUP_KEYS) for r in rows):
        chosen = [r for r in rows if tuple(r[key] for key in GROUP_KEYS) == group]
        modes = [m for m in MODES if any(r["mode"] == m for r in chosen)]
        columns = [(metric, mode) for metric in METRICS for mode in modes]
        words = {"time": "faster", "memory": "less memory"}
        headers = ["case"] + [f"{words[metric]}: {mode}" for metric, mode in columns]
        cells, notes = [], []
        for case in dict.fromkeys(r["case"] for r in chosen):
            by_column = {(r["metric"], r["mode"]): r for r in chosen if r["case"] == case}
            cells.append([case] + [by_column[c]["text"] if c in by_column else "-" for c in columns])
            # A note that holds for several columns of a case (e.g. running out of memory) is shown once.
            columns_of: dict[str, list[str]] = {}
            for metric, mode in columns:
                row = by_column.get((metric, mode))
                for part in filter(None, (row or {}).get("note", "").split("; ")):
                    columns_of.setdefault(part, []).append(f"{words[metric]}, {mode}")
            notes += [f"{case} ({'every column' if len(where) == len(columns) else '; '.join(where)}): {part}"
                      for part, where in columns_of.items()]
        time_words = "fastest" if chosen[0]["time_key"] == TARGET_TIME else "median"
        title = f"{_group_title(chosen[0])}; time: the {time_words} call of each point"
        coverage = "; ".join(_baseline_coverage(chosen)) + "."
        if markdown:
            parts += [f"{heading} {title}", "", format_markdown(headers, cells), "", coverage]
            parts += ["", "Notes:", *(f"- {note}" for note in notes)] if notes else []
        else:
            parts += [f"Crossover with fused softmax: {title}", format_table(headers, cells), coverage]
            parts += ["Notes:", *(f"  {note}" for note in notes)] if notes else []
        parts.append("")
    return "\n".join(parts).rstrip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lattn bench crossover",
        description="From which N each mechanism is faster than fused softmax attention, and from which N "
        "it needs less peak memory, computed from saved results of `lattn bench attention` (measures "
        "nothing). N is interpolated log-log between the measured N that bracket the crossing.",
    )
    parser.add_argument("--from", dest="sources", nargs="+", metavar="FILE", required=True,
                        help="attention.json of one or more runs (e.g. one per head size)")
    parser.add_argument("--time", choices=list(TIME_KEYS), default="fastest",
                        help="which call of each point is compared: fastest (default, as the targets) or median")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables instead of plain text")
    return parser


def main(argv: Sequence[str]) -> list[dict[str, Any]]:
    """`lattn bench crossover --from FILE ...`: print the crossover table of saved results."""
    options = build_parser().parse_args(list(argv))
    records = []
    for source in options.sources:
        document = json.loads(Path(source).read_text())
        if document.get("benchmark") != "attention":
            raise ValueError(f"{source} is not the JSON of `lattn bench attention`")
        records += document["results"]
        print(f"{source}: measured on {machine_line(document)}" + ("  " if options.markdown else ""))
    rows = crossovers(records, time=options.time)
    print()
    print(format_crossover(rows, markdown=options.markdown))
    return rows
