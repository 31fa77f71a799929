"""
Evaluate MoA-DepthCLIP on the 654 frames of NYU Depth V2's official test split, run zero-shot
DepthCLIP on the same CLIP, or predict depth for your own photos. Read top to bottom: the protocols,
how each scores, the model's maps, the evaluation loop; then the machinery (data, photos, flags).

    python evaluate.py out/model.pt                     # NYU test split, standard protocol
    python evaluate.py out/model.pt --protocol all --save-vis vis/   # every protocol; pictures
    python evaluate.py runs/s*/model.pt                 # several seeds: mean +- sd per metric
    python evaluate.py --zero-shot --clip RN50 --protocol depthclip   # DepthCLIP's row: a setup check
    python evaluate.py --zero-shot --protocol all       # zero-shot DepthCLIP on ViT-B/32
    python evaluate.py --ceiling --protocol all         # the least RMSE a 7x7 output grid can score
    python evaluate.py out/model.pt --image photo.jpg   # photo_depth: .npy, _mm.png, .ply (metres), .json
    python evaluate.py out/model.pt --data synthetic --limit 16   # offline, synthetic rooms

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
Scored alone: the depth (the dual head's fusion of its maps) and the dual head's binned and regressed
maps. Last stdout line: JSON.
"""

import json
import math
import os
import sys
from argparse import RawDescriptionHelpFormatter
from collections import defaultdict
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import cli
import clip_vit
import data_nyu
import moa
import pictures

# rows, cols of the whole 480x640 NYU frame; every crop here is defined on it
FULL_FRAME = (0, 480, 0, 640)
# rows, cols of the RGB crop DepthCLIP's model sees
DEPTHCLIP_INPUT = (56, 472, 60, 604)
# ViT-B/32: one output cell per 32x32 input pixels
PATCH = 32


# -----------------------------------------------------------------------------
# the protocols: what each feeds the model and how it scores (docs/paper-notes.md §7)
@dataclass(frozen=True)
class Protocol:
    # rows, cols of the 480x640 frame the model sees, pasted back there
    input_box: tuple
    # the pixels scored: a data_nyu.CROPS box (and 1e-3 < gt < 10); "depthclip": also where the map > 1e-3
    crop: str
    # the mean with the mirrored-back prediction of the mirrored input
    flip: bool = False
    # "training": as the model was trained; "pil-bicubic": the authors' script
    resize: str = "training"
    # frames scored together, consecutive in the order given: 1 = each alone; more: the authors' groups
    group: int = 1


PROTOCOLS = {
    # BTS, AdaBins
    "standard": Protocol(FULL_FRAME, "eigen"),
    # the authors' first (compiled) metric function: DepthCLIP's, on the whole frame
    "standard-depthclip-crop": Protocol(FULL_FRAME, "depthclip"),
    # DepthCLIP's NYU script
    "depthclip": Protocol(DEPTHCLIP_INPUT, "depthclip", flip=True),
    # the authors' second, readable script: it scales and pools per batch of 8
    "authors": Protocol(FULL_FRAME, "garg", resize="pil-bicubic", group=8),
}


def score(maps, gt, protocol):
    """{output key: (B, 480, 640) map} -> {output key: {metric: scores}}: one per frame, or per group.
    Per image (BTS, AdaBins, DepthCLIP): each frame on its own within the protocol's crop; under
    DepthCLIP's crop a pixel counts only where the map is > 1e-3, as DepthCLIP's metric function (and
    the authors' first, a copy) masks it. The authors' script: per group of 8 frames as their list
    orders them, the Garg crop, one scale median(gt) / median(pred) over the group's valid pixels
    (torch.median: the lower middle value), the metrics over those pixels pooled, with no clamp after
    the scaling."""
    if protocol.group == 1:
        return {
            key: data_nyu.depth_metrics(
                pred,
                torch.where(pred > data_nyu.MIN_DEPTH, gt, 0.0) if protocol.crop == "depthclip" else gt,
                protocol.crop,
            )
            for key, pred in maps.items()
        }
    r0, r1, c0, c1 = data_nyu.CROPS[protocol.crop]

    def groups(x):  # each group as one tall image
        return [g.reshape(1, -1, c1 - c0) for g in x[:, r0:r1, c0:c1].split(protocol.group)]

    scores = {}
    for key, depth in maps.items():
        rows = []
        for group_gt, pred in zip(groups(gt), groups(depth)):
            valid = data_nyu.valid_depth(group_gt)
            # NaN for a group without a valid pixel
            scale = group_gt[valid].median().double() / pred[valid].median().double()
            rows.append(data_nyu.depth_metrics(pred.double() * scale, group_gt, crop="none", clamp=False))
        scores[key] = {m: torch.cat([r[m] for r in rows]) for m in data_nyu.KEYS}
    return scores


