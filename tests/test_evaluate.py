"""
evaluate.py as a user runs it (subprocesses on a checkpoint of a toy run): bad checkpoints, bad data files and
splits, photos in every mode, and the colormap.
Run: python -m pytest -q tests/test_evaluate.py
"""
import numpy as np
import torch

from evaluate import colorize


def test_bad_checkpoints(trained, small_clip, tmp_path, run_script, fails):
    fails(run_script("evaluate.py", tmp_path / "nope.pt", ok=False), tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00junk" * 100)
    fails(run_script("evaluate.py", junk, ok=False), junk)
    ckpt = torch.load(trained, weights_only=True)
    ckpt["model_config"]["num_bins"] = 32  # a different model config
    torch.save(ckpt, tmp_path / "config.pt")
    fails(run_script("evaluate.py", tmp_path / "config.pt", ok=False), tmp_path / "config.pt")
    ckpt = torch.load(trained, weights_only=True)
    ckpt["clip"]["sha256"] = "0" * 64  # trained on different CLIP weights
    torch.save(ckpt, tmp_path / "sha.pt")
    r = run_script("evaluate.py", tmp_path / "sha.pt", ok=False)
    fails(r, tmp_path / "sha.pt")
    assert "CLIP weights" in r.stderr


def test_bad_mat_files_and_split(trained, small_clip, tmp_path, run_script, fails):
    from nyu_fixtures import asymmetric_frames, write_splits, write_v73
    images, depths, _ = asymmetric_frames(3)
    mat = tmp_path / "nyu.mat"
    write_v73(mat, images, depths, raw_depths=depths, scene_types=["kitchen", "office", "kitchen"])
    write_splits(tmp_path / "splits.mat", [1, 2], [3, 7])  # test index 7 does not exist in a 3-frame file
    r = run_script("evaluate.py", trained, "--data", mat, ok=False)
    fails(r, "splits.mat")
    trunc = tmp_path / "trunc.mat"
    trunc.write_bytes(mat.read_bytes()[: mat.stat().st_size // 2])
    fails(run_script("evaluate.py", trained, "--data", trunc, "--splits", tmp_path / "splits.mat", ok=False), trunc)


def test_image_mode_handles_exif_grey_rgba_16bit(trained, tmp_path, run_script):
    from PIL import Image
    rgb = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "deep.png")  # 16-bit greyscale
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when displayed
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    run_script("evaluate.py", trained, "--image", *[tmp_path / n for n in ("grey.png", "rgba.png", "deep.png", "rotated.jpg")])
    for name, shape in [("grey", (60, 80)), ("rgba", (60, 80)), ("deep", (60, 80)), ("rotated", (80, 60))]:
        depth = np.load(tmp_path / f"{name}_depth.npy")
        assert depth.shape == shape and depth.dtype == np.float32 and (depth > 0).all() and (depth <= 10).all()
        assert Image.open(tmp_path / f"{name}_depth.png").size == shape[::-1]


def test_colormap_runs_blue_green_red():
    c = colorize(np.linspace(0, 1, 256)[None, :], 0, 1)[0].astype(int)
    assert c.shape == (256, 3) and colorize(np.ones((2, 2)), 0, 1).dtype == np.uint8
    assert c[38, 2] > c[38, 0] and c[128, 1] == c[128].max() and c[230, 0] > c[230, 2]  # turbo: blue, green, red
    assert (colorize(np.linspace(0, 1, 256)[None, :]) == colorize(np.linspace(0, 1, 256)[None, :], 0, 1)).all()
