"""How benchmark results are shown and saved: terminal table, Markdown, JSON, CSV and log-log PNG plots.

Every benchmark produces one *document* (a dict with "benchmark", "command", "machine", "settings",
"results" - one flat dict per measured point - and optionally "targets" or "claims"). Columns are given as
(header, result key, format) triples; the formats are those of :func:`format_value`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Column = tuple[str, "str | None", str]


def format_value(kind: str, value: Any, record: dict[str, Any]) -> str:
    """One cell. Kinds: s (text), d (integer), ms (seconds shown in ms), spread (fastest-slowest ms),
    MB (bytes), e (scientific), G (per second, in billions), % (fraction), x / f1 / f2 / f3 (decimals)."""
    if kind == "spread":
        fastest, slowest = record.get("time_fastest_s"), record.get("time_slowest_s")
        return "-" if fastest is None else f"{fastest * 1e3:.3g}-{slowest * 1e3:.3g}"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "s":
        return str(value)
    if kind == "d":
        return f"{value:,}" if isinstance(value, int) else str(value)
    if kind == "ms":
        return f"{value * 1e3:.3g}" if value < 0.1 else f"{value * 1e3:.0f}"
    if kind == "MB":
        return f"{value / 2**20:.1f}"
    if kind == "e":
        return f"{value:.1e}"
    if kind == "G":
        return f"{value / 1e9:.1f}"
    if kind == "%":
        return f"{value * 100:.0f}%"
    decimals = {"x": 2, "f1": 1, "f2": 2, "f3": 3}[kind]
    return f"{value:.{decimals}f}"


def format_row(record: dict[str, Any], columns: Sequence[Column]) -> list[str]:
    """The cells of one result; metrics of a point that did not run ("oom", "skipped") show as "-"."""
    return [format_value(kind, record.get(key) if key else None, record) for _, key, kind in columns]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table with right-aligned numbers and left-aligned words."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        parts = []
        for cell, width in zip(cells, widths):
            numeric = cell[:1].isdigit() or cell[:1] in "-." and cell[1:2].isdigit()
            parts.append(cell.rjust(width) if numeric else cell.ljust(width))
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(row) for row in rows])


def format_markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def results_table(records: Sequence[dict[str, Any]], columns: Sequence[Column], markdown: bool = False) -> str:
    """The results as a table, one row per point: plain text for the terminal, or Markdown."""
    headers = [header for header, _, _ in columns]
    rows = [format_row(record, columns) for record in records]
    return format_markdown(headers, rows) if markdown else format_table(headers, rows)


def written_line(document: dict[str, Any], written: Sequence[Path], counted: str = "points") -> str:
    """"<n> points in <s> s; written: <paths>": the last line a benchmark prints."""
    return (f"{len(document['results'])} {counted} in {document['seconds']:.0f} s; written: "
            + ", ".join(str(path) for path in written))


def _verdict(target: dict[str, Any]) -> str:
    verdict = {True: "PASS", False: "FAIL", None: "not measured"}[target["passed"]]
    return f"{verdict} (supplementary)" if target.get("supplementary") else verdict


def targets_summary(targets: Sequence[dict[str, Any]]) -> str:
    """"k of n targets hold (m not measured)", supplementary lines left out of the count."""
    counted = [t for t in targets if not t.get("supplementary")]
    held = sum(t["passed"] is True for t in counted)
    missing = sum(t["passed"] is None for t in counted)
    return f"{held} of {len(counted)} targets hold" + (f" ({missing} not measured)" if missing else "")


def format_targets(targets: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The targets with what was measured and whether each holds, and how many hold."""
    headers = ["target", "threshold", "measured", "result"]
    rows = [[t["statement"], t["threshold"], t["measured"], _verdict(t)] for t in targets]
    if markdown:
        return format_markdown(headers, rows) + "\n\n" + targets_summary(targets) + "."
    return "Targets\n" + format_table(headers, rows) + "\n" + targets_summary(targets)


def _flat(record: dict[str, Any]) -> dict[str, Any]:
    return {key: json.dumps(value) if isinstance(value, (dict, list)) else value for key, value in record.items()}


