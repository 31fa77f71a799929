"""
NYU Depth V2 for monocular depth: the labeled file (MATLAB v7.3, 1449 RGB-D frames at 640x480,
Silberman et al., ECCV 2012) with its official 795/654 split, procedural rooms for offline runs,
batches preloaded on the device, and the one metrics function (BTS/AdaBins formulas).

    ds = data_nyu.NYUDepthV2("nyu_depth_v2_labeled.mat", split="train")
    rgb, depth = ds[0]                  # uint8 (480, 640, 3), float32 (480, 640) metres
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# CLIP's pixel normalisation (normalize), the cache folder, downloads and the UserError
import clip_vit
from clip_vit import UserError, normalize

FILE_NAME = "nyu_depth_v2_labeled.mat"  # https://cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html
URL = "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/" + FILE_NAME
SPLITS_URL = "http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat"
SPLITS_SHA256 = "6e081404491a8bfba2f066beaa9713ef6046f9007aa5f799f2a350506a580cee"
# the usual valid range (BTS, AdaBins), both ends exclusive
MIN_DEPTH, MAX_DEPTH = 1e-3, 10.0
VALID = f"{MIN_DEPTH:g} < depth < {MAX_DEPTH:g} m"


# the pixels with a depth reading in the valid range, compared in depth's own dtype
def valid_depth(depth):
    return (depth > MIN_DEPTH) & (depth < MAX_DEPTH)


# -----------------------------------------------------------------------------
# the official file
def read_splits(path):
    """splits.mat (MATLAB v5) -> {"train", "test"}: int64 frame indices, 0-based, ascending."""
    import scipy.io

    try:
        m = scipy.io.loadmat(path)
    # scipy raises ValueError, TypeError, OSError... on a bad file
    except Exception as e:
        problem = " ".join(f"{type(e).__name__}: {e}".split())
        raise UserError(f"{path}: cannot read as a MATLAB v5 MAT-file ({problem})") from None
    out = {}
    for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
        idx = np.sort(np.ravel(m.get(key, []))).astype(np.int64)  # stored 1-based, uint16 (795, 1)
        if idx.size == 0 or idx[0] < 1 or not np.diff(idx).all():
            raise UserError(f"{path}: '{key}' missing, or not distinct 1-based frame numbers")
        out[split] = idx - 1
    if np.intersect1d(out["train"], out["test"]).size:
        raise UserError(f"{path}: train and test splits overlap")
    return out


def fetch(path, download=None):
    """The labeled file at `path`, downloaded if missing: always with download=True, never with
    False, with None only under its official name. Never into a missing folder (that is a typo)."""
    path = Path(path)
    if path.exists():
        return path
    if not path.parent.is_dir():
        raise UserError(f"{path}: no folder {path.parent} (a typo?); nothing was created or downloaded")
    if download is False or (download is None and path.name != FILE_NAME):
        raise UserError(
            f"{path}: not found; --download fetches it from {URL} (2.97 GB, "
            "no official checksum), or put a copy fetched by hand at exactly this path"
        )
    return clip_vit.download(URL, path)


def hdf5_problem(e):
    """h5py's OSError, C details over several lines -> a few words on one line."""
    text = " ".join(str(e).split())
    truncated = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", text)
    if truncated:
        have, want = map(int, truncated.groups())
        return f"truncated: {have:,} of {want:,} bytes (an unfinished download or copy?)"
    if "file signature not found" in text:
        return "not a MATLAB v7.3 MAT-file (HDF5), as NYU's labeled file is"
    reason = re.search(r"\(([^,()]*)", text)  # h5py's first clause in brackets
    return f"not readable as a MATLAB v7.3 MAT-file (HDF5: {reason[1] if reason else type(e).__name__})"


