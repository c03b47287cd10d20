"""The real stereo benchmarks as distributed: KITTI 2012/2015, Middlebury (MiddEval3, 2014) and ETH3D.

Every test writes a small tree in the benchmark's own file formats (16-bit PNG disparities, PFMs with
infinities, calib.txt, KITTI calibration files, occlusion masks) and reads it through the datamodules,
the metrics, the SGBM baseline, and the `lattn` command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lattn_app.cli import console_main, main
from lattn_app.data.io import ImageReadError, PFMError, read_pfm, write_pfm
from lattn_app.data.stereo import (
    CalibrationError,
    ETH3DDataModule,
    KITTI2012DataModule,
    KITTI2015DataModule,
    MiddleburyDataModule,
    read_calib_txt,
    read_kitti_calib,
    stereo_collate,
)
from lattn_app.metrics.stereo import (
    BENCHMARK_METRICS,
    benchmark_metric,
    zero_shot_table,
)
from lattn_app.tasks.stereo import fill_invalid_disparities, sgbm_disparity

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
HEIGHT, WIDTH = 32, 72
SMALL_MODEL = ["--model.net.feature_dim", "16", "--model.net.groups", "4", "--model.net.volume_channels", "8",
               "--model.net.num_hourglasses", "1", "--model.net.img_size", "[32, 64]",
               "--model.backbone_options.num_stages", "2"]


# ------------------------------------------------------------------------------ trees in the real formats


def textured_pair(rng: np.random.Generator, disparity: float, height: int = HEIGHT, width: int = WIDTH):
    """A random-texture left view and the right view it implies for a constant disparity (right(x) = left(x + d))."""
    wide = rng.integers(0, 256, (height, width + int(disparity) + 1, 3), dtype=np.uint8)
    left = wide[:, :width]
    right = wide[:, int(disparity):int(disparity) + width]
    return left, right


def save_png16(path: Path, disparity: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(disparity * 256).astype(np.uint16)).save(path)  # KITTI: value = disparity * 256


def save_rgb(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def write_kitti(root: Path, year: int, pairs: int = 2, disparity: float = 5.0) -> Path:
    """A KITTI 2015 (data_scene_flow) or 2012 (data_stereo_flow) tree with sparse ground truth."""
    names = (("image_2", "image_3", "disp_occ_0", "disp_noc_0", "calib_cam_to_cam") if year == 2015 else
             ("colored_0", "colored_1", "disp_occ", "disp_noc", "calib"))
    left_dir, right_dir, occ_dir, noc_dir, calib_dir = names
    base = root / ("data_scene_flow" if year == 2015 else "data_stereo_flow")
    rng = np.random.default_rng(year)
    for index in range(pairs):
        frame = f"{index:06d}_10.png"
        left, right = textured_pair(rng, disparity)
        save_rgb(base / "training" / left_dir / frame, left)
        save_rgb(base / "training" / right_dir / frame, right)
        save_rgb(base / "training" / left_dir / f"{index:06d}_11.png", right)  # the next frame: not a pair
        occ = np.full((HEIGHT, WIDTH), disparity, np.float32)
        occ[::3] = 0  # sparse: rows without laser points
        noc = occ.copy()
        noc[:, :8] = 0  # occluded at the left border
        save_png16(base / "training" / occ_dir / frame, occ)
        save_png16(base / "training" / noc_dir / frame, noc)
        # P_left = K [I | 0], P_right = K [I | -f B] with f = 700 px and B = 0.54 m
        p_left = "700 0 36 0 0 700 16 0 0 0 1 0"
        p_right = "700 0 36 -378 0 700 16 0 0 0 1 0"
        text = (f"P_rect_02: {p_left}\nP_rect_03: {p_right}\n" if year == 2015 else
                f"P0: {p_left}\nP1: {p_right}\nP2: {p_left}\nP3: {p_right}\n")
        for split in ("training", "testing"):
            (base / split / calib_dir).mkdir(parents=True, exist_ok=True)
            (base / split / calib_dir / f"{index:06d}.txt").write_text(text)
        test_left, test_right = textured_pair(rng, disparity)
        save_rgb(base / "testing" / left_dir / frame, test_left)
        save_rgb(base / "testing" / right_dir / frame, test_right)
    return base


def calib_text(ndisp: int, focal: float = 100.0, doffs: float = 2.5, baseline: float = 200.0) -> str:
    return (f"cam0=[{focal} 0 35.5; 0 {focal} 15.5; 0 0 1]\ncam1=[{focal} 0 {35.5 + doffs}; 0 {focal} 15.5; 0 0 1]\n"
            f"doffs={doffs}\nbaseline={baseline}\nwidth={WIDTH}\nheight={HEIGHT}\nndisp={ndisp}\nisint=0\nvmin=2\n"
            "vmax=20\ndyavg=0\ndymax=0\n")


def write_scene(folder: Path, rng: np.random.Generator, disparity: float, ndisp: int,
                truth_folder: Path | None = None, truth_name: str = "disp0GT.pfm", mask: bool = True,
                size: tuple[int, int] = (HEIGHT, WIDTH)) -> None:
    """One Middlebury/ETH3D scene: im0/im1, calib.txt, a PFM with infinities, mask0nocc.png (255/128/0)."""
    left, right = textured_pair(rng, disparity, *size)
    save_rgb(folder / "im0.png", left)
    save_rgb(folder / "im1.png", right)
    (folder / "calib.txt").write_text(calib_text(ndisp))
    truth = truth_folder if truth_folder is not None else folder
    ground_truth = np.full(size, disparity, np.float32)
    ground_truth[:4] = np.inf  # unknown
    write_pfm(truth / truth_name, ground_truth)
    if mask:
        values = np.full(size, 255, np.uint8)
        values[:, :6] = 128  # occluded
        values[:4] = 0  # no ground truth
        save_rgb(truth / "mask0nocc.png", values)


def write_middeval3(root: Path, resolution: str = "Q", ndisp: int = 24, disparity: float = 6.0) -> Path:
    rng = np.random.default_rng(3)
    for scene, size in (("Adirondack", (HEIGHT, WIDTH)), ("Motorcycle", (36, 64))):  # scenes differ in size
        write_scene(root / "MiddEval3" / f"training{resolution}" / scene, rng, disparity, ndisp, size=size)
    left, right = textured_pair(rng, disparity)
    for name, image in (("im0.png", left), ("im1.png", right)):
        save_rgb(root / "MiddEval3" / f"test{resolution}" / "Australia" / name, image)
    (root / "MiddEval3" / f"test{resolution}" / "Australia" / "calib.txt").write_text(calib_text(ndisp))
    return root


def write_middlebury2014(root: Path) -> Path:
    rng = np.random.default_rng(4)
    for scene in ("Backpack-perfect", "Cable-perfect"):
        write_scene(root / scene, rng, 6.0, 24, truth_name="disp0.pfm", mask=False)
    return root


def write_eth3d(root: Path, disparity: float = 4.0) -> Path:
    rng = np.random.default_rng(5)
    for scene in ("delivery_area_1l", "electro_1l"):
        (root / "two_view_training_gt" / scene).mkdir(parents=True)
        write_scene(root / "two_view_training" / scene, rng, disparity, 16, truth_folder=root / "two_view_training_gt" / scene)
    left, right = textured_pair(rng, disparity)
    for name, image in (("im0.png", left), ("im1.png", right)):
        save_rgb(root / "two_view_test" / "lakeside_1l" / name, image)
    (root / "two_view_test" / "lakeside_1l" / "calib.txt").write_text(calib_text(16))
    return root


def module(cls, root: Path, **kwargs):
    return cls(root=str(root), num_workers=0, **kwargs)


# ------------------------------------------------------------------------------------------- KITTI


@pytest.mark.parametrize("year", [2015, 2012])
def test_kitti_reads_sparse_16bit_ground_truth_masks_and_calibration(year, tmp_path):
    base = write_kitti(tmp_path, year)
    cls = KITTI2015DataModule if year == 2015 else KITTI2012DataModule
    data = module(cls, tmp_path, eval_batch_size=2)  # root: the folder holding data_scene_flow/
    data.setup("test")
    dataset = data.datasets["test"]
    assert len(dataset) == 2  # the _11 frames are not pairs
    sample = dataset[0]
    left_name = "image_2" if year == 2015 else "colored_0"
    assert sample["name"] == f"{base.name}/training/{left_name}/000000_10.png"
    disparity = sample["disparity"].numpy()
    assert disparity.shape == (HEIGHT, WIDTH) and disparity.dtype == np.float32
    assert np.all(disparity[::3] == 0) and np.all(disparity[1::3] == 5.0)  # value / 256; 0 = no ground truth
    noc = sample["nonoccluded"].numpy()
    assert noc.sum() == ((disparity > 0).sum() - (disparity[:, :8] > 0).sum()) and not noc[:, :8].any()
    calibration = sample["calibration"]
    assert calibration["focal_length"] == 700 and calibration["baseline"] == pytest.approx(0.54)
    assert "disparity_bound" not in sample  # KITTI states no bound
    assert data.benchmark_metrics[0] == ("d1_all" if year == 2015 else "bad3_noc")

    predict = module(cls, base, predict_split="testing")  # root may also be data_scene_flow/ itself
    predict.setup("predict")
    pairs = [predict.datasets["predict"][i] for i in range(2)]
    assert "disparity" not in pairs[0] and pairs[1]["name"].endswith(f"testing/{left_name}/000001_10.png")


def test_kitti_missing_and_malformed_files_are_named(tmp_path):
    base = write_kitti(tmp_path, 2015)
    (base / "training/disp_noc_0/000001_10.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) missing .*disp_noc_0/000001_10\.png"):
        module(KITTI2015DataModule, tmp_path).setup("test")
    save_rgb(base / "training/disp_noc_0/000001_10.png", np.zeros((HEIGHT, WIDTH, 3), np.uint8))  # 8-bit RGB
    Image.fromarray(np.zeros((HEIGHT, WIDTH), np.uint8)).save(base / "training/disp_occ_0/000001_10.png")
    data = module(KITTI2015DataModule, tmp_path)
    data.setup("test")
    with pytest.raises(ImageReadError, match=r"disp_occ_0/000001_10\.png: expected a single-channel 16-bit"):
        data.datasets["test"][1]
    with pytest.raises(FileNotFoundError, match=r"KITTI2015DataModule: .*training not found; expected training/ "
                                                r"with image_2/"):
        module(KITTI2015DataModule, tmp_path / "data_scene_flow/training").setup("test")
    with pytest.raises(ValueError, match=r"KITTI2015DataModule: root is required \(a folder with training/"):
        KITTI2015DataModule(root=None)
    (base / "training/calib_cam_to_cam/000000.txt").write_text("P_rect_02: 700 0 36 0\n")
    with pytest.raises(CalibrationError, match=r"000000\.txt: no P_rect_02/P_rect_03"):
        module(KITTI2015DataModule, tmp_path).setup("test")


# -------------------------------------------------------------------------------------- Middlebury


def test_middeval3_reads_infinities_masks_calib_and_ndisp(tmp_path):
    write_middeval3(tmp_path, "Q", ndisp=24)
    data = module(MiddleburyDataModule, tmp_path, resolution="Q")
    data.setup("test")
    sample = data.datasets["test"][0]
    assert sample["name"] == "MiddEval3/trainingQ/Adirondack/im0.png"
    disparity = sample["disparity"].numpy()
    assert np.all(disparity[:4] == 0) and np.all(disparity[4:] == 6.0)  # infinity = unknown -> 0
    noc = sample["nonoccluded"].numpy()
    assert not noc[:4].any() and not noc[:, :6].any() and noc[4:, 6:].all()  # 255 only
    assert sample["disparity_bound"] == 24.0  # calib.txt's ndisp
    assert sample["calibration"]["focal_length"] == 100 and sample["calibration"]["doffs"] == 2.5
    assert data.benchmark_name == "Middlebury (Q)"
    assert data.benchmark_metrics == ("bad2_all", "bad2_noc", "avgerr_all", "avgerr_noc")

    with pytest.raises(FileNotFoundError, match=r"MiddEval3/trainingH not found; .*--data.resolution"):
        module(MiddleburyDataModule, tmp_path, resolution="H").setup("test")
    predict = module(MiddleburyDataModule, tmp_path / "MiddEval3", resolution="Q", predict_split="testing")
    predict.setup("predict")
    assert predict.datasets["predict"][0]["name"] == "testQ/Australia/im0.png"


def test_middlebury_2014_scenes_and_bad_calib_files(tmp_path):
    write_middlebury2014(tmp_path)
    data = module(MiddleburyDataModule, tmp_path)
    data.setup("test")
    assert len(data.datasets["test"]) == 2 and "nonoccluded" not in data.datasets["test"][0]
    assert data.benchmark_metrics == ("bad2_all", "avgerr_all") and data.benchmark_name == "Middlebury 2014"

    calib = tmp_path / "Cable-perfect/calib.txt"
    calib.write_text(calib_text(24).replace("baseline=200.0\n", ""))
    with pytest.raises(CalibrationError, match=r"Cable-perfect/calib\.txt: no baseline= line"):
        module(MiddleburyDataModule, tmp_path).setup("test")
    calib.write_text(calib_text(24).replace("ndisp=24", "ndisp=many"))
    with pytest.raises(CalibrationError, match=r"calib\.txt: ndisp='many' is not a number"):
        read_calib_txt(calib)
    calib.write_text(calib_text(24).replace("cam0=[100.0 0 35.5; 0 100.0 15.5; 0 0 1]", "cam0=[100 0 35.5]"))
    with pytest.raises(CalibrationError, match=r"cam0 must be a 3 x 3 matrix"):
        read_calib_txt(calib)
    calib.write_text(calib_text(24))
    (tmp_path / "Cable-perfect/disp0.pfm").write_bytes(b"Pf\n72 32\n-1.0\n" + b"\0" * 10)  # truncated
    data = module(MiddleburyDataModule, tmp_path)
    data.setup("test")
    with pytest.raises(PFMError, match=r"Cable-perfect/disp0\.pfm"):
        data.datasets["test"][1]
    (tmp_path / "Cable-perfect/disp0.pfm").unlink()
    with pytest.raises(FileNotFoundError, match=r"Cable-perfect/disp0\.pfm"):
        module(MiddleburyDataModule, tmp_path).setup("test")
    bad = tmp_path / "kitti_calib.txt"
    bad.write_text("P_rect_02: 700 0 36 0 0 700 16 0 0 0 1 0\nP_rect_03: 700 0 36 x 0 700 16 0 0 0 1 0\n")
    with pytest.raises(CalibrationError, match=r"kitti_calib\.txt: P_rect_03='x' is not a number"):
        read_kitti_calib(bad)


# ------------------------------------------------------------------------------------------- ETH3D


def test_eth3d_reads_ground_truth_from_its_own_folder(tmp_path):
    write_eth3d(tmp_path)
    data = module(ETH3DDataModule, tmp_path, eval_batch_size=2)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert batch["name"] == ["two_view_training/delivery_area_1l/im0.png", "two_view_training/electro_1l/im0.png"]
    assert batch["disparity"].shape == (2, HEIGHT, WIDTH) and torch.all(batch["disparity"][:, :4] == 0)
    assert batch["nonoccluded"][:, 4:, 6:].all() and not batch["nonoccluded"][:, :, :6].any()
    assert torch.all(batch["disparity_bound"] == 16)
    assert data.benchmark_metrics == ("bad1_noc", "avgerr_noc")
    (tmp_path / "two_view_training_gt/electro_1l/disp0GT.pfm").unlink()
    with pytest.raises(FileNotFoundError, match=r"two_view_training_gt/electro_1l/disp0GT\.pfm"):
        module(ETH3DDataModule, tmp_path).setup("test")
    Image.fromarray(np.zeros((HEIGHT, WIDTH // 2), np.uint8)).save(tmp_path / "two_view_training_gt/delivery_area_1l/"
                                                                               "mask0nocc.png")
    (tmp_path / "two_view_training_gt/electro_1l").rename(tmp_path / "unused")
    (tmp_path / "two_view_training/electro_1l").rename(tmp_path / "unused2")
    data = module(ETH3DDataModule, tmp_path)
    data.setup("test")
    with pytest.raises(ValueError, match=r"mask0nocc\.png: mask of size 36x32 but the image .*im0\.png is 72x32"):
        data.datasets["test"][0]


# ---------------------------------------------------------------------------------- metrics, SGBM


def test_benchmark_metrics_score_all_or_nonoccluded_pixels():
    target = torch.tensor([[[10.0, 10.0, 100.0, 0.0]]])
    prediction = torch.tensor([[[10.0, 14.0, 104.0, 50.0]]])  # errors 0, 4 (> 3 and > 5%), 4 (< 5% of 100), -
    noc = torch.tensor([[[True, False, True, True]]])
    values = {}
    for name in ("d1_all", "d1_noc", "bad3_all", "bad3_noc", "avgerr_all", "avgerr_noc", "bad1_noc"):
        metric = benchmark_metric(name)
        metric.update(prediction, target, noc if metric.pixels == "noc" else None)
        values[name] = float(metric.compute())
    assert values == pytest.approx({"d1_all": 1 / 3, "d1_noc": 0.0, "bad3_all": 2 / 3, "bad3_noc": 0.5,
                                    "avgerr_all": 8 / 3, "avgerr_noc": 2.0, "bad1_noc": 0.5})
    assert set(BENCHMARK_METRICS) >= {"d1_all", "bad2_noc", "bad1_noc", "avgerr_noc"}
    with pytest.raises(ValueError, match="unknown stereo benchmark metric 'd2_all'"):
        benchmark_metric("d2_all")


def test_sgbm_matches_a_textured_pair_and_fills_holes():
    rng = np.random.default_rng(0)
    left, right = textured_pair(rng, 7.0, 48, 96)
    views = [torch.from_numpy(view).permute(2, 0, 1)[None].float() / 255 for view in (left, right)]
    disparity = sgbm_disparity(*views, torch.tensor([16.0]), 192)
    assert disparity.shape == (1, 48, 96)
    inner = disparity[0, 4:-4, 24:-4]
    assert float((inner - 7.0).abs().mean()) < 0.3
    filled = fill_invalid_disparities(np.array([[0, 5, 0, 0, 3, 0]], np.float32),
                                      np.array([[False, True, False, False, True, False]]))
    assert filled.tolist() == [[5, 5, 3, 3, 3, 3]]


def test_pairs_of_several_sizes_batch_as_lists():
    batch = stereo_collate([{"left": torch.rand(3, 20, 30), "right": torch.rand(3, 20, 30), "name": "a",
                             "disparity_bound": 10.0},
                            {"left": torch.rand(3, 24, 40), "right": torch.rand(3, 24, 40), "name": "b",
                             "disparity_bound": 20.0}])
    assert [tuple(view.shape) for view in batch["left"]] == [(1, 3, 20, 30), (1, 3, 24, 40)]
    assert batch["disparity_bound"].tolist() == [10.0, 20.0]
    with pytest.raises(ValueError, match="different keys: b has"):
        stereo_collate([{"left": torch.rand(3, 4, 4), "name": "a", "disparity_bound": 1.0},
                        {"left": torch.rand(3, 4, 4), "name": "b"}])


def test_zero_shot_table_gathers_test_metrics(tmp_path):
    for name, data_class, value in (("kitti", "lattn_app.data.KITTI2015DataModule", 0.25),
                                    ("eth3d", "lattn_app.data.ETH3DDataModule", 0.5)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.yaml").write_text(f"data:\n  class_path: {data_class}\n")
        metrics = {"test_epe": 1.5, "test_bad2": value, "test_sgbm_bad2": 0.75, "test_eval_scale_min": 1.0}
        metrics["test_d1_all" if name == "kitti" else "test_bad1_noc"] = value
        (folder / "test_metrics.json").write_text(json.dumps({"metrics": metrics}))
    table = zero_shot_table([tmp_path / "kitti/test_metrics.json", tmp_path / "eth3d/test_metrics.json"])
    lines = table.splitlines()
    assert lines[0].startswith("| set | EPE | bad-1 % | bad-2 % |") and "d1_all" in lines[0] and "bad1_noc" in lines[0]
    assert lines[2].startswith("| KITTI2015 | 1.50 | - | 25.00 |") and lines[3].startswith("| ETH3D |")
    with pytest.raises(FileNotFoundError, match="missing.json not found"):
        zero_shot_table([tmp_path / "missing.json"])


# ------------------------------------------------------------------------------ through the lattn command


def read_ply(path: Path) -> tuple[list[str], np.ndarray]:
    """A binary little-endian vertex PLY as (header lines, structured array): what point-cloud viewers parse."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    assert header[0] == "ply" and header[1] == "format binary_little_endian 1.0"
    count = int(next(line for line in header if line.startswith("element vertex")).split()[-1])
    types = {"float": "<f4", "uchar": "u1"}
    dtype = [(line.split()[2], types[line.split()[1]]) for line in header if line.startswith("property")]
    vertices = np.frombuffer(data[end:], dtype=dtype)
    assert len(vertices) == count
    return header, vertices


