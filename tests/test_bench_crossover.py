"""The crossover with fused softmax (`lattn bench crossover`): the log-log interpolation on hand-computed
ratios, the "always" / "never" / several-crossings verdicts, which baseline each case is compared with,
and the table computed from the committed sweep. No timing is asserted; nothing is measured."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lattn_app.bench import bench_command
from lattn_app.bench.attention import report_from_json
from lattn_app.bench.crossover import (
    baseline_of,
    crossovers,
    find_crossing,
    format_crossover,
    format_n,
)

COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "attention-cpu-float32" / "attention.json"


def _record(case, n, mode, seconds, memory_mb=10.0, status="ok", head_dim=64):
    """A result with the fields the crossover reads; `memory_mb` above every memory floor at these sizes."""
    ok = status == "ok"
    return {"case": case, "n": n, "mode": mode, "dtype": "float32", "device": "cpu", "batch_size": 1,
            "width": 256, "head_dim": head_dim, "status": status, "bytes": 8 * n * 256 * 4,
            "time_fastest_s": seconds if ok else None, "time_median_s": seconds * 1.1 if ok else None,
            "peak_memory_bytes": int(memory_mb * 2**20) if ok else None}


# ------------------------------------------------------------------------------ find_crossing


def test_crossing_is_interpolated_log_log_between_the_bracketing_sizes():
    # log r goes from log 2 to -log 2 between N=100 and N=400: halfway in log N, the geometric mean 200.
    crossing = find_crossing([(100, 2.0), (400, 0.5)])
    assert crossing["verdict"] == "from" and crossing["between"] == [100, 400]
    assert crossing["n"] == pytest.approx(200.0)
    # log 4 down to -log 2: two thirds of the way from N=100 to N=1000, 100 * 10^(2/3) = 464.16.
    crossing = find_crossing([(1000, 0.5), (100, 4.0)])  # in any order
    assert crossing["n"] == pytest.approx(100 * 10 ** (2 / 3)) == pytest.approx(464.1589, abs=1e-3)
    assert crossing["sign_changes"] == 1 and crossing["cheaper_before"] == []
    # A ratio of exactly 1 is not cheaper: the crossing starts at that N.
    assert find_crossing([(100, 1.0), (200, 0.5)])["n"] == pytest.approx(100.0)


def test_always_and_never():
    always = find_crossing([(196, 0.9), (1024, 0.5), (4096, 0.1)])
    assert always["verdict"] == "always" and always["n"] is None and always["sign_changes"] == 0
    assert always["compared_from"] == 196 and always["compared_up_to"] == 4096

    never = find_crossing([(196, 3.0), (1024, 1.5)])
    assert never["verdict"] == "never" and never["compared_up_to"] == 1024
    assert never["ratio_at_largest"] == 1.5 and never["cheaper_before"] == []
    assert find_crossing([]) is None


SEVERAL = [(100, 0.8), (200, 1.25), (400, 2.0), (1600, 0.5), (3200, 0.9)]


def test_several_crossings_give_the_last_one_after_which_it_stays_cheaper():
    # cheaper, dearer, dearer, cheaper, cheaper: the ratio crosses 1 twice; the answer is the crossing
    # between 400 (2x) and 1600 (0.5x), sqrt(400 * 1600) = 800, and N=100 is listed as cheaper before.
    crossing = find_crossing(SEVERAL)
    assert crossing["verdict"] == "from" and crossing["n"] == pytest.approx(800.0)
    assert crossing["between"] == [400, 1600]
    assert crossing["sign_changes"] == 2 and crossing["cheaper_before"] == [100]
    rows = crossovers([_record("softmax", n, "forward", 1.0) for n, _ in SEVERAL]
                      + [_record("nystrom", n, "forward", ratio) for n, ratio in SEVERAL])
    (time,) = [r for r in rows if r["metric"] == "time"]
    assert time["text"] == "800 (400-1,600) *"
    assert "crosses 1 2 times (also cheaper at N=100): the number is the last crossing" in time["note"]
    assert "nystrom (faster, forward): the ratio crosses 1 2 times" in format_crossover(rows)

    # cheaper at small N, dearer at the largest: "never", with the earlier cheaper N kept.
    back = find_crossing([(100, 0.5), (200, 0.9), (400, 1.1)])
    assert back["verdict"] == "never" and back["cheaper_before"] == [100, 200] and back["sign_changes"] == 1


def test_out_of_memory_counts_as_not_cheaper():
    assert find_crossing([(100, 0.5), (200, None)])["verdict"] == "never"
    after = find_crossing([(100, None), (200, 0.5)])  # nothing to interpolate from: the first N it is cheaper
    assert after["verdict"] == "from" and after["n"] == 200.0


def test_interpolated_n_is_shown_to_two_significant_digits():
    assert format_n(464.1589) == "460"
    assert format_n(1449.9) == "1,400"
    assert format_n(196.0) == "200"


# ------------------------------------------------------------------------------ crossovers


def test_each_case_is_compared_with_fused_softmax_of_its_kind():
    assert baseline_of("efficient") == "softmax"
    assert baseline_of("softmax-materialised") == "softmax"  # the fused module, not itself
    assert baseline_of("op:efficient") == "op:softmax-fused"
    assert baseline_of("op:softmax-materialised") == "op:softmax-fused"
    assert baseline_of("softmax") is None and baseline_of("op:softmax-fused") is None
    assert baseline_of("reference:efficient") is None


def test_crossovers_of_a_synthetic_sweep():
    mode = "forward+backward"
    records = []
    for n, fused, materialised in ((100, 1.0, 0.5), (400, 4.0, 2.0), (1600, 16.0, 8.0)):
        records += [_record("softmax", n, mode, fused, memory_mb=10),
                    _record("op:softmax-fused", n, mode, fused, memory_mb=10),
                    # faster than op:softmax-fused everywhere: must not be the baseline of op:efficient
                    _record("op:softmax-materialised", n, mode, materialised, memory_mb=100),
                    _record("reference:efficient", n, mode, 0.1)]
    records += [
        # time ratio 2, then 0.5 (crossing at 200), then 0.25; memory ratio 1.5 everywhere: never
        _record("efficient", 100, mode, 2.0, memory_mb=15), _record("efficient", 400, mode, 2.0, memory_mb=15),
        _record("efficient", 1600, mode, 4.0, memory_mb=15),
        _record("op:efficient", 100, mode, 4.0, memory_mb=5), _record("op:efficient", 400, mode, 4.0, memory_mb=5),
        _record("op:efficient", 1600, mode, 4.0, memory_mb=5),
    ]
    # fused softmax skipped (too slow) at N=6400: compared up to 1600 only, nothing extrapolated
    records += [_record("softmax", 6400, mode, 0, status="skipped"), _record("efficient", 6400, mode, 100.0)]
    rows = {(r["case"], r["metric"]): r for r in crossovers(records)}
    assert set(rows) == {(case, metric) for case in ("efficient", "op:efficient", "op:softmax-materialised")
                         for metric in ("time", "memory")}
    time = rows["efficient", "time"]
    assert time["baseline"] == "softmax" and time["verdict"] == "from" and time["n"] == pytest.approx(200.0)
    assert time["text"] == "200 (100-400)" and time["compared_up_to"] == 1600
    memory = rows["efficient", "memory"]
    assert memory["verdict"] == "never" and memory["text"] == "never (up to N=1,600; 1.50x there)"
    # op:efficient against op:softmax-fused: 4x, 1x, 0.25x -> crossing at N=400 (the ratio is 1 there)
    op = rows["op:efficient", "time"]
    assert op["baseline"] == "op:softmax-fused" and op["n"] == pytest.approx(400.0)
    assert rows["op:efficient", "memory"]["verdict"] == "always"
    assert rows["op:softmax-materialised", "time"]["verdict"] == "always"  # 0.5x of op:softmax-fused

    table = format_crossover(list(rows.values()))
    assert "head size 64 (4 heads, width 256)" in table
    assert "`softmax` ran up to N=1,600 (forward+backward)" in table


def test_crossovers_are_per_head_size_and_honest_about_noise_and_missing_points():
    records = []
    for head_dim in (32, 64):
        records += [_record("softmax", 196, "forward", 1.0, head_dim=head_dim),
                    _record("softmax", 1024, "forward", 10.0, head_dim=head_dim),
                    _record("care", 196, "forward", 0.98, head_dim=head_dim),  # 2% faster: within noise
                    _record("care", 1024, "forward", 2.0, head_dim=head_dim)]
    # a memory reading below its floor (events lost) is not compared
    records += [_record("linformer", 196, "forward", 2.0, memory_mb=0.001, head_dim=64),
                _record("linformer", 1024, "forward", 2.0, memory_mb=5, head_dim=64),
                _record("softmax-materialised", 196, "forward", 1.5, head_dim=64),
                _record("softmax-materialised", 1024, "forward", 0, status="oom", head_dim=64)]
    rows = crossovers(records)
    care = [r for r in rows if r["case"] == "care" and r["metric"] == "time"]
    assert sorted(r["head_dim"] for r in care) == [32, 64]
    assert all(r["verdict"] == "always" and "within timing noise (5%)" in r["note"] for r in care)
    linformer = next(r for r in rows if r["case"] == "linformer" and r["metric"] == "memory")
    assert linformer["ratios"] == [[1024, 0.5]] and "memory not compared at N=196" in linformer["note"]
    materialised = next(r for r in rows if r["case"] == "softmax-materialised" and r["metric"] == "time")
    assert materialised["text"] == "never (up to N=1,024; out of memory there)"
    assert "out of memory from N=1,024" in materialised["note"]
    table = format_crossover(rows, markdown=True)
    assert "### float32, head size 32 (8 heads" in table and "### float32, head size 64 (4 heads" in table


# ------------------------------------------------------------------------------ the committed sweep


@pytest.fixture(scope="module")
def committed():
    return json.loads(COMMITTED.read_text())


def test_the_committed_sweep_gives_a_row_per_mechanism(committed):
    rows = crossovers(committed["results"])
    cases = [c for c in committed["settings"]["cases"] if baseline_of(c) is not None]
    assert {r["case"] for r in rows} == set(cases)
    for case in cases:  # every pass and metric of every case has its verdict
        chosen = [r for r in rows if r["case"] == case]
        assert {(r["mode"], r["metric"]) for r in chosen} == {
            (mode, metric) for mode in ("forward", "forward+backward") for metric in ("time", "memory")}
        assert all(r["verdict"] in ("always", "from", "never") for r in chosen)
        assert all(r["n"] is None or r["between"][0] <= r["n"] <= r["between"][1] for r in chosen)
    markdown = format_crossover(rows, markdown=True)
    table_rows = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| case")]
    assert [line.split(" | ")[0][2:] for line in table_rows] == cases
    # the materialised N x N map never beats fused softmax: it runs out of memory where fused softmax ran
    materialised = [r for r in rows if r["case"] == "softmax-materialised"]
    assert all(r["verdict"] == "never" for r in materialised)


def test_crossover_subcommand_and_from_json_recompute_without_measuring(committed, tmp_path, capsys):
    bench_command(["crossover", "--from", str(COMMITTED), "--markdown"])  # as `lattn bench crossover`
    printed = capsys.readouterr().out
    assert "measured on Intel" in printed and "| efficient |" in printed and "faster: forward+backward" in printed

    saved = tmp_path / "attention.json"
    saved.write_text(json.dumps({key: value for key, value in committed.items() if key != "crossover"}))
    document = report_from_json(saved, tmp_path / "again", plots=False)
    capsys.readouterr()
    again = json.loads((tmp_path / "again" / "attention.json").read_text())
    assert again["crossover"] == json.loads(json.dumps(document["crossover"]))
    assert all(math.isfinite(r["n"]) for r in again["crossover"] if r["n"] is not None)
    assert "## Crossover with fused softmax" in (tmp_path / "again" / "attention.md").read_text()