class NYUDepthV2:
    """ds[i] -> (rgb, depth): the i-th frame of the split, in file order; depth is the in-painted
    `depths`, or `rawDepths` (0 = no reading) with raw_depth. splits.mat: splits_path, else beside
    the data file, else the cache, else downloaded."""

    def __init__(self, mat_path, split="train", splits_path=None, raw_depth=False, download=None):
        import h5py

        self.path = fetch(mat_path, download)
        self.key = "rawDepths" if raw_depth else "depths"
        if self.path.is_dir():
            raise UserError(f"{self.path}: a directory, not NYU's labeled file ({FILE_NAME})")
        # v7.3 is HDF5 behind a 512-byte MAT header; the bytes decide, not the name
        try:
            self.h5 = h5py.File(self.path, "r", rdcc_nbytes=32 << 20)  # in case chunks span frames
        except OSError as e:
            raise UserError(f"{self.path}: {hdf5_problem(e)}") from None
        # None: missing
        im, dp, sc = [getattr(self.h5.get(k), "shape", None) for k in ("images", self.key, "sceneTypes")]
        if im is None or len(im) != 4 or im[1] != 3 or dp != (im[0], *im[2:]) or sc != (1, im[0]):
            raise UserError(
                f"{self.path}: not NYU's labeled file: images, {self.key}, sceneTypes are "
                f"{im}, {dp}, {sc}, not (N, 3, W, H), (N, W, H), (1, N) in h5py's order"
            )
        if split == "all":
            self.indices = np.arange(im[0])
            return
        splits_path = Path(splits_path) if splits_path else self._find_splits(download)
        self.indices = read_splits(splits_path)[split]
        if self.indices[-1] >= im[0]:
            raise UserError(
                f"{splits_path}: {split} frame {self.indices[-1] + 1} (1-based) is "
                f"out of range for {self.path}, which has {im[0]} frames"
            )

    def _find_splits(self, download):
        cached = clip_vit.cache_dir("nyu_depth_v2") / "splits.mat"
        for path in (self.path.parent / "splits.mat", cached):
            if path.exists():
                return path
        if download is False:
            raise UserError(
                f"{cached}: splits.mat not found there or next to {self.path}; drop "
                f"--no-download to fetch it, or put it in either place (SHA-256 {SPLITS_SHA256})"
            )
        return clip_vit.download(SPLITS_URL, cached, sha256=SPLITS_SHA256)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        # IndexError past the end, as a sequence should
        j = int(self.indices[i])
        try:
            rgb = self.h5["images"][j].T  # (3, W, H) -> (H, W, 3)
            depth = self.h5[self.key][j].T  # (W, H) -> (H, W)
        except OSError as e:
            raise UserError(f"{self.path}: cannot read frame {j}: {hdf5_problem(e)}") from None
        return np.ascontiguousarray(rgb, np.uint8), np.ascontiguousarray(depth, np.float32)

    # e.g. "kitchen": train.py holds out whole scenes for validation
    def scene(self, i):
        # a reference to a MATLAB string
        ref = self.h5["sceneTypes"][0, self.indices[i]]
        return "".join(map(chr, self.h5[ref][()].ravel()))  # its uint16 codes (L, 1)


# -----------------------------------------------------------------------------
# an offline stand-in with exactly known depth
@dataclass(eq=False)
class SyntheticDepth:
    """A pinhole view into a box-shaped room, deterministic per (seed, i), depth in [0.5, 9.5] m.
    Its checkerboard gets finer and darker with distance: colour carries depth cues to learn."""

    n: int = 48
    seed: int = 0
    height: int = 480
    width: int = 640
    SCENES = ("bedroom", "kitchen", "living_room", "office", "bathroom")

    def __len__(self):
        return self.n

    def scene(self, i):
        return self.SCENES[i % len(self.SCENES)]

    def __getitem__(self, i):
        if not -self.n <= i < self.n:
            raise IndexError(f"frame {i} out of range for {self.n} frames")
        rng = np.random.default_rng([self.seed, i % self.n])
        H, W = self.height, self.width
        # NYU's focal length, scaled to the width
        f = 518.8579 * W / 640
        dy, dx = np.mgrid[-H / 2 : H / 2, -W / 2 : W / 2].astype(np.float32) / f  # rays (dx, dy, 1)
        floor, ceiling, side, back = rng.uniform([1, 1, 1.5, 4], [1.6, 1.6, 3, 9])  # metres away
        # a ray parallel to a plane meets it very far away
        eps = 1e-6
        z = np.stack(
            [
                floor / np.maximum(dy, eps),
                ceiling / np.maximum(-dy, eps),  # (4, H, W)
                side / np.maximum(np.abs(dx), eps),
                np.full((H, W), back),
            ]
        )  # ray x plane
        # the nearest surface along each ray, and its depth
        surface = z.argmin(0)
        depth = np.clip(z.min(0), 0.5, 9.5).astype(np.float32)
        checker = np.floor(2 * np.stack([dx * depth, dy * depth, depth])).sum(0) % 2
        shade = (1 - 0.07 * depth) * (0.8 + 0.2 * checker)  # (H, W) darker and finer farther away
        colour = rng.uniform(0.7, 1.0, (4, 3))[surface]  # (H, W, 3) one tint per plane
        rgb = colour * shade[..., None] + rng.normal(0, 0.02, (H, W, 3))
        return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), depth


