"""
Evaluate MoA-DepthCLIP on the 654 frames of NYU Depth V2's official test split, run zero-shot
DepthCLIP on the same CLIP, or predict depth for your own photos.

    python evaluate.py out/ckpt.pt                      # NYU test split, standard protocol
    python evaluate.py out/ckpt.pt --protocol all --save-vis vis/   # every protocol; pictures
    python evaluate.py --zero-shot --protocol all       # zero-shot DepthCLIP on ViT-B/32
    python evaluate.py out/ckpt.pt --image photo.jpg    # photo_depth.png (picture), .npy (metres)
    python evaluate.py out/ckpt.pt --data synthetic --limit 16   # offline, synthetic rooms

--protocol (the paper says "standard protocol"; docs/paper-notes.md §7 has every detail); all = each:
  standard   BTS/AdaBins: Eigen crop (--crop), prediction clamped to [1e-3, 10] m, per-image mean
  depthclip  DepthCLIP's script: the model sees RGB rows 56:472, cols 60:604 and its mirror image
  authors    the authors' second script: bicubic squash, Garg crop, median scaling per batch of 8
Ground truth: rawDepths (holes = 0) unless --gt dense. Scored alone: the fused depth and, for the
dual head, the binned and the regressed maps. The last stdout line is one JSON object.
"""
import argparse
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import clip_vit
import data_nyu
import moa

OUTPUTS = {"depth": "fused", "depth_cls": "binned", "depth_reg": "regressed"}  # key -> name
PROTOCOLS = ("standard", "depthclip", "authors")  # the order --protocol all runs them
FRAME = (480, 640)                        # NYU frames; every crop here is defined on them
DEPTHCLIP_INPUT = (56, 472, 60, 604)      # rows, cols of the RGB crop DepthCLIP's model sees
GARG = (0.40810811, 0.99189189, 0.03594771, 0.96405229)  # KITTI Garg crop: fractions of H, H, W, W
GARG_BOX = tuple(int(f * n) for f, n in zip(GARG, (FRAME[0],) * 2 + (FRAME[1],) * 2))  # 195:476, 23:616
AUTHORS_BATCH = 8                         # the authors' script scales and pools per batch of 8
SYNTHETIC_TEST, SYNTHETIC_SEED = 654, 10_000  # NYU's test size; + the run's seed: unseen rooms
TITLE_H, BAR_H, TICK_H = 16, 12, 14       # picture rows in pixels: titles, colour bars, labels
ZERO_SHOT = {"head": "similarity", "use_context": False, "use_moa": False, "trainable_blocks": 0}

# -----------------------------------------------------------------------------
# pictures (PIL only): turbo colours, a title per panel, a colour bar in metres under each map

