"""
train.py and evaluate.py as a user runs them (subprocesses): a synthetic end-to-end run, resume equivalence,
DDP with two gloo processes, every bad-input case, photos, and depth_metrics on hand-checkable arrays.
Run: python -m pytest -q tests/test_train_eval.py
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import clip_vit
from conftest import ROOT, shared_file
from data_nyu import depth_metrics
from evaluate import colorize

SMALL = ["--input-size", "64", "--bottleneck", "8", "--gate-hidden", "16", "--num-bins", "16",
         "--synthetic-frames", "12", "--batch-size", "4", "--log-interval", "1"]


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    shared_file("clip", "bpe_simple_vocab_16e6.txt.gz")  # the scene-context prompts need the real vocabulary
    path = tmp_path_factory.mktemp("clip") / "small_clip.pt"
    torch.save(clip_vit.random_state_dict(embed_dim=32, image_resolution=64, vision_layers=12, vision_width=64,
                                          patch=32, width=64, heads=1, layers=1), path)
    return path


def run(script, *args, ok=True, timeout=300, launcher=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = (launcher or [sys.executable]) + [str(ROOT / script), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a hung run is killed whole
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if ok:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def train(out, clip, *extra, **kw):
    return run("train.py", "--data", "synthetic", "--clip", clip, "--out", out, *SMALL, *extra, **kw)


def test_end_to_end_train_resume_evaluate(small_clip, tmp_path):
    r = train(tmp_path / "run", small_clip, "--epochs", "1")
    assert "step 2/2" in r.stdout and "gate H" in r.stdout and "img/s" in r.stdout and "eta" in r.stdout
    r = train(tmp_path / "run", small_clip, "--epochs", "2", "--resume")
    assert "resumed from" in r.stdout and "step 4/4" in r.stdout
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 4 and ckpt["clip"]["sha256"] == clip_vit.sha256sum(small_clip)
    assert all(not k.startswith("visual.") or k.startswith("visual.transformer.resblocks.") for k in ckpt["model"])
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("val_d1" in entry for entry in logs) and any("gate_entropy" in entry for entry in logs)
    r = run("evaluate.py", tmp_path / "run" / "ckpt.pt", "--save-vis", tmp_path / "vis", "--flip")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n_images"] == 16 and 0 <= result["metrics"]["d1"] <= 1 and result["metrics"]["rmse"] > 0
    assert result["protocol"]["crop"] == "eigen" and result["protocol"]["flip_tta"] is True
    assert "protocol:" in r.stderr and "all " in r.stdout
    assert len(list((tmp_path / "vis").glob("*.png"))) == 16


def test_train_and_evaluate_on_an_official_layout_mat(small_clip, tmp_path):
    """The user's two commands on a v7.3 file in the real layout (6 frames), with its splits.mat beside it."""
    from nyu_fixtures import asymmetric_frames, write_splits, write_v73
    images, depths, raw = asymmetric_frames(6)
    scenes = ["kitchen", "office", "kitchen", "bedroom", "office", "kitchen"]
    write_v73(tmp_path / "nyu.mat", images, depths, raw_depths=raw, scene_types=scenes)
    write_splits(tmp_path / "splits.mat", [1, 2, 3, 4], [5, 6])
    r = run("train.py", "--data", tmp_path / "nyu.mat", "--clip", small_clip, "--out", tmp_path / "run", "--epochs", "1",
            "--no-download", *SMALL[:-6], "--batch-size", "1")
    assert "held-out scenes" in r.stdout and "step " in r.stdout
    r = run("evaluate.py", tmp_path / "run" / "ckpt.pt", "--no-download")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n_images"] == 2 and result["protocol"]["gt"] == "rawDepths"
    assert "kitchen" in r.stdout and "office" in r.stdout  # the per-scene rows