# -----------------------------------------------------------------------------
# frames -> tensors -> batches
def bicubic(x, size):
    """(B, 3, H, W) floats -> (B, 3, h, w): antialiased bicubic to size, as PIL's BICUBIC resizes."""
    return F.interpolate(x, size, mode="bicubic", antialias=True)


def resize(img, depth, size):
    """uint8 (B, 3, H, W), float (B, 1, H, W) or None -> float (B, 3, h, w) in [0, 1], float32
    (B, 1, h, w): the one resize, for training and evaluation. Both whole frames go to exactly
    (h, w), so they stay aligned (the authors' training code crops the RGB but not the depth, G16).
    The image: antialiased bicubic, as CLIP's own preprocessing and the authors' scripts (PIL's
    BICUBIC) resize; it overshoots a little, hence the clamp to [0, 1]."""
    img = bicubic(img.float() / 255, size)
    if depth is not None:
        # nearest-exact takes the source pixel whose centre is nearest, on the same pixel-centre grid
        # as the image's resize: depth edges land where image edges land, and a hole (0) is never
        # averaged with its neighbours into a false depth, as bilinear or bicubic would do
        depth = F.interpolate(depth.float(), size, mode="nearest-exact")
    return img.clamp(0, 1), depth


class PreloadedBatches:
    """Frames (items: positions into dataset) decoded ONCE onto `device`, served as batches of
    {"image", "depth", "mask"}: shuffled, a new order per epoch (set_epoch), full batches only; or
    every frame once, in order. augment: flip image and depth together, brightness, contrast."""

    def __init__(
        self, dataset, size=224, batch_size=8, device="cpu", shuffle=True, seed=0, augment=False, items=None
    ):
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self.epoch = 0
        items = range(len(dataset)) if items is None else items
        images = []
        depths = []
        # 32 frames at a time: batched resizes, bounded memory
        for s in range(0, len(items), 32):
            rgb, depth = zip(*[dataset[int(j)] for j in items[s : s + 32]])  # b frames each
            img = torch.from_numpy(np.stack(rgb)).to(device).permute(0, 3, 1, 2)  # (b, 3, H, W)
            img, depth = resize(img, torch.from_numpy(np.stack(depth)).to(device)[:, None], size)
            images.append((img * 255).round().to(torch.uint8))  # a quarter of float32's memory
            depths.append(depth)
        self.images = torch.cat(images)  # (N, 3, h, w) uint8
        self.depths = torch.cat(depths)  # (N, 1, h, w) metres

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        rounding = math.floor if self.shuffle else math.ceil  # full batches only when shuffling
        return rounding(len(self.images) / self.batch_size)

    def __iter__(self):
        N = len(self.images)
        # the same order and augments after a resume; SeedSequence mixes both
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        )
        order = torch.randperm(N, generator=g) if self.shuffle else torch.arange(N)
        for sel in order.to(self.device).split(self.batch_size)[: len(self)]:  # (B,) rows
            img = self.images[sel].float() / 255  # (B, 3, h, w) in [0, 1]
            depth = self.depths[sel]  # (B, 1, h, w) metres
            if self.augment:
                r = torch.rand(3, len(sel), 1, 1, 1, generator=g).to(self.device)  # (3, B, 1, 1, 1)
                flip = r[0] < 0.5
                contrast, bright = 0.9 + 0.2 * r[1:]
                img, depth = (torch.where(flip, t.flip(-1), t) for t in (img, depth))
                mean = img.mean((1, 2, 3), keepdim=True)
                img = (((img - mean) * contrast + mean) * bright).clamp(0, 1)
            yield {"image": normalize(img), "depth": depth, "mask": valid_depth(depth)}


