"""`lattn bench`: outputs and their fields, out-of-memory as a result, errors against exact attention,
the reference formulations, the targets' logic and the claims' report. No timing is asserted."""

from __future__ import annotations

import csv
import json
import resource
import sys

import pytest
import torch

from lattn_app.attention import create_attention
from lattn_app.bench.attention import evaluate_targets, parse_grid
from lattn_app.bench.reference import ReferenceEfficientAttention
from lattn_app.cli import main

SWEEP_CASES = ["softmax", "softmax-materialised", "efficient", "efficient-scaling", "performer", "fnet",
               "op:softmax-fused", "op:efficient", "op:efficient-scaling", "reference:efficient"]
RESULT_FIELDS = {"case", "kind", "n", "grid", "dtype", "mode", "status", "time_median_s", "time_fastest_s",
                 "time_slowest_s", "repeats", "peak_memory_bytes", "flops", "bytes", "flops_fraction",
                 "bandwidth_fraction", "roofline_ratio", "error", "error_against"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One small sweep through the `lattn` command: (output folder, JSON document, printed text)."""
    output = tmp_path_factory.mktemp("attention")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["bench", "attention", "--sizes", "4x4", "8x8", "--cases", *SWEEP_CASES, "--dtypes", "float32",
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
    # Scaling normalisation equals dot-product attention q k^T v / N exactly (ALGORITHMS.md section 1).
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
    main(["bench", "attention", "--sizes", "8x8", "64x64", "96x96", "--cases", "op:softmax-materialised",
          "op:efficient", "--dtypes", "float32", "--modes", "forward", "--repeats", "1",
          "--memory-limit", "0.1", "--no-plots", "--output", str(tmp_path)])
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
    return {"case": case, "n": n, "mode": mode, "dtype": "float32", "status": "ok", "batch_size": 1,
            "head_dim": 64, "width": 256, "time_fastest_s": seconds, "time_median_s": seconds,
            "peak_memory_bytes": memory, "roofline_s": roofline_s}


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
    ]
    verdicts = {t["target"]: t["passed"] for t in evaluate_targets(records)}
    assert verdicts["efficient op vs fused softmax"] is True
    assert verdicts["efficient module vs softmax module"] is False
    assert verdicts["growth performer forward"] is True
    assert verdicts["growth care forward"] is False
    assert verdicts["growth nystrom forward"] is None  # not measured
    assert verdicts["roofline op:efficient"] is False
    assert verdicts["reference efficient"] is True
    assert verdicts["reference fnet"] is False


def test_grids_are_parsed_from_hxw_or_n():
    assert parse_grid("135x240") == (135, 240)
    assert parse_grid("16384") == (128, 128)
    assert parse_grid("32400") == (180, 180)
    assert parse_grid("200") == (10, 20)


def test_backbone_benchmark_reports_speed_memory_and_complexity(tmp_path, capsys):
    main(["bench", "backbone", "--backbones", "vit_tiny", "--attentions", "efficient", "--sizes", "32",
          "--repeats", "1", "--output", str(tmp_path)])
    document = json.loads((tmp_path / "backbone.json").read_text())
    rows = {r["attention"]: r for r in document["results"]}
    assert set(rows) == {"softmax", "efficient"}  # the softmax twin is always measured
    for row in rows.values():
        assert row["status"] == "ok"
        assert row["inference_images_per_s"] > 0 and row["training_images_per_s"] > 0
        assert row["training_peak_bytes"] > 0 and row["params_m"] > 0 and row["gmacs"] > 0
    assert rows["softmax"]["training_speedup_vs_softmax"] == 1.0
    assert "train img/s" in capsys.readouterr().out


def test_claims_print_each_claim_with_the_papers_number_and_ours(tmp_path, capsys, monkeypatch):
    from lattn_app.bench import claims

    main(["bench", "claims", "--quick", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    for claim, paper in (("Couplformer", "42% less"), ("X-formers", "up to 7x less"), ("Efficient attention", "")):
        block = out[out.index(claim):]
        assert "paper:" in block and paper in block and "ours:" in block
    document = json.loads((tmp_path / "claims.json").read_text())
    assert len(document["results"]) == 3
    assert all(c["value"] is not None and c["value"] > 0 for c in document["results"])
    assert claims.XFORMERS == ("performer", "linformer", "nystrom", "fnet", "mixer")


def test_bench_without_a_subcommand_explains_the_choices(capsys):
    with pytest.raises(SystemExit):
        main(["bench"])
    assert "attention" in capsys.readouterr().err
