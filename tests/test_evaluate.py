"""
evaluate.py as a user runs it (subprocesses on a checkpoint of a toy run and on a tiny random
CLIP): every protocol and flag end to end, zero-shot DepthCLIP, photos in every mode, each bad input
ending in one `error:` line; and in-process: the authors' and DepthCLIP's protocols on
hand-checkable arrays, and the pictures.
Run: python -m pytest -q tests/test_evaluate.py
"""

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_vit
import data_nyu
import evaluate
import moa
import pictures
from test_data_nyu import bts_metrics
from conftest import HANG

METRICS = set(data_nyu.KEYS)
ROOT = Path(evaluate.__file__).resolve().parent


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
    r = run_script(
        "evaluate.py",
        trained,
        "--data",
        "synthetic",
        "--limit",
        "10",
        "--protocol",
        "all",
        "--batch-size",
        "3",
        "--flip",
        "--crop",
        "depthclip",
        "--moa-impl",
        "torch",
        "--device",
        "cpu",
        "--save-vis",
        tmp_path / "vis" / "new",
    )
    result = last_json(r)
    assert result["n_images"] == 10
    assert list(result["protocols"]) == list(evaluate.PROTOCOLS)  # all four, in the table's order
    for name, scores in result["protocols"].items():
        assert set(scores) == {"protocol", "depth", "binned", "regressed"}, name
        for output in ("depth", "binned", "regressed"):
            assert set(scores[output]) == METRICS
            assert 0 <= scores[output]["d1"] <= 1 and scores[output]["rmse"] > 0
    standard = result["protocols"]["standard"]
    assert result["metrics"] == standard["depth"] and result["protocol"] == standard["protocol"]
    assert standard["protocol"]["flip_tta"] is True
    assert standard["protocol"]["crop_box"] == [45, 471, 46, 601]
    assert result["protocols"]["authors"]["protocol"]["crop_box"] == [195, 476, 23, 616]
    assert standard["binned"] != standard["regressed"]  # each output is scored on its own
    for name in evaluate.PROTOCOLS:
        assert f"protocol {name}: " in r.stderr  # described first
        assert f"{name} protocol" in r.stdout  # then a table
    authors_table = r.stdout.split("authors protocol")[1].splitlines()
    # 10 frames in batches of 8 and 2: two scores, and n counts the 10 frames, as the JSON's n_images does
    assert authors_table[2].split()[:3] == ["all", "(depth)", "10"]
    assert len(list((tmp_path / "vis" / "new").glob("*[0-9].png"))) == 10  # and a gate panel each
    assert len(list((tmp_path / "vis" / "new").glob("*_gates.png"))) == 10

    alone = last_json(
        run_script(
            "evaluate.py",
            trained,
            "--data",
            "synthetic",
            "--limit",
            "10",
            "--protocol",
            "authors",
            "--batch-size",
            "8",
        )
    )
    assert set(alone["protocols"]) == {"authors"}
    for output, metrics in alone["protocols"]["authors"].items():
        if output != "protocol":
            expected = result["protocols"]["authors"][output]
            assert metrics == pytest.approx(expected, rel=1e-4), output


def test_zero_shot_depthclip(small_clip, tmp_path, run_script):
    """No checkpoint: frozen CLIP, DepthCLIP's prompts and bins; one output; protocols; photos."""
    r = run_script(
        "evaluate.py",
        "--zero-shot",
        "--clip",
        small_clip,
        "--data",
        "synthetic",
        "--limit",
        "3",
        "--protocol",
        "all",
    )
    result = last_json(r)
    for name, scores in result["protocols"].items():
        assert set(scores) == {"protocol", "depth"}, name  # the similarity head has one output
        assert 0 <= scores["depth"]["d1"] <= 1
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "room.png")
    run_script("evaluate.py", "--zero-shot", "--clip", small_clip, "--image", tmp_path / "room.png")
    depth = np.load(tmp_path / "room_depth.npy")
    assert depth.shape == (40, 50)
    assert (depth >= 1 - 1e-5).all() and (depth <= 3 + 1e-5).all()  # DepthCLIP's bins: 1-3 m


def test_no_valid_pixel_stops_in_one_line_that_suggests_the_units(trained, tmp_path, run_script, fails):
    """Ground truth without one valid pixel (here all holes; depths in millimetres look the same): one
    line naming the data file and the likely cause, not a table of n 0 and NaN."""
    from nyu_fixtures import asymmetric_frames, write_splits, write_v73

    images, depths, _ = asymmetric_frames(2)
    holes = np.zeros_like(depths)  # raw depth that is all holes
    write_v73(tmp_path / "nyu.mat", images, depths, raw_depths=holes, scene_types=["bath", "office"])
    write_splits(tmp_path / "splits.mat", [1], [2])
    r = run_script(
        "evaluate.py", trained, "--data", tmp_path / "nyu.mat", "--no-download", "--protocol", "all", ok=False
    )
    fails(r, "no test frame has a valid ground-truth pixel")
    assert "millimetres" in r.stderr and r.stdout.strip().splitlines()[-1].startswith("all ")


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
        Image.open(tmp_path / f"{name}_depth.png").verify()  # RGB | prediction, over a colour bar
    run_script("evaluate.py", trained, "--image", photos[0], "--out-dir", tmp_path / "out" / "new")
    written = {str(p) for p in files_under(tmp_path / "out")}
    files = {"new/grey_depth" + end for end in (".png", ".npy", "_mm.png", ".ply", ".json", "_gates.png")}
    assert written == {"new", *files}
    assert pictures.read_photo(photos[1])[0].flags.writeable  # torch warns on read-only arrays