# -----------------------------------------------------------------------------
# the maps a protocol scores: the model's prediction of its input box, or the ceiling's
@torch.no_grad()
def predict_maps(model, img, dtype, out_size, flip=False, resize="training"):
    """uint8 (B, 3, H, W) tensor -> {output key: (B, *out_size) float32 tensor, metres, clamped to
    the range}, on img's device. flip: the mean with the mirrored-back prediction of the mirrored
    image (run first, so that the model's gates are the plain image's). resize: "training"
    (data_nyu.resize, as the model was trained) or "pil-bicubic" (the authors' script: PIL's
    antialiased bicubic, whose result PIL rounds to uint8)."""
    cfg = model.cfg
    if resize == "pil-bicubic":
        x = data_nyu.bicubic(img.float(), cfg.input_size).round().clamp(0, 255) / 255
    else:
        x = data_nyu.resize(img, None, cfg.input_size)[0]
    x = data_nyu.normalize(x)
    with torch.autocast(img.device.type, dtype=dtype, enabled=dtype is not None):
        mirrored = model(x.flip(-1)) if flip else None
        out = model(x)
    maps = {}
    for key in [k for k in moa.OUTPUTS if k in out]:
        depth = out[key].float()  # (B, 1, h, w)
        if flip:
            depth = 0.5 * (depth + mirrored[key].float().flip(-1))
        maps[key] = F.interpolate(depth, out_size, mode="bilinear")[:, 0].clamp(cfg.min_depth, cfg.max_depth)
    return maps


def protocol_maps(rgb, gt, protocol, model=None, dtype=None, ceiling_input=None):
    """The maps a protocol scores, {output key: (B, 480, 640)}: the model's prediction of its input box,
    or with ceiling_input (an input size) the ceiling's, pasted into a zero frame."""
    r0, r1, c0, c1 = protocol.input_box
    size = (r1 - r0, c1 - c0)
    if ceiling_input:
        # the ground truth of the pixels the protocol's crop scores
        k0, k1, j0, j1 = data_nyu.CROPS[protocol.crop] or FULL_FRAME
        scored = torch.zeros_like(gt)
        scored[:, k0:k1, j0:j1] = gt[:, k0:k1, j0:j1]
        maps = ceiling_maps(scored[:, r0:r1, c0:c1], ceiling_input, size)
    else:
        maps = predict_maps(model, rgb[..., r0:r1, c0:c1], dtype, size, protocol.flip, protocol.resize)
    # as DepthCLIP pastes it into the whole frame: zeros around the box (left, right, top, bottom)
    _, height, _, width = FULL_FRAME
    return {key: F.pad(depth, (c0, width - c1, r0, height - r1)) for key, depth in maps.items()}


