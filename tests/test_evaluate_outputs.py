"""
What evaluate.py gives a user beyond the tables (issues 31 and 32): the setup check's verdict, the spread
over several seeds' checkpoints, a photo's files with their units and assumptions, the experts made
visible, and nothing silent (one-stem photos, flags that do nothing, a full disk, too large a batch).
Run: python -m pytest -q tests/test_evaluate_outputs.py
"""

import json
import os
import resource
import signal
import subprocess
import sys
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

ROOT = Path(__file__).resolve().parents[1]


def last_json(r):
    return json.loads(r.stdout.strip().splitlines()[-1])


def limited(script, *args, limit, kind=resource.RLIMIT_FSIZE):
    """script as a user runs it under a resource limit: a file-size limit stands for a full disk, an
    address-space limit for a machine without more memory."""

    def apply():
        resource.setrlimit(kind, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)

    return subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=apply,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )


# -----------------------------------------------------------------------------
# the setup check's verdict
def test_verdict_on_both_sides_of_the_tolerance():
    row = evaluate.DEPTHCLIP_ROW
    near = {k: v + 0.9 * evaluate.TOLERANCE[k] for k, v in row.items()}
    assert evaluate.verdict(near, 654).startswith(
        "setup check: matches DepthCLIP's published row within d1 +-"
    )
    far = {**near, "d1": row["d1"] - 2 * evaluate.TOLERANCE["d1"]}
    line = evaluate.verdict(far, 654)
    assert "off DepthCLIP's published row: d1 0.374 (-0.020 from 0.394)" in line and "rmse" not in line
    assert "--gt raw" in line and "split" in line and "crop" in line
    millimetres = {**near, "rmse": 1167.0, "d1": 0.0}
    assert "millimetres" in evaluate.verdict(millimetres, 654)
    assert "654" in evaluate.verdict(near, 16) and "matches" not in evaluate.verdict(near, 16)


# -----------------------------------------------------------------------------
# the spread over seeds
def test_seed_spread_is_mean_and_sd_over_the_checkpoints(trained, train_small, tmp_path, run_script):
    ckpts = [trained]
    for seed in (1, 2):
        train_small(tmp_path / f"s{seed}", "--epochs", "1", "--seed", str(seed))
        ckpts.append(tmp_path / f"s{seed}" / "model.pt")
    flags = ["--data", "synthetic", "--limit", "4", "--protocol", "all", "--device", "cpu"]
    result = last_json(run_script("evaluate.py", *ckpts, *flags))
    assert [run["checkpoint"] for run in result["runs"]] == list(map(str, ckpts))
    for name in evaluate.PROTOCOLS:
        values = np.array(
            [[run["protocols"][name]["depth"][k] for k in data_nyu.KEYS] for run in result["runs"]]
        )
        assert np.ptp(values[:, 0]) > 0  # three different models
        for k, mean, sd in zip(data_nyu.KEYS, values.mean(0), values.std(0, ddof=1)):
            assert result["spread"][name][k] == pytest.approx([mean, sd], rel=1e-12, abs=1e-15)
    alone = last_json(run_script("evaluate.py", ckpts[1], *flags))  # each run's rows: as it alone scores
    assert alone["protocols"] == result["runs"][1]["protocols"]


