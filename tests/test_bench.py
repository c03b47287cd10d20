"""`lattn bench`: outputs and their fields, out-of-memory as a result, errors against exact attention,
the reference formulations, the targets' logic and the claims' report. No timing is asserted."""

from __future__ import annotations

import csv
import json
import math
import resource
import sys
import time
from pathlib import Path

import pytest
import torch

from lattn_app.attention import create_attention
from lattn_app.bench import report
from lattn_app.bench.measure import Timing, call_with_peak_memory, paired_ratio, time_side_by_side
from lattn_app.bench.attention import parse_grid
from lattn_app.bench.targets import evaluate_targets, growth_exponent, memory_floor_bytes
from lattn_app.bench.reference import ReferenceEfficientAttention
from lattn_app.cli import main

REPO = Path(__file__).resolve().parents[1]

SWEEP_CASES = ["softmax", "softmax-materialised", "efficient", "efficient-scaling", "performer", "fnet",
               "op:softmax-fused", "op:efficient", "op:efficient-scaling", "reference:efficient"]
RESULT_FIELDS = {"case", "kind", "n", "grid", "dtype", "mode", "status", "time_median_s", "time_fastest_s",
                 "time_slowest_s", "repeats", "peak_memory_bytes", "flops", "bytes", "flops_fraction",
                 "bandwidth_fraction", "roofline_ratio", "error", "error_against"}


@pytest.fixture(scope="module", autouse=True)
def torch_threads_restored():
    """The benchmarks run with --threads 1 (tiny workloads; no oversubscription on a busy machine), which
    sets torch's threads for the whole process: restored for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One small sweep through the `lattn` command: (output folder, JSON document, printed text)."""
    output = tmp_path_factory.mktemp("attention")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["bench", "attention", "--threads", "1", "--sizes", "4x4", "8x8", "--cases", *SWEEP_CASES, "--dtypes", "float32",
              "--repeats", "2", "--point-seconds", "0.05", "--output", str(output)])
    return output, json.loads((output / "attention.json").read_text()), printed.getvalue()


def result(document, case, n, mode="forward"):
    return next(r for r in document["results"] if (r["case"], r["n"], r["mode"]) == (case, n, mode))


