"""
evaluate.py as a user runs it (subprocesses on a checkpoint of a toy run and on a tiny random
CLIP): every protocol and flag end to end, zero-shot DepthCLIP, photos in every mode, each bad input
ending in one `error:` line; and in-process: the authors' and DepthCLIP's protocols on
hand-checkable arrays, and the pictures.
Run: python -m pytest -q tests/test_evaluate.py
"""
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import data_nyu
import evaluate
from evaluate import colorize

METRICS = set(data_nyu.KEYS)


def last_json(r):
    """The last stdout line as JSON; NaN or Infinity anywhere fails (they are not JSON)."""
    def refuse(token):
        raise AssertionError(f"{token} in the JSON line")
    return json.loads(r.stdout.strip().splitlines()[-1], parse_constant=refuse)


def files_under(path):
    return sorted(p.relative_to(path) for p in path.rglob("*"))


# -----------------------------------------------------------------------------
# runs that work

def test_every_protocol_end_to_end(trained, tmp_path, run_script):
    """--protocol all with every scoring flag, then the authors' protocol alone at another batch
    size: its batches of 8 frames are the same whatever --batch-size is."""
    r = run_script("evaluate.py", trained, "--data", "synthetic", "--limit", "10",
                   "--protocol", "all", "--batch-size", "3", "--flip", "--crop", "depthclip",
                   "--moa-impl", "torch", "--device", "cpu", "--save-vis", tmp_path / "vis" / "new")
    result = last_json(r)
    assert result["n_images"] == 10
    assert set(result["protocols"]) == {"standard", "depthclip", "authors"}
    for name, scores in result["protocols"].items():
        assert set(scores) == {"protocol", "fused", "binned", "regressed"}, name
        for output in ("fused", "binned", "regressed"):
            assert set(scores[output]) == METRICS
            assert 0 <= scores[output]["d1"] <= 1 and scores[output]["rmse"] > 0
    standard = result["protocols"]["standard"]
    assert result["metrics"] == standard["fused"] and result["protocol"] == standard["protocol"]
    assert standard["protocol"]["flip_tta"] is True
    assert standard["protocol"]["crop_box"] == [45, 471, 46, 601]
    assert result["protocols"]["authors"]["protocol"]["crop_box"] == [195, 476, 23, 616]
    assert standard["binned"] != standard["regressed"]  # each output is scored on its own
    for name in ("standard", "depthclip", "authors"):
        assert f"protocol {name}: " in r.stderr  # described first
        assert f"{name} protocol" in r.stdout  # then a table
    authors_table = r.stdout.split("authors protocol")[1].splitlines()
    assert authors_table[2].split()[:3] == ["all", "(fused)", "2"]  # 10 frames: batches of 8 and 2
    assert len(list((tmp_path / "vis" / "new").glob("*.png"))) == 10

    alone = last_json(run_script("evaluate.py", trained, "--data", "synthetic", "--limit", "10",
                                 "--protocol", "authors", "--batch-size", "8"))
    assert set(alone["protocols"]) == {"authors"}
    for output, metrics in alone["protocols"]["authors"].items():
        if output != "protocol":
            expected = result["protocols"]["authors"][output]
            assert metrics == pytest.approx(expected, rel=1e-4), output


def test_zero_shot_depthclip(small_clip, tmp_path, run_script):
    """No checkpoint: frozen CLIP, DepthCLIP's prompts and bins; one output; protocols; photos."""
    r = run_script("evaluate.py", "--zero-shot", "--clip", small_clip, "--data", "synthetic",
                   "--limit", "3", "--protocol", "all")
    result = last_json(r)
    for name, scores in result["protocols"].items():
        assert set(scores) == {"protocol", "fused"}, name  # the similarity head has one output
        assert 0 <= scores["fused"]["d1"] <= 1
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "room.png")
    run_script("evaluate.py", "--zero-shot", "--clip", small_clip, "--image", tmp_path / "room.png")
    depth = np.load(tmp_path / "room_depth.npy")
    assert depth.shape == (40, 50)
    assert (depth >= 1 - 1e-5).all() and (depth <= 3 + 1e-5).all()  # DepthCLIP's bins: 1-3 m


