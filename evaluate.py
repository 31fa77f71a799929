"""
Evaluate MoA-DepthCLIP on the 654 frames of NYU Depth V2's official test split, run zero-shot
DepthCLIP on the same CLIP, or predict depth for your own photos.

    python evaluate.py out/ckpt.pt                      # NYU test split, standard protocol
    python evaluate.py out/ckpt.pt --protocol all --save-vis vis/   # every protocol; pictures
    python evaluate.py --zero-shot --protocol all       # zero-shot DepthCLIP on ViT-B/32
    python evaluate.py out/ckpt.pt --image photo.jpg    # photo_depth.png (picture), .npy (metres)
    python evaluate.py out/ckpt.pt --data synthetic --limit 16   # offline, synthetic rooms

--protocol (the paper says "standard protocol"; docs/paper-notes.md §7 has details); all = each:
  standard   BTS/AdaBins: Eigen crop (--crop), prediction clamped to [1e-3, 10] m, per-image mean
  depthclip  DepthCLIP's script: the model sees RGB rows 56:472, cols 60:604 and its mirror image
  authors    the authors' second script: bicubic squash, Garg crop, median scaling per batch of 8
Scored alone: fused depth and the dual head's binned and regressed maps. Last stdout line: JSON.
"""
import json
import sys
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

import clip_vit
import data_nyu
import moa

