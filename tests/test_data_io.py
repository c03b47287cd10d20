"""File formats of the stereo data: PFM, RGB images, 16-bit disparity PNGs, disparity colouring."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image

from lattn_app.data.io import (
    ImageReadError,
    PFMError,
    colorize_disparity,
    read_disparity_png16,
    read_image,
    read_pfm,
    write_disparity_png16,
    write_pfm,
)

# ----------------------------------------------------------------------------------------------- PFM


@pytest.mark.parametrize("little_endian", [True, False])
@pytest.mark.parametrize("shape", [(5, 7), (4, 6, 3)])
def test_pfm_round_trip(tmp_path, little_endian, shape):
    array = np.random.default_rng(0).normal(0, 50, shape).astype(np.float32)
    array.flat[0] = np.inf  # special values survive as well
    path = tmp_path / "a.pfm"
    write_pfm(path, array, little_endian=little_endian)
    assert path.read_bytes().startswith(b"PF\n" if len(shape) == 3 else b"Pf\n")
    back = read_pfm(path)
    assert back.dtype == np.float32 and back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_pfm_rows_are_stored_bottom_to_top(tmp_path):
    # Hand-written: a 2 x 3 (W x H) grey little-endian file; the file lists the bottom row first.
    path = tmp_path / "hand.pfm"
    path.write_bytes(b"Pf\n2 3\n-1.0\n" + struct.pack("<6f", 5, 6, 3, 4, 1, 2))
    expected = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
    np.testing.assert_array_equal(read_pfm(path), expected)
    # ... and the writer produces exactly that file.
    write_pfm(tmp_path / "written.pfm", expected)
    assert (tmp_path / "written.pfm").read_bytes() == path.read_bytes()


def test_pfm_big_endian_colour_hand_written(tmp_path):
    path = tmp_path / "big.pfm"
    # 1 x 2 colour, big endian (positive scale; its magnitude is ignored); bottom pixel first.
    path.write_bytes(b"PF\n1 2\n2.5\n" + struct.pack(">6f", 4, 5, 6, 1, 2, 3) + b"trailing junk is ignored")
    np.testing.assert_array_equal(read_pfm(path), np.array([[[1, 2, 3]], [[4, 5, 6]]], np.float32))


def test_pfm_windows_line_breaks(tmp_path):
    path = tmp_path / "crlf.pfm"
    path.write_bytes(b"Pf\r\n1 1\r\n-1.0\r\n" + struct.pack("<f", 7.5))
    np.testing.assert_array_equal(read_pfm(path), np.array([[7.5]], np.float32))


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"P6\n2 2\n255\n" + bytes(12), "magic"),
        (b"", "magic"),
        (b"Pf\nabc 2\n-1.0\n" + bytes(16), "not integers"),
        (b"Pf\n0 2\n-1.0\n", "must be positive"),
        (b"Pf\n2 -3\n-1.0\n" + bytes(24), "must be positive"),
        (b"Pf\n2 2\n0.0\n" + bytes(16), "scale"),
        (b"Pf\n2 2\nhello\n" + bytes(16), "scale"),
        (b"Pf\n2 2\n", "truncated header"),
        (b"Pf\n2 2\n-1.0\n" + bytes(15), "truncated data"),
        (b"PF\n2 2\n-1.0\n" + bytes(16), "truncated data"),  # colour needs 3 x as much
    ],
)
def test_malformed_pfm_raises_pfm_error_naming_the_file(tmp_path, content, problem):
    path = tmp_path / "broken_file.pfm"
    path.write_bytes(content)
    with pytest.raises(PFMError, match=problem) as info:
        read_pfm(path)
    assert "broken_file.pfm" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_pfm_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_pfm(tmp_path / "nothing.pfm")


def test_write_pfm_rejects_other_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 3\)"):
        write_pfm(tmp_path / "x.pfm", np.zeros((2, 2, 2), np.float32))


# -------------------------------------------------------------------------------------------- images


def test_read_image_rgb_and_conversions(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)

    grey = rgb[..., 0]
    Image.fromarray(grey).save(tmp_path / "grey.png")
    out = read_image(tmp_path / "grey.png")
    assert out.shape == (6, 9, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))

    rgba = np.concatenate([rgb, np.full((6, 9, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped

    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    assert read_image(tmp_path / "palette.png").shape == (6, 9, 3)


def test_16bit_and_float_images_are_refused_naming_the_file_and_mode(tmp_path):
    Image.fromarray(np.full((4, 5), 40000, np.uint16)).save(tmp_path / "depth16.png")
    with pytest.raises(ImageReadError, match=r"depth16.png: a 'I;16' .*expected an 8-bit"):
        read_image(tmp_path / "depth16.png")
    Image.fromarray(np.full((4, 5), 0.5, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ImageReadError, match=r"float.tif: a 'F' "):
        read_image(tmp_path / "float.tif")


def test_truncated_png_raises_image_read_error(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut_short.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut_short.png"):
        read_image(tmp_path / "cut_short.png")


def test_non_image_raises_image_read_error(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(ImageReadError, match="notes.png"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(FileNotFoundError, match="absent.png"):
        read_image(tmp_path / "absent.png")


# ------------------------------------------------------------------------------------- disparities


def test_png16_round_trip_to_one_256th(tmp_path):
    disparity = np.random.default_rng(3).uniform(0.01, 250.0, (20, 30)).astype(np.float32)
    disparity[0, 0] = np.nan  # invalid -> 0
    disparity[0, 1] = -3.0  # negative -> 0
    disparity[0, 2] = 400.0  # saturates at 65535 / 256
    path = tmp_path / "pred.png"
    write_disparity_png16(path, disparity)
    assert Image.open(path).mode.startswith("I;16")
    back = read_disparity_png16(path)
    assert back.dtype == np.float32 and back.shape == disparity.shape
    assert back[0, 0] == 0 and back[0, 1] == 0
    assert back[0, 2] == pytest.approx(65535 / 256)
    rest = np.ones_like(disparity, dtype=bool)
    rest[0, :3] = False
    assert np.abs(back[rest] - disparity[rest]).max() <= 0.5 / 256 + 1e-6


def test_reading_an_8bit_png_as_disparity_fails(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "eight.png")
    with pytest.raises(ImageReadError, match="eight.png.*16-bit"):
        read_disparity_png16(tmp_path / "eight.png")


def test_colorize_disparity():
    disparity = np.tile(np.linspace(0, 40, 16, dtype=np.float32), (8, 1))
    disparity[0, 5] = np.nan
    disparity[1, 5] = -1
    image = colorize_disparity(disparity, max_disparity=40)
    assert image.shape == (8, 16, 3) and image.dtype == np.uint8
    assert (image[0, 5] == 0).all() and (image[1, 5] == 0).all() and (image[2, 0] == 0).all()  # invalid: black
    assert image[2, 1:].sum(axis=-1).min() > 0  # valid: coloured
    assert not np.array_equal(image[2, 1], image[2, 15])
    np.testing.assert_array_equal(colorize_disparity(disparity), image)  # default max = largest valid value
    with pytest.raises(ValueError, match="max_disparity"):
        colorize_disparity(disparity, max_disparity=0)
