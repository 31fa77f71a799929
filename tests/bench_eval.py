"""
evaluate.py's pipeline speed: the frames of a v7.3 file through every protocol, per frame and per
protocol, split into read (HDF5 to tensors), resize (the input squashed to the model's size, its
maps upsampled and pasted back; timed with a stub model that costs nothing), model (the real
forwards alone) and score (the metrics), against today's path before the batched torch metrics
(kept below as the baseline: frame by frame reads, numpy metrics per output and frame, the authors'
groups from a pending list, the whole batch resized at once), timed in the same run on the same
frames, the two paths alternated (--rounds; the best run of each counts). A benchmark, not a test:
pytest does not collect it.

    python tests/bench_eval.py [--frames 48] [--rounds 3] [--device cpu|cuda] [--model tiny|vit-b32]
                               [--threads N] [--frames-per-call N]

tiny: a random CLIP of width 64 at 224x224 with the paper's heads (128 bins): the maps, their sizes
and the scoring are the real model's, only its forward is cheaper. vit-b32: a random ViT-B/32.
"""

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nyu_fixtures import write_splits, write_v73
from test_data_nyu import bts_metrics

import clip_vit
import data_nyu
import evaluate
import moa

# -----------------------------------------------------------------------------
# today's path (the baseline), as evaluate.py and data_nyu.py ran it before this change


def old_depth_metrics(pred, gt, crop="eigen"):
    """data_nyu.depth_metrics as it was: numpy float64 on one image (the tests' oracle, bts_metrics)."""
    pred = np.asarray(torch.as_tensor(pred).detach().cpu().float())
    gt = np.asarray(torch.as_tensor(gt).detach().cpu().float())
    return bts_metrics(pred, gt, data_nyu.CROPS[crop])


@torch.no_grad()
def old_predict(model, rgb, dtype, out_size, flip=False, bicubic=False):
    device, cfg = next(model.parameters()).device, model.cfg
    img = torch.from_numpy(rgb).to(device).permute(0, 3, 1, 2)
    if bicubic:
        img = F.interpolate(img / 255, cfg.input_size, mode="bicubic", antialias=True).clamp(0, 1)
    else:  # data_nyu.resize as it was: the whole batch at once
        img = F.interpolate(img.float() / 255, cfg.input_size, mode="bicubic", antialias=True).clamp(0, 1)
    img = data_nyu.normalize(img)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        out = model(img)
        mirrored = model(img.flip(-1)) if flip else None
    maps = {}
    for key in [k for k in moa.OUTPUTS if k in out]:
        depth = out[key].float()
        if flip:
            depth = 0.5 * (depth + mirrored[key].float().flip(-1))
        depth = F.interpolate(depth, size=out_size, mode="bilinear", align_corners=False)
        maps[key] = depth[:, 0].clamp(cfg.min_depth, cfg.max_depth).cpu().numpy()
    return maps


def old_depthclip_scores(maps, gts):
    r0, r1, c0, c1 = evaluate.DEPTHCLIP_INPUT
    rows = defaultdict(list)
    for key, preds in maps.items():
        for pred, gt in zip(preds, gts):
            canvas = np.zeros(evaluate.FRAME, dtype=np.float32)
            canvas[r0:r1, c0:c1] = pred
            gt = np.where(canvas > 1e-3, gt, 0)
            rows[key].append(old_depth_metrics(canvas, gt, crop="depthclip"))
    return rows


def old_authors_scores(group):
    r0, r1, c0, c1 = data_nyu.CROPS["garg"]
    gt = np.stack([g for _, g in group])[:, r0:r1, c0:c1]
    valid = (gt > 1e-3) & (gt < 10)
    if not valid.any():
        return {key: None for key in group[0][0]}
    rows = {}
    for key in group[0][0]:
        pred = np.stack([maps[key] for maps, _ in group])[:, r0:r1, c0:c1][valid]
        scaled = pred * np.median(gt[valid]) / np.median(pred)
        rows[key] = old_depth_metrics(scaled[None], gt[valid][None], crop="none")
    return rows


def old_path(model, ds, n, batch_size, dtype):
    """Today's main loop for --protocol all (standard, depthclip, authors), timed by its parts."""
    seconds = defaultdict(float)
    pending = []
    for s in range(0, n, batch_size):
        t = time.perf_counter()
        frames = [ds[i] for i in range(s, min(s + batch_size, n))]
        rgb, gts = np.stack([f[0] for f in frames]), [f[1] for f in frames]
        seconds["read"] += time.perf_counter() - t
        t = time.perf_counter()
        std = old_predict(model, rgb, dtype, evaluate.FRAME)
        seconds["predict"] += time.perf_counter() - t
        t = time.perf_counter()
        for preds in std.values():
            for pred, gt in zip(preds, gts):
                old_depth_metrics(pred, gt)
        seconds["score"] += time.perf_counter() - t
        t = time.perf_counter()
        r0, r1, c0, c1 = evaluate.DEPTHCLIP_INPUT
        maps = old_predict(model, rgb[:, r0:r1, c0:c1], dtype, (r1 - r0, c1 - c0), flip=True)
        seconds["predict"] += time.perf_counter() - t
        t = time.perf_counter()
        old_depthclip_scores(maps, gts)
        seconds["score"] += time.perf_counter() - t
        t = time.perf_counter()
        maps = old_predict(model, rgb, dtype, evaluate.FRAME, bicubic=True)
        seconds["predict"] += time.perf_counter() - t
        t = time.perf_counter()
        pending += [({key: v[j] for key, v in maps.items()}, gt) for j, gt in enumerate(gts)]
        while len(pending) >= 8 or (pending and s + batch_size >= n):
            old_authors_scores(pending[:8])
            pending = pending[8:]
        seconds["score"] += time.perf_counter() - t
    return seconds