def test_kill_and_resume_is_bit_identical(small_clip, tmp_path):
    """SIGKILL a run once its first checkpoint lands, resume it, and compare with an uninterrupted run."""
    import time
    train(tmp_path / "a", small_clip, "--epochs", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = ["--data", "synthetic", "--clip", small_clip, "--out", tmp_path / "b", *SMALL, "--epochs", "4"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = tmp_path / "b" / "ckpt.pt"
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["epoch"]
    assert killed_at < 3, "the run finished before it could be killed"
    stale = tmp_path / "b" / ".ckpt.pt.x1y2.tmp"  # what a kill during a checkpoint write would leave
    stale.write_bytes(b"partial")
    r = train(tmp_path / "b", small_clip, "--epochs", "4", "--resume")
    assert f"resumed from {ckpt}: epoch {killed_at + 1}" in r.stdout and not stale.exists()
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_non_finite_loss_stops_and_keeps_the_checkpoint(small_clip, tmp_path):
    train(tmp_path / "run", small_clip, "--epochs", "1")
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    r = train(tmp_path / "run", small_clip, "--epochs", "2", "--resume", "--w-silog", "nan", ok=False)
    fails(r, "non-finite loss")
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before


def test_ddp_two_gloo_processes(small_clip, tmp_path):
    r = train(tmp_path / "ddp", small_clip, "--epochs", "1",
              launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert "x 2 ranks" in r.stdout and r.stdout.count("training ") == 1  # rank 0 logs alone
    ckpt = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 1  # 9 train frames / 2 ranks / batch 4 = 1 step per epoch

# ----------------------------------------------------------------------------------------------------
# bad input: one clear line naming the file, non-zero exit, no traceback, nothing half-written


def fails(r, name):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(name) in lines[0], r.stderr[-2000:]


@pytest.fixture(scope="module")
def trained(small_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train(out, small_clip, "--epochs", "1")
    return out / "ckpt.pt"


def test_bad_checkpoints(trained, small_clip, tmp_path):
    fails(run("evaluate.py", tmp_path / "nope.pt", ok=False), tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00junk" * 100)
    fails(run("evaluate.py", junk, ok=False), junk)
    ckpt = torch.load(trained, weights_only=True)
    ckpt["model_config"]["num_bins"] = 32  # a different model config
    torch.save(ckpt, tmp_path / "config.pt")
    fails(run("evaluate.py", tmp_path / "config.pt", ok=False), tmp_path / "config.pt")
    ckpt = torch.load(trained, weights_only=True)
    ckpt["clip"]["sha256"] = "0" * 64  # trained on different CLIP weights
    torch.save(ckpt, tmp_path / "sha.pt")
    r = run("evaluate.py", tmp_path / "sha.pt", ok=False)
    fails(r, tmp_path / "sha.pt")
    assert "CLIP weights" in r.stderr


def test_bad_data_clip_out_and_images(trained, small_clip, tmp_path):
    junk = tmp_path / "junk.mat"
    junk.write_bytes(os.urandom(4096))
    fails(run("evaluate.py", trained, "--data", junk, ok=False), junk)
    fails(run("train.py", "--data", junk, "--clip", small_clip, "--out", tmp_path / "o", ok=False), junk)
    half = tmp_path / "half.pt"
    half.write_bytes(small_clip.read_bytes()[:5000])
    fails(run("train.py", "--data", "synthetic", "--clip", half, "--out", tmp_path / "o2", *SMALL, ok=False), half)
    fails(run("train.py", "--data", "synthetic", "--clip", "ViT-L/99", "--out", tmp_path / "o3", ok=False), "ViT-L/99")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    fails(run("train.py", "--data", "synthetic", "--clip", small_clip, "--out", blocker / "sub", ok=False), blocker / "sub")
    notimg = tmp_path / "photo.jpg"
    notimg.write_text("not an image")
    fails(run("evaluate.py", trained, "--image", notimg, ok=False), notimg)
    assert not list(tmp_path.glob("photo_depth*"))


def test_bad_mat_files_and_split(trained, small_clip, tmp_path):
    from nyu_fixtures import asymmetric_frames, write_splits, write_v73
    images, depths, _ = asymmetric_frames(3)
    mat = tmp_path / "nyu.mat"
    write_v73(mat, images, depths, raw_depths=depths, scene_types=["kitchen", "office", "kitchen"])
    write_splits(tmp_path / "splits.mat", [1, 2], [3, 7])  # test index 7 does not exist in a 3-frame file
    r = run("evaluate.py", trained, "--data", mat, ok=False)
    fails(r, "splits.mat")
    trunc = tmp_path / "trunc.mat"
    trunc.write_bytes(mat.read_bytes()[: mat.stat().st_size // 2])
    fails(run("evaluate.py", trained, "--data", trunc, "--splits", tmp_path / "splits.mat", ok=False), trunc)


def test_image_mode_handles_exif_grey_rgba_16bit(trained, tmp_path):
    from PIL import Image
    rgb = (np.random.default_rng(0).random((60, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "deep.png")  # 16-bit greyscale
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when displayed
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    run("evaluate.py", trained, "--image", *[tmp_path / n for n in ("grey.png", "rgba.png", "deep.png", "rotated.jpg")])
    for name, shape in [("grey", (60, 80)), ("rgba", (60, 80)), ("deep", (60, 80)), ("rotated", (80, 60))]:
        depth = np.load(tmp_path / f"{name}_depth.npy")
        assert depth.shape == shape and depth.dtype == np.float32 and (depth > 0).all() and (depth <= 10).all()
        assert Image.open(tmp_path / f"{name}_depth.png").size == shape[::-1]

# ----------------------------------------------------------------------------------------------------
# the one metrics function


def test_depth_metrics_hand_checkable():
    gt = np.full((480, 640), 2.0)
    m = depth_metrics(gt.copy(), gt)
    assert m["d1"] == 1 and m["abs_rel"] == 0 and m["rmse"] == 0 and m["silog"] == 0
    pred = np.full((480, 640), 2.6)  # ratio 1.3: fails delta_1, passes delta_2
    m = depth_metrics(pred, gt)
    assert m["d1"] == 0 and m["d2"] == 1 and m["abs_rel"] == pytest.approx(0.3) and m["rmse"] == pytest.approx(0.6)
    assert m["sq_rel"] == pytest.approx(0.36 / 2) and m["log10"] == pytest.approx(np.log10(1.3))
    assert m["rmse_log"] == pytest.approx(np.log(1.3)) and m["silog"] == pytest.approx(0, abs=1e-6)
    # only the Eigen crop counts: a wrong prediction outside it changes nothing, inside it does
    pred = gt.copy()
    pred[:45] = pred[471:] = pred[:, :41] = pred[:, 601:] = 9.0
    assert depth_metrics(pred, gt)["d1"] == 1 and depth_metrics(pred, gt, crop="none")["d1"] < 1
    pred[45:471, 41:46] = 9.0  # the columns DepthCLIP's crop drops
    assert depth_metrics(pred, gt)["d1"] < 1 and depth_metrics(pred, gt, crop="depthclip")["d1"] == 1
    # holes and out-of-range ground truth are ignored; predictions are clamped to [1e-3, 10]
    gt2 = gt.copy()
    gt2[100:200] = 0
    gt2[200:210] = 12
    pred = np.full_like(gt, 2.0)
    pred[100:210] = 50
    pred[300, 300] = np.inf
    m = depth_metrics(torch.tensor(pred), torch.tensor(gt2))
    assert m["d1"] == pytest.approx(1 - 1 / ((471 - 45 - 110) * 560)) and np.isfinite(m["rmse"])
    assert m["rmse"] == pytest.approx(np.sqrt(8 ** 2 / ((471 - 45 - 110) * 560)))  # inf clamped to 10
    assert depth_metrics(pred, np.zeros_like(gt)) is None
    with pytest.raises(ValueError, match="480x640"):
        depth_metrics(np.ones((10, 10)), np.ones((10, 10)))


def test_colormap_runs_blue_green_red():
    c = colorize(np.linspace(0, 1, 256)[None, :], 0, 1)[0].astype(int)
    assert c.shape == (256, 3) and colorize(np.ones((2, 2)), 0, 1).dtype == np.uint8
    assert c[38, 2] > c[38, 0] and c[128, 1] == c[128].max() and c[230, 0] > c[230, 2]  # turbo: blue, green, red
    assert (colorize(np.linspace(0, 1, 256)[None, :]) == colorize(np.linspace(0, 1, 256)[None, :], 0, 1)).all()