def write_outputs(document: dict[str, Any], folder: Path, name: str, columns: Sequence[Column],
                  plots: bool = True) -> list[Path]:
    """Write <name>.json (everything), <name>.csv (one row per point), <name>.md (table, targets and the
    machine) and, for the attention benchmark, the PNG plots. Returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    json_path = folder / f"{name}.json"
    json_path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    written.append(json_path)

    csv_path = folder / f"{name}.csv"
    records = [_flat(record) for record in document["results"]]
    fieldnames = list(dict.fromkeys(key for record in records for key in record))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(records)
    written.append(csv_path)

    markdown_path = folder / f"{name}.md"
    markdown_path.write_text(markdown_report(document, columns))
    written.append(markdown_path)

    if plots and name == "attention":
        written += plot_attention(document, folder)
    return written


def machine_line(document: dict[str, Any]) -> str:
    machine = document["machine"]
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['cpu_cores']} cores, {machine['torch_threads']} torch threads)"
    return f"{where}, {machine.get('memory_gb')} GB RAM, torch {machine['torch']}"


def markdown_report(document: dict[str, Any], columns: Sequence[Column]) -> str:
    """<name>.md: the command, the machine, the table of every point, its notes and the targets."""
    table = results_table(document["results"], columns, markdown=True)
    parts = [
        f"# lattn bench {document['benchmark']}",
        "",
        f"Command: `{document.get('command', '')}`  ",
        f"Machine: {machine_line(document)}  ",
        f"Took: {document.get('seconds', '?')} s",
    ]
    summary_first = document["benchmark"] == "attention"
    if not summary_first:
        parts += ["", table]
    if document["benchmark"] == "attention":
        parts += ["", "## Summary: time and memory against N", "", *attention_summary(document["results"])]
        parts += ["", "## Every point"]
    notes = [f"- {r.get('case') or r.get('backbone')} {r.get('grid', r.get('image_size', ''))} "
             f"{r.get('dtype', '')} {r.get('mode', '')}: {r['note']}"
             for r in document["results"] if r.get("note")]
    if summary_first:
        parts += ["", table]
    if notes:
        parts += ["", "Notes:", *notes]
    if document.get("crossover"):
        # Imported here: crossover imports this module.
        from .crossover import format_crossover

        parts += ["", "## Crossover with fused softmax", "", format_crossover(document["crossover"], markdown=True)]
    if document.get("targets"):
        parts += ["", "## Targets", "", format_targets(document["targets"], markdown=True)]
    return "\n".join(parts) + "\n"


def attention_summary(records: Sequence[dict[str, Any]]) -> list[str]:
    """One table per dtype and mode: a row per case, a column per N; the cells are the median time in ms
    and the peak extra memory in MB, or why the point has no number (oom, skipped, error)."""
    lines = []
    for dtype in dict.fromkeys(r["dtype"] for r in records):
        for mode in dict.fromkeys(r["mode"] for r in records):
            chosen = [r for r in records if r["dtype"] == dtype and r["mode"] == mode]
            sizes = sorted({r["n"] for r in chosen})
            headers = ["case"] + [f"N={n:,}" for n in sizes]
            rows = []
            for case in dict.fromkeys(r["case"] for r in chosen):
                cells = [case]
                for n in sizes:
                    point = next((r for r in chosen if r["case"] == case and r["n"] == n), None)
                    if point is None:
                        cells.append("")
                    elif point["status"] != "ok":
                        cells.append(point["status"])
                    else:
                        cells.append(f"{format_value('ms', point['time_median_s'], point)} ms / "
                                     f"{format_value('MB', point['peak_memory_bytes'], point)} MB")
                rows.append(cells)
            lines += [f"### {mode}, {dtype}: median time / peak extra memory", "", format_markdown(headers, rows), ""]
    return lines


def plot_attention(document: dict[str, Any], folder: Path) -> list[Path]:
    """Log-log plots of time and of peak memory against N, one file per dtype, one panel per mode.
    Modules and operations are drawn; the reference formulations are left to the table."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    records = [r for r in document["results"] if r["status"] == "ok" and r["kind"] != "reference"]
    machine = machine_line(document)
    written = []
    for dtype in sorted({r["dtype"] for r in records}):
        for metric, key, scale, unit in (("time", "time_median_s", 1e3, "ms per call"),
                                         ("memory", "peak_memory_bytes", 1 / 2**20, "peak extra MB")):
            modes = sorted({r["mode"] for r in records if r["dtype"] == dtype}, key=len)
            figure, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
            for axis, mode in zip(axes[0], modes):
                points = [r for r in records if r["dtype"] == dtype and r["mode"] == mode and r[key]]
                cases = list(dict.fromkeys(r["case"] for r in points))
                colours = plt.get_cmap("tab20")
                for index, case in enumerate(cases):
                    line = sorted((r["n"], r[key] * scale) for r in points if r["case"] == case)
                    style = "--" if case.startswith("op:") else "-"
                    axis.plot(*zip(*line), style, marker="o", markersize=3, linewidth=1.2,
                              color=colours(index % 20), label=case)
                axis.set_xscale("log")
                axis.set_yscale("log")
                axis.xaxis.set_minor_formatter(NullFormatter())  # 2x10^2, 3x10^2 ... would overlap
                axis.set_xlabel("tokens N")
                axis.set_ylabel(unit)
                axis.set_title(f"{mode}, {dtype}", fontsize=10)
                axis.grid(True, which="major", alpha=0.3)
            handles, labels = axes[0][0].get_legend_handles_labels()
            figure.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
            figure.suptitle(f"lattn bench attention: {metric} ({machine})", fontsize=9)
            figure.tight_layout(rect=(0, 0, 0.84, 0.95))
            path = folder / f"attention_{metric}_{dtype}.png"
            figure.savefig(path, dpi=72)
            plt.close(figure)
            written.append(path)
    return written