# -----------------------------------------------------------------------------
# the new path, evaluate.py's, timed by its parts


def new_path(model, ds, order, protocols, dtype, batch_size, device):
    seconds = defaultdict(float)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step = 8 * -(-batch_size // 8)
    for s in range(0, len(order), step):
        t = time.perf_counter()
        rgb, gt = evaluate.read_frames(ds, order[s : s + step], device)
        sync()
        seconds["read"] += time.perf_counter() - t
        for protocol in protocols.values():
            t = time.perf_counter()
            maps = evaluate.protocol_maps(rgb, gt, protocol, model=model, dtype=dtype)
            sync()
            seconds["predict"] += time.perf_counter() - t
            t = time.perf_counter()
            protocol.scorer(maps, gt, protocol)
            sync()
            seconds["score"] += time.perf_counter() - t
    return seconds


@torch.no_grad()
def model_seconds(model, n, batch_size, protocols, dtype, device):
    """The forwards alone, as the protocols run them on n frames (the flip: twice)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.zeros(batch_size, 3, *model.cfg.input_size, device=device)
    t = time.perf_counter()
    for _ in range(0, n, batch_size):
        for protocol in protocols.values():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                model(x)
                if protocol.flip:
                    model(x.flip(-1))
    sync()
    return time.perf_counter() - t


class Stub(torch.nn.Module):
    """The model's outputs at the model's size, at no cost: so that read, resize and score are timed
    without a forward in between, and without subtracting one."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        depth = 1 + x[:, :1].abs()  # (B, 1, h, w), varies with the image
        return {"depth": depth, "depth_cls": depth * 1.1, "depth_reg": depth * 0.9}


def make_model(kind, device):
    if kind == "tiny":
        sd = clip_vit.random_state_dict(
            embed_dim=32,
            image_resolution=224,
            vision_layers=12,
            vision_width=64,
            patch=32,
            width=64,
            heads=1,
            layers=1,
        )
    else:
        sd = clip_vit.random_state_dict()
    clip = clip_vit.build_model(sd)
    return moa.MoADepthCLIP(clip, moa.DepthConfig()).to(device).eval()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=("tiny", "vit-b32"), default="tiny")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="alternated runs of each path; the best counts")
    p.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's choice)")
    p.add_argument(
        "--frames-per-call",
        type=int,
        metavar="N",
        help="frames per depth_metrics call (default: evaluate.frames_per_call's choice)",
    )
    args = p.parse_args()
    if args.frames_per_call:
        evaluate.frames_per_call = lambda device: args.frames_per_call
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = None if device.type == "cpu" else torch.bfloat16
    model = make_model(args.model, device)
    n = args.frames
    rooms = data_nyu.SyntheticDepth(n=n + n // 4)
    frames = [rooms[i] for i in range(len(rooms))]
    depth = np.stack([f[1] for f in frames])
    raw = depth.copy()
    raw[:, ::9, ::7] = 0  # Kinect-like holes
    test = [i + 1 for i in range(len(rooms)) if i % 5 != 4][:n]  # runs of 4 frames, as NYU's split
    with tempfile.TemporaryDirectory() as tmp:
        write_v73(
            Path(tmp) / "nyu.mat",
            np.stack([f[0] for f in frames]),
            depth,
            raw_depths=raw,
            scene_types=[rooms.scene(i) for i in range(len(rooms))],
        )
        write_splits(Path(tmp) / "splits.mat", [i for i in range(1, len(rooms) + 1) if i not in test], test)
        ds = data_nyu.NYUDepthV2(
            Path(tmp) / "nyu.mat", split="test", splits_path=Path(tmp) / "splits.mat", raw_depth=True
        )
        order = evaluate.authors_order(ds, n)
        old_protocols = ("standard", "depthclip", "authors")  # what --protocol all ran before
        protocols = {name: evaluate.PROTOCOLS[name] for name in old_protocols}
        stub = Stub(model.cfg).to(device)
        new_path(stub, ds, order[:8], protocols, dtype, args.batch_size, device)  # warm up
        old, new, model_s = None, None, float("inf")
        for _ in range(args.rounds):  # alternated: a shared machine's slow minutes hit both paths alike
            o = old_path(stub, ds, n, args.batch_size, dtype)
            w = new_path(stub, ds, order, protocols, dtype, args.batch_size, device)
            model_s = min(model_s, model_seconds(model, n, args.batch_size, protocols, dtype, device))
            old = o if old is None or sum(o.values()) < sum(old.values()) else old
            new = w if new is None or sum(w.values()) < sum(new.values()) else new
    per = 1e3 / (n * len(protocols))  # seconds in all -> ms per frame per protocol
    print(
        f"{n} frames x {len(protocols)} protocols ({', '.join(protocols)}), {args.model} model, "
        f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("ms per frame per protocol    read   resize    model    score   pipeline (read+resize+score)")
    pipelines = {}
    for name, s in (("today's: numpy per frame", old), ("new: batched torch", new)):
        pipelines[name] = sum(s.values())  # with the stub model: resize is "predict"
        print(
            f"{name:<26}{s['read'] * per:7.2f}{s['predict'] * per:9.2f}{model_s * per:9.2f}"
            f"{s['score'] * per:9.2f}{pipelines[name] * per:11.2f}"
        )
    old_pipeline, new_pipeline = pipelines.values()
    print(
        f"speed-up: pipeline {old_pipeline / new_pipeline:.2f}x; whole evaluation (+ the forwards) "
        f"{old_pipeline + model_s:.1f} s -> {new_pipeline + model_s:.1f} s"
    )