# -----------------------------------------------------------------------------
# a photo's files
def test_photo_files_state_units_and_assumptions(trained, tmp_path, run_script):
    rgb = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 28  # FocalLengthIn35mmFilm, mm
    Image.fromarray(rgb).save(tmp_path / "room.jpg", exif=exif)
    run_script("evaluate.py", trained, "--image", tmp_path / "room.jpg")
    stem = tmp_path / "room_depth"
    depth = np.load(f"{stem}.npy")
    sidecar = json.loads(Path(f"{stem}.json").read_text())
    assert sidecar["units"] == {".npy": "metres", ".ply": "metres", "_mm.png": "millimetres"}
    assert sidecar["intrinsics"]["source"] == "EXIF FocalLengthIn35mmFilm"
    assert sidecar["intrinsics"]["fx"] == pytest.approx(28 / 36 * 64)
    assert sidecar["checkpoint"] == str(trained) and sidecar["clip"]["sha256"]
    assert "2x2 cells for a 64x64 input" in sidecar["output_grid"] and "indoor" in sidecar["output_grid"]
    assert sidecar["depth"]["min"] == pytest.approx(float(depth.min()))
    millimetres = np.asarray(Image.open(f"{stem}_mm.png")).astype(np.float64)
    assert np.abs(millimetres / 1000 - depth).max() <= 0.0005 + 1e-6
    ply = Path(f"{stem}.ply").read_bytes()
    header, body = ply.split(b"end_header\n")
    assert b"element vertex 3072" in header  # 48 x 64 pixels
    vertices = np.frombuffer(
        body, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")]
    )
    np.testing.assert_array_equal(vertices["z"].reshape(48, 64), depth)
    run_script(
        "evaluate.py",
        trained,
        "--image",
        tmp_path / "room.jpg",
        "--focal",
        "100",
        "--out-dir",
        tmp_path / "f",
    )
    assert json.loads((tmp_path / "f" / "room_depth.json").read_text())["intrinsics"]["source"] == "--focal"


