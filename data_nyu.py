"""
NYU Depth V2 for monocular depth: the labeled file (MATLAB v7.3, 1449 RGB-D frames at 640x480,
Silberman et al., ECCV 2012) with its official 795/654 split, procedural rooms for offline runs,
batches preloaded on the device, and the one metrics function (BTS/AdaBins formulas).

    ds = data_nyu.NYUDepthV2("nyu_depth_v2_labeled.mat", split="train")
    rgb, depth = ds[0]                  # uint8 (480, 640, 3), float32 (480, 640) metres

Benchmark (writes a synthetic v7.3 file into a temp dir): python tests/bench_data.py [cpu|cuda]
"""
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import clip_vit  # CLIP's pixel normalisation, the cache folder, downloads and the UserError

FILE_NAME = "nyu_depth_v2_labeled.mat"  # https://cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html
URL = "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/" + FILE_NAME
SPLITS_URL = "http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat"
SPLITS_SHA256 = "6e081404491a8bfba2f066beaa9713ef6046f9007aa5f799f2a350506a580cee"
MIN_DEPTH, MAX_DEPTH = 1e-3, 10.0  # the usual valid range (BTS, AdaBins), both ends exclusive
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

# -----------------------------------------------------------------------------
# the official file

def _err(path, problem):
    return clip_vit.UserError(f"{path}: {problem}")

def _check_header(path):
    """The labeled file is MATLAB v7.3: HDF5 behind a 512-byte MAT header (the bytes, not the name)."""
    with open(path, "rb") as f:
        f.seek(512)
        signature = f.read(8)
    if signature != HDF5_SIGNATURE:
        raise _err(path, "not a MATLAB v7.3 MAT-file (no HDF5 signature at byte 512)")

def read_splits(path):
    """splits.mat (MATLAB v5) -> {"train": int64 array, "test": int64 array}, 0-based, ascending."""
    import scipy.io
    try:
        m = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, OSError... on a bad file
        problem = " ".join(f"{type(e).__name__}: {e}".split())
        raise _err(path, f"cannot read as a MATLAB v5 MAT-file ({problem})") from None
    out = {}
    for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
        if key not in m:
            raise _err(path, f"no variable '{key}'")
        idx = np.sort(np.asarray(m[key]).astype(np.int64).ravel())  # stored uint16 (795, 1)
        if idx.size == 0 or idx[0] < 1 or np.any(np.diff(idx) == 0):
            raise _err(path, f"'{key}' must hold distinct 1-based frame numbers")
        out[split] = idx - 1
    if np.intersect1d(out["train"], out["test"]).size:
        raise _err(path, "train and test splits overlap")
    return out

def fetch(path, download=None):
    """The labeled file at `path`, downloaded if missing: always with download=True, never with
    False, with None only under its official name. Never into a missing folder (that is a typo)."""
    path = Path(path)
    if path.exists():
        return path
    if not path.parent.is_dir():
        raise _err(path, f"no folder {path.parent} (a typo?); nothing was created or downloaded")
    if download is False or (download is None and path.name != FILE_NAME):
        raise _err(path, f"not found; --download fetches it from {URL} (2.97 GB, no official "
                         "checksum), or put a copy fetched by hand at exactly this path")
    return clip_vit.download(URL, path)