def run(args: list[str]) -> None:
    main([*args, "--data.num_workers", "0", *SMALL_MODEL])


SCENEFLOW_CONFIG = str(CONFIGS / "sceneflow_efficient.yaml")


def small_checkpoint(path: Path, **options) -> Path:
    """A lattn stereo checkpoint of the small model (as a Scene Flow run would leave it)."""
    from lattn_app.models.stereo import StereoNetOptions
    from lattn_app.tasks.stereo import StereoTask

    net = StereoNetOptions(feature_dim=16, groups=4, volume_channels=8, num_hourglasses=1, img_size=(32, 64),
                           **options)
    task = StereoTask(max_disparity=32, backbone_options={"num_stages": 2}, net=net)
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "lattn": {"task": "StereoTask"}}, path)
    return path


def test_kitti15_finetune_config_fits_tests_and_writes_the_submission_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_kitti(tmp_path / "kitti", 2015)
    checkpoint = small_checkpoint(tmp_path / "sceneflow.ckpt")
    common = ["--config", str(CONFIGS / "kitti15_finetune_efficient.yaml"), "--data.root", str(tmp_path / "kitti"),
              "--model.max_disparity", "32", "--data.crop_size", "[32, 64]", "--data.val_fraction", "0.5"]
    run(["fit", *common, "--model.init_checkpoint", str(checkpoint), "--trainer.fast_dev_run", "1"])
    run(["test", *common, "--untrained", "true", "--trainer.fast_dev_run", "1"])
    run(["predict", *common, "--untrained", "true", "--data.predict_split", "testing"])
    submission = sorted((tmp_path / "predictions/kitti15_finetune_efficient/disp_0").iterdir())
    assert [path.name for path in submission] == ["000000_10.png", "000001_10.png"]
    image = Image.open(submission[0])
    assert image.mode in ("I;16", "I") and image.size == (WIDTH, HEIGHT) and np.asarray(image).min() >= 1
    # KITTI's calibration gives depth (m) and a point cloud for every pixel with a disparity.
    stem = tmp_path / "predictions/kitti15_finetune_efficient/data_scene_flow/testing/image_2/000000_10"
    disparity, depth = read_pfm(stem.with_name(stem.name + ".pfm")), read_pfm(stem.with_name(stem.name + "_depth.pfm"))
    np.testing.assert_allclose(depth[disparity > 0], 700 * 0.54 / disparity[disparity > 0], rtol=1e-5)
    _, vertices = read_ply(stem.with_name(stem.name + ".ply"))
    assert len(vertices) == int((disparity > 0).sum())