def test_photos_with_one_name_keep_their_own_outputs(trained, tmp_path, run_script):
    rgb = (np.random.default_rng(1).random((32, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "room.jpg")
    Image.fromarray(255 - rgb).save(tmp_path / "room.png")
    r = run_script("evaluate.py", trained, "--image", tmp_path / "room.jpg", tmp_path / "room.png")
    a, b = np.load(tmp_path / "room_jpg_depth.npy"), np.load(tmp_path / "room_png_depth.npy")
    assert not np.array_equal(a, b) and "room_jpg_depth" in r.stdout and "room_png_depth" in r.stdout
    run_script("evaluate.py", trained, "--image", tmp_path, "--out-dir", tmp_path / "all")  # a folder
    assert sorted(p.name for p in (tmp_path / "all").glob("*.npy")) == [
        "room_jpg_depth.npy",
        "room_png_depth.npy",
    ]


# -----------------------------------------------------------------------------
# the experts made visible
def test_gate_panel_experts_are_moa_references_winners():
    """The gates evaluate.py draws and shares out are those moa_reference computes from each MoA layer's
    input, and the panel's winners are their argmax."""
    sizes = dict(embed_dim=32, image_resolution=64, vision_layers=12, vision_width=64, patch=32, width=64)
    clip = clip_vit.build_model(clip_vit.random_state_dict(**sizes, heads=1, layers=1))
    cfg = moa.DepthConfig(bottleneck=8, gate_hidden=16, num_bins=8, input_size=(64, 96), temperature=0.5)
    torch.manual_seed(0)
    model = moa.build_model(clip, cfg, moa_impl="torch").eval()
    for layer in model.moa:  # gates that differ from token to token
        torch.nn.init.normal_(layer.gate_w2, std=3.0)
    inputs = []
    for layer in model.moa:
        layer.register_forward_hook(lambda m, args, out: inputs.append((m, args[0])))
    img = torch.randint(0, 256, (2, 3, 120, 160), dtype=torch.uint8)
    evaluate.predict_maps(model, img, None, (120, 160))
    gates = evaluate.gates_of(model)
    assert list(gates) == ["block 2", "block 5", "block 8", "block 11"]
    for (layer, x), got in zip(inputs, gates.values()):
        weights = [getattr(layer, n) for n in evaluate_weight_names()]
        _, want = moa.moa_reference(x, *weights, layer.down_w.shape[0], layer.temperature)
        np.testing.assert_allclose(got, want[:, 1:].detach().numpy(), rtol=1e-5, atol=1e-6)
        for b in range(2):  # per frame: the 2x3 grid of a 64x96 input
            winners = pictures.winning_experts([got[b].reshape(2, 3, -1)])[0]
            assert (winners == want[b, 1:].argmax(-1).reshape(2, 3).numpy()).all()
        assert len(set(got.argmax(-1).ravel())) > 1


def evaluate_weight_names():
    return ("gate_w1", "gate_b1", "gate_w2", "gate_b2", "down_w", "down_b", "up_w", "up_b")


def test_expert_shares_per_scene_and_layer(trained, tmp_path, run_script):
    r = run_script(
        "evaluate.py", trained, "--data", "synthetic", "--limit", "6", "--save-vis", tmp_path / "vis"
    )
    shares = last_json(r)["expert_shares"]
    assert list(shares) == ["L2", "L5", "L8", "L11"]
    for layer in shares.values():
        assert set(layer) <= set(data_nyu.SyntheticDepth.SCENES) and len(layer) >= 3
        for row in layer.values():
            assert len(row) == 4 and sum(row) == pytest.approx(1, abs=1e-3)
    assert "expert shares" in r.stdout
    assert sorted(p.name for p in (tmp_path / "vis").iterdir())[:2] == ["0000.png", "0000_gates.png"]


# -----------------------------------------------------------------------------
# nothing silent
def test_flags_that_do_nothing_are_refused(trained, tmp_path, run_script, fails):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    rows = [
        (("--image", photo, "--flip"), "--flip: does nothing with --image"),
        (("--image", photo, "--limit", "3"), "--limit: does nothing with --image"),
        (("--image", photo, "--save-vis", tmp_path / "v"), "--save-vis: does nothing with --image"),
        (("--image", photo, "--protocol", "all"), "--protocol: does nothing with --image"),
        (("--out-dir", tmp_path / "o"), "--out-dir: does nothing without --image"),
        (("--focal", "500"), "--focal: does nothing without --image"),
    ]
    for args, message in rows:
        r = run_script("evaluate.py", trained, *args, ok=False)
        fails(r, message)
        assert r.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]


def test_a_full_disk_ends_in_one_line_and_keeps_what_was_written(trained, tmp_path, fails):
    """A file-size limit as a full disk: --save-vis writes its small pictures, then fails on one that does
    not fit, in one line naming it; the photo's outputs likewise. Files already written stay whole."""
    r = limited(
        "evaluate.py", trained, "--data", "synthetic", "--limit", "4", "--save-vis", tmp_path / "vis", limit=0
    )
    fails(r, tmp_path / "vis")
    assert "cannot write it" in r.stderr and not list((tmp_path / "vis").glob(".*.tmp"))
    rgb = (np.random.default_rng(2).random((300, 400, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "big.png")
    r = limited(
        "evaluate.py", trained, "--image", tmp_path / "big.png", "--out-dir", tmp_path / "out", limit=600_000
    )
    fails(r, tmp_path / "out")
    assert "cannot write it (File too large)" in r.stderr
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "big_depth.npy" in written and not [name for name in written if name.endswith(".tmp")]
    assert np.load(tmp_path / "out" / "big_depth.npy").shape == (300, 400)


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(monkeypatch, tmp_path):
    """os.access says no (a read-only folder for a user; root writes anywhere, so the test asks os.access)."""
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(clip_vit.UserError, match=r"--save-vis .*vis: cannot write there \(.* is read-only\)"):
        evaluate.check_folder("--save-vis", tmp_path / "vis")


def test_too_large_a_batch_under_a_memory_cap_ends_in_one_line(trained, fails):
    r = limited(
        "evaluate.py",
        trained,
        "--data",
        "synthetic",
        "--limit",
        "600",
        "--batch-size",
        "600",
        "--device",
        "cpu",
        limit=3 << 30,
        kind=resource.RLIMIT_AS,
    )
    fails(r, "out of memory")
    assert "lower --batch-size" in r.stderr


def test_a_clip_mismatch_is_known_before_any_download(trained, tmp_path, run_script, fails, monkeypatch):
    """A checkpoint trained on random CLIP weights, given --clip ViT-B/32: refused from the official
    SHA-256 in the model's URL, with nothing downloaded (the network is closed here)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    r = run_script("evaluate.py", trained, "--clip", "ViT-B/32", "--data", "synthetic", ok=False)
    fails(r, "CLIP weights")
    assert "download" not in r.stderr and not (tmp_path / "cache").exists()
