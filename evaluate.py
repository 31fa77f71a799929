"""
Evaluate MoA-DepthCLIP on the 654 frames of NYU Depth V2's official test split, run zero-shot
DepthCLIP on the same CLIP, or predict depth for your own photos.

    python evaluate.py out/ckpt.pt                      # NYU test split, standard protocol
    python evaluate.py out/ckpt.pt --protocol all --save-vis vis/   # every protocol; pictures
    python evaluate.py --zero-shot --protocol all       # zero-shot DepthCLIP on ViT-B/32
    python evaluate.py --ceiling --protocol all         # the least RMSE a 7x7 output grid can score
    python evaluate.py --zero-shot --clip RN50 --protocol depthclip   # DepthCLIP's own row, RN50
    python evaluate.py out/ckpt.pt --image photo.jpg    # photo_depth.png (picture), .npy (metres)
    python evaluate.py out/ckpt.pt --data synthetic --limit 16   # offline, synthetic rooms

--protocol (the paper says "standard protocol"; docs/paper-notes.md §7 has details); all = each:
  standard   BTS/AdaBins: Eigen crop (--crop), prediction clamped to [1e-3, 10] m, per-image mean
  standard-depthclip-crop   the same with DepthCLIP's metric function (cols 46:601; only where the
             map is > 1e-3): the authors' first script
  depthclip  DepthCLIP's script: the model sees RGB rows 56:472, cols 60:604 and its mirror image
  authors    the authors' second script: bicubic squash, Garg crop, median scaling per batch of 8
             in their list's order (scene type, then frame), no clamp after the scaling
--ceiling: no model; per frame, the 7x7 output grid (a checkpoint's grid if one is given) whose map,
upsampled as the model's output is, has the least squared error over the pixels each protocol scores:
no such map scores a lower RMSE under standard, standard-depthclip-crop and depthclip (other metrics,
and the authors' median-scaled scores, are not bounded by it). Also cell_mean, the ground truth
averaged on each cell: a reference, not a bound.
Scored alone: fused depth and the dual head's binned and regressed maps. Last stdout line: JSON.
"""

import json
import math
import sys
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from collections import defaultdict
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

import clip_vit
import data_nyu
import moa