def test_finetuning_starts_from_the_checkpoint_and_refuses_another_architecture(tmp_path):
    from lattn_app.models.stereo import StereoNetOptions
    from lattn_app.tasks.stereo import StereoTask

    checkpoint = small_checkpoint(tmp_path / "sceneflow.ckpt")
    net = StereoNetOptions(feature_dim=16, groups=4, volume_channels=8, num_hourglasses=1, img_size=(32, 64))
    task = StereoTask(max_disparity=192, backbone_options={"num_stages": 2}, net=net, init_checkpoint=str(checkpoint))
    task.load_initial_weights(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(value, saved[key]) for key, value in task.state_dict().items())
    other = StereoTask(max_disparity=192, backbone_options={"num_stages": 2},
                       net=StereoNetOptions(feature_dim=24, groups=4, volume_channels=8, num_hourglasses=1))
    with pytest.raises(ValueError, match=r"model.init_checkpoint: \S*sceneflow\.ckpt: .*feature_dim: 16 -> 24"):
        other.load_initial_weights(checkpoint)
    with pytest.raises(FileNotFoundError, match=r"model.init_checkpoint: \S*missing\.ckpt not found"):
        other.load_initial_weights(tmp_path / "missing.ckpt")
    # A fit that resumes (Lightning restores --ckpt_path, calling on_load_checkpoint, before on_fit_start)
    # keeps the restored weights and does not look for init_checkpoint.
    resumed = StereoTask(max_disparity=192, backbone_options={"num_stages": 2}, net=net,
                         init_checkpoint=str(tmp_path / "missing.ckpt"))
    with pytest.raises(FileNotFoundError, match="missing.ckpt not found"):
        resumed.on_fit_start()
    resumed.on_load_checkpoint(torch.load(checkpoint, weights_only=True))
    resumed.on_fit_start()
    with pytest.raises(ValueError, match=r"lr_milestones must be positive epoch numbers"):
        StereoTask(lr_milestones=[0])