def test_sweep_writes_table_json_csv_and_plots_with_every_field(sweep):
    output, document, printed = sweep
    assert {"benchmark", "command", "machine", "settings", "roofline", "results", "targets"} <= set(document)
    assert document["roofline"]["float32"]["matmul_flops_per_second"] > 0
    assert document["roofline"]["float32"]["copy_bytes_per_second"] > 0
    assert len(document["results"]) == len(SWEEP_CASES) * 2 * 2  # cases x sizes x modes
    for record in document["results"]:
        assert RESULT_FIELDS <= set(record)
        assert record["status"] == "ok", record
        assert record["time_fastest_s"] <= record["time_median_s"] <= record["time_slowest_s"]
        assert record["peak_memory_bytes"] > 0 and record["bytes"] > 0, record
    assert result(document, "softmax", 64)["flops"] > 0  # matrix products counted
    paired = result(document, "reference:efficient", 64, "forward+backward")  # timed in alternation with ours
    assert paired["paired_case"] == "efficient" and paired["paired_ours_fastest_s"] > 0

    with (output / "attention.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(document["results"]) and RESULT_FIELDS <= set(rows[0])
    markdown = (output / "attention.md").read_text()
    assert "| case | N | dtype | mode | time ms |" in markdown and "## Targets" in markdown
    assert "time ms" in printed and "Targets" in printed
    for metric in ("time", "memory"):
        png = output / f"attention_{metric}_float32.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_error_is_zero_for_exact_mechanisms_and_not_for_approximations(sweep):
    _, document, _ = sweep
    for case in ("softmax", "softmax-materialised", "op:softmax-fused"):
        assert result(document, case, 64)["error"] < 1e-5, case
        assert result(document, case, 64)["error_against"] == "softmax"
    # Scaling normalisation equals dot-product attention q k^T v / N exactly (docs/methods.md#efficient).
    for case in ("efficient-scaling", "op:efficient-scaling"):
        assert result(document, case, 64)["error"] < 1e-5, case
        assert result(document, case, 64)["error_against"] == "dot-product"
    for case in ("efficient", "op:efficient", "performer"):  # approximations of softmax attention
        assert result(document, case, 64)["error"] > 1e-3, case
    assert result(document, "fnet", 64)["error"] is None  # no q, k, v: not an approximation of attention
    # The error belongs to the forward output and is shown on both modes.
    assert result(document, "performer", 16, "forward+backward")["error"] == result(document, "performer", 16)["error"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU memory cap uses Linux's RLIMIT_DATA")
def test_out_of_memory_is_recorded_as_a_result(tmp_path):
    limit_before = resource.getrlimit(resource.RLIMIT_DATA)
    main(["bench", "attention", "--threads", "1", "--sizes", "8x8", "64x64", "96x96", "--cases", "op:softmax-materialised",
          "op:efficient", "--dtypes", "float32", "--modes", "forward", "--repeats", "1",
          "--memory-limit", "0.1", "--max-call-seconds", "1000", "--point-seconds", "0.05", "--no-plots",
          "--output", str(tmp_path)])
    document = json.loads((tmp_path / "attention.json").read_text())
    # 4 heads x 4096^2 fp32 scores = 256 MiB > the 100 MiB limit: the allocation itself fails.
    oom = result(document, "op:softmax-materialised", 4096)
    assert oom["status"] == "oom" and "limit" in oom["note"] and oom["time_median_s"] is None
    assert result(document, "op:softmax-materialised", 9216)["status"] == "oom"  # not run after an OOM
    assert "not run" in result(document, "op:softmax-materialised", 9216)["note"]
    assert result(document, "op:softmax-materialised", 64)["status"] == "ok"
    assert result(document, "op:efficient", 9216)["status"] == "ok"  # O(N d) memory fits
    assert resource.getrlimit(resource.RLIMIT_DATA) == limit_before  # the cap is lifted afterwards
    assert "oom" in (tmp_path / "attention.md").read_text()


RETAINED_AFTER_OUT_OF_MEMORY = """
import resource, torch
from lattn_app.bench.measure import MemoryCap, is_out_of_memory, retain_freed_memory
assert retain_freed_memory()
def faults_of_a_100_mb_buffer():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(100 * 2**20, dtype=torch.uint8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(3):  # the heap grows to hold it (glibc takes two rounds)
    faults_of_a_100_mb_buffer()
assert faults_of_a_100_mb_buffer() < 1000, "freed memory is not retained"
try:
    with MemoryCap(2**30, torch.device("cpu")):
        torch.empty(8 * 2**30, dtype=torch.uint8)
    raise SystemExit("the 8 GiB allocation did not fail under a 1 GiB cap")
except RuntimeError as error:
    assert is_out_of_memory(error), error
print(faults_of_a_100_mb_buffer())
"""


def test_freed_memory_stays_retained_after_an_allocation_fails():
    """A point out of memory must not slow the points after it: the failed allocation must not move
    malloc to an arena that maps (and page-faults) every big buffer anew."""
    import subprocess

    run = subprocess.run([sys.executable, "-c", RETAINED_AFTER_OUT_OF_MEMORY], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    page_faults = int(run.stdout.split()[-1])
    assert page_faults < 1000, f"{page_faults} page faults: the buffer was mapped anew"  # 25,600 if so


def test_every_memory_reading_starts_from_the_state_before_each_sets():
    """A short call is read several times; a call that frees what the previous call left (as a training
    step frees the last gradients) must not have that freeing offset its new allocations."""
    kept = {}

    def replace_kept_tensor():
        kept.pop("tensor", None)  # the previous call's tensor, freed inside this call
        kept["tensor"] = torch.ones(2**20)  # 4 MiB, kept like a gradient
        return None

    _, peak = call_with_peak_memory(replace_kept_tensor, torch.device("cpu"), before_each=kept.clear)
    assert peak == 4 * 2**20
    _, offset = call_with_peak_memory(replace_kept_tensor, torch.device("cpu"))
    assert offset < 4 * 2**20  # what before_each prevents: readings after the first net out the freed tensor


def test_a_memory_reading_is_the_one_two_calls_agree_on():
    """A reading that lost events (lower) or made one-time allocations (higher) is outvoted by two that
    agree; a call that allocates the same every time is read twice."""
    sizes_mib = iter([1, 8, 4, 4, 2])  # lost events, one-time allocations, then the true peak twice

    def allocate_next_size():
        return torch.ones(next(sizes_mib) * 2**18)

    _, peak = call_with_peak_memory(allocate_next_size, torch.device("cpu"))
    assert peak == 4 * 2**20
    assert next(sizes_mib) == 2  # stopped once two readings agreed
    calls = []

    def allocate_one_mib():
        calls.append(None)
        return torch.ones(2**18)

    _, peak = call_with_peak_memory(allocate_one_mib, torch.device("cpu"))
    assert peak == 2**20 and len(calls) == 2


def test_reference_efficient_formulation_matches_lattn_module():
    """The per-head-loop reference (channels-first, 1x1 convs, residual) computes lattn's efficient attention."""
    dim, heads, hw = 32, 4, (5, 7)
    ours = create_attention("efficient", dim=dim, num_heads=heads).double().eval()
    reference = ReferenceEfficientAttention(dim, heads, hw).double().eval()
    q_weight, k_weight, v_weight = ours.qkv.weight.chunk(3)
    q_bias, k_bias, v_bias = ours.qkv.bias.chunk(3)
    with torch.no_grad():
        for conv, weight, bias in ((reference.queries, q_weight, q_bias), (reference.keys, k_weight, k_bias),
                                   (reference.values, v_weight, v_bias), (reference.reprojection, ours.proj.weight,
                                                                          ours.proj.bias)):
            conv.weight.copy_(weight[:, :, None, None])
            conv.bias.copy_(bias)
    x = torch.randn(2, hw[0] * hw[1], dim, dtype=torch.float64)
    (maps,) = reference.prepare(x, hw)
    expected = (reference(maps) - maps).flatten(2).transpose(1, 2)  # without the reference's residual
    torch.testing.assert_close(ours(x, hw=hw), expected)


def _record(case, n, mode, seconds, memory=1000, roofline_s=None):
    """A result; `memory` in MB (above every floor of memory_floor_bytes at these sizes)."""
    return {"case": case, "n": n, "mode": mode, "dtype": "float32", "status": "ok", "batch_size": 1,
            "head_dim": 64, "width": 256, "time_fastest_s": seconds, "time_median_s": seconds, "time_slowest_s": seconds,
            "peak_memory_bytes": memory * 10**6, "bytes": 8 * n * 256 * 4, "roofline_s": roofline_s}


@pytest.mark.parametrize(("key", "package", "layer"), [
    ("performer", "performer_pytorch", "SelfAttention"),
    ("linformer", "linformer", "LinformerSelfAttention"),
    ("nystrom", "nystrom_attention", "NystromAttention"),
])
def test_package_references_are_the_packages_own_layers(key, package, layer, monkeypatch):
    """Where the public code is a package, the reference row runs it, not a rewrite; without it the row is left out."""
    from lattn_app.bench.cases import all_cases
    from lattn_app.bench.reference import REFERENCES

    reference = REFERENCES[key]
    module = reference.build(256, 4, (8, 8), **reference.options)
    assert type(module.layer).__module__.startswith(package) and type(module.layer).__name__ == layer
    x = torch.randn(2, 64, 256)
    assert module(*module.prepare(x, (8, 8))).shape == x.shape
    monkeypatch.setattr(type(reference), "available", property(lambda self: self.package is None))
    labels = [case.label for case in all_cases()]
    assert f"reference:{key}" not in labels and "reference:efficient" in labels


def test_targets_pass_and_fail_on_the_measured_ratios():
    records = [
        _record("op:softmax-fused", 16384, "forward+backward", 6.0),
        _record("op:efficient", 16384, "forward+backward", 0.1),  # 60x: passes >= 50x
        _record("softmax", 16384, "forward+backward", 6.0),
        _record("efficient", 16384, "forward+backward", 0.5),  # 12x: fails >= 20x
        _record("performer", 1024, "forward", 0.01),
        _record("performer", 65536, "forward", 0.01 * 64**1.1),  # N^1.10 passes
        _record("care", 1024, "forward", 0.01),
        _record("care", 65536, "forward", 0.01 * 64**1.3),  # N^1.30 fails
        _record("op:efficient", 16384, "forward", 0.03, roofline_s=0.01),  # 3x roofline fails
        _record("efficient", 1024, "forward", 0.010, memory=900),
        _record("reference:efficient", 1024, "forward", 0.011, memory=1000),  # faster and leaner: passes
        _record("fnet", 1024, "forward", 0.012, memory=1000),
        _record("reference:fnet", 1024, "forward", 0.010, memory=1000),  # 20% slower: fails
        _record("fnet", 65536, "forward", 0.012 * 64**1.3),  # N^1.30: fails, but fnet is O(N log N)
    ]
    targets = evaluate_targets(records)
    verdicts = {t["target"]: t["passed"] for t in targets}
    supplementary = {t["target"] for t in targets if t["supplementary"]}
    assert verdicts["growth fnet forward"] is False and "growth fnet forward" in supplementary
    assert "growth care forward" not in supplementary
    assert verdicts["efficient op vs fused softmax"] is True
    assert verdicts["efficient module vs softmax module"] is False
    assert verdicts["growth performer forward"] is True
    assert verdicts["growth care forward"] is False
    assert verdicts["growth nystrom forward"] is None  # not measured
    assert verdicts["roofline op:efficient"] is False
    assert verdicts["reference efficient"] is True
    assert verdicts["reference fnet"] is False


def test_growth_exponent_is_the_least_squares_slope_of_log_time_against_log_n():
    sizes = [1024, 3136, 4096, 16384, 32400, 65536]
    assert growth_exponent([(n, 3e-6 * n) for n in sizes]) == pytest.approx(1.0)
    assert growth_exponent([(n, 1e-7 * n**1.2) for n in sizes]) == pytest.approx(1.2)
    # One point slowed 2x by a busy machine moves the fit much less than it moves its endpoint ratio.
    noisy = [(n, 3e-6 * n * (2 if n == 65536 else 1)) for n in sizes]
    endpoints = math.log(noisy[-1][1] / noisy[0][1]) / math.log(64)
    assert 1.0 < growth_exponent(noisy) < endpoints


def test_growth_targets_are_fitted_over_every_size_from_1024_to_65536():
    sizes = [196, 1024, 3136, 4096, 16384, 32400, 65536]
    records = [_record("efficient", n, "forward", 1e-6 * n**1.12) for n in sizes]
    records += [_record("performer", n, "forward", 1e-6 * n**1.18) for n in sizes]
    records += [_record("nystrom", n, "forward", 1e-6 * n) for n in sizes[:-1]]  # N=65536 missing
    # N=196 lies outside the range: a slow point there does not count.
    records.append(_record("mixer", 196, "forward", 1.0))
    records += [_record("mixer", n, "forward", 1e-6 * n) for n in sizes[1:]]
    targets = {t["target"]: t for t in evaluate_targets(records)}
    assert targets["growth efficient forward"]["passed"] is True
    assert "N^1.12" in targets["growth efficient forward"]["measured"]
    assert "6 sizes" in targets["growth efficient forward"]["measured"]
    assert targets["growth performer forward"]["passed"] is False
    assert "N^1.18" in targets["growth performer forward"]["measured"]
    assert targets["growth nystrom forward"]["passed"] is None
    assert targets["growth mixer forward"]["passed"] is True and "N^1.00" in targets["growth mixer forward"]["measured"]


def test_no_cliffs_targets_hold_each_step_to_what_its_cost_predicts():
    sizes = [196, 1024, 4096, 16384, 32400, 65536]
    flops = {n: 1000 * n for n in sizes}  # a linear mechanism
    records = [dict(_record("efficient", n, mode, 1e-6 * n), flops=flops[n]) for n in sizes
               for mode in ("forward", "forward+backward")]
    # coupling: a 3.7x step where the cost predicts 2.3x (the cliff of the Xeon sweep)
    coupling = {1024: 1.0, 4096: 4.4, 16384: 21.0, 32400: 48.0, 65536: 112.0}
    records += [dict(_record("coupling", n, "forward", 1e-3 * coupling[n] * (3.7 if n == 65536 else 1)),
                     flops=int(1e6 * coupling[n])) for n in coupling]
    records.append(dict(_record("performer", 196, "forward", 1.0), flops=196))  # below N=1024: not a step
    records += [dict(_record("performer", n, "forward", 1e-6 * n), flops=n) for n in sizes[1:]]
    records += [_record("fnet", n, "forward", 1e-9 * n * 256 * math.log2(n * 256)) for n in sizes]  # no FLOP count
    targets = {t["target"]: t for t in evaluate_targets(records)}
    assert targets["no cliffs efficient"]["passed"] is True and "8 steps" in targets["no cliffs efficient"]["measured"]
    assert targets["no cliffs coupling"]["passed"] is False
    assert "N=32400 -> 65536 forward" in targets["no cliffs coupling"]["measured"]
    assert targets["no cliffs performer"]["passed"] is True
    assert targets["no cliffs fnet"]["passed"] is True  # N C log(N C), not N
    assert targets["no cliffs nystrom"]["passed"] is None  # not measured


def test_speedup_targets_use_the_fastest_call_and_only_the_target_settings():
    records = [
        dict(_record("op:softmax-fused", 16384, "forward+backward", 5.0), time_median_s=9.0),
        dict(_record("op:efficient", 16384, "forward+backward", 0.1), time_median_s=0.3),  # 50x fastest
        _record("softmax", 16384, "forward+backward", 5.0),
        dict(_record("efficient", 16384, "forward+backward", 0.2), width=512),  # not width 256: ignored
    ]
    targets = {t["target"]: t for t in evaluate_targets(records)}
    assert targets["efficient op vs fused softmax"]["passed"] is True
    assert targets["efficient op vs fused softmax"]["measured"].startswith("50.0x")
    assert targets["efficient module vs softmax module"]["passed"] is None


def test_reference_targets_use_the_alternated_timing_and_every_point():
    records = [
        # Measured minutes apart, ours looks slower; timed call by call in alternation it is faster.
        _record("efficient", 1024, "forward", 0.012),
        dict(_record("reference:efficient", 1024, "forward", 0.010), paired_ours_fastest_s=0.009,
             paired_reference_fastest_s=0.010),
        _record("performer", 1024, "forward", 0.010, memory=1000),
        _record("reference:performer", 1024, "forward", 0.020, memory=2000),
        _record("performer", 4096, "forward+backward", 0.010, memory=2100),  # hungrier at one point: fails
        _record("reference:performer", 4096, "forward+backward", 0.020, memory=2000),
    ]
    targets = {t["target"]: t for t in evaluate_targets(records)}
    assert targets["reference efficient"]["passed"] is True
    assert targets["reference efficient"]["measured"].startswith("time 0.90-0.90x")
    assert targets["reference performer"]["passed"] is False
    assert "memory 0.50-1.05x (worst at N=4096 forward+backward)" in targets["reference performer"]["measured"]


def test_alternated_timing_compares_round_by_round():
    """The paired ratio is the median of each round's ratio: a load that changes between rounds cancels
    out, and one round disturbed between its two calls is outvoted."""
    calls = [lambda: time.sleep(0.02), lambda: time.sleep(0.01)]
    ours, reference = time_side_by_side(calls, torch.device("cpu"), warmup=0, repeats=4)
    assert len(ours.calls) == len(reference.calls) == ours.repeats == 4
    assert paired_ratio(ours, reference) > 1.3
    # Every other round runs the calls in reverse order, so neither always pays for coming first.
    order: list[str] = []
    time_side_by_side([lambda: order.append("a"), lambda: order.append("b")], torch.device("cpu"), warmup=0,
                      repeats=4)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    # The machine slows down from round 3 on, and the load lifts for the reference's call in round 4 only:
    # the fastest calls' ratio (1.0 / 0.8 = 1.25) would say ours is slower; the rounds' median does not.
    ours = Timing(2.0, 1.0, 2.0, 5, (1.0, 1.0, 2.0, 2.0, 2.0))
    reference = Timing(2.2, 0.8, 2.2, 5, (1.1, 1.1, 2.2, 0.8, 2.2))
    assert paired_ratio(ours, reference) == pytest.approx(1.0 / 1.1)
    records = [_record("efficient", 1024, "forward", 0.012),
               dict(_record("reference:efficient", 1024, "forward", 0.010), paired_ours_fastest_s=0.009,
                    paired_reference_fastest_s=0.010, paired_time_ratio=1.2)]
    target = {t["target"]: t for t in evaluate_targets(records)}["reference efficient"]
    assert target["passed"] is False and target["measured"].startswith("time 1.20-1.20x")


def test_memory_readings_below_their_floor_are_not_compared():
    """A CPU reading under the output and gradients a call must have written lost profiler events: the
    reference comparison leaves it out (and says so) instead of failing, or passing, on it."""
    lost = 3 * 1024 * 256 * 4  # fwd+bwd floor at N=1024: half of the essential bytes (8 N C 4 / 2)
    records = [
        _record("mixer", 1024, "forward+backward", 0.010, memory=2000),
        dict(_record("reference:mixer", 1024, "forward+backward", 0.010), peak_memory_bytes=lost),
        _record("mixer", 196, "forward", 0.001, memory=900),
        _record("reference:mixer", 196, "forward", 0.001, memory=1000),
    ]
    assert memory_floor_bytes(records[1]) == 4 * 1024 * 256 * 4
    assert memory_floor_bytes(records[2]) == 196 * 256 * 4
    target = {t["target"]: t for t in evaluate_targets(records)}["reference mixer"]
    assert target["passed"] is True
    assert "memory 0.90-0.90x" in target["measured"]
    assert "memory not compared at N=1024 forward+backward" in target["measured"]
    records[1]["peak_memory_bytes"] = 1000 * 10**6  # a complete reading: ours is twice as hungry
    assert {t["target"]: t for t in evaluate_targets(records)}["reference mixer"]["passed"] is False


def test_roofline_target_is_the_module_and_the_operation_a_supplementary_line():
    records = [_record("efficient", 16384, "forward", 0.018, roofline_s=0.010),
               _record("efficient", 65536, "forward", 0.019 * 4, roofline_s=0.040),
               _record("op:efficient", 16384, "forward", 0.030, roofline_s=0.010)]
    targets = {t["target"]: t for t in evaluate_targets(records)}
    module, operation = targets["roofline efficient"], targets["roofline op:efficient"]
    assert module["passed"] is True and not module["supplementary"]
    assert module["measured"] == "1.80x at N=16384, 1.90x at N=65536"
    assert operation["passed"] is False and operation["supplementary"]
    summary = report.targets_summary(list(targets.values()))
    assert summary.startswith("1 of ") and "not measured" in summary  # the supplementary line not counted


def test_targets_are_evaluated_again_from_a_saved_json(tmp_path, sweep):
    _, document, _ = sweep
    document = dict(document, targets=[{"stale": True}])
    document["results"] = document["results"] + [
        _record("op:softmax-fused", 16384, "forward+backward", 6.0),
        _record("op:efficient", 16384, "forward+backward", 0.1)]
    saved = tmp_path / "run" / "attention.json"
    saved.parent.mkdir()
    saved.write_text(json.dumps(document))
    main(["bench", "attention", "--from-json", str(saved), "--no-plots"])
    again = json.loads(saved.read_text())
    verdicts = {t["target"]: t["passed"] for t in again["targets"]}
    assert verdicts["efficient op vs fused softmax"] is True  # 60x, from the added points
    markdown = (saved.parent / "attention.md").read_text()
    assert "## Targets" in markdown and "60.0x" in markdown and "targets hold" in markdown


def test_grids_are_parsed_from_hxw_or_n():
    assert parse_grid("135x240") == (135, 240)
    assert parse_grid("16384") == (128, 128)
    assert parse_grid("32400") == (180, 180)
    assert parse_grid("200") == (10, 20)


def test_backbone_benchmark_reports_speed_memory_and_complexity(tmp_path, capsys):
    main(["bench", "backbone", "--threads", "1", "--backbones", "vit_tiny", "--attentions", "efficient", "--sizes", "32",
          "--repeats", "1", "--output", str(tmp_path)])
    document = json.loads((tmp_path / "backbone.json").read_text())
    rows = {r["attention"]: r for r in document["results"]}
    assert set(rows) == {"softmax", "efficient"}  # the softmax twin is always measured
    for row in rows.values():
        assert row["status"] == "ok"
        assert row["inference_images_per_s"] > 0 and row["training_images_per_s"] > 0
        assert row["params_m"] > 0 and row["gmacs"] > 0
        # A training step's peak includes the gradients it writes (each reading starts without them).
        assert row["training_peak_bytes"] >= 0.99 * row["params_m"] * 1e6 * 4 and row["note"] == ""
        assert row["inference_peak_bytes"] > 0
    assert rows["softmax"]["training_speedup_vs_softmax"] == 1.0
    assert "train img/s" in capsys.readouterr().out


def test_claims_print_each_claim_with_the_papers_number_and_ours(tmp_path, capsys, monkeypatch):
    from lattn_app.bench import claims

    # The report, with stand-in measurements (the measurements themselves are tested below): one network
    # per (backbone, attention), the regular Transformer 2x to 4x hungrier than the others.
    def classifier(backbone, attention, options, size, batch, device):
        regular = options == {"fused": False}
        return (4 if regular and backbone == "vix_cifar" else 2 if regular else 1) * 2**20

    def stereo(attention, options, crop, batch, device, attention_only):
        return (3 if options == {"fused": False} else 1) * 2**20 * (1 if attention_only else 10)

    def maskrcnn(attention, options, modules, image, batch, device):
        return (5 if options == {"fused": False} else 2 if modules else 1) * 2**20

    monkeypatch.setattr(claims, "classifier_memory", classifier)
    monkeypatch.setattr(claims, "stereo_memory", stereo)
    monkeypatch.setattr(claims, "maskrcnn_memory", maskrcnn)
    monkeypatch.setattr(claims, "psmnet_memory",
                        lambda attention, options, crop, batch, device: (2 if attention is None else 3 if options else 2.2) * 2**20)
    main(["bench", "claims", "--quick", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    for claim, paper in (("Couplformer", "42% less"), ("X-formers", "up to 7x less"), ("Efficient attention", ""),
                         ("5 modules in a Mask R-CNN", "5 and 7 non-local blocks out of memory")):
        block = out[out.index(claim):]
        assert "paper:" in block and paper in block and "ours:" in block
    document = json.loads((tmp_path / "claims.json").read_text())
    assert [c["value"] for c in document["results"]] == pytest.approx([0.5, 4.0, 3.0, 2.5, 1.1])
    assert "50% less" in out and "up to 4.0x less" in out and "network 3.0x less" in out
    assert "5 non-local blocks take 2.5x the training memory of 5 efficient modules" in out
    assert "EA-PSMNet 1.10x PSMNet's memory; a non-local module in its place 1.36x EA-PSMNet's" in out
    assert claims.XFORMERS == ("performer", "linformer", "nystrom", "fnet", "mixer")
    assert (tmp_path / "claims.md").exists() and (tmp_path / "claims.csv").exists()


def test_claims_measure_training_memory_of_the_networks():
    from lattn_app.bench import claims

    cpu = torch.device("cpu")
    fnet = claims.classifier_memory("vix_cifar", "fnet", None, 32, 1, cpu)
    weights = sum(p.numel() * 4 for p in claims.build_network("vix_cifar", "fnet", 32).parameters())
    assert fnet > 2 * weights  # weights + gradients + the step's activations
    efficient = claims.stereo_memory("efficient", None, (32, 64), 1, cpu, attention_only=True)
    regular = claims.stereo_memory(*claims.REGULAR, (32, 64), 1, cpu, attention_only=True)
    assert 0 < efficient < regular  # 128 tokens per view: the materialised maps already cost more


@pytest.mark.slow  # about 30 s: up to four Mask R-CNN training steps for one reading
def test_claims_measure_training_memory_of_the_mask_rcnn():
    from lattn_app.bench import claims
    from lattn_app.models.detection import build_detector

    weights = sum(p.numel() * 4 for p in build_detector(
        "maskrcnn", 80, "resnet50", {"attention_positions": 1, "num_classes": 0}).parameters())
    maskrcnn = claims.maskrcnn_memory("efficient", None, 1, (64, 96), 1, torch.device("cpu"))
    assert maskrcnn > weights  # weights + the trained layers' gradients + the step's activations


def test_bench_without_a_subcommand_explains_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["bench"])
    assert "attention" in capsys.readouterr().err


def test_timm_parity_loads_timm_weights_into_lattn_s_softmax_vit_and_reports_ratios():
    from lattn_app.bench import timm_parity

    ours, theirs = timm_parity.twin_models("vit_tiny", 32)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours.eval()(images), theirs.eval()(images))  # the same network, weight for weight
    row = timm_parity.measure_point("vit_tiny", 32, 1, "inference", torch.device("cpu"), repeats=1)
    assert row["max_output_difference"] == 0.0 and row["time_ratio"] > 0 and row["memory_ratio"] > 0


def test_stereo_bench_builds_the_main_job_network_and_times_it_against_the_previous_one(tmp_path):
    import yaml

    from lattn_app.bench import stereo_step

    model = yaml.safe_load((REPO / "configs/sceneflow_efficient.yaml").read_text())["model"]["init_args"]
    net = dict(model["net"])
    assert {**net, "img_size": tuple(net["img_size"])} == stereo_step.MAIN_JOB["options"]
    assert (model["backbone"], model["backbone_options"], model["attention"]) == (
        stereo_step.MAIN_JOB["backbone"], stereo_step.MAIN_JOB["backbone_options"], stereo_step.MAIN_JOB["attention"])
    document = stereo_step.main(["--quick", "--repeats", "1", "--output", str(tmp_path)])
    (row,) = document["results"]
    assert row["previous_seconds"] > 0 and row["main_job_seconds"] > 0
    assert 0 < row["backbone_share"] < row["features_share"]
    assert (tmp_path / "stereo.md").is_file() and (tmp_path / "stereo.json").is_file()


def test_compile_benchmark_reports_breaks_compile_time_and_both_timings(tmp_path, capsys):
    from lattn_app.bench import bench_command

    bench_command(["compile", "--mechanisms", "fnet", "performer", "--networks", "--sizes", "8x8",
                   "--modes", "inference", "training", "--backend", "aot_eager", "--repeats", "2",
                   "--output", str(tmp_path)])
    document = json.loads((tmp_path / "compile.json").read_text())
    rows = document["results"]
    assert [(r["what"], r["mode"]) for r in rows] == [("fnet", "inference"), ("fnet", "training"),
                                                      ("performer", "inference"), ("performer", "training")]
    for row in rows:
        assert row["graph_breaks"] == 0 and row["tokens"] == 64 and row["compile_seconds"] > 0
        assert row["compiled_over_eager"] == pytest.approx(row["compiled_seconds"] / row["eager_seconds"])
        assert row["relative_difference"] < 1e-5  # aot_eager runs the same kernels
    assert document["settings"]["backend"] == "aot_eager"
    assert "| fnet | inference | 8x8 |" in (tmp_path / "compile.md").read_text()
    assert "performer training 8x8: 0 graph breaks" in capsys.readouterr().out


def test_the_committed_compile_run_covers_every_mechanism_and_network():
    from lattn_app.attention import list_attentions
    from lattn_app.bench.compiled import NETWORKS

    committed = Path(__file__).resolve().parents[1] / "benchmarks/compile-cpu/compile.json"
    rows = json.loads(committed.read_text())["results"]
    measured = {(r["what"], r["mode"], r["size"]) for r in rows}
    for name in list_attentions():
        assert {(name, mode, size) for mode in ("inference", "training") for size in ("64x64", "128x128")} <= measured
    assert {r["what"].split(" ")[0] for r in rows if r["kind"] == "network"} == set(NETWORKS)
    assert all(r["graph_breaks"] == 0 for r in rows)