# -----------------------------------------------------------------------------
# bad input: one `error:` line, no traceback, nothing written


def test_bad_flags_fail_before_any_work(trained, tmp_path, run_script, fails):
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"someone's file")
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    no_gpu = () if torch.cuda.is_available() else ((trained, "--device", "cuda"), "--device cuda")
    rows = [
        ((trained, "--limit", "0"), "--limit"),
        ((trained, "--limit", "-1"), "--limit"),
        ((trained, "--batch-size", "0"), "--batch-size"),
        ((trained, "--protocol", "median"), "--protocol"),
        ((trained, "--moa-impl", "cuda"), "--moa-impl"),
        ((trained, "--gt", "filled"), "--gt"),
        ((trained, "--device", f"cuda:{torch.cuda.device_count()}"), "--device cuda:"),
        ((trained, "--device", "gpu"), "--device gpu"),
        ((trained, "--save-vis", taken), taken),
        ((trained, "--image", photo, "--out-dir", taken), taken),
        ((), "--zero-shot"),
        ((trained, "--zero-shot"), "--zero-shot"),
        ((trained, "--download", "--no-download"), "--no-download"),
        *([no_gpu] if no_gpu else []),
    ]
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
    r = run_script("evaluate.py", trained, "--data", trunc, "--splits", tmp_path / "splits.mat", ok=False)
    fails(r, trunc)
    assert not (tmp_path / "vis").exists()


# -----------------------------------------------------------------------------
# the protocols on hand-checkable arrays (in-process)


def authors_group(preds, gts):
    """evaluate.score on one group of frames, (480, 640) arrays -> {metric: float}."""
    maps = {"depth": torch.as_tensor(np.stack(preds))}
    scores = evaluate.score(maps, torch.as_tensor(np.stack(gts)), evaluate.PROTOCOLS["authors"])
    return {m: float(v[0]) for m, v in scores["depth"].items()}


def test_authors_protocol_crop_bounds():
    """Garg crop rows int(0.40810811 * 480) : int(0.99189189 * 480), cols int(0.03594771 * 640)
    : int(0.96405229 * 640) = 195:476, 23:616. A prediction right exactly there (and wildly wrong
    one pixel outside) scores perfectly."""
    H, W = 480, 640  # the fractions as the authors' script has them
    assert (
        data_nyu.CROPS["garg"]
        == (int(0.40810811 * H), int(0.99189189 * H), int(0.03594771 * W), int(0.96405229 * W))
        == (195, 476, 23, 616)
    )
    gt = np.full((480, 640), 4.0, np.float32)
    pred = np.full((480, 640), 9.0, np.float32)
    pred[195:476, 23:616] = 2.0  # half the ground truth: one median scale of 2 fixes it
    m = authors_group([pred], [gt])
    assert m["abs_rel"] == 0 and m["d1"] == 1
    pred[194, 300] = pred[476 - 1, 300] = 9.0  # one pixel in the first and the last row of the crop
    assert authors_group([pred], [gt])["abs_rel"] > 0


def test_authors_protocol_median_scaling_is_one_scale_per_batch():
    rng = np.random.default_rng(0)
    gt = [rng.uniform(1, 9, (480, 640)).astype(np.float32) for _ in range(3)]
    exact = authors_group([g / 3 for g in gt], gt)  # one scale: 3
    assert exact["abs_rel"] == pytest.approx(0, abs=1e-6)
    assert exact["rmse"] == pytest.approx(0, abs=1e-5)
    # two images off by different factors: a per-image scale would fix both; one per batch cannot
    mixed = authors_group([gt[0] / 2, gt[1] / 4], gt[:2])
    assert mixed["abs_rel"] > 0.1


def test_authors_protocol_pools_pixels_over_the_batch():
    """Image A: one valid pixel, 50 % off. Image B: three valid pixels, exact. The medians of both
    (1 m) agree, so the scale is 1. Pooled: abs_rel = 0.5 / 4 = 0.125; a mean of per-image values
    would give 0.25."""
    gt_a = np.zeros((480, 640), np.float32)
    gt_b = np.zeros((480, 640), np.float32)
    gt_a[300, 300] = 2.0
    gt_b[300, 300:303] = 1.0
    pred_a = np.ones((480, 640), np.float32)
    pred_b = np.ones((480, 640), np.float32)
    pred_a[300, 300] = 3.0
    m = authors_group([pred_a, pred_b], [gt_a, gt_b])
    assert m["abs_rel"] == pytest.approx(0.125) and m["d1"] == pytest.approx(0.75)
    assert all(np.isnan(v) for v in authors_group([pred_a], [np.zeros_like(gt_a)]).values())


