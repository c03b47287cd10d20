"""Stereo metrics: per-pixel averaging over the set, validity mask, thresholds, mergeable states."""

from __future__ import annotations

import math

import pytest
import torch

from lattn_app.metrics import BadPixelRate, D1Error, EndPointError, stereo_metrics, valid_disparity_mask


def test_epe_averages_over_pixels_of_the_whole_set_not_per_image():
    metric = EndPointError(max_disparity=100)
    # Image 1: one valid pixel with error 4. Image 2: three valid pixels with error 0.
    metric.update(torch.tensor([[14.0, 0.0]]), torch.tensor([[10.0, 0.0]]))
    metric.update(torch.tensor([[5.0, 6.0, 7.0]]), torch.tensor([[5.0, 6.0, 7.0]]))
    assert metric.compute().item() == 1.0  # 4 / 4 pixels; the per-image mean would be 2.0


def test_invalid_pixels_are_ignored():
    target = torch.tensor([0.0, -1.0, float("nan"), float("inf"), 100.0, 150.0, 10.0])
    preds = torch.full_like(target, 50.0)
    assert valid_disparity_mask(target, 100).tolist() == [False] * 6 + [True]
    metric = EndPointError(max_disparity=100)
    metric.update(preds, target)
    assert metric.compute().item() == 40.0


def test_bad_pixel_rates_and_d1_follow_their_definitions():
    target = torch.tensor([10.0, 10.0, 10.0, 10.0, 100.0, 100.0])
    preds = torch.tensor([10.5, 11.5, 12.5, 13.5, 104.0, 106.0])  # errors 0.5 1.5 2.5 3.5 4 6
    expected = {1: 5 / 6, 2: 4 / 6, 3: 3 / 6}
    for threshold, rate in expected.items():
        metric = BadPixelRate(threshold, max_disparity=192)
        metric.update(preds, target)
        assert math.isclose(metric.compute().item(), rate)
    d1 = D1Error(max_disparity=192)
    d1.update(preds, target)
    # > 3 px and > 5 %: 3.5 px of 10 yes; 4 px of 100 no (4 %); 6 px of 100 yes.
    assert math.isclose(d1.compute().item(), 2 / 6)


def test_states_merge_like_ranks_under_ddp():
    preds, target = torch.rand(4, 8, 9) * 60, torch.rand(4, 8, 9) * 60
    whole = stereo_metrics(48, "val_")
    whole.update(preds, target)
    rank0, rank1 = stereo_metrics(48, "val_"), stereo_metrics(48, "val_")
    rank0.update(preds[:3], target[:3])
    rank1.update(preds[3:], target[3:])
    for name in rank0:
        rank0[name].merge_state(rank1[name])
    merged, expected = rank0.compute(), whole.compute()
    assert set(expected) == {"val_epe", "val_bad1", "val_bad2", "val_bad3", "val_d1"}
    for key in expected:
        assert torch.allclose(merged[key], expected[key], rtol=0, atol=1e-12)


def test_shape_mismatch_is_an_error_naming_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        EndPointError().update(torch.zeros(2, 3), torch.zeros(3, 2))