def colorize(x, lo, hi):
    """(H, W) -> (H, W, 3) uint8, turbo colours (Google's smoothed rainbow, polynomial fit)."""
    t = np.clip((x - lo) / max(hi - lo, 1e-9), 0, 1)[..., None]  # 0 to 1 across the scale
    powers = np.concatenate([t ** i for i in range(6)], axis=-1)  # (H, W, 6): 1, t, ..., t^5
    coeffs = np.array([[0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
                       [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
                       [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973]])
    return (np.clip(powers @ coeffs.T, 0, 1) * 255).astype(np.uint8)

def save_picture(path, rgb, pred, gt=None):
    """RGB | prediction [| ground truth | |error|] as one PNG. Prediction and ground truth share a
    scale fitted to both (a 3.5-6.4 m room uses every colour); |error| has its own, from 0."""
    from PIL import Image, ImageDraw, ImageFont
    lo, hi = float(pred.min()), float(pred.max())  # fitted to the data
    panels = [("prediction", pred)]
    if gt is not None:
        valid = (gt > data_nyu.MIN_DEPTH) & (gt < data_nyu.MAX_DEPTH)  # no holes
        if valid.any():
            lo, hi = min(lo, float(gt[valid].min())), max(hi, float(gt[valid].max()))
        panels += [("ground truth", gt), ("|error|", np.abs(pred - gt) * valid)]  # 0 at GT holes
    H, W = rgb.shape[:2]
    canvas = Image.new("RGB", (W * (1 + len(panels)), TITLE_H + H + BAR_H + TICK_H), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()  # no font file needed
    canvas.paste(Image.fromarray(rgb), (0, TITLE_H))
    draw.text((2, 2), "RGB", fill="black", font=font)
    ramp = colorize(np.tile(np.linspace(0, 1, W), (BAR_H, 1)), 0, 1)  # (BAR_H, W, 3) low to high
    for i, (title, depth) in enumerate(panels, start=1):
        if title == "|error|":
            lo, hi = 0.0, float(depth.max())
        canvas.paste(Image.fromarray(colorize(depth, lo, hi)), (i * W, TITLE_H))
        canvas.paste(Image.fromarray(ramp), (i * W, TITLE_H + H))  # its colour bar
        draw.text((i * W + 2, 2), f"{title}, colours {lo:.2f}-{hi:.2f} m", fill="black", font=font)
        draw.text((i * W + 2, TITLE_H + H + BAR_H), f"{lo:.2f} m", fill="black", font=font)
        right = (i + 1) * W - 2 - draw.textlength(f"{hi:.2f} m", font=font)  # right-aligned
        draw.text((right, TITLE_H + H + BAR_H), f"{hi:.2f} m", fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # --save-vis and --out-dir may not exist yet
    clip_vit.atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))

def read_photo(path):
    """Any photo -> uint8 (H, W, 3) RGB, upright (EXIF), from greyscale, RGBA, palette, 16-bit."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        im = ImageOps.exif_transpose(Image.open(path))
        im.load()  # decode now: a broken file fails here
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise clip_vit.UserError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: stretch to 8 bits
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((255 * (a - a.min()) / max(a.max() - a.min(), 1)).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "P"):  # transparent pixels over white, as a viewer shows them
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return np.array(im.convert("RGB"))  # a writable copy: torch warns on read-only arrays

@torch.no_grad()
def predict(model, rgb, dtype, out_size, flip=False, bicubic=False):
    """uint8 (B, H, W, 3) -> {output key: (B, *out_size) float32 metres, clamped to the range}.
    flip: mean with the mirrored prediction of the mirrored image; bicubic: the authors' resize."""
    device, cfg = next(model.parameters()).device, model.cfg
    img = torch.from_numpy(rgb).to(device).permute(0, 3, 1, 2)           # (B, 3, H, W) uint8
    if bicubic:  # PIL-style antialiased bicubic, as the authors' script resizes
        img = F.interpolate(img.float() / 255, cfg.input_size, mode="bicubic", antialias=True).clamp(0, 1)
    else:  # exactly the resize the model was trained with
        img = data_nyu.resize(img, None, cfg.input_size)[0]
    img = data_nyu.normalize(img)                                        # (B, 3, h, w)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):  # as in training
        out = model(img)
        mirrored = model(img.flip(-1)) if flip else None
    maps = {}
    for key in [k for k in OUTPUTS if k in out]:  # the similarity head has only "depth"
        depth = out[key].float()                                         # (B, 1, h, w)
        if flip:
            depth = 0.5 * (depth + mirrored[key].float().flip(-1))  # mirrored back
        depth = F.interpolate(depth, size=out_size, mode="bilinear", align_corners=False)
        maps[key] = depth[:, 0].clamp(cfg.min_depth, cfg.max_depth).cpu().numpy()
    return maps

# -----------------------------------------------------------------------------
# the protocols: array operations around the one metrics function, data_nyu.depth_metrics

def depthclip_scores(model, rgb, gts, dtype):
    """DepthCLIP's script: predict on the RGB crop and its mirror, paste into a zero 480x640 canvas,
    score where it is > 1e-3 inside rows 45:471, cols 46:601. -> {key: [metrics or None]}"""
    r0, r1, c0, c1 = DEPTHCLIP_INPUT
    maps = predict(model, np.ascontiguousarray(rgb[:, r0:r1, c0:c1]), dtype, (r1 - r0, c1 - c0), flip=True)
    rows = defaultdict(list)
    for key, preds in maps.items():
        for pred, gt in zip(preds, gts):
            canvas = np.zeros(FRAME, dtype=np.float32)  # as DepthCLIP pastes it
            canvas[r0:r1, c0:c1] = pred
            gt = np.where(canvas > data_nyu.MIN_DEPTH, gt, 0)  # their "pred > 1e-3"; gt 0: not valid
            rows[key].append(data_nyu.depth_metrics(canvas, gt, crop="depthclip"))
    return rows

def authors_scores(group):
    """The authors' second script on one batch [(maps, gt)]: the Garg crop, one median scale
    median(gt) / median(pred) over the batch's valid cropped pixels, metrics over them pooled."""
    r0, r1, c0, c1 = GARG_BOX
    gt = np.stack([g for _, g in group])[:, r0:r1, c0:c1]  # (b, 281, 593)
    valid = (gt > data_nyu.MIN_DEPTH) & (gt < data_nyu.MAX_DEPTH)
    if not valid.any():  # not one valid pixel in the whole batch: nothing to score
        return {key: None for key in group[0][0]}  # None: not averaged
    rows = {}
    for key in group[0][0]:
        pred = np.stack([maps[key] for maps, _ in group])[:, r0:r1, c0:c1][valid]
        scaled = pred * np.median(gt[valid]) / np.median(pred)  # depth_metrics clamps it again
        rows[key] = data_nyu.depth_metrics(scaled[None], gt[valid][None], crop="none")  # 1 "image"
    return rows

def describe(protocol, args, n, data):
    """How a protocol made its numbers: printed first, and kept with them in the JSON line."""
    gt = "rawDepths" if args.gt == "raw" else "depths (in-painted)"
    crop = {"standard": args.crop, "depthclip": "depthclip", "authors": "garg"}[protocol]
    return {"split": f"{'synthetic' if data == 'synthetic' else 'official test'} ({n} frames)",
            "gt": "exact (synthetic)" if data == "synthetic" else gt, "valid": "1e-3 < gt < 10",
            "crop": crop, "crop_box": GARG_BOX if crop == "garg" else data_nyu.CROPS[crop],
            "flip_tta": {"standard": args.flip, "depthclip": True, "authors": False}[protocol],
            "average": "median-scaled, pooled per batch of 8" if protocol == "authors" else "per image"}

# -----------------------------------------------------------------------------
# the script

def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument  # every help line: what it means, its format, its default
    arg("ckpt", nargs="?", help="checkpoint written by train.py (or --zero-shot)")
    arg("--zero-shot", action="store_true", help="no checkpoint: frozen CLIP, DepthCLIP's prompts")
    arg("--protocol", choices=(*PROTOCOLS, "all"), default="standard", help="see above (default: standard)")
    arg("--data", metavar="PATH", help="NYU labeled .mat, or synthetic: 654 generated rooms "
        f"(default: the file the run trained on, else {data_nyu.FILE_NAME})")
    arg("--splits", metavar="PATH", help="splits.mat (default: next to --data, else the cache's)")
    arg("--clip", metavar="NAME|PATH", help="CLIP weights (default: the run's; ViT-B/32)")
    arg("--gt", choices=("raw", "dense"), default="raw",
        help="ground truth: raw Kinect depth, holes = 0, or in-painted (default: raw)")
    arg("--crop", choices=tuple(data_nyu.CROPS), default="eigen",
        help="the standard protocol's crop (default: eigen, rows 45:471, cols 41:601)")
    arg("--flip", action="store_true", help="standard protocol: add the mirrored prediction")
    arg("--batch-size", type=int, default=16, metavar="N", help="frames per pass (default: 16)")
    arg("--limit", type=int, metavar="N", help="score the first N frames only (default: all)")
    arg("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    arg("--moa-impl", choices=("auto", "triton", "torch"), default="auto",
        help="the MoA layer's code (default: auto = Triton on CUDA, else PyTorch)")
    fetch = p.add_mutually_exclusive_group().add_argument  # args.download: True, False or None
    fetch("--download", action="store_const", const=True, help="fetch a missing --data, any name")
    fetch("--no-download", dest="download", action="store_const", const=False, help="fetch nothing")
    arg("--save-vis", metavar="DIR", help="a labelled PNG per frame into DIR (default: none)")
    arg("--image", nargs="+", metavar="PHOTO", help="predict depth for these photos instead")
    arg("--out-dir", metavar="DIR", help="--image: write there (default: next to each photo)")
    args = p.parse_args()
    if (args.ckpt is None) != args.zero_shot:  # all checked before a model or frame is loaded
        p.error("give either a checkpoint or --zero-shot")
    for flag, count in (("--batch-size", args.batch_size), ("--limit", args.limit)):
        if count is not None and count < 1:
            p.error(f"argument {flag}: {count} is not a count >= 1")
    for flag, folder in (("--save-vis", args.save_vis), ("--out-dir", args.out_dir)):
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            p.error(f"{flag} {folder}: exists and is not a folder")
    return args

def main():
    args = parse_args()
    device, dtype = moa.runtime(args.device)  # a device this machine lacks: one error line
    moa.MOA_IMPL = args.moa_impl  # every MoA layer reads it
    photos = [(path, read_photo(path)) for path in args.image or []]  # all readable, or stop here
    if args.zero_shot:
        # frozen CLIP: its one adapter, after the last block, is the identity at init
        clip, ckpt = clip_vit.load(args.clip or "ViT-B/32"), {}
        last = (len(clip.visual.transformer.resblocks) - 1,)
        model = moa.MoADepthCLIP(clip, moa.DepthConfig(**ZERO_SHOT, moa_layers=last)).to(device).eval()
    else:
        ckpt = moa.load_checkpoint(args.ckpt)  # its config: data, seed
        model = moa.from_checkpoint(ckpt, args.clip, device, where=args.ckpt)
    for path, rgb in photos:  # your photos: <name>_depth.png (picture), <name>_depth.npy (metres)
        depth = predict(model, rgb[None], dtype, rgb.shape[:2])["depth"][0]
        stem = Path(args.out_dir or Path(path).parent) / f"{Path(path).stem}_depth"
        save_picture(f"{stem}.png", rgb, depth)  # first: it makes a missing --out-dir
        npy = io.BytesIO()  # np.save to a name would add ".npy" to atomic_write's temporary name
        np.save(npy, depth.astype(np.float32))
        clip_vit.atomic_write(f"{stem}.npy", lambda tmp: Path(tmp).write_bytes(npy.getvalue()))
        print(f"{path}: depth {depth.min():.2f}-{depth.max():.2f} m -> {stem}.png, {stem}.npy")
    if photos:
        return

    # the test frames: NYU's official test split, or synthetic rooms from a seed the run never saw
    config = ckpt.get("config", {})
    data = args.data or config.get("data", data_nyu.FILE_NAME)
    if data == "synthetic":
        ds = data_nyu.SyntheticDepth(n=SYNTHETIC_TEST, seed=SYNTHETIC_SEED + config.get("seed", 0))
    else:
        ds = data_nyu.NYUDepthV2(data, split="test", splits_path=args.splits,
                                 raw_depth=args.gt == "raw", download=args.download)
    n = min(len(ds), args.limit or len(ds))  # --limit: the first N frames
    protocols = PROTOCOLS if args.protocol == "all" else (args.protocol,)
    for name in protocols:  # say how the numbers are made before any number appears
        about = ", ".join(f"{k}={v}" for k, v in describe(name, args, n, data).items())
        print(f"protocol {name}: {about}", file=sys.stderr)

    # rows[protocol][key]: metrics per image (authors: per batch); by_scene: fused depth, per image
    rows = {name: defaultdict(list) for name in protocols}
    by_scene = {name: defaultdict(list) for name in protocols}
    pending = []  # authors: (maps, gt) per frame, scored in groups of 8 in frame order
    for s in range(0, n, args.batch_size):
        frames = [ds[i] for i in range(s, min(s + args.batch_size, n))]  # decoded once
        rgb, gts = np.stack([f[0] for f in frames]), [f[1] for f in frames]
        per_image = {}  # protocol -> {key: [metrics]}
        if "standard" in protocols:
            std = predict(model, rgb, dtype, FRAME, flip=args.flip)
            per_image["standard"] = {key: [data_nyu.depth_metrics(p, g, crop=args.crop)
                                           for p, g in zip(preds, gts)] for key, preds in std.items()}
        if "depthclip" in protocols:
            per_image["depthclip"] = depthclip_scores(model, rgb, gts, dtype)  # its own input
        if "authors" in protocols:
            maps = predict(model, rgb, dtype, FRAME, bicubic=True)
            pending += [({key: v[j] for key, v in maps.items()}, gt) for j, gt in enumerate(gts)]
        for name, scores in per_image.items():  # None: a frame without one valid pixel
            for key, ms in scores.items():
                rows[name][key] += [m for m in ms if m is not None]
            for j, m in enumerate(scores["depth"]):
                if m is not None:
                    by_scene[name][ds.scene(s + j)].append(m)
        while len(pending) >= AUTHORS_BATCH or (pending and s + args.batch_size >= n):  # last: short
            for key, m in authors_scores(pending[:AUTHORS_BATCH]).items():
                rows["authors"][key] += [] if m is None else [m]
            pending = pending[AUTHORS_BATCH:]  # keep the rest
        if args.save_vis:  # pictures of the standard protocol's prediction of the whole frame
            vis = std if "standard" in protocols else predict(model, rgb, dtype, FRAME)
            for j, gt in enumerate(gts):
                save_picture(Path(args.save_vis) / f"{s + j:04d}.png", rgb[j], vis["depth"][j], gt)
        print(f"evaluated {min(s + args.batch_size, n)}/{n}", file=sys.stderr)
    report(args, protocols, rows, by_scene, n, data)

def report(args, protocols, rows, by_scene, n, data):
    """A table per protocol on stdout, then one JSON line with every protocol's metrics: null, not
    NaN, where nothing could be scored (no valid ground-truth pixel)."""
    results = {}  # protocol -> its description and metrics
    for name in protocols:
        head = f"{name + ' protocol':<24}{'n':>5}" + "".join(f"{k:>10}" for k in data_nyu.KEYS)
        print(head + "\n" + "-" * len(head))  # one table per protocol
        lines = [(f"all ({OUTPUTS[key]})", ms) for key, ms in rows[name].items()]
        for label, ms in lines + sorted(by_scene[name].items()):  # then the fused depth per scene
            means = data_nyu.mean_metrics(ms).values()
            print(f"{label:<24}{len(ms):>5}" + "".join(f"{v:>10.4f}" for v in means))
        results[name] = {"protocol": describe(name, args, n, data)}
        for key, ms in rows[name].items():
            means = data_nyu.mean_metrics(ms)
            results[name][OUTPUTS[key]] = {k: None if np.isnan(v) else v for k, v in means.items()}
    first = results[protocols[0]]  # the headline: the first protocol's fused depth
    print(json.dumps({"metrics": first["fused"], "n_images": n, "protocol": first["protocol"],
                      "protocols": results}, allow_nan=False))

if __name__ == "__main__":
    try:
        main()
    except clip_vit.UserError as e:  # a problem the user can fix: one line, no traceback
        sys.exit(f"error: {e}")
