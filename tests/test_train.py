"""
train.py as a user runs it (subprocesses on a tiny random CLIP and synthetic rooms): an end-to-end run, resume,
kill-and-resume equivalence, the non-finite-loss stop, DDP with two gloo processes, and bad input.
Run: python -m pytest -q tests/test_train.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import clip_vit

ROOT = Path(__file__).resolve().parents[1]


def test_end_to_end_train_resume_evaluate(small_clip, tmp_path, run_script, train_small):
    r = train_small(tmp_path / "run", "--epochs", "1")
    assert "step 2/2" in r.stdout and "gate H" in r.stdout and "img/s" in r.stdout and "eta" in r.stdout
    r = train_small(tmp_path / "run", "--epochs", "2", "--resume")
    assert "resumed from" in r.stdout and "step 4/4" in r.stdout
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 4 and ckpt["clip"]["sha256"] == clip_vit.sha256sum(small_clip)
    assert all(not k.startswith("visual.") or k.startswith("visual.transformer.resblocks.") for k in ckpt["model"])
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("val_d1" in entry for entry in logs) and any("gate_entropy" in entry for entry in logs)
    r = run_script("evaluate.py", tmp_path / "run" / "ckpt.pt", "--save-vis", tmp_path / "vis", "--flip")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n_images"] == 16 and 0 <= result["metrics"]["d1"] <= 1 and result["metrics"]["rmse"] > 0
    assert result["protocol"]["crop"] == "eigen" and result["protocol"]["flip_tta"] is True
    assert "protocol:" in r.stderr and "all " in r.stdout
    assert len(list((tmp_path / "vis").glob("*.png"))) == 16


def test_train_and_evaluate_on_an_official_layout_mat(small_clip, tmp_path, run_script):
    """The user's two commands on a v7.3 file in the real layout (6 frames), with its splits.mat beside it."""
    from nyu_fixtures import asymmetric_frames, write_splits, write_v73
    images, depths, raw = asymmetric_frames(6)
    scenes = ["kitchen", "office", "kitchen", "bedroom", "office", "kitchen"]
    write_v73(tmp_path / "nyu.mat", images, depths, raw_depths=raw, scene_types=scenes)
    write_splits(tmp_path / "splits.mat", [1, 2, 3, 4], [5, 6])
    r = run_script("train.py", "--data", tmp_path / "nyu.mat", "--clip", small_clip, "--out", tmp_path / "run", "--epochs", "1",
            "--no-download", "--input-size", "64", "--bottleneck", "8", "--gate-hidden", "16",
            "--num-bins", "16", "--batch-size", "1")
    assert "held-out scenes" in r.stdout and "step " in r.stdout
    r = run_script("evaluate.py", tmp_path / "run" / "ckpt.pt", "--no-download")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n_images"] == 2 and result["protocol"]["gt"] == "rawDepths"
    assert "kitchen" in r.stdout and "office" in r.stdout  # the per-scene rows


def test_kill_and_resume_is_bit_identical(small_clip, tmp_path, train_small):
    """SIGKILL a run once its first checkpoint lands, resume it, and compare with an uninterrupted run."""
    import time
    train_small(tmp_path / "a", "--epochs", "4")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = ["--data", "synthetic", "--clip", small_clip, "--out", tmp_path / "b", "--input-size", "64", "--bottleneck", "8", "--gate-hidden", "16", "--num-bins", "16",
            "--synthetic-frames", "12", "--batch-size", "4", "--epochs", "4"]
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
    r = train_small(tmp_path / "b", "--epochs", "4", "--resume")
    assert f"resumed from {ckpt}: epoch {killed_at + 1}" in r.stdout and not stale.exists()
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_non_finite_loss_stops_and_keeps_the_checkpoint(small_clip, tmp_path, train_small, fails):
    train_small(tmp_path / "run", "--epochs", "1")
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    r = train_small(tmp_path / "run", "--epochs", "2", "--resume", "--w-silog", "nan", ok=False)
    fails(r, "non-finite loss")
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before


def test_ddp_two_gloo_processes(small_clip, tmp_path, train_small):
    r = train_small(tmp_path / "ddp", "--epochs", "1",
              launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert "x 2 ranks" in r.stdout and r.stdout.count("training ") == 1  # rank 0 logs alone
    ckpt = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 1  # 9 train frames / 2 ranks / batch 4 = 1 step per epoch


def test_bad_data_clip_out_and_images(trained, small_clip, tmp_path, run_script, fails):
    junk = tmp_path / "junk.mat"
    junk.write_bytes(os.urandom(4096))
    fails(run_script("evaluate.py", trained, "--data", junk, ok=False), junk)
    fails(run_script("train.py", "--data", junk, "--clip", small_clip, "--out", tmp_path / "o", ok=False), junk)
    half = tmp_path / "half.pt"
    half.write_bytes(small_clip.read_bytes()[:5000])
    fails(run_script("train.py", "--data", "synthetic", "--clip", half, "--out", tmp_path / "o2", "--input-size", "64", "--bottleneck", "8", "--gate-hidden", "16", "--num-bins", "16",
            "--synthetic-frames", "12", "--batch-size", "4", ok=False), half)
    fails(run_script("train.py", "--data", "synthetic", "--clip", "ViT-L/99", "--out", tmp_path / "o3", ok=False), "ViT-L/99")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    fails(run_script("train.py", "--data", "synthetic", "--clip", small_clip, "--out", blocker / "sub", ok=False), blocker / "sub")
    notimg = tmp_path / "photo.jpg"
    notimg.write_text("not an image")
    fails(run_script("evaluate.py", trained, "--image", notimg, ok=False), notimg)
    assert not list(tmp_path.glob("photo_depth*"))
