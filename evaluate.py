"""
Evaluate a MoA-DepthCLIP checkpoint on the 654-image official NYU Depth V2 test split, or predict depth for
your own photos.

    python evaluate.py out/ckpt.pt                                   # NYU test split, BTS/AdaBins protocol
    python evaluate.py out/ckpt.pt --flip --save-vis vis/            # + flip TTA, coloured PNGs
    python evaluate.py out/ckpt.pt --image photo.jpg                 # writes photo_depth.png and photo_depth.npy

Protocol (paper.md §7; the paper does not say which it used, so the output always prints it): ground truth is
rawDepths (holes = 0) unless --gt dense; valid where 1e-3 < gt < 10 inside the Eigen crop (rows 45:471,
cols 41:601); the prediction is upsampled bilinearly to 480x640 and clamped to [1e-3, 10]; metrics per image,
then the mean over images. The last stdout line is one JSON object with the mean metrics and the protocol.
"""
import argparse
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

def cli_errors():
    """Known bad-input errors end the program with one line on stderr and exit code 1; bugs keep their traceback."""
    def hook(kind, err, tb):
        if issubclass(kind, clip_vit.UserError):
            print(f"error: {err}", file=sys.stderr)
            sys.exit(1)
        sys.__excepthook__(kind, err, tb)
    sys.excepthook = hook