# --ceiling's least squares: its pull towards the cell means, against ~6,000 pixels' weight per cell
CEILING_RIDGE = 1e-9


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
    grid = [size // PATCH for size in input_size]
    valid = data_nyu.valid_depth(gt).double()  # (B, H, W)
    depth = gt.double() * valid
    # each cell's sum / its pixels (holes as 0), and its valid share
    depth_mean, valid_mean = F.adaptive_avg_pool2d(torch.stack([depth, valid]), grid)
    frame_mean = depth.sum((1, 2), keepdim=True) / valid.sum((1, 2), keepdim=True).clamp_min(1)
    means = torch.where(valid_mean > 0, depth_mean / valid_mean.clamp_min(1e-12), frame_mean)  # (B, gh, gw)

    # bilinear resizing is separable: a grid g's map is R^T g C, R and C the unit vectors of each axis
    # resized as the model resizes (to input_size in the forward, to out_size in predict_maps)
    def weights(axis):  # (cells along the axis, out_size[axis])
        x = torch.eye(grid[axis], dtype=torch.float64, device=gt.device)[:, None]
        for size in (input_size[axis], out_size[axis]):
            x = F.interpolate(x, size, mode="linear")
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


# -----------------------------------------------------------------------------
# the evaluation: every protocol over the test frames, each frame read once
def evaluate_frames(ds, order, protocols, maps_of, device, args, model=None, made=None):
    """The frames at positions `order` under every protocol, read once per pass of --batch-size frames,
    rounded up to whole groups (the authors' batches of 8 stay whole); maps_of(rgb, gt, protocol): the
    maps it scores. -> ({protocol: [{output key: {metric: scores}} of each pass]}, {scene: (layers, E)
    summed expert shares} of the model's gates)."""
    rows = defaultdict(list)
    shares = defaultdict(int)
    group = max(protocol.group for protocol in protocols.values())
    step = group * math.ceil(args.batch_size / group)
    for s in range(0, len(order), step):
        positions = order[s : s + step]
        # uint8 (B, 480, 640, 3) and float32 (B, 480, 640) on device
        rgb, gt = (torch.from_numpy(np.stack(x)).to(device) for x in zip(*(ds[i] for i in positions)))
        # protocols that feed the model alike share its maps: standard, standard-depthclip-crop (not the
        # ceiling's, fitted to the pixels each crop scores)
        maps_by_input = {}
        gates = None
        for name, protocol in protocols.items():
            fed = (protocol.input_box, protocol.flip, protocol.resize, args.ceiling and protocol.crop)
            if fed not in maps_by_input:
                maps_by_input[fed] = maps_of(rgb.permute(0, 3, 1, 2), gt, protocol)
                # the MoA gates of the first protocol's input
                gates = gates or gates_of(model)
            rows[name].append(score(maps_by_input[fed], gt, protocol))
        if gates:
            for j, i in enumerate(positions):
                shares[ds.scene(i)] += pictures.expert_shares([g[j] for g in gates.values()])
        if args.save_vis:
            save_pictures(ds, positions, rgb, gt, next(iter(maps_by_input.values())), gates, args, made)
        print(f"evaluated {s + len(positions)}/{len(order)}", file=sys.stderr)
        cli.stop_if_interrupted()
    return rows, shares


def gates_of(model):
    """{"block i": the patch tokens' gates of the model's last forward, (B, gh*gw, E)} per MoA layer, or
    None (no MoA: the ceiling, zero-shot models, plain adapters)."""
    layers = getattr(model, "moa", [])
    if layers and layers[0].gated:
        return {f"block {i}": m.last_gates[:, 1:].cpu().numpy() for i, m in zip(model.cfg.moa_layers, layers)}


def report(rows, scenes, about):
    """A table per protocol on stdout: each output over all frames, then the first output per
    scene (not for the authors', whose rows are groups). -> {protocol: {output: means}}"""
    results = {}
    for name, passes in rows.items():
        head = f"{name + ' protocol':<34}{'n':>5}" + "".join(f"{k:>10}" for k in data_nyu.KEYS)
        print(head + "\n" + "-" * len(head))
        # {output: {metric: one score per frame or group}}
        scores = {
            moa.OUTPUTS.get(key, key): {
                m: torch.cat([p[key][m] for p in passes]).cpu() for m in data_nyu.KEYS
            }
            for key in passes[0]
        }
        # (its text, the output it is in the JSON or None, the scores)
        lines = [(f"all ({label})", label, s) for label, s in scores.items()]
        group = PROTOCOLS[name].group
        if group == 1:
            first = next(iter(scores.values()))
            for scene in sorted(set(scenes)):
                at = torch.tensor([where == scene for where in scenes])
                lines.append((scene, None, {m: v[at] for m, v in first.items()}))
        results[name] = {"protocol": about[name]}
        for text, label, s in lines:
            means = data_nyu.mean_metrics([s])
            # n counts frames: each score repeated once per frame behind it (its group's; the last group
            # may be short); NaN: no valid pixel in the frame (or group)
            scored = int((~s["d1"].repeat_interleave(group)[: len(scenes)].isnan()).sum())
            print(f"{text:<34}{scored:>5}" + "".join(f"{v:>10.4f}" for v in means.values()))
            if label:
                # JSON has no NaN: null where nothing could be scored
                results[name][label] = {k: None if math.isnan(v) else v for k, v in means.items()}
    return results


def report_experts(shares, scenes, layers):
    """Each expert's share of the gate weight, per scene type and MoA layer: do the experts specialise?
    -> {layer: {scene: [share per expert]}}"""
    print("expert shares (mean gate per expert over a scene's patches)")
    table = {}
    for scene in sorted(shares):
        mean = shares[scene] / scenes.count(scene)  # (layers, E)
        print(
            f"{scene:<24}"
            + "  ".join(f"L{layer} " + " ".join(f"{v:.2f}" for v in row) for layer, row in zip(layers, mean))
        )
        for layer, row in zip(layers, mean):
            table.setdefault(f"L{layer}", {})[scene] = [round(float(v), 4) for v in row]
    return table


# DepthCLIP's published NYU row (its paper, Table 1), and how far a correct setup may land from it
DEPTHCLIP_ROW = {"d1": 0.394, "d2": 0.683, "d3": 0.851, "abs_rel": 0.388, "rmse": 1.167}
TOLERANCE = {"d1": 0.01, "d2": 0.01, "d3": 0.01, "abs_rel": 0.01, "rmse": 0.03}


def verdict(metrics, n):
    """The setup check's one line: zero-shot DepthCLIP on RN50 against DepthCLIP's published row, within
    TOLERANCE (docs/paper-notes.md §7), or which metric is off, by how much, and the usual causes."""
    off = {k: metrics[k] - v for k, v in DEPTHCLIP_ROW.items() if not abs(metrics[k] - v) <= TOLERANCE[k]}
    if n != 654:
        return (
            f"setup check: {n} frames, not the 654 of NYU's test split; the check needs them all (no --limit)"
        )
    if not off:
        return "setup check: matches DepthCLIP's published row within " + ", ".join(
            f"{k} +-{t}" for k, t in TOLERANCE.items()
        )
    diffs = ", ".join(f"{k} {metrics[k]:.3f} ({v:+.3f} from {DEPTHCLIP_ROW[k]})" for k, v in off.items())
    cause = (
        "depths in other units (millimetres?)"
        if metrics["rmse"] > 100 * DEPTHCLIP_ROW["rmse"] or metrics["d1"] < 0.01
        else "ground truth in-painted instead of raw (--gt raw), another crop, or another split"
    )
    return f"setup check: off DepthCLIP's published row: {diffs}; usually {cause}"


def spread(runs):
    """Each metric's mean and sample standard deviation over runs (several seeds' checkpoints), per
    protocol, of each run's first output. -> {protocol: {metric: [mean, sd]}}"""
    table = {}
    for name in runs[0][1]:
        values = np.array([list(headline(result[name]).values()) for _, result in runs], dtype=float)
        print(f"{name} protocol over {len(runs)} runs (first output)")
        for (path, _), row in zip(runs, values):
            print(f"{str(path):<34}" + "".join(f"{v:>10.4f}" for v in row))
        # (metric, [mean, sd])
        pairs = np.stack([values.mean(0), values.std(0, ddof=1)], 1)
        print(f"{'mean +- sd':<34}" + "".join(f"{m:>7.4f}+-{s:.4f}" for m, s in pairs))
        table[name] = dict(zip(data_nyu.KEYS, pairs.tolist()))
    return table


# a protocol's first output: the model's depth, or the ceiling's least-squares map
def headline(result):
    return next(v for k, v in result.items() if k != "protocol")


def evaluate(args, ckpt_path, rt, made):
    """One model (a checkpoint, zero-shot DepthCLIP or the ceiling) on the test frames under each chosen
    protocol: the tables, then -> the JSON line: its first protocol's metrics, n_images, every protocol's
    {"protocol": how, output: mean metrics}, and the expert shares and setup check where there are."""
    ckpt, model = load_model(args, ckpt_path, rt)
    ceiling_input = args.ceiling and tuple(
        ckpt.get("model_config", {}).get("input_size", moa.DepthConfig().input_size)
    )
    # --data, else the data the run trained on
    data = args.data or ckpt.get("data") or data_nyu.FILE_NAME
    ds = (
        data_nyu.SyntheticDepth(SYNTHETIC_TEST, SYNTHETIC_SEED + (ckpt.get("seed") or 0))
        if data == "synthetic"
        else data_nyu.NYUDepthV2(
            data, "test", args.splits, raw_depth=args.gt == "raw", download=args.download
        )
    )
    n = min(len(ds), args.limit or len(ds))
    # one order for all: per-image scores do not depend on it
    order = authors_order(ds, n)
    scenes = [ds.scene(i) for i in order]
    # --crop and --flip set the standard protocol's
    protocols = {
        name: replace(p, crop=args.crop, flip=args.flip) if name == "standard" else p
        for name, p in PROTOCOLS.items()
        if args.protocol in (name, "all")
    }
    # how the numbers are made, before any number appears
    about = {name: describe(name, p, args, n, data, ceiling_input) for name, p in protocols.items()}
    maps_of = partial(protocol_maps, model=model, dtype=rt.dtype, ceiling_input=ceiling_input)
    rows, shares = evaluate_frames(ds, order, protocols, maps_of, rt.device, args, model, made)
    results = report(rows, scenes, about)
    first = results[next(iter(protocols))]
    if headline(first)["d1"] is None:
        raise clip_vit.UserError(
            f"{data}: no test frame has a valid ground-truth pixel ({data_nyu.VALID}): depths in millimetres?"
        )
    line = {"metrics": headline(first), "n_images": n, "protocol": first["protocol"], "protocols": results}
    if shares:
        line["expert_shares"] = report_experts(shares, scenes, model.cfg.moa_layers)
    if isinstance(model, moa.DepthCLIPZeroShot) and "depthclip" in results:
        line["setup_check"] = verdict(headline(results["depthclip"]), n)
        print(line["setup_check"])
    return line


def main(args, made):
    """Photos, or the test frames for each checkpoint given (their spread over several), and the JSON line."""
    rt = moa.runtime(args.device)
    if args.image:
        return predict_photos(args, rt, made)
    runs = []
    for ckpt_path in args.ckpt or [None]:
        line = evaluate(args, ckpt_path, rt, made)
        runs.append((ckpt_path, line["protocols"]))
    if len(runs) > 1:
        line = {
            "spread": spread(runs),
            "n_images": line["n_images"],
            "runs": [{"checkpoint": str(p), "protocols": r} for p, r in runs],
        }
    print(json.dumps(line, allow_nan=False))


# =============================================================================
# machinery: the test frames, how a protocol is described, pictures, your photos, flags
SYNTHETIC_TEST = 654  # NYU's test size
# + the run's seed: rooms the run never trained on
SYNTHETIC_SEED = 10_000


def authors_order(ds, n):
    """Positions 0..n-1 as the authors' test list orders its frames: by scene type, then frame
    number (DepthCLIP's nyudepthv2_test_files_with_gt_dense.txt; docs/paper-notes.md §7)."""
    return sorted(range(n), key=lambda i: (ds.scene(i), i))


def describe(name, protocol, args, n, data, ceiling_input):
    """How a protocol made its numbers: printed (to stderr) first, and kept with them in the JSON line."""
    synthetic = data == "synthetic"
    about = {
        "split": f"{'synthetic' if synthetic else 'official test'} ({n} frames)",
        "gt": "exact (synthetic)"
        if synthetic
        else {"raw": "rawDepths", "dense": "depths (in-painted)"}[args.gt],
        "valid": data_nyu.VALID,
        "input_box": protocol.input_box,
        "resize": protocol.resize,
        "crop": protocol.crop,
        "crop_box": data_nyu.CROPS[protocol.crop],
        "flip_tta": protocol.flip,
        "average": "per image, then the mean over images"
        if protocol.group == 1
        else f"per group of {protocol.group} frames in the authors' list order (scene type, then frame): "
        "median-scaled, pixels pooled, then the mean over groups",
    }
    if ceiling_input:
        about["model"] = (
            f"ceiling: the least-squares {ceiling_input[0] // PATCH}x{ceiling_input[1] // PATCH} output grid (input {ceiling_input[0]}x{ceiling_input[1]}), "
            "upsampled as the model's output is, over the scored pixels; cell_mean: the ground truth averaged on each cell"
        )
    print(f"protocol {name}: " + ", ".join(f"{k}={v}" for k, v in about.items()), file=sys.stderr)
    return about


def save_pictures(ds, positions, rgb, gt, maps, gates, args, made):
    """--save-vis, rgb uint8 (B, 480, 640, 3): per frame <frame number>.png (RGB, the first output,
    ground truth, |error|) and, for a MoA model, <frame number>_gates.png (the expert that wins each
    patch, per layer)."""
    made += pictures.make_folder(args.save_vis)
    depth = next(iter(maps.values()))
    for j, i in enumerate(positions):
        # the frame's index in NYU's labeled file (0-based), or its position in other data
        frame = int(ds.indices[i]) if hasattr(ds, "indices") else i
        path = Path(args.save_vis) / f"{frame:04d}"
        image = rgb[j].cpu().numpy()
        pictures.save_frame_picture(
            f"{path}.png",
            image,
            depth[j].cpu().numpy(),
            gt[j].cpu().numpy(),
            title=f"frame {frame}",
            scene=ds.scene(i),
            crop=args.crop,
        )
        if gates:
            pictures.save_gate_panel(f"{path}_gates.png", image, [g[j] for g in gates.values()], list(gates))


def load_model(args, ckpt_path, rt):
    """-> (the checkpoint or {}, the model or None for the ceiling): zero-shot DepthCLIP on --clip, or the
    checkpoint's model on its CLIP weights."""
    ckpt = moa.load_checkpoint(ckpt_path) if ckpt_path else {}
    if args.ceiling:
        return ckpt, None
    if args.zero_shot:
        return ckpt, moa.build_model(clip_vit.load(args.clip or "ViT-B/32"), None, args.moa_impl).to(
            rt.device
        ).eval()
    return ckpt, moa.from_checkpoint(ckpt, args.clip, rt.device, ckpt_path, args.moa_impl)


def predict_photos(args, rt, made):
    """--image: per photo, beside it or in --out-dir, <name>_depth.npy (float32 metres at the photo's size),
    .png (a picture), _mm.png (16-bit millimetres), .ply (a point cloud) and .json (units, range,
    intrinsics and where they came from, the model), and _gates.png for a MoA model."""
    paths = pictures.photo_paths(args.image)
    # two photos with one name (room.jpg, room.png) keep their suffix in their outputs' names
    names = [p.stem for p in paths]
    stems = [
        Path(args.out_dir or p.parent)
        / f"{p.stem if names.count(p.stem) == 1 else p.name.replace('.', '_')}_depth"
        for p in paths
    ]
    for stem in stems:
        check_folder("--out-dir" if args.out_dir else "the photo's folder", stem.parent)
    ckpt_path = args.ckpt[0] if args.ckpt else None
    ckpt, model = load_model(args, ckpt_path, rt)
    cfg = model.cfg
    for path, stem in zip(paths, stems):
        rgb, notes, focal35 = pictures.read_photo(path)
        img = torch.from_numpy(rgb).to(rt.device).permute(2, 0, 1)[None]
        depth = predict_maps(model, img, rt.dtype, rgb.shape[:2])["depth"][0].cpu().numpy()
        made += pictures.make_folder(stem.parent)
        sidecar = {
            "photo": path.name,
            "checkpoint": str(ckpt_path) if ckpt_path else "zero-shot DepthCLIP",
            "clip": ckpt.get("clip", {"name": args.clip or "ViT-B/32"}),
            "output_grid": f"{cfg.input_size[0] // PATCH}x{cfg.input_size[1] // PATCH} cells for a {cfg.input_size[0]}x{cfg.input_size[1]} input, bilinearly upsampled to the photo: an indoor model, {cfg.min_depth:g}-{cfg.max_depth:g} m",
        }
        intrinsics = pictures.photo_intrinsics(rgb.shape, args.focal, focal35)
        pictures.write_photo_outputs(stem, rgb, depth, intrinsics, sidecar, (cfg.min_depth, cfg.max_depth))
        if gates := gates_of(model):
            pictures.save_gate_panel(f"{stem}_gates.png", rgb, [g[0] for g in gates.values()], list(gates))
        print(
            f"{path}: depth {depth.min():.2f}-{depth.max():.2f} m -> {stem}.npy, .png, _mm.png, .ply, .json"
        )
        for note in [*notes, pictures.cap_warning(depth, cfg.max_depth)]:
            if note:
                print(f"note: {path}: {note}", file=sys.stderr)


def check_folder(flag, folder):
    """Before any work: an output folder is a folder (or can be made) and can be written to."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise clip_vit.UserError(f"{flag} {folder}: exists and is not a folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise clip_vit.UserError(f"{flag} {folder}: cannot write there ({existing} is read-only)")


def parse_args(argv=None):
    p = cli.ArgumentParser(
        prog="evaluate.py", description=__doc__, formatter_class=RawDescriptionHelpFormatter
    )
    arg = p.add_argument
    arg(
        "ckpt", nargs="*", help="checkpoints written by train.py (model.pt or ckpt.pt); several: their spread"
    )
    arg(
        "--ceiling",
        action="store_true",
        help="no model: the least-squares map of this output grid (the lowest RMSE any model's grid can score, per-image protocols), and the ground truth averaged on it (cell_mean)",
    )
    arg(
        "--zero-shot",
        action="store_true",
        help="no checkpoint: frozen CLIP, DepthCLIP's prompts and bins. On RN50 exactly DepthCLIP's code: 416x544 input, ImageNet mean/std, layer4 features, every other channel; on a ViT: 224x224, CLIP's mean/std, tokens through ln_post and proj (G23). Each follows its own reference",
    )
    arg("--protocol", choices=(*PROTOCOLS, "all"), default="standard", help="see above (default: standard)")
    arg(
        "--data",
        metavar="PATH",
        help=f"NYU labeled .mat, or synthetic: 654 generated rooms (default: the file the run trained on, else {data_nyu.FILE_NAME})",
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
        help="the standard protocol's crop (default: eigen, rows 45:471, cols 41:601; depthclip: cols 46:601 and only where the map is > 1e-3, DepthCLIP's mask)",
    )
    arg("--flip", action="store_true", help="standard protocol: add the mirrored prediction")
    arg(
        "--batch-size",
        type=int,
        default=16,
        metavar="N",
        help="frames per pass, each ~80 MB on a CPU; with the authors' protocol rounded up to a multiple of 8 (default: 16)",
    )
    arg("--limit", type=int, metavar="N", help="score the first N frames only (default: all)")
    arg("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    arg(
        "--moa-impl",
        choices=moa.MOA_IMPLS,
        default="auto",
        help="the MoA layer's code (default: auto = Triton on CUDA, else PyTorch)",
    )
    fetch = p.add_mutually_exclusive_group().add_argument
    fetch("--download", action="store_const", const=True, help="fetch a missing --data, any name")
    fetch("--no-download", dest="download", action="store_const", const=False, help="fetch nothing")
    arg(
        "--save-vis",
        metavar="DIR",
        help="per frame <frame index in the labeled file>.png (and _gates.png for a MoA model) into DIR",
    )
    arg("--image", nargs="+", metavar="PHOTO", help="predict depth for these photos (or a folder's) instead")
    arg("--out-dir", metavar="DIR", help="--image: write there (default: next to each photo)")
    arg(
        "--focal",
        type=float,
        metavar="PIXELS",
        help="--image: the camera's focal length for the point cloud (default: EXIF's, else NYU's Kinect scaled to the photo)",
    )
    args = p.parse_args(argv)
    if bool(args.ckpt) == args.zero_shot and not args.ceiling:
        p.error("give either a checkpoint (several: their spread) or --zero-shot (or --ceiling)")
    if len(args.ckpt) > 1 and (args.image or args.ceiling):
        p.error("--image and --ceiling take one checkpoint")
    for name in ("batch_size", "limit", "focal"):
        count = getattr(args, name)
        if count is not None and not count > 0:
            p.error(f"argument {moa.flag(name)}: {count} is not > 0")
    # flags that mean nothing with --image, and flags that mean something only with it
    not_for_photos = ("ceiling", "protocol", "data", "splits", "gt", "crop", "flip", "limit", "save_vis")
    for name in not_for_photos if args.image else ("out_dir", "focal"):
        if getattr(args, name) != p.get_default(name):
            p.error(f"{moa.flag(name)}: does nothing {'with' if args.image else 'without'} --image")
    for flag, folder in (("--save-vis", args.save_vis), ("--out-dir", args.out_dir)):
        if folder:
            try:
                check_folder(flag, folder)
            except clip_vit.UserError as e:
                p.error(str(e))
    return args


if __name__ == "__main__":
    args = parse_args()
    # the folders this run made: removed again if still empty when it stops early
    made = []
    cli.run(
        lambda: main(args, made),
        lambda: "stopped before the end; the files written so far are complete",
        "lower --batch-size (a frame costs about 80 MB)",
        on_failure=lambda: pictures.remove_empty_folders(made),
    )