class NYUDepthV2:
    """ds[i] -> (rgb uint8 (480, 640, 3), depth float32 (480, 640) metres), the i-th frame of the
    split in file order. depth is the in-painted `depths`, or `rawDepths` (0 = no reading) with
    raw_depth. splits.mat: splits_path, else next to the data file, else the cache, else downloaded."""

    def __init__(self, mat_path, split="train", splits_path=None, raw_depth=False, download=None):
        assert split in ("train", "test", "all"), split
        self.path, self.key = fetch(mat_path, download), "rawDepths" if raw_depth else "depths"
        _check_header(self.path)
        self._h5, self._pid = None, None
        v = self._vars()
        for key in ("images", self.key):
            if not hasattr(v.get(key), "shape"):
                raise _err(self.path, f"missing dataset '{key}'")
        im, dp = v["images"].shape, v[self.key].shape  # (N, 3, W, H), (N, W, H)
        if len(im) != 4 or im[1] != 3 or dp != (im[0], *im[2:]):
            raise _err(self.path, f"images {im} and {self.key} {dp} are not (N, 3, W, H) and "
                                  "(N, W, H) in h5py's order")
        if self._h5 is not None:  # reopened lazily, so each DataLoader worker gets its own handle
            self._h5.close()
            self._h5 = None
        if split == "all":
            self.indices = np.arange(im[0], dtype=np.int64)
            return
        splits_path = Path(splits_path) if splits_path else self._find_splits(download)
        self.indices = read_splits(splits_path)[split]
        if self.indices[-1] >= im[0]:
            last = self.indices[-1] + 1
            raise _err(splits_path, f"{split} frame {last} (1-based) is out of range for "
                                    f"{self.path}, which has {im[0]} frames")

    def _find_splits(self, download):
        cached = clip_vit.cache_dir("nyu_depth_v2") / "splits.mat"
        for path in (self.path.parent / "splits.mat", cached):
            if path.exists():
                return path
        if download is False:
            raise _err(cached, f"splits.mat not found there or next to {self.path}; drop "
                               f"--no-download to fetch it, or put it in either place "
                               f"(SHA-256 {SPLITS_SHA256})")
        return clip_vit.download(SPLITS_URL, cached, sha256=SPLITS_SHA256)

    def _vars(self):
        if self._h5 is None or self._pid != os.getpid():  # first access in this process
            import h5py
            try:  # a 32 MB chunk cache, in case compressed chunks span several frames
                self._h5 = h5py.File(self.path, "r", rdcc_nbytes=32 << 20)
                self._pid = os.getpid()
            except OSError as e:
                raise _err(self.path, f"unreadable or truncated HDF5 ({e})") from None
        return self._h5

    def __getstate__(self):  # an open h5py handle can be neither pickled nor shared
        return {**self.__dict__, "_h5": None, "_pid": None}

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j, v = int(self.indices[i]), self._vars()  # IndexError past the end, as a sequence should
        try:
            rgb = v["images"][j].transpose(2, 1, 0)  # (3, W, H) -> (H, W, 3)
            depth = v[self.key][j].T                 # (W, H) -> (H, W)
        except OSError as e:
            raise _err(self.path, f"cannot read frame {j} ({e})") from None
        return np.ascontiguousarray(rgb, np.uint8), np.ascontiguousarray(depth, np.float32)

    def scene(self, i):
        """Scene type of the i-th frame, e.g. "kitchen"."""
        j, v = int(self.indices[i]), self._vars()
        if "sceneTypes" not in v:
            raise _err(self.path, "no 'sceneTypes'")
        codes = v[v["sceneTypes"][0, j]][()]  # a reference to a MATLAB string: uint16 codes (L, 1)
        return "".join(map(chr, codes.ravel()))

# -----------------------------------------------------------------------------
# an offline stand-in with exactly known depth

class SyntheticDepth:
    """A pinhole view of a box-shaped room with a few boxes on the floor, deterministic per
    (seed, i), depth in [0.5, 9.5] m. The checkerboard gets finer and the shading darker with
    distance, so colour carries depth cues a model can learn."""
    SCENES = ("bedroom", "kitchen", "living_room", "office", "bathroom")

    def __init__(self, n=48, seed=0, height=480, width=640):
        self.n, self.seed, self.height, self.width = n, seed, height, width

    def __len__(self):
        return self.n

    def _rng(self, i):
        if not -self.n <= i < self.n:
            raise IndexError(f"frame {i} out of range for {self.n} frames")
        return np.random.default_rng([self.seed, i % self.n])

    def scene(self, i):
        return self.SCENES[self._rng(i).integers(len(self.SCENES))]

    def __getitem__(self, i):
        rng, H, W = self._rng(i), self.height, self.width
        rng.integers(len(self.SCENES))  # the draw scene() makes
        v, u = np.mgrid[0:H, 0:W].astype(np.float32)
        f = 518.8579 * W / 640  # NYU's focal length, scaled to the width
        dx, dy = (u - W / 2) / f, (v - H / 2) / f  # ray (dx, dy, 1); y points down
        floor, ceil, side = rng.uniform(1.0, 1.6), rng.uniform(1.0, 1.6), rng.uniform(1.5, 3)
        back = rng.uniform(4, 9)
        eps = 1e-6
        z = np.stack([floor / np.maximum(dy, eps), ceil / np.maximum(-dy, eps),  # each ray meets
                      side / np.maximum(np.abs(dx), eps), np.full((H, W), back)])  # each plane
        surf, depth = z.argmin(0), z.min(0)  # (H, W) the nearest of the 4 planes
        for k in range(rng.integers(1, 4)):  # boxes standing on the floor, facing the camera
            bz, bx = rng.uniform(1, back - 0.5), rng.uniform(-side, side)
            bw, bh = rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.2)
            hit = (np.abs(dx * bz - bx) < bw / 2) & (dy * bz > floor - bh) & (dy * bz < floor)
            hit &= bz < depth
            depth, surf = np.where(hit, bz, depth), np.where(hit, 4 + k, surf)
        depth = np.clip(depth, 0.5, 9.5).astype(np.float32)
        colour = rng.uniform(0.3, 1.0, size=(7, 3))  # one base colour per surface
        checker = (np.floor(2 * dx * depth) + np.floor(2 * dy * depth) + np.floor(2 * depth)) % 2
        shade = (1 - 0.07 * depth) * (0.8 + 0.2 * checker)  # (H, W)
        rgb = colour[surf] * shade[..., None] + rng.normal(0, 0.02, (H, W, 3))
        return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), depth