def test_lattn_test_reports_each_benchmark_sgbm_and_reduced_scales_and_one_table(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    write_middeval3(tmp_path / "middlebury", "Q", ndisp=60)  # ndisp 60 > the model's 32: evaluated at 32/60
    write_eth3d(tmp_path / "eth3d")
    write_kitti(tmp_path / "kitti", 2015, disparity=40.0)  # beyond the range, and KITTI states no bound
    common = ["test", "--config", SCENEFLOW_CONFIG, "--untrained", "true", "--model.max_disparity", "32"]
    sets = {"middlebury": ["--data", "MiddleburyDataModule", "--data.resolution", "Q"],
            "eth3d": ["--data", "ETH3DDataModule"], "kitti": ["--data", "KITTI2015DataModule"]}
    records = {}
    for name, data in sets.items():
        with caplog.at_level("WARNING", logger="lattn_app"):
            run([*common, *data, "--data.root", str(tmp_path / name), "--trainer.logger.init_args.version", name])
        written = tmp_path / f"lightning_logs/sceneflow_efficient/{name}/test_metrics.json"
        records[name] = json.loads(written.read_text())["metrics"]
    middlebury, eth3d, kitti = records["middlebury"], records["eth3d"], records["kitti"]
    for key in ("test_bad2_all", "test_bad2_noc", "test_avgerr_all", "test_avgerr_noc", "test_sgbm_bad2_noc",
                "test_sgbm_epe", "test_epe", "test_bad1", "test_bad2", "test_bad3"):
        assert key in middlebury, key
    # the two scenes differ in size and go through the config's batches of 2 (eval_batch_size) one by one
    assert middlebury["test_eval_scale_min"] == pytest.approx(38 / 72) and middlebury["test_rescaled_pairs"] == 2
    assert "evaluated at scale 0.528 (e.g. 72x32 -> 38x17)" in caplog.text
    assert {"test_bad1_noc", "test_avgerr_noc", "test_sgbm_bad1_noc"} <= set(eth3d) and "test_bad2_noc" not in eth3d
    assert eth3d["test_eval_scale_min"] == 1.0 and eth3d["test_sgbm_bad1_noc"] < 0.05  # SGBM matches the texture
    assert {"test_d1_all", "test_d1_noc", "test_sgbm_d1_all"} <= set(kitti)
    assert kitti["test_gt_beyond_range_pixels"] == 2 * (HEIGHT - HEIGHT // 3 - (HEIGHT % 3 > 0)) * WIDTH
    assert "pass --data.disparity_bound D" in caplog.text.replace("Pass", "pass")
    # ... and with the bound given, KITTI is evaluated at a scale that fits it
    run([*common, *sets["kitti"], "--data.root", str(tmp_path / "kitti"), "--data.disparity_bound", "64",
         "--trainer.logger.init_args.version", "kitti_bound"])
    bounded = json.loads((tmp_path / "lightning_logs/sceneflow_efficient/kitti_bound/test_metrics.json").read_text())
    assert bounded["metrics"]["test_eval_scale_min"] == pytest.approx(36 / 72)
    assert bounded["metrics"]["test_gt_beyond_range_pixels"] == 0

    table = zero_shot_table(sorted((tmp_path / "lightning_logs/sceneflow_efficient").glob("*/test_metrics.json")))
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines()[2:]}
    assert set(rows) == {"ETH3D", "KITTI2015", "Middlebury (Q)"} and "0.53" in rows["Middlebury (Q)"]


def test_predict_with_given_calibration_writes_depth_and_a_point_cloud(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    for name, (height, width) in (("a.png", (32, 48)), ("b.png", (40, 72))):  # two sizes in one default batch
        left, right = textured_pair(rng, 4.0, height, width)
        save_rgb(tmp_path / "pairs/left" / name, left)
        save_rgb(tmp_path / "pairs/right" / name, right)
    run(["predict", "--config", SCENEFLOW_CONFIG, "--untrained", "true", "--model.max_disparity", "32",
         "--data.predict_pairs", str(tmp_path / "pairs"), "--data.focal_length", "500", "--data.baseline", "0.1"])
    out = tmp_path / "predictions/sceneflow_efficient/left"
    for name, shape in (("a", (32, 48)), ("b", (40, 72))):
        disparity, depth = read_pfm(out / f"{name}.pfm"), read_pfm(out / f"{name}_depth.pfm")
        assert disparity.shape == depth.shape == shape
        valid = disparity > 0
        np.testing.assert_allclose(depth[valid], 500 * 0.1 / disparity[valid], rtol=1e-5)
        header, vertices = read_ply(out / f"{name}.ply")
        assert len(vertices) == int(valid.sum()) and "property uchar red" in header
        _, u = np.nonzero(valid)
        np.testing.assert_allclose(vertices["x"], (u - (shape[1] - 1) / 2) * depth[valid] / 500, rtol=1e-4, atol=1e-6)
        left = np.asarray(Image.open(tmp_path / "pairs/left" / f"{name}.png"))
        assert np.array_equal(vertices["red"], left[valid][:, 0])
    with pytest.raises(ValueError, match="focal_length and baseline go together"):
        run(["predict", "--config", SCENEFLOW_CONFIG, "--untrained", "true", "--data.predict_pairs",
             str(tmp_path / "pairs"), "--data.focal_length", "500"])


def test_a_pair_smaller_than_the_network_can_match_is_refused(tmp_path, monkeypatch, capsys):
    """Issue 20, item 13: a 1 x 1 pair is refused in one line naming the file and the minimum size."""
    monkeypatch.chdir(tmp_path)
    for side in ("left", "right"):
        save_rgb(tmp_path / "pairs" / side / "tiny.png", np.zeros((1, 1, 3), np.uint8))
    monkeypatch.setattr(sys, "argv", ["lattn", "predict", "--config", SCENEFLOW_CONFIG, "--untrained", "true",
                                      "--data.predict_pairs", str(tmp_path / "pairs"), "--data.num_workers", "0",
                                      *SMALL_MODEL])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lattn: error:")]
    expected = ("lattn: error: left/tiny.png: the stereo pair is 1x1 pixels, smaller than the network can match; "
                "the minimum is 16x16 (width x height)")
    assert errors == [expected]
    assert not list(tmp_path.rglob("*.pfm"))  # nothing predicted


# ------------------------------------------------------------------------- a real pair (scikit-image)


def test_real_motorcycle_pair_is_a_middlebury_scene_at_full_and_half_size(tmp_path):
    from lattn_app.data.stereo.real_sample import write_motorcycle

    full, half = write_motorcycle(tmp_path / "full"), write_motorcycle(tmp_path / "half", scale=0.5)
    with pytest.raises(FileExistsError, match="Motorcycle-perfect exists"):
        write_motorcycle(tmp_path / "full")
    scores = {}
    for scene, size, ndisp in ((full, (500, 741), 68), (half, (250, 370), 34)):
        data = module(MiddleburyDataModule, scene.parent)
        data.setup("test")
        (sample,) = [data.datasets["test"][0]]
        assert tuple(sample["left"].shape[-2:]) == size
        calibration = read_calib_txt(scene / "calib.txt")
        assert calibration.ndisp == ndisp and calibration.baseline == pytest.approx(193.001)
        truth = sample["disparity"]
        known = truth > 0
        assert 0.85 < float(known.float().mean()) < 0.95  # Middlebury's infinities are "no ground truth"
        assert 0.5 * ndisp / 68 * 7 < float(truth[known].min()) and float(truth[known].max()) < ndisp
        sgbm = sgbm_disparity(sample["left"][None], sample["right"][None], torch.tensor([float(ndisp)]), 192)[0]
        scores[size] = float(((sgbm - truth).abs() > 2)[known].float().mean())
    # SGBM finds most of this real scene: the reference a stereo model has to beat on it.
    assert all(0.05 < bad2 < 0.3 for bad2 in scores.values()), scores