def test_authors_protocol_no_clamp_after_scaling_and_the_lower_median():
    """Frame A: prediction 1, ground truth 4; frame B: 3 and 9, the same pixels valid. The script
    takes torch.median, the lower of the two middle values: median(gt) = 4, median(pred) = 1, so
    the scale is 4; A becomes exact, B 12 m against 9 m, and stays 12 (no clamp to 10):
    abs_rel = (0 + 3/9) / 2 = 1/6, RMSE = sqrt((0 + 9) / 2), d1 = 1/2. (np.median's scale 3.25,
    or a clamp to 10, would give other values.)"""
    preds = [np.full((480, 640), 1.0, np.float32), np.full((480, 640), 3.0, np.float32)]
    gts = [np.full((480, 640), 4.0, np.float32), np.full((480, 640), 9.0, np.float32)]
    m = authors_group(preds, gts)
    assert m["abs_rel"] == pytest.approx(1 / 6, rel=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(4.5), rel=1e-12)
    assert m["d1"] == 0.5


def test_protocols_fed_alike_share_one_prediction():
    """--protocol all: standard and standard-depthclip-crop feed the model the same input, so each
    pass predicts once for both (3 predictions a pass, not 4), and every protocol still gets the
    maps its own input gives."""
    ds = data_nyu.SyntheticDepth(n=8)
    fed = []

    def maps_of(rgb, gt, protocol):
        fed.append(protocol)
        depth = torch.full(gt.shape, 1.0 + len(fed))  # a new map each time: which call made it
        return {"depth": depth}

    args = argparse.Namespace(batch_size=8, save_vis=None, ceiling=False)
    rows, _ = evaluate.evaluate_frames(
        ds, list(range(8)), evaluate.PROTOCOLS, maps_of, torch.device("cpu"), args
    )
    assert len(fed) == 3
    assert [(p.input_box, p.flip, p.resize) for p in fed] == [
        (evaluate.FULL_FRAME, False, "training"),
        (evaluate.DEPTHCLIP_INPUT, True, "training"),
        (evaluate.FULL_FRAME, False, "pil-bicubic"),
    ]
    # standard-depthclip-crop scored the first call's map (2 m everywhere) in its own crop
    gt = torch.from_numpy(np.stack([ds[i][1] for i in range(8)]))
    for name in ("standard", "standard-depthclip-crop"):
        expected = data_nyu.depth_metrics(torch.full(gt.shape, 2.0), gt, crop=evaluate.PROTOCOLS[name].crop)
        torch.testing.assert_close(rows[name][0]["depth"]["rmse"], expected["rmse"], rtol=1e-12, atol=0)


class FakeModel(torch.nn.Module):
    """Stands in for MoADepthCLIP where predict_maps calls it: a cfg (input size, depth range), a
    parameter (the device), and forward(CLIP-normalised image) -> {output key: (B, 1, h, w)}."""

    def __init__(self, forward, input_size=(224, 224)):
        super().__init__()
        self.cfg = moa.DepthConfig(input_size=input_size)
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.fn = forward

    def forward(self, x):
        return self.fn(x)