# NYU frames; every crop here is defined on them
FRAME = (480, 640)
FULL_FRAME = (0, 480, 0, 640)  # rows, cols: the whole frame
# rows, cols of the RGB crop DepthCLIP's model sees
DEPTHCLIP_INPUT = (56, 472, 60, 604)
# the authors' script scales and pools per batch of 8
AUTHORS_BATCH = 8
# ViT-B/32: one output cell per 32x32 input pixels
PATCH = 32
# --ceiling's least squares: its pull towards the cell means, against ~6,000 pixels' weight per cell
CEILING_RIDGE = 1e-9
# NYU's test size; + the run's seed: unseen rooms
SYNTHETIC_TEST, SYNTHETIC_SEED = 654, 10_000
# a picture's long side at most, short side at least (px)
PICTURE_MAX, PICTURE_MIN = 2048, 256
# font size / height of a picture's maps: letters >= 2 %
TEXT = 0.04
# pixels: the font of a picture of tiny maps
MIN_FONT = 14
# the folders this run created: removed again if still empty when it stops early
MADE = []
TURBO = np.array(
    [
        [0.13572138, 4.6153926, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
        [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
        [0.1066733, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
    ]
)


# -----------------------------------------------------------------------------
# pictures (PIL only): turbo colours, a title per panel, a colour bar in metres under each map


def colorize(x, lo, hi):
    """(H, W) -> (H, W, 3) uint8 in turbo, Google's smoothed rainbow: lo dark blue, hi dark red."""
    # 0 to 1 across the scale
    t = np.clip((x - lo) / max(hi - lo, 1e-9), 0, 1)[..., None]
    powers = t ** np.arange(6)  # (H, W, 6): 1, t, ..., t^5; TURBO's rows: R, G, B coefficients
    return (np.clip(powers @ TURBO.T, 0, 1) * 255).astype(np.uint8)


def picture_layout(h, w, rows, cols, header, cells):
    """Maps of h x w pixels in a rows x cols grid -> the picture's geometry, a dict. Under a header
    line, each cell is a title row, the map, a colour bar and a row of the bar's labels; columns are
    one font size apart, and a cell is as wide as its texts need, so no two labels touch.
    cells: (title, bar labels or ()) per cell. The font is TEXT of the maps' height."""
    size = max(MIN_FONT, round(TEXT * rows * h))
    # Pillow >= 10.1: scalable, no font file needed
    font = ImageFont.load_default(size=size)
    cell_w = w
    # the bar's labels side by side, a font size apart
    for title, labels in cells:
        need = sum(font.getlength(label) + size for label in labels)
        cell_w = max(cell_w, math.ceil(font.getlength(title)), math.ceil(need))
    g = {
        "font": font,
        "size": size,
        "cell_w": cell_w,
        "header_h": round(1.6 * size),
        "title_h": round(1.4 * size),
        "bar_h": round(0.6 * size),
        "label_h": round(1.4 * size),
    }
    g["cell_h"] = g["title_h"] + h + g["bar_h"] + g["label_h"]
    g["height"] = g["header_h"] + rows * g["cell_h"]
    g["width"] = max(cols * cell_w + (cols + 1) * size, math.ceil(font.getlength(header)) + 2 * size)
    return g


def boundary(ok, lo, hi):
    """-> (last, first), ok(last) true and ok(first) false, 0.1 % apart, for an ok that holds up
    to a point and not after it, given ok(lo) true and ok(hi) false."""
    while hi / lo > 1.001:
        # geometric: scales run from 1e-4 to 1e4
        mid = (lo * hi) ** 0.5
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def fit_scale(H, W, rows, cols, header, cells):
    """The scale for (H, W) maps: 1, their own pixels, where the picture is then at most PICTURE_MAX
    on its long side and at least PICTURE_MIN on its short side; else the nearest scale that keeps
    the long side in bounds and, where the photo's shape allows it, the short side."""

    # -> (short, long) of the picture
    def sides(scale):
        g = picture_layout(max(1, round(scale * H)), max(1, round(scale * W)), rows, cols, header, cells)
        return min(g["height"], g["width"]), max(g["height"], g["width"])

    short, long = sides(1.0)
    if long > PICTURE_MAX:  # a large photo: shrink
        return boundary(lambda s: sides(s)[1] <= PICTURE_MAX, 1e-4, 1.0)[0]
    if short >= PICTURE_MIN:
        return 1.0
    reaches = boundary(lambda s: sides(s)[0] < PICTURE_MIN, 1.0, 1e4)[1]  # a tiny photo: enlarge
    fits = boundary(lambda s: sides(s)[1] <= PICTURE_MAX, 1.0, 1e4)[0]
    return min(reaches, fits)


def resized(a, h, w):
    """A map (nearest pixel: depths stay depths, holes stay holes) or an RGB photo (box filter when
    smaller, nearest when larger: a 1x1 photo shows as one block) at h x w."""
    if a.shape[:2] == (h, w):
        return a
    im = Image.fromarray(a)  # (H, W) float32: mode F; (H, W, 3) uint8: RGB
    smaller = h * w < a.shape[0] * a.shape[1]
    resample = Image.Resampling.BOX if a.ndim == 3 and smaller else Image.Resampling.NEAREST
    return np.asarray(im.resize((w, h), resample))


def save_picture(path, rgb, pred, gt=None, *, title="", scene=None, crop="eigen", metrics=None):
    """RGB | prediction [| ground truth | |error|] as one PNG, a colour bar in metres under each
    map, under a header: title, scene and, with ground truth, the frame's d1 and RMSE within `crop`
    (metrics: this frame's, if already scored; else scored here). Maps keep their pixels unless the
    picture would be too large or too small (fit_scale)."""
    # fitted: a 3.5-6.4 m room uses every colour
    lo, hi = float(pred.min()), float(pred.max())
    panels = [("prediction", pred)]
    score = ""
    if gt is not None:
        valid = (gt > data_nyu.MIN_DEPTH) & (gt < data_nyu.MAX_DEPTH)  # no holes
        if valid.any():
            lo, hi = min(lo, float(gt[valid].min())), max(hi, float(gt[valid].max()))  # one scale
        error = (np.abs(pred - gt) * valid).astype(np.float32)  # 0 at GT holes
        panels += [("ground truth", gt), ("|error|", error)]
        m = metrics or data_nyu.depth_metrics(pred, gt, crop=crop)  # as the standard protocol does
        d1, rmse = float(m["d1"]), float(m["rmse"])  # NaN: not one valid pixel
        within = "" if crop == "none" else f" ({crop} crop)"
        score = "no valid ground truth" if math.isnan(d1) else f"d1 {d1:.3f}, RMSE {rmse:.3f} m{within}"
    names = ", ".join(t for t in (title, scene) if t)
    header = ": ".join(t for t in (names, score) if t)
    scales = [(0.0, float(a.max())) if name == "|error|" else (lo, hi) for name, a in panels]
    cells = [("RGB", ())]  # (title, colour bar labels) per panel
    cells += [(name, (f"{a:.2f} m", f"{b:.2f} m")) for (name, _), (a, b) in zip(panels, scales)]
    # four maps in 2x2: a picture to see whole
    cols = 2 if len(cells) == 4 else len(cells)
    rows = len(cells) // cols
    H, W = rgb.shape[:2]
    scale = fit_scale(H, W, rows, cols, header, cells)  # resized before colouring: little memory
    h, w = max(1, round(scale * H)), max(1, round(scale * W))
    images = [resized(rgb, h, w)]
    images += [colorize(resized(a, h, w), a_lo, a_hi) for (_, a), (a_lo, a_hi) in zip(panels, scales)]
    canvas = draw_picture(header, cells, images, picture_layout(h, w, rows, cols, header, cells), cols)
    make_folder(Path(path).parent)  # --save-vis, --out-dir may not exist
    clip_vit.atomic_write(path, lambda f: canvas.save(f, format="PNG"))  # an old one stays whole


def draw_picture(header, cells, images, g, cols):
    """The header, then per cell its title, its image (h, w, 3) and, given labels, a colour bar."""
    size, font, cell_w = g["size"], g["font"], g["cell_w"]
    h, w = images[0].shape[:2]
    canvas = Image.new("RGB", (max(g["width"], PICTURE_MIN), max(g["height"], PICTURE_MIN)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((size, size // 4), header, fill="black", font=font)
    ramp = colorize(np.tile(np.linspace(0, 1, cell_w), (g["bar_h"], 1)), 0, 1)  # low to high
    for i, ((title, labels), image) in enumerate(zip(cells, images)):
        x = size + (i % cols) * (cell_w + size)  # the cell's top left corner
        y = g["header_h"] + (i // cols) * g["cell_h"]
        draw.text((x, y + size // 8), title, fill="black", font=font)
        canvas.paste(Image.fromarray(image), (x + (cell_w - w) // 2, y + g["title_h"]))
        # a colour bar, its lowest value at the left, its highest at the right
        if labels:
            bar_y = y + g["title_h"] + h
            canvas.paste(Image.fromarray(ramp), (x, bar_y))
            draw.text((x, bar_y + g["bar_h"]), labels[0], fill="black", font=font)
            right = x + cell_w - draw.textlength(labels[1], font=font)
            draw.text((right, bar_y + g["bar_h"]), labels[1], fill="black", font=font)
    return canvas


def make_folder(folder):
    """mkdir -p that remembers each folder it made (MADE), so an interrupted run removes them
    again if they are still empty."""
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    MADE.extend(reversed(missing))  # outermost first


def remove_empty_folders():
    for folder in reversed(MADE):  # innermost first
        try:
            folder.rmdir()  # only an empty folder goes
        except OSError:
            pass


def read_photo(path):
    """Any photo -> uint8 (H, W, 3) RGB, upright (EXIF), from greyscale, RGBA, palette, 16-bit."""
    try:
        im = ImageOps.exif_transpose(Image.open(path))
        # decode now: a broken file fails here, before the model is loaded
        im.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise clip_vit.UserError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    # 16-bit greyscale: stretch to 8 bits
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray((255 * (a - a.min()) / max(a.max() - a.min(), 1)).astype(np.uint8))
    # transparent pixels over white, as a viewer shows them
    if im.mode in ("RGBA", "LA", "P"):
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    # a writable copy: torch warns on read-only arrays
    return np.array(im.convert("RGB"))


@torch.no_grad()
def predict_maps(model, img, dtype, out_size, flip=False, resize="training"):
    """uint8 (B, 3, H, W) tensor -> {output key: (B, *out_size) float32 tensor, metres, clamped to
    the range}, on img's device. flip: the mean with the mirrored-back prediction of the mirrored
    image. resize: "training" (data_nyu.resize, as the model was trained) or "pil-bicubic" (the
    authors' script: PIL's antialiased bicubic, whose result PIL rounds to uint8)."""
    cfg = model.cfg
    if resize == "pil-bicubic":
        x = data_nyu.bicubic(img, cfg.input_size, 1)
        x = x.round().clamp(0, 255) / 255  # (B, 3, h, w)
    else:
        x = data_nyu.resize(img, None, cfg.input_size)[0]  # (B, 3, h, w)
    x = data_nyu.normalize(x)
    with torch.autocast(img.device.type, dtype=dtype, enabled=dtype is not None):  # as in training
        out = model(x)
        mirrored = model(x.flip(-1)) if flip else None
    maps = {}
    # the similarity head has only "depth"
    for key in [k for k in moa.OUTPUTS if k in out]:
        depth = out[key].float()  # (B, 1, h, w)
        if flip:
            depth = 0.5 * (depth + mirrored[key].float().flip(-1))  # mirrored back
        depth = F.interpolate(depth, size=out_size, mode="bilinear", align_corners=False)
        maps[key] = depth[:, 0].clamp(cfg.min_depth, cfg.max_depth)
    return maps


def ceiling_maps(gt, input_size, out_size):
    """The ceiling "model", two maps from the ground truth gt (B, H, W) of the pixels a protocol scores (0
    elsewhere), each a grid of input_size / 32 cells upsampled as the model's output is (bilinear to
    input_size in the forward, bilinear to out_size in predict_maps) and clamped -> {"ceiling",
    "cell_mean": (B, *out_size) float64 metres}. cell_mean: each cell's mean of the valid ground truth
    under it (a cell without one: the frame's valid mean). ceiling: the grid whose upsampled map has
    the least squared error over the valid pixels, a linear least-squares problem solved per frame on
    its normal equations; a ridge of CEILING_RIDGE towards the cell means settles the cells that no
    valid pixel depends on (they keep their cell mean). No grid's map has a lower RMSE before the
    clamp, and the clamp only moves a pixel towards its valid ground truth. The maps are R^T g C, the
    separable form of the model's two bilinear resizes (equal to them to float64 rounding)."""
    grid = (input_size[0] // PATCH, input_size[1] // PATCH)
    valid = ((gt > data_nyu.MIN_DEPTH) & (gt < data_nyu.MAX_DEPTH)).double()  # (B, H, W)
    depth = gt.double() * valid
    # each cell's sum / its pixels, holes as 0
    depth_mean = F.adaptive_avg_pool2d(depth, grid)
    # each cell's valid share: same cells
    valid_mean = F.adaptive_avg_pool2d(valid, grid)
    frame_mean = depth.sum((1, 2), keepdim=True) / valid.sum((1, 2), keepdim=True).clamp_min(1)
    means = torch.where(valid_mean > 0, depth_mean / valid_mean.clamp_min(1e-12), frame_mean)  # (B, gh, gw)

    # bilinear resizing is separable: a grid g's map is R^T g C, R and C the unit vectors of each axis
    # resized as the model resizes (to input_size in the forward, to out_size in predict_maps)
    def weights(axis):  # (cells along the axis, out_size[axis])
        x = torch.eye(grid[axis], dtype=torch.float64, device=gt.device)[:, None]
        for size in (input_size[axis], out_size[axis]):
            x = F.interpolate(x, size=size, mode="linear", align_corners=False)
        return x[:, 0]

    R, C = weights(0), weights(1)
    # the normal equations of min over g of sum_pq valid_pq ((R^T g C)_pq - gt_pq)^2, one per frame
    normal = torch.einsum("ip,kp,bpq,jq,lq->bijkl", R, R, valid, C, C).flatten(3).flatten(1, 2)
    normal.diagonal(0, 1, 2).add_(CEILING_RIDGE)
    rhs = torch.einsum("ip,bpq,jq->bij", R, depth, C) + CEILING_RIDGE * means
    best = torch.linalg.solve(normal, rhs.flatten(1)).view(means.shape)
    return {
        key: torch.einsum("ip,bij,jq->bpq", R, x, C).clamp(data_nyu.MIN_DEPTH, data_nyu.MAX_DEPTH)
        for key, x in {"ceiling": best, "cell_mean": means}.items()
    }


def protocol_maps(rgb, gt, protocol, model=None, dtype=None, ceiling=None):
    """The maps a protocol scores, {output key: (B, 480, 640)}: the model's prediction of its input
    box, or with ceiling=input_size the ceiling's (ceiling_maps of the ground truth that the protocol's
    crop scores), pasted into a zero frame."""
    r0, r1, c0, c1 = protocol.input_box
    size = (r1 - r0, c1 - c0)
    if ceiling:
        k0, k1, j0, j1 = data_nyu.CROPS[protocol.crop] or FULL_FRAME
        scored = torch.zeros_like(gt)
        scored[:, k0:k1, j0:j1] = gt[:, k0:k1, j0:j1]
        maps = ceiling_maps(scored[:, r0:r1, c0:c1], ceiling, size)
    else:
        maps = predict_maps(model, rgb[..., r0:r1, c0:c1], dtype, size, protocol.flip, protocol.resize)
    if size == FRAME:
        return maps
    # as DepthCLIP pastes it: zeros around the box (left, right, top, bottom)
    around = (c0, FRAME[1] - c1, r0, FRAME[0] - r1)
    return {key: F.pad(depth, around) for key, depth in maps.items()}


# -----------------------------------------------------------------------------
# the protocols: what each feeds the model and how it scores, around data_nyu.depth_metrics


def frames_per_call(device):
    """Frames scored per depth_metrics call: a GPU takes the whole batch; a CPU is faster one frame
    at a time, its float64 temporaries then staying in cache (tests/bench_eval.py)."""
    return 1 if device.type == "cpu" else None


def score_per_image(maps, gt, protocol):
    """Each frame on its own within the protocol's crop (BTS, AdaBins, DepthCLIP); under DepthCLIP's
    crop a pixel counts only where the map is > 1e-3, as DepthCLIP's metric function (and the
    authors' first, a copy) masks it. -> {output key: {metric: (B,)}}"""
    step = frames_per_call(gt.device) or len(gt)
    scores = {}
    # output by output: stacking them first costs a copy and is slower on a CPU
    for key, depth in maps.items():
        parts = []
        for s in range(0, len(gt), step):
            pred = depth[s : s + step]  # (b, 480, 640)
            frame_gt = gt[s : s + step]
            # DepthCLIP's metric function, which the authors' first copies: only where the map is > 1e-3
            # (outside a pasted map's box the canvas is 0)
            if protocol.crop == "depthclip":
                frame_gt = torch.where(pred > data_nyu.MIN_DEPTH, frame_gt, 0.0)
            parts.append(data_nyu.depth_metrics(pred, frame_gt, crop=protocol.crop))  # {metric: (b,)}
        scores[key] = {m: torch.cat([part[m] for part in parts]) for m in data_nyu.KEYS}
    return scores


def lower_median(x, keep):
    """torch.median(x[keep]), the lower of the two middle values, for float32 or float64 x; only
    positive values count (NaN never does, as in torch.nanmedian); NaN when none is kept. -> 0-dim.

    It counts instead of sorting: ~1.7x faster than torch.median on a CPU (a group of 8 frames,
    1.9 M pixels: 8-10 ms, not 16-17), and no host sync on a GPU. A positive float's bits, read
    as an integer, order as the floats do; so the value at the middle rank is found 16 bits at a
    time, high bits first: count the kept values per 16-bit digit, take the digit that holds the
    rank, keep only the values with that digit, and go on with the next 16 bits (2 rounds for
    float32, 4 for float64)."""
    bits = x.view({torch.float32: torch.int32, torch.float64: torch.int64}[x.dtype])
    keep = keep & (x > 0)
    # the 0-based rank of the lower middle value; -1 if nothing is kept
    rank = (keep.sum() - 1) // 2
    nothing_kept = rank < 0
    median_bits = torch.zeros((), dtype=bits.dtype, device=x.device)
    for shift in range(bits.element_size() * 8 - 16, -1, -16):
        digits = (bits >> shift).bitwise_and_(0xFFFF)
        # 65536: not kept, not counted (in place: a new map of this size costs page faults)
        digits.masked_fill_(~keep, 65536)
        counts = torch.bincount(digits.flatten(), minlength=65537)[:65536]
        # kept values at digits <= d
        upto = counts.cumsum(0)
        digit = torch.searchsorted(upto, rank, right=True).clamp_max(65535)
        # the rank among the values with this digit
        rank = rank - (upto[digit] - counts[digit])
        median_bits = (median_bits << 16 | digit).to(bits.dtype)
        # the next round: the values with this digit (those not kept hold 65536, never a digit)
        if shift:
            keep = digits == digit
    return torch.where(nothing_kept, torch.nan, median_bits.view(x.dtype))


def score_authors(maps, gt, protocol):
    """The authors' script, per group of 8 frames as their list orders them: the Garg crop, one
    scale median(gt) / median(pred) over the group's valid pixels (torch.median: the lower middle
    value), the metrics over those pixels pooled, with no clamp after the scaling.
    -> {output key: {metric: (groups,)}}"""
    r0, r1, c0, c1 = data_nyu.CROPS[protocol.crop]
    gt = gt[:, r0:r1, c0:c1]
    valid = (gt > data_nyu.MIN_DEPTH) & (gt < data_nyu.MAX_DEPTH)
    rows = defaultdict(list)
    size = protocol.group
    for s in range(0, len(gt), size):
        # the group as one tall image
        group_gt = gt[s : s + size].reshape(1, -1, c1 - c0)
        group_valid = valid[s : s + size].reshape(1, -1, c1 - c0)
        gt_median = lower_median(group_gt, group_valid).double()
        for key, depth in maps.items():
            pred = depth[s : s + size, r0:r1, c0:c1].reshape(1, -1, c1 - c0)
            pred_median = lower_median(pred, group_valid).double()
            # not one valid pixel: NaN, unscored
            scaled = pred.double() * (gt_median / pred_median)
            rows[key].append(data_nyu.depth_metrics(scaled, group_gt, crop="none", clamp=False))
    return {
        key: {m: torch.cat([r[m] for r in groups]) for m in data_nyu.KEYS} for key, groups in rows.items()
    }


@dataclass(frozen=True)
class Protocol:
    # rows, cols of the 480x640 frame the model sees, pasted back there
    input_box: tuple
    # the mean with the mirrored-back prediction of the mirrored input
    flip: bool
    # "training": as the model was trained; "pil-bicubic": the authors' script
    resize: str
    # the pixels scored: a data_nyu.CROPS box (and 1e-3 < gt < 10)
    crop: str
    # frames scored together, consecutive in the order given: 1 = each alone
    group: int
    # how the frames' scores make one number
    average: str
    scorer: object  # (maps, gt, protocol) -> {output key: {metric: scores}}


PER_IMAGE = "per image, then the mean over images"
PER_GROUP = (
    f"per group of {AUTHORS_BATCH} frames in the authors' list order (scene type, then frame): "
    "median-scaled, pixels pooled, then the mean over groups"
)
# the order --protocol all runs them (docs/paper-notes.md §7)
PROTOCOLS = {
    "standard": Protocol(  # BTS, AdaBins
        input_box=FULL_FRAME,
        flip=False,
        resize="training",
        crop="eigen",
        group=1,
        average=PER_IMAGE,
        scorer=score_per_image,
    ),
    # the authors' first (compiled) metric function
    "standard-depthclip-crop": Protocol(
        input_box=FULL_FRAME,
        flip=False,
        resize="training",
        crop="depthclip",
        group=1,
        average=PER_IMAGE,
        scorer=score_per_image,
    ),
    "depthclip": Protocol(  # DepthCLIP's NYU script
        input_box=DEPTHCLIP_INPUT,
        flip=True,
        resize="training",
        crop="depthclip",
        group=1,
        average=PER_IMAGE,
        scorer=score_per_image,
    ),
    "authors": Protocol(  # the authors' second, readable script
        input_box=FULL_FRAME,
        flip=False,
        resize="pil-bicubic",
        crop="garg",
        group=AUTHORS_BATCH,
        average=PER_GROUP,
        scorer=score_authors,
    ),
}


def chosen_protocols(args):
    """{name: Protocol} that --protocol names; --crop and --flip set the standard protocol's."""
    names = PROTOCOLS if args.protocol == "all" else [args.protocol]
    chosen = {name: PROTOCOLS[name] for name in names}
    if "standard" in chosen:
        chosen["standard"] = replace(chosen["standard"], crop=args.crop, flip=args.flip)
    return chosen


def authors_order(ds, n):
    """Positions 0..n-1 as the authors' test list orders its frames: by scene type, then frame
    number (DepthCLIP's nyudepthv2_test_files_with_gt_dense.txt; docs/paper-notes.md §7)."""
    return sorted(range(n), key=lambda i: (ds.scene(i), i))  # positions ascend with frame numbers


def read_frames(ds, positions, device):
    """-> uint8 (B, 3, 480, 640) and float32 (B, 480, 640) tensors on device: from an NYU file in
    runs of consecutive frames (NYUDepthV2.frames), from other datasets frame by frame."""
    if hasattr(ds, "frames"):
        rgb, gt = ds.frames(positions)  # (B, H, W, 3), (B, H, W)
    else:
        rgb = np.stack([ds[i][0] for i in positions])
        gt = np.stack([ds[i][1] for i in positions])
    rgb = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(0, 3, 1, 2)  # channels last
    return rgb, torch.from_numpy(np.ascontiguousarray(gt)).to(device)


def describe(name, protocol, args, n, data, ceiling=None):
    """How a protocol made its numbers: printed first, and kept with them in the JSON line."""
    split = "official test"
    gt = {"raw": "rawDepths", "dense": "depths (in-painted)"}[args.gt]
    # generated rooms: their depth is exact, without Kinect holes
    if data == "synthetic":
        split = "synthetic"
        gt = "exact (synthetic)"
    about = {
        "split": f"{split} ({n} frames)",
        "gt": gt,
        "valid": f"{data_nyu.MIN_DEPTH:g} < gt < {data_nyu.MAX_DEPTH:g}",
        "input_box": protocol.input_box,
        "resize": protocol.resize,
        "crop": protocol.crop,
        "crop_box": data_nyu.CROPS[protocol.crop],
        "flip_tta": protocol.flip,
        "average": protocol.average,
    }
    if ceiling:
        grid = f"{ceiling[0] // PATCH}x{ceiling[1] // PATCH}"
        about["model"] = (
            f"ceiling: the least-squares {grid} output grid (input {ceiling[0]}x{ceiling[1]}), upsampled as "
            "the model's output is, over the scored pixels; cell_mean: the ground truth averaged on each cell"
        )
    return about


def predict_photos(photos, model, dtype, out_dir=None):
    """Your photos [(path, rgb)]: <name>_depth.npy, float32 metres at the photo's resolution, and
    <name>_depth.png, a picture to look at, next to each photo or in out_dir."""
    for path, rgb in photos:
        img = torch.from_numpy(rgb).to(next(model.parameters()).device).permute(2, 0, 1)[None]  # (1, 3, H, W)
        depth = predict_maps(model, img, dtype, rgb.shape[:2])["depth"][0].cpu().numpy()  # (H, W) metres
        stem = Path(out_dir or Path(path).parent) / f"{Path(path).stem}_depth"
        save_picture(f"{stem}.png", rgb, depth, title=Path(path).name)  # first: it makes out_dir
        clip_vit.atomic_write(f"{stem}.npy", lambda f: np.save(f, depth))
        print(f"{path}: depth {depth.min():.2f}-{depth.max():.2f} m -> {stem}.png, {stem}.npy")


# -----------------------------------------------------------------------------
# the script


class Parser(ArgumentParser):
    # the problem and where to look, not the whole usage
    def error(self, message):
        self.exit(2, f"error: {message}\npython {self.prog} --help lists every flag\n")


def parse_args():
    p = Parser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    # every help line: what it means, its format, its default
    arg = p.add_argument
    arg("ckpt", nargs="?", help="checkpoint written by train.py (or --zero-shot)")
    arg(
        "--ceiling",
        action="store_true",
        help="no model: the least-squares map of this output grid (the lowest RMSE any model's grid "
        "can score, per-image protocols), and the ground truth averaged on it (cell_mean)",
    )
    arg(
        "--zero-shot",
        action="store_true",
        help="no checkpoint: frozen CLIP, DepthCLIP's prompts "
        "and bins. On RN50 exactly DepthCLIP's code: 416x544 input, ImageNet mean/std, layer4 "
        "features, every other channel; on a ViT: 224x224, CLIP's mean/std, tokens through "
        "ln_post and proj (G23). Each follows its own reference",
    )
    arg("--protocol", choices=(*PROTOCOLS, "all"), default="standard", help="see above (default: standard)")
    arg(
        "--data",
        metavar="PATH",
        help="NYU labeled .mat, or synthetic: 654 generated rooms "
        f"(default: the file the run trained on, else {data_nyu.FILE_NAME})",
    )
    arg("--splits", metavar="PATH", help="splits.mat (default: next to --data, else the cache's)")
    arg(
        "--clip",
        metavar="NAME|PATH",
        help="CLIP weights: ViT-B/32, RN50 (--zero-shot only), a file, random (default: the run's; ViT-B/32)",
    )
    arg(
        "--gt",
        choices=("raw", "dense"),
        default="raw",
        help="ground truth: raw Kinect depth, holes = 0, or in-painted (default: raw)",
    )
    arg(
        "--crop",
        choices=tuple(data_nyu.CROPS),
        default="eigen",
        help="the standard protocol's crop (default: eigen, rows 45:471, cols 41:601; depthclip: "
        "cols 46:601 and only where the map is > 1e-3, DepthCLIP's mask)",
    )
    arg("--flip", action="store_true", help="standard protocol: add the mirrored prediction")
    arg(
        "--batch-size",
        type=int,
        default=16,
        metavar="N",
        help="frames per pass; with the authors' protocol rounded up to a multiple of 8 (default: 16)",
    )
    arg("--limit", type=int, metavar="N", help="score the first N frames only (default: all)")
    arg("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    arg(
        "--moa-impl",
        choices=("auto", "triton", "torch"),
        default="auto",
        help="the MoA layer's code (default: auto = Triton on CUDA, else PyTorch)",
    )
    fetch = p.add_mutually_exclusive_group().add_argument  # args.download: True, False or None
    fetch("--download", action="store_const", const=True, help="fetch a missing --data, any name")
    fetch("--no-download", dest="download", action="store_const", const=False, help="fetch nothing")
    arg("--save-vis", metavar="DIR", help="a labelled PNG per frame into DIR (default: none)")
    arg("--image", nargs="+", metavar="PHOTO", help="predict depth for these photos instead")
    arg("--out-dir", metavar="DIR", help="--image: write there (default: next to each photo)")
    args = p.parse_args()
    if (args.ckpt is None) != args.zero_shot and not args.ceiling:  # checked before any loading
        p.error("give either a checkpoint or --zero-shot (or --ceiling)")
    for flag, count in (("--batch-size", args.batch_size), ("--limit", args.limit)):
        if count is not None and count < 1:
            p.error(f"argument {flag}: {count} is not a count >= 1")
    for flag, folder in (("--save-vis", args.save_vis), ("--out-dir", args.out_dir)):
        if folder and Path(folder).exists() and not Path(folder).is_dir():
            p.error(f"{flag} {folder}: exists and is not a folder")
    return args


def open_data(args, config):
    """-> (the test frames, the name of their data): --data, else the data the run trained on."""
    data = args.data or config.get("data", data_nyu.FILE_NAME)
    if data == "synthetic":
        ds = data_nyu.SyntheticDepth(n=SYNTHETIC_TEST, seed=SYNTHETIC_SEED + config.get("seed", 0))
    else:
        ds = data_nyu.NYUDepthV2(
            data, split="test", splits_path=args.splits, raw_depth=args.gt == "raw", download=args.download
        )
    return ds, data


def evaluate_frames(ds, order, protocols, maps_of, device, args):
    """The frames at positions `order` under every protocol, read once per pass of --batch-size
    frames, rounded up to whole groups (the authors' batches of 8 stay whole).
    -> {protocol: {output key: [{metric: scores of a pass}]}}, the scores still on device."""
    rows = {name: defaultdict(list) for name in protocols}
    group = max(protocol.group for protocol in protocols.values())
    step = group * math.ceil(args.batch_size / group)
    for s in range(0, len(order), step):
        positions = order[s : s + step]
        rgb, gt = read_frames(ds, positions, device)  # (b, 3, 480, 640), (b, 480, 640)
        # protocols that feed the model alike share its maps: standard, standard-depthclip-crop (not the
        # ceiling's, fitted to the pixels each crop scores)
        maps_by_input = {}

        def maps_for(protocol):
            fed = (protocol.input_box, protocol.flip, protocol.resize, args.ceiling and protocol.crop)
            if fed not in maps_by_input:
                maps_by_input[fed] = maps_of(rgb, gt, protocol)  # {key: (b, 480, 640)}
            return maps_by_input[fed]

        for name, protocol in protocols.items():
            for key, metrics in protocol.scorer(maps_for(protocol), gt, protocol).items():
                rows[name][key].append(metrics)
        # pictures of the standard protocol's map of the whole frame
        if args.save_vis:
            standard = chosen_protocols(args).get("standard", PROTOCOLS["standard"])
            save_pictures(ds, positions, rgb, gt, maps_for(standard), args)
        print(f"evaluated {s + len(positions)}/{len(order)}", file=sys.stderr)
    return rows


def save_pictures(ds, positions, rgb, gt, maps, args):
    # the fused map (or the ceiling's)
    depth = next(iter(maps.values()))
    # named by the frame's position in the split
    for j, i in enumerate(positions):
        save_picture(
            Path(args.save_vis) / f"{i:04d}.png",
            rgb[j].permute(1, 2, 0).cpu().numpy(),
            depth[j].cpu().numpy(),
            gt[j].cpu().numpy(),
            title=f"frame {i}",
            scene=ds.scene(i),
            crop=args.crop,
        )


def report(rows, scenes, about):
    """A table per protocol on stdout: each output over all frames, then the first output per
    scene (not for the authors', whose rows are groups). -> {protocol: {output: means}}"""
    results = {}
    for name, outputs in rows.items():
        head = f"{name + ' protocol':<34}{'n':>5}" + "".join(f"{k:>10}" for k in data_nyu.KEYS)
        print(head + "\n" + "-" * len(head))
        scores = {
            key: {m: torch.cat([r[m] for r in rs]).cpu() for m in data_nyu.KEYS}
            for key, rs in outputs.items()
            # {key: {metric: one score per frame or group}}
        }
        # the output's name; a model with one output (the similarity head, zero-shot) has "depth" alone
        labels = {key: moa.OUTPUTS.get(key, key) for key in scores}
        # the one output of a similarity head or zero-shot model: not "fused"
        if list(scores) == ["depth"]:
            labels["depth"] = "depth"
        lines = [(f"all ({labels[key]})", s) for key, s in scores.items()]
        first = next(iter(scores.values()))
        # frames behind each score: 1 per image, or the size of each group (the last one may be short)
        group = PROTOCOLS[name].group
        frames = torch.tensor([min(group, len(scenes) - start) for start in range(0, len(scenes), group)])
        if about[name]["average"] == PER_IMAGE:
            for scene in sorted(set(scenes)):
                at = torch.tensor([where == scene for where in scenes])
                lines.append((scene, {m: v[at] for m, v in first.items()}))
        for label, s in lines:
            means = data_nyu.mean_metrics([s])
            # n counts frames, also where a score is a group's; NaN: no valid pixel in the frame (or group)
            scored = int(frames[: len(s["d1"])][~s["d1"].isnan()].sum())
            print(f"{label:<34}{scored:>5}" + "".join(f"{v:>10.4f}" for v in means.values()))
        results[name] = {"protocol": about[name]}
        # JSON has no NaN: null where nothing could be scored
        for key, s in scores.items():
            means = data_nyu.mean_metrics([s]).items()
            results[name][labels[key]] = {k: None if math.isnan(v) else v for k, v in means}
    return results


def main():
    args = parse_args()
    # a device this machine lacks: one error line
    device, dtype = moa.runtime(args.device)[:2]
    photos = [(path, read_photo(path)) for path in args.image or []]  # all readable, or stop here
    # no model: the ground truth on the output grid of a checkpoint's model (or 7x7)
    if args.ceiling:
        ckpt = moa.load_checkpoint(args.ckpt) if args.ckpt else {}
        model = None
    # DepthCLIP: CLIP as it is, so nothing is trained and no checkpoint read
    elif args.zero_shot:
        clip = clip_vit.load(args.clip or "ViT-B/32")
        ckpt = {}
        if isinstance(clip.visual, clip_vit.ModifiedResNet):  # RN50: DepthCLIP's own code, exactly
            model = moa.DepthCLIPZeroShot(clip).to(device).eval()
        # a ViT: DepthCLIP's prompts and bins on the ViT's tokens (G23)
        else:
            # one adapter there: identity at init
            last = (len(clip.visual.transformer.resblocks) - 1,)
            cfg = moa.DepthConfig(head="similarity", use_context=False, use_moa=False, moa_layers=last)
            model = moa.MoADepthCLIP(clip, cfg, moa_impl=args.moa_impl).to(device).eval()
    else:
        ckpt = moa.load_checkpoint(args.ckpt)  # its config: data, seed
        model = moa.from_checkpoint(ckpt, args.clip, device, where=args.ckpt, moa_impl=args.moa_impl)
    if photos:
        predict_photos(photos, model, dtype, args.out_dir)
        return

    ds, data = open_data(args, ckpt.get("config", {}))
    n = min(len(ds), args.limit or len(ds))  # --limit: the first N frames
    # one order for all: per-image scores do not depend on it
    order = authors_order(ds, n)
    protocols = chosen_protocols(args)
    # --ceiling: the input size whose output grid the ceiling is computed on; None: a model runs
    ceiling = None
    if args.ceiling:
        ceiling = tuple(ckpt.get("model_config", {}).get("input_size", moa.DepthConfig().input_size))
    about = {name: describe(name, p, args, n, data, ceiling) for name, p in protocols.items()}
    # say how the numbers are made before any number appears
    for name, lines in about.items():
        print(f"protocol {name}: " + ", ".join(f"{k}={v}" for k, v in lines.items()), file=sys.stderr)
    maps_of = partial(protocol_maps, model=model, dtype=dtype, ceiling=ceiling)
    rows = evaluate_frames(ds, order, protocols, maps_of, device, args)
    results = report(rows, [ds.scene(i) for i in order], about)
    # the headline: the first protocol's first output
    first = results[next(iter(protocols))]
    headline = next(v for k, v in first.items() if k != "protocol")
    print(
        json.dumps(
            {"metrics": headline, "n_images": n, "protocol": first["protocol"], "protocols": results},
            allow_nan=False,
        )
    )


if __name__ == "__main__":
    try:
        main()
    # a problem the user can fix: one line, no traceback
    except clip_vit.UserError as e:
        remove_empty_folders()
        sys.exit(f"error: {e}")
    # Ctrl-C: one line; every file written is whole (atomic_write)
    except KeyboardInterrupt:
        remove_empty_folders()
        print("interrupted: stopped before the end; the files written so far are complete", file=sys.stderr)
        # 128 + SIGINT: what a shell reports for a program stopped by Ctrl-C
        sys.exit(130)