PROTOCOLS = ("standard", "depthclip", "authors")  # the order --protocol all runs them
FRAME = (480, 640)                        # NYU frames; every crop here is defined on them
DEPTHCLIP_INPUT = (56, 472, 60, 604)      # rows, cols of the RGB crop DepthCLIP's model sees
GARG_BOX = (195, 476, 23, 616)            # KITTI's Garg crop, cut as the authors' script cuts it
AUTHORS_BATCH = 8                         # the authors' script scales and pools per batch of 8
SYNTHETIC_TEST, SYNTHETIC_SEED = 654, 10_000  # NYU's test size; + the run's seed: unseen rooms
TITLE_H, BAR_H, TICK_H = 16, 12, 14       # picture rows in pixels: titles, colour bars, labels
TURBO = np.array([[0.13572138, 4.6153926, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
                  [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
                  [0.1066733, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973]])


# -----------------------------------------------------------------------------
# pictures (PIL only): turbo colours, a title per panel, a colour bar in metres under each map

def colorize(x, lo, hi):
    """(H, W) -> (H, W, 3) uint8 in turbo, Google's smoothed rainbow: lo dark blue, hi dark red."""
    t = np.clip((x - lo) / max(hi - lo, 1e-9), 0, 1)[..., None]  # 0 to 1 across the scale
    powers = t ** np.arange(6)  # (H, W, 6): 1, t, ..., t^5; TURBO's rows: R, G, B coefficients
    return (np.clip(powers @ TURBO.T, 0, 1) * 255).astype(np.uint8)


def save_picture(path, rgb, pred, gt=None):
    """RGB | prediction [| ground truth | |error|] as one PNG, a colour bar under each map."""
    lo, hi = float(pred.min()), float(pred.max())  # fitted: a 3.5-6.4 m room uses every colour
    panels = [("prediction", pred)]
    if gt is not None:
        valid = (gt > data_nyu.MIN_DEPTH) & (gt < data_nyu.MAX_DEPTH)  # no holes
        if valid.any():
            lo, hi = min(lo, float(gt[valid].min())), max(hi, float(gt[valid].max()))  # one scale
        panels += [("ground truth", gt), ("|error|", np.abs(pred - gt) * valid)]  # 0 at GT holes
    H, W = rgb.shape[:2]
    canvas = Image.new("RGB", (W * (1 + len(panels)), TITLE_H + H + BAR_H + TICK_H), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()  # no font file needed
    canvas.paste(Image.fromarray(rgb), (0, TITLE_H))
    draw.text((2, 2), "RGB", fill="black", font=font)
    ramp = colorize(np.tile(np.linspace(0, 1, W), (BAR_H, 1)), 0, 1)  # (BAR_H, W, 3) low to high
    for i, (title, depth) in enumerate(panels, start=1):
        if title == "|error|":  # its own scale, from 0
            lo, hi = 0.0, float(depth.max())
        canvas.paste(Image.fromarray(colorize(depth, lo, hi)), (i * W, TITLE_H))
        canvas.paste(Image.fromarray(ramp), (i * W, TITLE_H + H))  # its colour bar
        draw.text((i * W + 2, 2), f"{title}, colours {lo:.2f}-{hi:.2f} m", fill="black", font=font)
        draw.text((i * W + 2, TITLE_H + H + BAR_H), f"{lo:.2f} m", fill="black", font=font)
        right = (i + 1) * W - 2 - draw.textlength(f"{hi:.2f} m", font=font)  # right-aligned
        draw.text((right, TITLE_H + H + BAR_H), f"{hi:.2f} m", fill="black", font=font)
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # --save-vis, --out-dir may not exist
    clip_vit.atomic_write(path, lambda f: canvas.save(f, format="PNG"))  # an old one stays whole


def read_photo(path):
    """Any photo -> uint8 (H, W, 3) RGB, upright (EXIF), from greyscale, RGBA, palette, 16-bit."""
    try:
        im = ImageOps.exif_transpose(Image.open(path))
        im.load()  # decode now: a broken file fails here, before the model is loaded
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
    if bicubic:  # PIL-style antialiased bicubic, as the authors' script resizes; it overshoots
        img = F.interpolate(img / 255, cfg.input_size, mode="bicubic", antialias=True).clamp(0, 1)
    else:  # exactly the resize the model was trained with
        img = data_nyu.resize(img, None, cfg.input_size)[0]
    img = data_nyu.normalize(img)                                        # (B, 3, h, w)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):  # as in training
        out = model(img)
        mirrored = model(img.flip(-1)) if flip else None
    maps = {}
    for key in [k for k in moa.OUTPUTS if k in out]:  # the similarity head has only "depth"
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
    maps = predict(model, rgb[:, r0:r1, c0:c1], dtype, (r1 - r0, c1 - c0), flip=True)
    rows = defaultdict(list)
    for key, preds in maps.items():
        for pred, gt in zip(preds, gts):
            canvas = np.zeros(FRAME, dtype=np.float32)  # as DepthCLIP pastes it
            canvas[r0:r1, c0:c1] = pred
            gt = np.where(canvas > data_nyu.MIN_DEPTH, gt, 0)  # gt 0 is a hole: not scored
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
    split, gt = "official test", {"raw": "rawDepths", "dense": "depths (in-painted)"}[args.gt]
    if data == "synthetic":  # generated rooms: their depth is exact, without Kinect holes
        split, gt = "synthetic", "exact (synthetic)"
    crop = {"standard": args.crop, "depthclip": "depthclip", "authors": "garg"}[protocol]
    pooled = f"median-scaled, pooled per batch of {AUTHORS_BATCH}"
    return {"split": f"{split} ({n} frames)", "gt": gt,
            "valid": f"{data_nyu.MIN_DEPTH:g} < gt < {data_nyu.MAX_DEPTH:g}",
            "crop": crop, "crop_box": GARG_BOX if crop == "garg" else data_nyu.CROPS[crop],
            "flip_tta": {"standard": args.flip, "depthclip": True, "authors": False}[protocol],
            "average": pooled if protocol == "authors" else "per image"}


# -----------------------------------------------------------------------------
# the script

def parse_args():
    p = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    arg = p.add_argument  # every help line: what it means, its format, its default
    arg("ckpt", nargs="?", help="checkpoint written by train.py (or --zero-shot)")
    arg("--zero-shot", action="store_true", help="no checkpoint: frozen CLIP, DepthCLIP's prompts")
    arg("--protocol", choices=(*PROTOCOLS, "all"), default="standard",
        help="see above (default: standard)")
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
    if args.zero_shot:  # DepthCLIP: CLIP as it is, so nothing is trained and no checkpoint read
        clip, ckpt = clip_vit.load(args.clip or "ViT-B/32"), {}
        last = (len(clip.visual.transformer.resblocks) - 1,)  # one adapter there: identity at init
        cfg = moa.DepthConfig(head="similarity", use_context=False, use_moa=False, moa_layers=last)
        model = moa.MoADepthCLIP(clip, cfg).to(device).eval()
    else:
        ckpt = moa.load_checkpoint(args.ckpt)  # its config: data, seed
        model = moa.from_checkpoint(ckpt, args.clip, device, where=args.ckpt)
    for path, rgb in photos:  # your photos: <name>_depth.png (picture), <name>_depth.npy (metres)
        depth = predict(model, rgb[None], dtype, rgb.shape[:2])["depth"][0]
        stem = Path(args.out_dir or Path(path).parent) / f"{Path(path).stem}_depth"
        save_picture(f"{stem}.png", rgb, depth)  # first: it makes a missing --out-dir
        clip_vit.atomic_write(f"{stem}.npy", lambda f: np.save(f, depth))  # float32 metres
        print(f"{path}: depth {depth.min():.2f}-{depth.max():.2f} m -> {stem}.png, {stem}.npy")
    if photos:
        return

    config = ckpt.get("config", {})  # the run's: which data it trained on, and its seed
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

    rows = {name: defaultdict(list) for name in protocols}  # [protocol][key]: metrics per frame
    pending = []  # the authors': (maps, gt) per frame, scored in groups of 8; the last may be short
    for s in range(0, n, args.batch_size):
        frames = [ds[i] for i in range(s, min(s + args.batch_size, n))]  # decoded once
        rgb, gts = np.stack([f[0] for f in frames]), [f[1] for f in frames]
        if "standard" in protocols:
            std = predict(model, rgb, dtype, FRAME, flip=args.flip)
            for key, preds in std.items():
                for pred, gt in zip(preds, gts):
                    rows["standard"][key].append(data_nyu.depth_metrics(pred, gt, crop=args.crop))
        if "depthclip" in protocols:  # its own input: the crop that DepthCLIP's model sees
            for key, scores in depthclip_scores(model, rgb, gts, dtype).items():
                rows["depthclip"][key] += scores
        if "authors" in protocols:
            maps = predict(model, rgb, dtype, FRAME, bicubic=True)
            pending += [({key: v[j] for key, v in maps.items()}, gt) for j, gt in enumerate(gts)]
        while len(pending) >= AUTHORS_BATCH or (pending and s + args.batch_size >= n):
            for key, m in authors_scores(pending[:AUTHORS_BATCH]).items():
                rows["authors"][key].append(m)  # one row per group, whatever --batch-size is
            pending = pending[AUTHORS_BATCH:]
        if args.save_vis:  # pictures of the standard protocol's prediction of the whole frame
            vis = std if "standard" in protocols else predict(model, rgb, dtype, FRAME)
            for j, gt in enumerate(gts):
                save_picture(Path(args.save_vis) / f"{s + j:04d}.png", rgb[j], vis["depth"][j], gt)
        print(f"evaluated {min(s + args.batch_size, n)}/{n}", file=sys.stderr)

    # a table per protocol on stdout, then every protocol's metrics as one JSON line, the last
    scenes = [ds.scene(i) for i in range(n)]
    results = {}  # protocol -> its description and metrics
    for name in protocols:
        head = f"{name + ' protocol':<24}{'n':>5}" + "".join(f"{k:>10}" for k in data_nyu.KEYS)
        print(head + "\n" + "-" * len(head))
        lines = [(f"all ({moa.OUTPUTS[key]})", ms) for key, ms in rows[name].items()]
        if name != "authors":  # then the fused depth per scene (the authors' rows are groups)
            for scene in sorted(set(scenes)):
                ms = [m for m, at in zip(rows[name]["depth"], scenes) if at == scene]
                lines.append((scene, ms))
        for label, ms in lines:
            ms = [m for m in ms if m is not None]  # None: no valid pixel in the frame (or group)
            means = data_nyu.mean_metrics(ms).values()
            print(f"{label:<24}{len(ms):>5}" + "".join(f"{v:>10.4f}" for v in means))
        results[name] = {"protocol": describe(name, args, n, data)}
        for key, ms in rows[name].items():  # JSON has no NaN: null where nothing could be scored
            means = data_nyu.mean_metrics([m for m in ms if m is not None]).items()
            results[name][moa.OUTPUTS[key]] = {k: None if np.isnan(v) else v for k, v in means}
    first = results[protocols[0]]  # the headline: the first protocol's fused depth
    print(json.dumps({"metrics": first["fused"], "n_images": n, "protocol": first["protocol"],
                      "protocols": results}, allow_nan=False))


if __name__ == "__main__":
    try:
        main()
    except clip_vit.UserError as e:  # a problem the user can fix: one line, no traceback
        sys.exit(f"error: {e}")