# -----------------------------------------------------------------------------
# frames -> tensors -> batches

def normalize(x):
    """CLIP's per-channel normalisation of (B, 3, H, W) floats in [0, 1]."""
    mean = torch.tensor(clip_vit.MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(clip_vit.STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std

def resize(img, depth, size):
    """uint8 (B, 3, H, W), float (B, 1, H, W) or None -> float (B, 3, h, w) in [0, 1], float32
    (B, 1, h, w): the one resize, for training and evaluation. Both whole frames go to exactly
    (h, w), so they stay aligned (the DepthCLIP authors cropped the RGB but not the depth)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    img = F.interpolate(img.float() / 255, size, mode="bilinear", antialias=True, align_corners=False)
    if depth is not None:
        # nearest-exact takes the source pixel whose centre is nearest: bilinear's pixel-centre
        # geometry, so depth edges land where image edges land, and holes (0) never mix in
        depth = F.interpolate(depth.float(), size=size, mode="nearest-exact")
    return img.clamp(0, 1), depth

def make_batch(img, depth):
    """Images in [0, 1] (B, 3, h, w), depth (B, 1, h, w) -> the training dict, with the valid mask."""
    depth = depth.float()
    mask = (depth > MIN_DEPTH) & (depth < MAX_DEPTH)  # (B, 1, h, w) bool
    return {"image": normalize(img), "depth": depth, "mask": mask}

def _seed(*keys):  # one well-mixed 63-bit seed from a tuple such as (seed, epoch)
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)

class PreloadedBatches:
    """Decodes the chosen frames (items: positions into dataset) ONCE into uint8 images
    (N, 3, h, w) and depths (N, 1, h, w) on `device`, then yields make_batch dicts plus "index"
    (B,), reshuffled per epoch. DDP: each rank takes every world_size-th entry of one permutation,
    padded by wrapping around like DistributedSampler. augment: flip image and depth together,
    brightness and contrast x[0.9, 1.1]."""

    def __init__(self, dataset, size=224, batch_size=8, device="cpu", shuffle=True, seed=0,
                 augment=False, rank=0, world_size=1, drop_last=True, items=None):
        assert 0 <= rank < world_size and batch_size > 0
        self.items = np.arange(len(dataset)) if items is None else np.asarray(items, np.int64)
        self.batch_size, self.device, self.shuffle, self.seed = batch_size, device, shuffle, seed
        self.augment, self.rank, self.world_size = augment, rank, world_size
        self.drop_last, self.epoch = drop_last, 0
        images, depths, N = [], [], len(self.items)
        for s in range(0, N, 32):  # read 32 frames on the CPU, resize them on the device
            frames = [dataset[int(j)] for j in self.items[s:s + 32]]
            img = torch.from_numpy(np.stack([f[0] for f in frames])).to(device)  # (b, H, W, 3)
            depth = torch.from_numpy(np.stack([f[1] for f in frames])).to(device)  # (b, H, W)
            img, depth = resize(img.permute(0, 3, 1, 2), depth[:, None], size)
            images.append((img * 255).round().to(torch.uint8))
            depths.append(depth)
            if N >= 200 and s % 128 == 96:
                print(f"PreloadedBatches: decoded {s + len(frames)}/{N} frames", file=sys.stderr)
        self.images, self.depths = torch.cat(images), torch.cat(depths)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _shard(self):
        """This rank's positions into self.items for the current epoch."""
        N, ws = len(self.items), self.world_size
        g = torch.Generator().manual_seed(_seed(self.seed, self.epoch))
        perm = torch.randperm(N, generator=g) if self.shuffle else torch.arange(N)
        per_rank = N // ws if self.drop_last else math.ceil(N / ws)
        n = per_rank * ws
        perm = perm.repeat(math.ceil(n / N))[:n]  # wraps around when n > N
        return perm[self.rank::ws]  # (per_rank,)

    def __len__(self):
        n = len(self._shard())
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        idx, B, dev = self._shard(), self.batch_size, self.device
        g = torch.Generator(device=dev).manual_seed(_seed(self.seed, self.epoch, 1, self.rank))
        for b in range(len(self)):
            sel = idx[b * B:(b + 1) * B]
            img = self.images[sel.to(dev)].float() / 255  # (B, 3, h, w)
            depth = self.depths[sel.to(dev)].float()      # (B, 1, h, w)
            if self.augment:
                flip = torch.rand(len(sel), 1, 1, 1, generator=g, device=dev) < 0.5
                img = torch.where(flip, img.flip(-1), img)
                depth = torch.where(flip, depth.flip(-1), depth)
                factors = 0.9 + 0.2 * torch.rand(2, len(sel), 1, 1, 1, generator=g, device=dev)
                bright, contrast = factors
                mean = img.mean(dim=(1, 2, 3), keepdim=True)
                img = (((img - mean) * contrast + mean) * bright).clamp(0, 1)
            yield {**make_batch(img, depth), "index": torch.from_numpy(self.items[sel.numpy()])}

# -----------------------------------------------------------------------------
# the metrics (the one metrics function; train.py validates and evaluate.py scores with it)

CROPS = {  # (row0, row1, col0, col1), 0-based and end-exclusive on the 480x640 frame
    "eigen": (45, 471, 41, 601),      # BTS, AdaBins, mmsegmentation
    "depthclip": (45, 471, 46, 601),  # DepthCLIP's variant
    "none": None,
}
KEYS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")

def depth_metrics(pred, gt, crop="eigen", min_depth=MIN_DEPTH, max_depth=MAX_DEPTH):
    """pred, gt: (H, W) arrays or tensors in metres, one image -> a dict of KEYS, or None when the
    image has no valid pixel. Formulas as in BTS/AdaBins."""
    pred = np.asarray(torch.as_tensor(pred).detach().cpu().float(), dtype=np.float64)
    pred = np.nan_to_num(pred, nan=min_depth, posinf=max_depth)
    gt = np.asarray(torch.as_tensor(gt).detach().cpu().float(), dtype=np.float64)
    valid = (gt > min_depth) & (gt < max_depth)
    if CROPS[crop] is not None:
        if gt.shape != (480, 640):
            raise ValueError(f"the {crop} crop is defined on 480x640 frames, got {gt.shape}")
        r0, r1, c0, c1 = CROPS[crop]
        region = np.zeros_like(valid)
        region[r0:r1, c0:c1] = True
        valid &= region
    if not valid.any():
        return None
    p, g = np.clip(pred[valid], min_depth, max_depth), gt[valid]
    ratio = np.maximum(g / p, p / g)
    e = np.log(p) - np.log(g)
    return {
        "d1": (ratio < 1.25).mean(), "d2": (ratio < 1.25 ** 2).mean(), "d3": (ratio < 1.25 ** 3).mean(),
        "abs_rel": (np.abs(g - p) / g).mean(), "sq_rel": ((g - p) ** 2 / g).mean(),
        "rmse": np.sqrt(((g - p) ** 2).mean()), "rmse_log": np.sqrt((e ** 2).mean()),
        "log10": np.abs(np.log10(p) - np.log10(g)).mean(),
        "silog": 100 * np.sqrt(max((e ** 2).mean() - e.mean() ** 2, 0)),
    }

def mean_metrics(rows):
    """The mean of each metric over images (NaN for every key when there are none)."""
    if not rows:
        return {k: float("nan") for k in KEYS}
    return {k: float(np.mean([r[k] for r in rows])) for k in KEYS}