def test_no_valid_pixel_gives_null_not_nan(trained, tmp_path, run_script):
    from nyu_fixtures import asymmetric_frames, write_splits, write_v73
    images, depths, _ = asymmetric_frames(2)
    holes = np.zeros_like(depths)  # raw depth that is all holes
    write_v73(tmp_path / "nyu.mat", images, depths, raw_depths=holes,
              scene_types=["bath", "office"])
    write_splits(tmp_path / "splits.mat", [1], [2])
    r = run_script("evaluate.py", trained, "--data", tmp_path / "nyu.mat", "--no-download",
                   "--protocol", "all")
    result = last_json(r)
    assert result["metrics"] == {k: None for k in METRICS}
    for scores in result["protocols"].values():
        for output, metrics in scores.items():
            assert output == "protocol" or set(metrics.values()) == {None}


def test_image_mode_handles_exif_grey_rgba_16bit(trained, tmp_path, run_script):
    rgb = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    deep = rgb[..., 0].astype(np.uint16) * 257  # 16-bit greyscale
    Image.fromarray(deep).save(tmp_path / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when displayed
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    photos = [tmp_path / n for n in ("grey.png", "rgba.png", "deep.png", "rotated.jpg")]
    run_script("evaluate.py", trained, "--image", *photos)
    shapes = {"grey": (60, 80), "rgba": (60, 80), "deep": (60, 80), "rotated": (80, 60)}
    for name, (h, w) in shapes.items():
        depth = np.load(tmp_path / f"{name}_depth.npy")
        assert depth.shape == (h, w) and depth.dtype == np.float32
        assert (depth > 0).all() and (depth <= 10).all()
        picture = Image.open(tmp_path / f"{name}_depth.png")  # RGB | prediction, over a colour bar
        assert picture.size == (2 * w, evaluate.TITLE_H + h + evaluate.BAR_H + evaluate.TICK_H)
    run_script("evaluate.py", trained, "--image", photos[0], "--out-dir", tmp_path / "out" / "new")
    written = {str(p) for p in files_under(tmp_path / "out")}
    assert written == {"new", "new/grey_depth.png", "new/grey_depth.npy"}
    assert evaluate.read_photo(photos[1]).flags.writeable  # torch warns on read-only arrays


# -----------------------------------------------------------------------------
# bad input: one `error:` line, no traceback, nothing written

def test_bad_flags_fail_before_any_work(trained, tmp_path, run_script, fails):
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"someone's file")
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    no_gpu = () if torch.cuda.is_available() else ((trained, "--device", "cuda"), "--device cuda")
    rows = [((trained, "--limit", "0"), "--limit"), ((trained, "--limit", "-1"), "--limit"),
            ((trained, "--batch-size", "0"), "--batch-size"),
            ((trained, "--protocol", "median"), "--protocol"),
            ((trained, "--moa-impl", "cuda"), "--moa-impl"), ((trained, "--gt", "filled"), "--gt"),
            ((trained, "--device", f"cuda:{torch.cuda.device_count()}"), "--device cuda:"),
            ((trained, "--device", "gpu"), "--device gpu"), ((trained, "--save-vis", taken), taken),
            ((trained, "--image", photo, "--out-dir", taken), taken), ((), "--zero-shot"),
            ((trained, "--zero-shot"), "--zero-shot"),
            ((trained, "--download", "--no-download"), "--no-download"),
            *([no_gpu] if no_gpu else [])]
    before = files_under(tmp_path)
    with ThreadPoolExecutor(max_workers=4) as pool:  # each is seconds of imports: run together
        results = list(pool.map(lambda row: run_script("evaluate.py", *row[0], ok=False), rows))
    for (args, name), r in zip(rows, results):
        fails(r, name)
    assert files_under(tmp_path) == before and taken.read_bytes() == b"someone's file"


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
    write_splits(tmp_path / "splits.mat", [1, 2], [3, 7])  # no test frame 7 in a 3-frame file
    r = run_script("evaluate.py", trained, "--data", mat, ok=False)
    fails(r, "splits.mat")
    trunc = tmp_path / "trunc.mat"
    trunc.write_bytes(mat.read_bytes()[: mat.stat().st_size // 2])
    r = run_script("evaluate.py", trained, "--data", trunc, "--splits", tmp_path / "splits.mat",
                   ok=False)
    fails(r, trunc)
    assert not (tmp_path / "vis").exists()


# -----------------------------------------------------------------------------
# the protocols on hand-checkable arrays (in-process)

def test_authors_protocol_crop_bounds():
    """Garg crop rows int(0.40810811 * 480) : int(0.99189189 * 480), cols int(0.03594771 * 640)
    : int(0.96405229 * 640) = 195:476, 23:616. A prediction right exactly there (and wildly wrong
    one pixel outside) scores perfectly."""
    H, W = 480, 640  # the fractions as the authors' script has them
    assert evaluate.GARG_BOX == (int(0.40810811 * H), int(0.99189189 * H),
                                 int(0.03594771 * W), int(0.96405229 * W)) == (195, 476, 23, 616)
    gt = np.full((480, 640), 4.0, np.float32)
    pred = np.full((480, 640), 9.0, np.float32)
    pred[195:476, 23:616] = 2.0  # half the ground truth: one median scale of 2 fixes it
    for name, maps in evaluate.authors_scores([({"depth": pred}, gt)]).items():
        assert maps["abs_rel"] == 0 and maps["d1"] == 1, name
    pred[194, 300] = pred[476 - 1, 300] = 9.0  # one pixel in the first and the last row of the crop
    assert evaluate.authors_scores([({"depth": pred}, gt)])["depth"]["abs_rel"] > 0


def test_authors_protocol_median_scaling_is_one_scale_per_batch():
    rng = np.random.default_rng(0)
    gt = [rng.uniform(1, 9, (480, 640)).astype(np.float32) for _ in range(3)]
    exact = evaluate.authors_scores([({"depth": g / 3}, g) for g in gt])["depth"]  # one scale: 3
    assert exact["abs_rel"] == pytest.approx(0, abs=1e-6)
    assert exact["rmse"] == pytest.approx(0, abs=1e-5)
    # two images off by different factors: a per-image scale would fix both; one per batch cannot
    batch = [({"depth": gt[0] / 2}, gt[0]), ({"depth": gt[1] / 4}, gt[1])]
    mixed = evaluate.authors_scores(batch)["depth"]
    assert mixed["abs_rel"] > 0.1


def test_authors_protocol_pools_pixels_over_the_batch():
    """Image A: one valid pixel, 50 % off. Image B: three valid pixels, exact. The medians of both
    (1 m) agree, so the scale is 1. Pooled: abs_rel = 0.5 / 4 = 0.125; a mean of per-image values
    would give 0.25."""
    gt_a, gt_b = np.zeros((480, 640), np.float32), np.zeros((480, 640), np.float32)
    gt_a[300, 300] = 2.0
    gt_b[300, 300:303] = 1.0
    pred_a, pred_b = np.ones((480, 640), np.float32), np.ones((480, 640), np.float32)
    pred_a[300, 300] = 3.0
    m = evaluate.authors_scores([({"depth": pred_a}, gt_a), ({"depth": pred_b}, gt_b)])["depth"]
    assert m["abs_rel"] == pytest.approx(0.125) and m["d1"] == pytest.approx(0.75)
    assert evaluate.authors_scores([({"depth": pred_a}, np.zeros_like(gt_a))]) == {"depth": None}


def test_depthclip_protocol_scores_only_where_the_pasted_map_lands(monkeypatch):
    """The model sees RGB rows 56:472, cols 60:604; its map is pasted back there, and pixels count
    inside rows 45:471, cols 46:601 where the pasted map is > 1e-3: rows 56:471, cols 60:601."""
    seen = {}

    def fake_predict(model, rgb, dtype, out_size, flip=False):
        seen.update(shape=rgb.shape, out_size=out_size, flip=flip)
        return {"depth": np.full((len(rgb), *out_size), 2.0, np.float32)}
    monkeypatch.setattr(evaluate, "predict", fake_predict)
    gt = np.full((480, 640), 7.0, np.float32)  # wrong everywhere ...
    gt[56:471, 60:601] = 2.0                    # ... but where DepthCLIP's script looks
    frame = np.zeros((1, 480, 640, 3), np.uint8)
    rows = evaluate.depthclip_scores(None, frame, [gt], None)
    assert seen == {"shape": (1, 416, 544, 3), "out_size": (416, 544), "flip": True}
    assert rows["depth"][0]["abs_rel"] == 0 and rows["depth"][0]["d1"] == 1
    gt[55, 100] = gt[300, 601] = 2.0  # just outside: still not counted, so the score stays perfect
    gt[56, 60] = 7.0                  # the first pixel inside counts
    assert evaluate.depthclip_scores(None, frame, [gt], None)["depth"][0]["d1"] < 1


# -----------------------------------------------------------------------------
# pictures

LUT = colorize(np.linspace(0, 1, 256)[None, :], 0, 1)[0].astype(int)  # (256, 3): level -> colour


def levels(pixels):
    """Colours (N, 3) -> the colormap level 0..255 each is nearest to."""
    return np.argmin(((pixels[:, None, :].astype(int) - LUT[None]) ** 2).sum(-1), axis=1)


def test_colormap_runs_blue_green_red():
    c = LUT
    assert c.shape == (256, 3) and colorize(np.ones((2, 2)), 0, 1).dtype == np.uint8
    # turbo runs blue, green, red
    assert c[38, 2] > c[38, 0] and c[128, 1] == c[128].max() and c[230, 0] > c[230, 2]


def test_picture_panels_titles_and_colour_bars(tmp_path):
    """A 3.5-6.4 m room: four panels of the frame's size over a colour bar each, every bar running
    low to high; prediction and ground truth on one scale fitted to both (3.5-6.7 m here), so the
    room spans the whole colormap and one depth has one colour in both panels."""
    H, W = 48, 64
    gt = np.tile(np.linspace(3.5, 6.4, W, dtype=np.float32), (H, 1))  # depth grows left to right
    gt[:4] = 0  # a hole: not part of the scale
    pred = gt[:, ::-1] + 0.3                                             # right to left, 3.8-6.7 m
    pred[:4] = 5.0
    evaluate.save_picture(tmp_path / "p.png", np.zeros((H, W, 3), np.uint8), pred, gt)
    picture = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    top, bar = evaluate.TITLE_H, evaluate.TITLE_H + H + evaluate.BAR_H // 2
    assert picture.shape == (top + H + evaluate.BAR_H + evaluate.TICK_H, 4 * W, 3)
    assert (picture[:top] < 128).any(axis=-1).sum() > 50  # dark title text on white
    for i in (1, 2, 3):  # prediction, ground truth, |error|: a bar from the lowest to the highest
        run = levels(picture[bar, i * W:(i + 1) * W])
        assert (np.diff(run) >= 0).all() and run[0] <= 3 and run[-1] >= 252, i
    row = top + H // 2
    shown = levels(picture[row, W:3 * W])  # prediction, then ground truth
    assert shown.min() <= 3 and shown.max() >= 252  # fitted, not a flat band of a fixed 0-10 m
    j = int(np.argmin(np.abs(pred[H // 2] - 5.0)))
    k = int(np.argmin(np.abs(gt[H // 2] - pred[H // 2, j])))
    assert abs(gt[H // 2, k] - pred[H // 2, j]) < 0.03  # the same depth ...
    assert abs(int(shown[j]) - int(shown[W + k])) <= 3   # ... the same colour