def colorize(x, lo=None, hi=None):
    """(H, W) -> (H, W, 3) uint8 with the turbo colormap (Google's perceptually smoothed rainbow, polynomial fit)."""
    lo = np.nanmin(x) if lo is None else lo
    hi = np.nanmax(x) if hi is None else hi
    t = np.clip((x - lo) / max(hi - lo, 1e-9), 0, 1)[..., None]
    powers = np.concatenate([t ** i for i in range(6)], axis=-1)  # (H, W, 6): 1, t, ..., t^5
    coeffs = np.array([[0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
                       [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
                       [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973]])
    return (np.clip(powers @ coeffs.T, 0, 1) * 255).astype(np.uint8)


def save_png(path, rgb):
    from PIL import Image
    clip_vit.atomic_write(path, lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))


@torch.no_grad()
def predict(model, rgb, dtype=None, flip=False, out_size=None):
    """rgb uint8 (B, H, W, 3) numpy -> depth (B, H, W) float32 tensor on the CPU, at out_size or (H, W)."""
    device = next(model.parameters()).device
    img = torch.from_numpy(rgb).to(device).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    img = data_nyu.normalize(data_nyu.resize(img, None, model.cfg.input_size)[0])  # exactly as in training
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        depth = model(img)["depth"].float()
        if flip:
            depth = 0.5 * (depth + model(img.flip(-1))["depth"].float().flip(-1))
    depth = F.interpolate(depth, size=out_size or rgb.shape[1:3], mode="bilinear", align_corners=False)
    return depth[:, 0].clamp(model.cfg.min_depth, model.cfg.max_depth).cpu()


def read_photo(path):
    """Any photo -> uint8 (H, W, 3) RGB, upright (EXIF), from greyscale, RGBA, palette or 16-bit files."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        im = ImageOps.exif_transpose(Image.open(path))
        im.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise clip_vit.UserError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bits
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((255 * (a - a.min()) / max(a.max() - a.min(), 1)).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "P"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return np.asarray(im.convert("RGB"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--data", default=None, help="NYU .mat, or 'synthetic' (default: the path the run trained on)")
    p.add_argument("--splits", default=None, help="splits.mat (default: next to the data, or downloaded)")
    p.add_argument("--clip", default=None, help="CLIP name or file (default: the one in the checkpoint)")
    p.add_argument("--gt", choices=("raw", "dense"), default="raw", help="rawDepths (BTS/AdaBins) or in-painted depths")
    p.add_argument("--crop", choices=tuple(data_nyu.CROPS), default="eigen")
    p.add_argument("--flip", action="store_true", help="average with the horizontally flipped prediction")
    p.add_argument("--median-scale", action="store_true",
                   help="per-image median scaling (the authors' variant; for comparison only)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N test images (0 = all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-download", action="store_true")
    p.add_argument("--save-vis", default=None, metavar="DIR", help="write RGB | prediction | GT | abs error PNGs")
    p.add_argument("--image", nargs="+", default=None, metavar="PHOTO", help="predict depth for these photos")
    args = p.parse_args()

    device, dtype = moa.runtime(args.device)
    ckpt = moa.load_checkpoint(args.ckpt)
    model = moa.from_checkpoint(ckpt, args.clip, device, where=args.ckpt)

    if args.image:  # your own photos: <name>_depth.png (coloured) and <name>_depth.npy (metres) beside each
        photos = [(path, read_photo(path)) for path in args.image]  # all readable before anything is written
        for path, rgb in photos:
            depth = predict(model, rgb[None], dtype)[0].numpy()
            stem = Path(path).with_suffix("")
            clip_vit.atomic_write(f"{stem}_depth.npy", lambda tmp: np.save(open(tmp, "wb"), depth.astype(np.float32)))
            save_png(f"{stem}_depth.png", colorize(depth, model.cfg.min_depth, model.cfg.max_depth))
            print(f"{path}: depth {depth.min():.2f}-{depth.max():.2f} m -> {stem}_depth.png, {stem}_depth.npy")
        return

    data = args.data or ckpt.get("config", {}).get("data", "nyu_depth_v2_labeled.mat")
    if data == "synthetic":  # the offline stand-in: a held-out seed the training run never saw
        ds = data_nyu.SyntheticDepth(n=16, seed=10_000 + ckpt.get("config", {}).get("seed", 0))
    else:
        ds = data_nyu.NYUDepthV2(data, split="test", splits_path=args.splits, raw_depth=args.gt == "raw",
                                 download=not args.no_download)
    n = min(len(ds), args.limit) if args.limit else len(ds)
    if args.save_vis:
        Path(args.save_vis).mkdir(parents=True, exist_ok=True)
    protocol = {"split": f"{'synthetic' if data == 'synthetic' else 'official test'} ({n} images)",
                "gt": "exact (synthetic)" if data == "synthetic" else
                      "rawDepths" if args.gt == "raw" else "depths (in-painted)", "crop": args.crop,
                "crop_box": data_nyu.CROPS[args.crop], "valid": "1e-3 < gt < 10",
                "pred": "bilinear to 480x640, clamp [1e-3, 10]",
                "flip_tta": args.flip, "median_scaling": args.median_scale, "average": "mean of per-image metrics"}
    print("protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.items()), file=sys.stderr)
    rows, by_scene = [], defaultdict(list)
    for s in range(0, n, args.batch_size):
        frames = [ds[i] for i in range(s, min(s + args.batch_size, n))]
        rgb, gts = np.stack([f[0] for f in frames]), [f[1] for f in frames]
        preds = predict(model, rgb, dtype, flip=args.flip, out_size=gts[0].shape)
        for j, (pred, gt) in enumerate(zip(preds.numpy(), gts)):
            if args.median_scale and (v := (gt > 1e-3) & (gt < 10)).any():
                pred = np.clip(pred * np.median(gt[v]) / np.median(pred[v]), 1e-3, 10)
            m = data_nyu.depth_metrics(pred, gt, crop=args.crop)
            if m is not None:
                rows.append(m)
                by_scene[ds.scene(s + j)].append(m)
            if args.save_vis:
                err = np.abs(pred - gt) * (gt > 1e-3)
                panel = [rgb[j], colorize(pred, 0, 10), colorize(gt, 0, 10), colorize(err, 0, 2)]
                save_png(Path(args.save_vis) / f"{s + j:04d}.png", np.concatenate(panel, axis=1))
        print(f"evaluated {min(s + args.batch_size, n)}/{n}", file=sys.stderr)

    head = f"{'scene':<18}{'n':>5}" + "".join(f"{k:>10}" for k in data_nyu.KEYS)
    print(head + "\n" + "-" * len(head))
    for name, ms in [("all", rows)] + sorted(by_scene.items()):
        print(f"{name:<18}{len(ms):>5}" + "".join(f"{v:>10.4f}" for v in data_nyu.mean_metrics(ms).values()))
    print(json.dumps({"metrics": data_nyu.mean_metrics(rows), "n_images": len(rows), "protocol": protocol}))


if __name__ == "__main__":
    cli_errors()
    main()