# -----------------------------------------------------------------------------
# the metrics (the one metrics function; train.py validates and evaluate.py scores with it)
CROPS = {  # (row0, row1, col0, col1), 0-based and end-exclusive on the 480x640 frame
    "eigen": (45, 471, 41, 601),  # BTS, AdaBins, mmsegmentation
    "depthclip": (45, 471, 46, 601),  # DepthCLIP's variant
    # KITTI's Garg crop as the authors' NYU script cuts it
    "garg": (195, 476, 23, 616),
    "none": None,
}
KEYS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")


def depth_metrics(pred, gt, crop="eigen", clamp=True):
    """pred (..., H, W), gt broadcastable to it, metres, numpy or torch -> {KEYS: float64 tensor (...)}:
    each frame's metrics over its valid pixels (BTS's compute_errors), on pred's device; NaN for a frame
    without a valid pixel. clamp: pred to [MIN_DEPTH, MAX_DEPTH] first (NaN to MIN_DEPTH); off only for
    the authors' script, which scores its median-scaled prediction as it is."""
    pred = torch.as_tensor(pred).detach()
    gt = torch.as_tensor(gt).detach().to(pred.device)
    if CROPS[crop] is not None:
        if gt.shape[-2:] != (480, 640):
            raise ValueError(f"the {crop} crop is defined on 480x640 frames, got {tuple(gt.shape)}")
        r0, r1, c0, c1 = CROPS[crop]
        pred = pred[..., r0:r1, c0:c1]
        gt = gt[..., r0:r1, c0:c1]
    # the range in gt's own dtype (float32 1e-3 is not > 1e-3); the formulas in float64
    valid = valid_depth(gt)
    gt = gt.double()
    pred = pred.double().nan_to_num(nan=MIN_DEPTH)
    if clamp:
        pred = pred.clamp(MIN_DEPTH, MAX_DEPTH)

    def mean(x):
        return torch.where(valid, x, 0.0).sum((-2, -1), dtype=torch.float64) / valid.sum((-2, -1))

    thresh = torch.maximum(gt / pred, pred / gt)
    err = torch.log(pred) - torch.log(gt)
    return {
        "d1": mean(thresh < 1.25),
        "d2": mean(thresh < 1.25**2),
        "d3": mean(thresh < 1.25**3),
        "abs_rel": mean((gt - pred).abs() / gt),
        "sq_rel": mean((gt - pred) ** 2 / gt),
        "rmse": mean((gt - pred) ** 2).sqrt(),
        "rmse_log": mean(err**2).sqrt(),
        "log10": mean((torch.log10(pred) - torch.log10(gt)).abs()),
        "silog": 100 * (mean(err**2) - mean(err) ** 2).clamp_min(0).sqrt(),
    }


def mean_metrics(rows):
    """rows: dicts of depth_metrics -> the mean of each metric over the frames that had a valid
    pixel, as floats (NaN for every key when none had)."""
    if not rows:
        return {k: float("nan") for k in KEYS}
    scored = {k: torch.cat([torch.as_tensor(r[k]).reshape(-1) for r in rows]).cpu() for k in KEYS}
    # NaN: a frame without a valid pixel, not averaged
    kept = ~scored["d1"].isnan()
    return {k: float(v[kept].mean()) for k, v in scored.items()}  # NaN: the mean of none