def pixels(x):
    """CLIP-normalised (B, 3, h, w) -> the 0-255 values the model was shown."""
    mean = torch.tensor(clip_vit.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(clip_vit.STD).view(1, 3, 1, 1)
    return (x * std + mean) * 255


def test_depthclip_protocol_feeds_the_model_its_crop_and_pastes_it_back():
    """Red encodes each pixel's row, green its column, and the model reads depth off them: the map
    is right only where the model was fed the pixels that its output is pasted over (rows 56:472,
    cols 60:604). Scored inside rows 45:471, cols 46:601 where the pasted map is > 1e-3."""
    rows, cols = np.mgrid[0:480, 0:640]
    frame = np.zeros((1, 480, 640, 3), np.uint8)
    frame[0, ..., 0] = rows // 2
    frame[0, ..., 1] = cols // 3
    gt = (1 + rows / 100 + cols / 200).astype(np.float32)[None]  # 1 to 8 m

    def reads_depth_off_the_pixels(x):
        seen = pixels(x)
        return {"depth": 1 + seen[:, :1] * 2 / 100 + seen[:, 1:2] * 3 / 200}

    model = FakeModel(reads_depth_off_the_pixels)
    protocol = evaluate.PROTOCOLS["depthclip"]
    maps = evaluate.protocol_maps(
        torch.from_numpy(frame).permute(0, 3, 1, 2), torch.from_numpy(gt), protocol, model=model
    )
    depth = maps["depth"][0].numpy()
    assert (depth[:56] == 0).all() and (depth[472:] == 0).all() and (depth[:, 604:] == 0).all()
    inner = np.abs(depth - gt[0])[70:460, 80:590]
    assert inner.mean() < 0.03, inner.mean()  # right where it was fed; blurred at the box's edges
    m = evaluate.score(maps, torch.from_numpy(gt), protocol)["depth"]
    assert float(m["abs_rel"][0]) < 0.01 and float(m["d1"][0]) == 1


def test_depthclip_protocol_scores_only_where_the_pasted_map_lands():
    """The canvas is 0 outside rows 56:472, cols 60:604, and pixels count inside rows 45:471,
    cols 46:601 where it is > 1e-3: rows 56:471, cols 60:601."""
    maps = {"depth": torch.zeros(1, 480, 640)}
    maps["depth"][:, 56:472, 60:604] = 2.0  # as protocol_maps pastes a map of 2 m
    gt = torch.full((1, 480, 640), 7.0)  # wrong everywhere ...
    gt[:, 56:471, 60:601] = 2.0  # ... but where DepthCLIP's script looks
    protocol = evaluate.PROTOCOLS["depthclip"]
    m = evaluate.score(maps, gt, protocol)["depth"]
    assert float(m["abs_rel"][0]) == 0 and float(m["d1"][0]) == 1
    gt[:, 55, 100] = 2.0  # just outside: still not counted, so the score stays perfect
    gt[:, 300, 601] = 2.0
    assert float(evaluate.score(maps, gt, protocol)["depth"]["d1"][0]) == 1
    gt[:, 56, 60] = 7.0  # the first pixel inside counts
    assert float(evaluate.score(maps, gt, protocol)["depth"]["d1"][0]) < 1


def test_depthclip_metric_function_drops_predictions_at_or_below_1e_3():
    """DepthCLIP's compute_errors_NYU, and the authors' first metric function (standard-depthclip-crop), a
    copy of it: valid = (1e-3 < gt < 10) & (pred > 1e-3), the mask taken before the clamp. A non-constant
    map with pixels at exactly 1e-3, below it, at 0, negative and NaN: standard-depthclip-crop scores as
    if they were holes, standard clamps them to 1e-3 and keeps them, and 1.5e-3 counts in both."""
    rng = np.random.default_rng(5)
    gt = rng.uniform(0.5, 9.5, (2, 480, 640))
    pred = gt * rng.uniform(0.8, 1.25, gt.shape)
    low = rng.random(gt.shape) < 0.05
    pred[low] = rng.choice([1e-3, 5e-4, 0.0, -1.0, np.nan], int(low.sum()))
    pred[:, 100, 100:110] = 1.5e-3  # just above: scored, far off
    maps = {"depth": torch.from_numpy(pred)}
    for name, holed in (("standard-depthclip-crop", np.where(low, 0.0, gt)), ("standard", gt)):
        protocol = evaluate.PROTOCOLS[name]
        got = evaluate.score(maps, torch.from_numpy(gt), protocol)["depth"]
        expected = [bts_metrics(pred[b], holed[b], data_nyu.CROPS[protocol.crop]) for b in range(2)]
        assert_scores(got, expected)
    dropped = evaluate.score(maps, torch.from_numpy(gt), evaluate.PROTOCOLS["standard-depthclip-crop"])
    assert (
        dropped["depth"]["d1"]
        > evaluate.score(maps, torch.from_numpy(gt), evaluate.PROTOCOLS["standard"])["depth"]["d1"]
    ).all()


# -----------------------------------------------------------------------------
# Ctrl-C


def interrupt(args, after):
    """Run evaluate.py, send Ctrl-C (SIGINT) once a stderr line starts with `after`. -> (exit
    code, stdout, the stderr lines after that one)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "evaluate.py", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C reaches it even where a shell started the tests with SIGINT ignored (a background job)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        for line in proc.stderr:
            assert "Traceback" not in line and "error" not in line, line
            if line.startswith(after):
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=HANG)
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, out, err.strip().splitlines()


def test_ctrl_c_ends_in_one_line_and_leaves_nothing_half_done(trained, tmp_path):
    """Ctrl-C before the first picture: exit 130, one line, no empty folder left behind (on a busy machine
    the signal may land after the first picture: then the folder holds it); after two: the pictures
    written are whole PNGs, and nothing else is there (no temporary, no half file)."""
    vis = tmp_path / "new" / "vis"
    args = [trained, "--data", "synthetic", "--batch-size", "1", "--save-vis", vis, "--device", "cpu"]
    for after in ("protocol standard", "evaluated 2/"):
        code, out, err = interrupt(args, after)
        assert code == 130 and out == "", (code, out, err)
        lines = [line for line in err if not line.startswith("evaluated ")]  # a frame may finish
        assert len(lines) == 1 and lines[0].startswith("interrupted: "), err
        if after == "protocol standard":
            assert not (tmp_path / "new").exists() or any(vis.iterdir())
    pictures = sorted(vis.iterdir())
    assert len(pictures) >= 2 and all(p.suffix == ".png" for p in pictures)
    for p in pictures:
        Image.open(p).verify()  # whole


def test_flag_errors_are_the_error_and_where_to_look(trained, tmp_path, run_script):
    rows = [("--limit", "0"), ("--protocol", "median"), ("--no-such-flag",)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda row: run_script("evaluate.py", trained, *row, ok=False), rows))
    for row, r in zip(rows, results):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and "usage" not in r.stderr, r.stderr
        assert len(lines) == 2 and lines[0].startswith("error: ") and row[0] in lines[0], lines
        assert lines[1] == "(python evaluate.py --help lists every flag)"


def test_messages_are_one_whole_line(trained, tmp_path, run_script):
    """A directory as --data, a truncated .mat, a text file, a truncated and an empty checkpoint:
    each says what the file is, in one line; nothing is created."""
    from nyu_fixtures import asymmetric_frames, write_v73

    write_v73(tmp_path / "nyu.mat", *asymmetric_frames(2)[:2], scene_types=["bath", "office"])
    mat = (tmp_path / "nyu.mat").read_bytes()
    (tmp_path / "cut.mat").write_bytes(mat[: len(mat) // 2])
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.pt").write_text("these are my notes\n")
    ckpt = trained.read_bytes()
    (tmp_path / "cut.pt").write_bytes(ckpt[: len(ckpt) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    rows = [
        ((trained, "--data", tmp_path / "folder"), "folder: a directory, not NYU's labeled file"),
        ((trained, "--data", tmp_path / "cut.mat"), "cut.mat: truncated: "),
        ((tmp_path / "notes.pt",), "notes.pt: not a checkpoint"),
        ((tmp_path / "cut.pt",), "cut.pt: a zip archive cut short: a truncated checkpoint"),
        ((tmp_path / "empty.pt",), "empty.pt: an empty file, not a checkpoint"),
        ((tmp_path / "folder",), "folder: a directory, not a checkpoint file"),
    ]
    before = files_under(tmp_path)
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda row: run_script("evaluate.py", *row[0], ok=False), rows))
    for (args, message), r in zip(rows, results):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert lines[0].startswith("error: ") and message in lines[0] and "Traceback" not in lines[0]
    assert files_under(tmp_path) == before


def test_failed_download_leaves_no_empty_folder(tmp_path, http_server):
    """A download that fails before its first byte (say, the CLIP weights into an empty HOME)
    removes the folders it made; one that fails later keeps its .part to resume."""
    http_server.routes["/w.pt"] = {"status": 500}
    dest = tmp_path / "home" / ".cache" / "clip" / "w.pt"
    with pytest.raises(clip_vit.UserError, match="HTTP 500"):
        clip_vit.download(http_server.url + "/w.pt", dest)
    assert list(tmp_path.iterdir()) == []
    http_server.routes["/w.pt"] = {"data": b"x" * 1000, "cut_after": 100}
    with pytest.raises(clip_vit.UserError, match="run again to resume"):
        clip_vit.download(http_server.url + "/w.pt", dest)
    assert (tmp_path / "home" / ".cache" / "clip" / "w.pt.part").stat().st_size == 100


# -----------------------------------------------------------------------------
# the protocols against numpy oracles; the list order; each output from its own map; the ceiling


def oracle_scores(name, preds, gts, order=None):
    """numpy: what protocol `name` makes of maps preds (K, B, 480, 640) and ground truth gts
    (B, 480, 640), frames in the given order -> [[metrics per frame or group] per output]."""
    protocol = evaluate.PROTOCOLS[name]
    box = data_nyu.CROPS[protocol.crop]
    order = range(gts.shape[0]) if order is None else order
    scores = []
    for pred in preds:
        if name != "authors":
            # DepthCLIP's compute_errors_NYU, and the authors' first function, a copy: valid = ... & (pred > 1e-3)
            masked = name in ("depthclip", "standard-depthclip-crop")
            scores.append(
                [
                    bts_metrics(pred[i], np.where(pred[i] > 1e-3, gts[i], 0) if masked else gts[i], box)
                    for i in order
                ]
            )
            continue
        groups = []
        for s in range(0, len(order), 8):  # the authors' batches of 8
            frames = list(order)[s : s + 8]
            r0, r1, c0, c1 = box
            g = np.concatenate([gts[i, r0:r1, c0:c1].ravel() for i in frames]).astype(np.float64)
            p = np.concatenate([pred[i, r0:r1, c0:c1].ravel() for i in frames]).astype(np.float64)
            valid = (g > 1e-3) & (g < 10)
            if not valid.any():
                groups.append(None)
                continue
            lower = (valid.sum() - 1) // 2  # torch.median: the lower middle value
            scale = np.sort(g[valid])[lower] / np.sort(p[valid])[lower]
            groups.append(bts_metrics(p[valid] * scale, g[valid], clamp=False))
        scores.append(groups)
    return scores


def assert_scores(got, expected, tol=1e-9):
    """got {metric: (n,) tensor} against the oracle's [metrics or None] (None: NaN)."""
    assert len(got["d1"]) == len(expected)
    for j, e in enumerate(expected):
        for k in data_nyu.KEYS:
            value = float(got[k][j])
            if e is None:
                assert np.isnan(value), (j, k)
            else:
                assert abs(value - e[k]) <= tol * max(1, abs(e[k])), (j, k, value, e[k])


@pytest.mark.parametrize("name", list(evaluate.PROTOCOLS))
def test_each_protocols_scores_equal_its_numpy_oracle(name):
    """The batched torch scorers against a numpy formulation, frame by frame (group by group for
    the authors'), to 1e-9: holes, ground truth and maps out of range, a frame without a valid
    pixel, 10 frames (the authors': a group of 8 and one of 2), three outputs."""
    from test_data_nyu import rough_frames

    pred, gt = rough_frames(10, seed=3)
    preds = np.stack([pred, pred[::-1], np.clip(np.nan_to_num(pred, nan=1.0), 1e-3, 10)])
    protocol = evaluate.PROTOCOLS[name]
    if protocol.input_box != evaluate.FULL_FRAME:  # zeros around the box, as it is pasted
        r0, r1, c0, c1 = protocol.input_box
        canvas = np.zeros_like(preds)
        canvas[..., r0:r1, c0:c1] = preds[..., r0:r1, c0:c1]
        preds = canvas
    if name == "authors":  # the script clamps before it scales: its maps are in range
        preds = np.clip(np.nan_to_num(preds, nan=1e-3), 1e-3, 10)
    maps = dict(zip(moa.OUTPUTS, torch.from_numpy(preds)))
    got = evaluate.score(maps, torch.from_numpy(gt), protocol)
    for key, expected in zip(moa.OUTPUTS, oracle_scores(name, preds, gt)):
        assert_scores(got[key], expected)


def frame_index(x):
    """The frame a fake model was shown: its red level is 20 x the frame's index."""
    return (pixels(x)[:, 0].mean((1, 2)) / 20).round()  # (B,)


def fake_gt(i):
    return 2 + 0.5 * i  # metres: frame i's ground truth is this everywhere


def fake_outputs(i):
    """Three maps, each constant on a frame, each off by its own factors: (fused, binned, regressed)."""
    return (
        fake_gt(i) * (1 + 0.1 * (i % 3)),
        fake_gt(i) * torch.where(i % 2 == 1, 1.3, 0.9),
        torch.full_like(i, 3.0),
    )


def test_every_output_is_scored_from_its_own_map_in_the_authors_list_order(tmp_path):
    """A labeled file of 10 frames of two scene types, interleaved; a fake model whose three maps
    differ, read off the frame it is shown. Under every protocol each output's scores equal the
    oracle's on that output's own map, the authors' in groups of 8 in their list's order (scene
    type, then frame): a, a, a, a, a, b, b, b | b, b. Frame order would group other frames."""
    from nyu_fixtures import write_v73

    scenes = ["b", "a", "b", "a", "a", "b", "a", "b", "b", "a"]
    images = np.zeros((10, 480, 640, 3), np.uint8)
    images[..., 0] = (20 * np.arange(10))[:, None, None]
    gts = np.stack([np.full((480, 640), fake_gt(i), np.float32) for i in range(10)])
    gts[:, :40] = 0  # holes
    write_v73(tmp_path / "nyu.mat", images, gts, raw_depths=gts, scene_types=scenes)
    ds = data_nyu.NYUDepthV2(tmp_path / "nyu.mat", split="all", raw_depth=True)
    order = evaluate.authors_order(ds, 10)
    assert order == [1, 3, 4, 6, 9, 0, 2, 5, 7, 8]

    def forward(x):
        outputs = fake_outputs(frame_index(x))
        return {
            key: v[:, None, None, None].expand(-1, 1, *x.shape[-2:]) for key, v in zip(moa.OUTPUTS, outputs)
        }

    model = FakeModel(forward, input_size=(64, 64))
    args = argparse.Namespace(
        batch_size=3, save_vis=None, crop="eigen", flip=False, protocol="all", ceiling=False
    )
    maps_of = functools.partial(evaluate.protocol_maps, model=model, dtype=None)
    rows, _ = evaluate.evaluate_frames(ds, order, evaluate.PROTOCOLS, maps_of, torch.device("cpu"), args)
    preds = np.stack(
        [np.broadcast_to(v[:, None, None], gts.shape) for v in fake_outputs(torch.arange(10.0))]
    ).astype(np.float32)  # (3, 10, 480, 640)
    for name, protocol in evaluate.PROTOCOLS.items():
        expected_maps = preds.copy()
        if protocol.input_box != evaluate.FULL_FRAME:
            r0, r1, c0, c1 = protocol.input_box
            expected_maps = np.zeros_like(preds)
            expected_maps[..., r0:r1, c0:c1] = preds[..., r0:r1, c0:c1]
        expected = oracle_scores(name, expected_maps, gts, order)
        for key, want in zip(moa.OUTPUTS, expected):
            got = {m: torch.cat([r[key][m] for r in rows[name]]) for m in data_nyu.KEYS}
            assert_scores(got, want, tol=1e-5)  # float32 resizes; silog of a constant ratio: ~1e-6
    by_frame = oracle_scores("authors", preds, gts)  # frame order: other groups, other numbers
    by_list = oracle_scores("authors", preds, gts, order)
    assert abs(by_frame[0][0]["abs_rel"] - by_list[0][0]["abs_rel"]) > 1e-3  # far beyond 1e-5


def test_similarity_head_depth_is_fp32_under_autocast(monkeypatch):
    """Under bf16 autocast (CPU's casts the matmul as CUDA's does) the similarity head's depth is
    fp32: a bf16 probs @ bins was off by up to 1 cm."""
    from test_moa import zero_shot_model

    _, model = zero_shot_model(monkeypatch)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(image)["depth"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = model(image)["depth"]
            bins = torch.softmax(torch.randn(4, 7), -1) @ model.bins  # what autocast does to it
    assert bins.dtype == torch.bfloat16  # the cast this test relies on
    assert cast.dtype == torch.float32 and plain.dtype == torch.float32
    assert (cast > 1.0 - 1e-5).all() and (cast < 3.0 + 1e-5).all()  # DepthCLIP's bins: 1-3 m


def bilinear(a, size):
    """numpy: (B, h, w) -> (B, *size), bilinear with align_corners False (half-pixel centres)."""

    def weights(n_in, n_out):
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, x - lo

    r_lo, r_hi, r_t = weights(a.shape[1], size[0])
    c_lo, c_hi, c_t = weights(a.shape[2], size[1])
    rows = a[:, r_lo] * (1 - r_t)[None, :, None] + a[:, r_hi] * r_t[None, :, None]
    return rows[:, :, c_lo] * (1 - c_t) + rows[:, :, c_hi] * c_t


@functools.lru_cache(maxsize=4)
def unit_maps(grid, input_size, size):
    """numpy: the map of each unit grid, upsampled to input_size, then to size: (cells, size[0] * size[1])."""
    n = grid[0] * grid[1]
    return bilinear(bilinear(np.eye(n).reshape(n, *grid), input_size), size).reshape(n, -1)


def ceiling_grids(gt, grid=(7, 7), input_size=(224, 224)):
    """numpy, from the ground truth gt (B, H, W) that counts (0 elsewhere): {"cell_mean": each cell's
    mean of the valid ground truth (the cells of adaptive average pooling: rows floor(i H / 7) to
    ceil((i + 1) H / 7); a cell without a valid pixel: the frame's valid mean), "ceiling": the grid
    whose upsampled map (to the input size, then to gt's size) has the least squared error over the
    valid pixels (np.linalg.lstsq, minimum norm)}: (B, *grid) each."""
    B, H, W = gt.shape
    valid = (gt > 1e-3) & (gt < 10)
    means = np.zeros((B, *grid))
    for i in range(grid[0]):
        for j in range(grid[1]):
            rows = slice(i * H // grid[0], -(-(i + 1) * H // grid[0]))
            cols = slice(j * W // grid[1], -(-(j + 1) * W // grid[1]))
            for b in range(B):
                g = gt[b, rows, cols][valid[b, rows, cols]]
                means[b, i, j] = g.mean() if g.size else gt[b][valid[b]].mean()
    basis = unit_maps(grid, input_size, (H, W))  # (cells, H * W)
    best = [
        np.linalg.lstsq(basis[:, v].T, g[v], rcond=None)[0]
        for g, v in zip(gt.reshape(B, -1), valid.reshape(B, -1))
    ]
    return {"ceiling": np.reshape(best, (B, *grid)), "cell_mean": means}


def ceiling_by_hand(gt, input_size=(224, 224)):
    """ceiling_grids' grids upsampled to the input size, then to gt's size, and clamped: the maps."""
    grids = ceiling_grids(gt, input_size=input_size)
    return {k: np.clip(bilinear(bilinear(c, input_size), gt.shape[1:]), 1e-3, 10) for k, c in grids.items()}


def scored_gt(gt, name):
    """The ground truth that protocol `name` scores: inside its crop and, for depthclip, its input box."""
    kept = np.zeros_like(gt)
    r0, r1, c0, c1 = data_nyu.CROPS[evaluate.PROTOCOLS[name].crop]
    kept[:, r0:r1, c0:c1] = gt[:, r0:r1, c0:c1]
    r0, r1, c0, c1 = evaluate.PROTOCOLS[name].input_box
    return kept[:, r0:r1, c0:c1]


def check_ceiling(result, images_gt, tol=1e-6):
    """The JSON of evaluate.py --ceiling --protocol all against ceiling_by_hand, protocol by
    protocol, each fitted to the pixels it scores (the frames: one scene type, so the authors'
    order is frame order). -> {protocol: {output: the oracle's mean metrics}}"""
    gt = images_gt.astype(np.float64)
    expected = {}
    for name, protocol in evaluate.PROTOCOLS.items():
        r0, r1, c0, c1 = protocol.input_box
        maps = ceiling_by_hand(scored_gt(gt, name))
        pasted = np.zeros((2, *gt.shape))
        pasted[:, :, r0:r1, c0:c1] = [maps["ceiling"], maps["cell_mean"]]
        expected[name] = {}
        for output, scores in zip(("ceiling", "cell_mean"), oracle_scores(name, pasted, gt)):
            scores = [e for e in scores if e is not None]
            expected[name][output] = {k: np.mean([e[k] for e in scores]) for k in data_nyu.KEYS}
            got = result["protocols"][name][output]
            for k in data_nyu.KEYS:
                want = expected[name][output][k]
                assert got[k] == pytest.approx(want, rel=tol, abs=tol), (name, output, k)
    return expected


@pytest.mark.parametrize("name", ["standard", "depthclip"])
def test_ceiling_is_the_least_rmse_any_grid_can_score(name):
    """--ceiling's maps against other 7x7 grids under the same upsampling, scored by the protocol itself,
    on rooms with holes, ground truth out of range and a whole row of cells without a valid pixel. The
    ceiling's RMSE is numpy's least squares', frame by frame; the cell means, 20 random grids in the
    model's range and 5 small steps off the least-squares grid all score a higher RMSE."""
    rooms = data_nyu.SyntheticDepth(n=3, seed=11)
    gt = np.stack([rooms[i][1] * (0.9 + 0.1 * np.sin(np.arange(640) / 7)) for i in range(3)])  # not flat
    rng = np.random.default_rng(0)
    gt[rng.random(gt.shape) < 0.1] = 0
    gt[0, :150] = 0  # frame 0: no pixel of the top row of cells is valid
    gt[1, 300:, 320:] = 12  # frame 1: out of range
    protocol = evaluate.PROTOCOLS[name]
    r0, r1, c0, c1 = protocol.input_box

    def rmse(depth):  # a map (3, 480, 640) -> its RMSE per frame, as the protocol scores it
        return evaluate.score({"depth": depth}, torch.from_numpy(gt), protocol)["depth"]["rmse"].numpy()

    def pasted(cells):  # (3, 7, 7) -> the map a model's grid gives, upsampled as predict_maps does
        canvas = np.zeros(gt.shape)
        canvas[:, r0:r1, c0:c1] = np.clip(bilinear(bilinear(cells, (224, 224)), (r1 - r0, c1 - c0)), 1e-3, 10)
        return torch.from_numpy(canvas)

    maps = evaluate.protocol_maps(None, torch.from_numpy(gt), protocol, ceiling_input=(224, 224))
    ceiling = rmse(maps["ceiling"])
    grids = ceiling_grids(scored_gt(gt, name))
    np.testing.assert_allclose(ceiling, rmse(pasted(grids["ceiling"])), rtol=1e-9)
    np.testing.assert_allclose(rmse(maps["cell_mean"]), rmse(pasted(grids["cell_mean"])), rtol=1e-9)
    others = [grids["cell_mean"], *rng.uniform(1e-3, 10, (20, 3, 7, 7))]
    others += [grids["ceiling"] + rng.normal(0, 0.02, (3, 7, 7)) for _ in range(5)]
    for cells in others:
        assert (rmse(pasted(cells)) > ceiling).all()


def test_ceiling_on_synthetic_rooms(run_script):
    """--ceiling needs no model: every protocol, against ceiling_by_hand (rooms 0-2 are a
    bedroom, a kitchen and a living room: the authors' order is frame order)."""
    r = run_script("evaluate.py", "--ceiling", "--data", "synthetic", "--limit", "3", "--protocol", "all")
    result = last_json(r)
    assert set(result["protocols"]) == set(evaluate.PROTOCOLS)
    assert "7x7 output grid" in result["protocol"]["model"]
    rooms = data_nyu.SyntheticDepth(n=evaluate.SYNTHETIC_TEST, seed=evaluate.SYNTHETIC_SEED)
    check_ceiling(result, np.stack([rooms[i][1] for i in range(3)]))


def test_ceiling_on_real_frames(tmp_path, shared_file, run_script):
    """The 10 real NYU test frames (dense ground truth): evaluate.py --ceiling under every protocol
    equals ceiling_by_hand scored by the numpy oracles."""
    from nyu_fixtures import write_splits, write_v73

    root = shared_file("nyu2_mini_test")
    images = np.stack([np.array(Image.open(root / f"image_{i}.png").convert("RGB")) for i in range(10)])
    depths = np.stack([np.array(Image.open(root / f"depth_{i}.png")) for i in range(10)]) / 1000
    depths = depths.astype(np.float32)
    write_v73(
        tmp_path / "nyu.mat",
        np.concatenate([images, images[:1]]),
        np.concatenate([depths, depths[:1]]),
        scene_types=["kitchen"] * 11,
    )
    write_splits(tmp_path / "splits.mat", [11], list(range(1, 11)))  # frames 1-10 are the test
    r = run_script(
        "evaluate.py",
        "--ceiling",
        "--data",
        tmp_path / "nyu.mat",
        "--gt",
        "dense",
        "--protocol",
        "all",
        "--no-download",
    )
    check_ceiling(last_json(r), depths)
