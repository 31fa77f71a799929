"""
NYU Depth V2 (labeled: 1449 RGB-D frames at 640x480, Silberman et al. ECCV 2012) for monocular depth.
https://cs.nyu.edu/~silberman/datasets/nyu_depth_v2.html

- NYUDepthV2 reads nyu_depth_v2_labeled.mat frame by frame (MATLAB v7.3 = HDF5 via h5py, or v5 via scipy) with
  the official 795/654 train/test split from splits.mat; both are downloaded when missing.
- SyntheticDepth is a procedural offline stand-in with the same interface (train.py --data synthetic).
- PreloadedBatches decodes frames once into device tensors and serves shuffled, DDP-sharded batches;
  NYUTorchDataset is the naive per-sample DataLoader baseline it is benchmarked against.

Benchmark (writes a synthetic v7.3 file into a temp dir): python tests/bench_data.py [cpu|cuda]
"""
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import clip_vit  # CLIP's pixel normalisation (MEAN, STD), the cache directory and all network code
from clip_vit import MEAN, STD

URL = "http://horatio.cs.nyu.edu/mit/silberman/nyu_depth_v2/nyu_depth_v2_labeled.mat"
SPLITS_URL = "http://horatio.cs.nyu.edu/mit/silberman/indoor_seg_sup/splits.mat"
SPLITS_SHA256 = "6e081404491a8bfba2f066beaa9713ef6046f9007aa5f799f2a350506a580cee"
MIN_DEPTH, MAX_DEPTH = 1e-3, 10.0  # the usual valid range (BTS, AdaBins): 1e-3 < depth < 10 m, both exclusive

# --------------------------------------------------------------------------------------------------
# the official file

def _err(path, problem):
    return clip_vit.UserError(f"{path}: {problem}")

def _download(url, dest, sha256=None):
    return Path(clip_vit.download(url, dest, sha256=sha256))

def _mat_version(path):
    """'7.3' or '5' from the 128-byte MAT header (and the HDF5 signature at byte 512), never the extension."""
    with open(path, "rb") as f:
        head, _, sig = f.read(128), f.seek(512), f.read(8)
    if head[124:128] in (b"\x00\x02IM", b"\x02\x00MI") or head.startswith(b"MATLAB 7.3 MAT-file"):
        if sig != b"\x89HDF\r\n\x1a\n":
            raise _err(path, "MATLAB 7.3 header but no HDF5 signature at byte 512 (truncated or corrupt)")
        return "7.3"
    if head[124:128] in (b"\x00\x01IM", b"\x01\x00MI"):
        return "5"
    raise _err(path, "not a MATLAB v5 or v7.3 MAT-file (bad 128-byte header)")

def _loadmat(path):
    import scipy.io
    try:
        return scipy.io.loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, OSError... on a bad file
        raise _err(path, f"cannot read as a v5 MAT-file ({type(e).__name__}: {e})".replace("\n", " ")) from None

def read_splits(path):
    """splits.mat -> {"train": int64 array, "test": int64 array} of 0-based, ascending frame indices."""
    m, out = _loadmat(path), {}
    for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
        if key not in m:
            raise _err(path, f"no variable '{key}'")
        idx = np.sort(np.asarray(m[key]).astype(np.int64).ravel())  # stored uint16 (795, 1): cast first
        if idx.size == 0 or idx[0] < 1 or np.any(np.diff(idx) == 0):
            raise _err(path, f"'{key}' must hold distinct 1-based frame numbers")
        out[split] = idx - 1
    if np.intersect1d(out["train"], out["test"]).size:
        raise _err(path, "train and test splits overlap")
    return out

class NYUDepthV2:
    """ds[i] -> (rgb uint8 (480, 640, 3), depth float32 (480, 640) metres), i-th frame of the split in file order.
    depth is the in-painted `depths`, or `rawDepths` (0 = no reading) with raw_depth=True."""

    def __init__(self, mat_path, split="train", splits_path=None, raw_depth=False, download=True):
        assert split in ("train", "test", "all"), split
        self.path, self.split, self.key = Path(mat_path), split, "rawDepths" if raw_depth else "depths"
        if not self.path.exists():
            if not download:
                raise _err(self.path, "not found (download=True fetches it, about 2.8 GB, no official checksum)")
            _download(URL, self.path)
        self.version, self._h5, self._pid, self._v5 = _mat_version(self.path), None, None, None
        if self.version == "5":  # transpose every variable into the reversed-axes view that h5py gives of v7.3
            self._v5 = {k: v.T for k, v in _loadmat(self.path).items() if isinstance(v, np.ndarray)}
        v = self._vars()
        for key in ("images", self.key):
            if not hasattr(v.get(key), "shape"):
                raise _err(self.path, f"missing dataset '{key}'")
        im, dp = v["images"].shape, v[self.key].shape  # (N, 3, W, H), (N, W, H)
        if len(im) != 4 or im[1] != 3 or len(dp) != 3 or dp[1:] != im[2:]:
            raise _err(self.path, f"unexpected shapes: images {im}, {self.key} {dp} (h5py order)")
        if im[0] != dp[0]:
            raise _err(self.path, f"inconsistent frame counts: images has {im[0]}, {self.key} has {dp[0]}")
        if self._h5 is not None:  # reopened lazily, so forked DataLoader workers / DDP ranks get their own handle
            self._h5.close()
            self._h5 = None
        self.num_frames = n = im[0]
        if split == "all":
            self.indices = np.arange(n, dtype=np.int64)
            return
        splits_path = Path(splits_path) if splits_path else self._find_splits(download)
        self.indices = read_splits(splits_path)[split]
        if self.indices[-1] >= n:
            raise _err(splits_path, f"{split} frame {self.indices[-1] + 1} (1-based) is out of range for "
                                    f"{self.path}, which has {n} frames")

    def _find_splits(self, download):
        for p in (self.path.parent / "splits.mat", clip_vit.cache_dir("nyu_depth_v2") / "splits.mat"):
            if p.exists():
                return p
        if not download:
            raise _err(p, "splits.mat not found here or next to the data file (and download=False)")
        return _download(SPLITS_URL, p, sha256=SPLITS_SHA256)

    def _vars(self):
        if self._v5 is not None:
            return self._v5
        if self._h5 is None or self._pid != os.getpid():  # first access in this process
            import h5py
            try:  # a 32 MB chunk cache, in case compressed chunks span several frames
                self._h5, self._pid = h5py.File(self.path, "r", rdcc_nbytes=32 << 20), os.getpid()
            except OSError as e:
                raise _err(self.path, f"unreadable or truncated HDF5 ({e})") from None
        return self._h5

    def __getstate__(self):  # an open h5py handle can neither be pickled nor shared between processes
        return {**self.__dict__, "_h5": None, "_pid": None}

    def __len__(self):
        return len(self.indices)

    def _frame(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"frame {i} out of range for {len(self)} frames")
        return int(self.indices[i])

    def __getitem__(self, i):
        j, v = self._frame(i), self._vars()
        try:
            rgb, depth = v["images"][j].transpose(2, 1, 0), v[self.key][j].T  # (3, W, H) -> (H, W, 3); (W, H) -> (H, W)
        except OSError as e:
            raise _err(self.path, f"cannot read frame {j} ({e})") from None
        return np.ascontiguousarray(rgb, dtype=np.uint8), np.ascontiguousarray(depth, dtype=np.float32)

    def scene(self, i):
        """Scene type of the i-th frame, e.g. "kitchen"."""
        j, v = self._frame(i), self._vars()
        if "sceneTypes" not in v:
            raise _err(self.path, "no 'sceneTypes'")
        cell = v["sceneTypes"][0, j]  # v7.3: a reference to uint16 char codes (L, 1); v5: a str array
        return "".join(np.asarray(cell).ravel()) if self._v5 is not None else "".join(map(chr, v[cell][()].ravel()))

# --------------------------------------------------------------------------------------------------
# an offline stand-in with exactly known depth

class SyntheticDepth:
    """A pinhole view of a box-shaped room (floor, ceiling, side and back walls) with a few boxes, deterministic
    per (seed, i). The world-space checkerboard gets finer and the shading darker with distance, so colour
    carries depth cues a model can learn. Depth lies in [0.5, 9.5] m."""
    SCENES = ("bedroom", "kitchen", "living_room", "office", "bathroom")

    def __init__(self, n=48, seed=0, height=480, width=640):
        self.n, self.seed, self.height, self.width = n, seed, height, width
        self.indices = np.arange(n, dtype=np.int64)

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
        floor, ceil, side, back = rng.uniform(1.0, 1.6), rng.uniform(1.0, 1.6), rng.uniform(1.5, 3), rng.uniform(4, 9)
        z = np.stack([floor / np.maximum(dy, 1e-6), ceil / np.maximum(-dy, 1e-6),  # depth where each ray meets
                      side / np.maximum(np.abs(dx), 1e-6), np.full((H, W), back)])  # each plane: (4, H, W)
        surf, depth = z.argmin(0), z.min(0)
        for k in range(rng.integers(1, 4)):  # boxes standing on the floor, facing the camera
            bz, bx = rng.uniform(1, back - 0.5), rng.uniform(-side, side)
            bw, bh = rng.uniform(0.3, 1.2), rng.uniform(0.3, 1.2)
            hit = (np.abs(dx * bz - bx) < bw / 2) & (dy * bz > floor - bh) & (dy * bz < floor) & (bz < depth)
            depth, surf = np.where(hit, bz, depth), np.where(hit, 4 + k, surf)
        depth = np.clip(depth, 0.5, 9.5).astype(np.float32)
        colour = rng.uniform(0.3, 1.0, size=(7, 3))  # one base colour per surface
        checker = (np.floor(dx * depth / 0.5) + np.floor(dy * depth / 0.5) + np.floor(depth / 0.5)) % 2
        rgb = colour[surf] * ((1 - 0.07 * depth) * (0.8 + 0.2 * checker))[..., None] + rng.normal(0, 0.02, (H, W, 3))
        return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), depth

# --------------------------------------------------------------------------------------------------
# frames -> tensors -> batches

def normalize(x):
    """CLIP's per-channel normalisation of (B, 3, H, W) floats in [0, 1]."""
    mean, std = (torch.tensor(c, device=x.device, dtype=x.dtype).view(1, 3, 1, 1) for c in (MEAN, STD))
    return (x - mean) / std

def resize(img, depth, size):
    """uint8 (B, 3, H, W), float (B, 1, H, W) or None -> float (B, 3, h, w) in [0, 1], float32 (B, 1, h, w).
    The one resize for training, validation and evaluate.py's inputs."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    img = F.interpolate(img.float() / 255, size=size, mode="bilinear", antialias=True, align_corners=False)
    # nearest-exact takes the source pixel whose centre is nearest: the same pixel-centre geometry as bilinear
    # with align_corners=False, so depth edges land where image edges land, and holes (0) never mix in
    return img.clamp(0, 1), None if depth is None else F.interpolate(depth.float(), size=size, mode="nearest-exact")

def frames_to_tensors(rgb, depth, size):
    """rgb uint8 (H, W, 3), depth float32 (H, W) -> image float32 (3, h, w) in [0, 1], depth float32 (1, h, w);
    size is an int (square) or (h, w). Both WHOLE frames are resized to exactly (h, w), so they stay aligned by
    construction. (The DepthCLIP authors' code centre-cropped the RGB input but not the depth, misaligning the
    two; we never crop one without the other. Note 224x224 squashes the 4:3 frame; (384, 512) keeps it.)"""
    img = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    img, d = resize(img, torch.from_numpy(np.ascontiguousarray(depth, np.float32))[None, None], size)
    return img[0], d[0]

def _batch(img, depth):  # float images in [0, 1] (B, 3, h, w), depth (B, 1, h, w) -> the training dict
    depth = depth.float()
    return {"image": normalize(img), "depth": depth, "mask": (depth > MIN_DEPTH) & (depth < MAX_DEPTH)}

class NYUTorchDataset(torch.utils.data.Dataset):
    """Per-sample dicts for a plain DataLoader (the naive baseline). The resized image is rounded to uint8 as
    PreloadedBatches stores it, so both give the same numbers."""

    def __init__(self, dataset, size):
        self.dataset, self.size = dataset, size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, depth = frames_to_tensors(*self.dataset[i], self.size)
        return {k: v[0] for k, v in _batch((img[None] * 255).round() / 255, depth[None]).items()}

def _seed(*keys):  # one well-mixed 63-bit seed from a tuple such as (seed, epoch)
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)

class PreloadedBatches:
    """Decodes the chosen frames (items: positions into dataset, default all) ONCE into tensors on `device`
    (images uint8 (N, 3, h, w), depth (N, 1, h, w)), then yields {"image": (B, 3, h, w) CLIP-normalised,
    "depth": (B, 1, h, w) metres, "mask": (B, 1, h, w) bool, "index": (B,) positions into dataset}, shuffled
    per epoch by a generator seeded with (seed, epoch). DDP: rank takes every world_size-th entry of the same
    permutation, padded by wrapping like DistributedSampler, so every rank gets the same number of batches.
    augment: random horizontal flip of image and depth together, brightness/contrast x[0.9, 1.1]."""

    def __init__(self, dataset, size=224, batch_size=8, device="cpu", shuffle=True, seed=0, augment=False,
                 rank=0, world_size=1, drop_last=True, items=None, depth_dtype=torch.float32):
        assert 0 <= rank < world_size and batch_size > 0
        self.items = np.arange(len(dataset)) if items is None else np.asarray(items, dtype=np.int64)
        self.batch_size, self.device, self.shuffle, self.seed, self.augment = batch_size, device, shuffle, seed, augment
        self.rank, self.world_size, self.drop_last, self.epoch = rank, world_size, drop_last, 0
        images, depths, N = [], [], len(self.items)
        for s in range(0, N, 32):  # read 32 frames on the CPU, resize them on the device
            frames = [dataset[int(j)] for j in self.items[s:s + 32]]
            img = torch.from_numpy(np.stack([f[0] for f in frames])).to(device).permute(0, 3, 1, 2)  # (b, 3, H, W)
            img, dep = resize(img, torch.from_numpy(np.stack([f[1] for f in frames])).to(device)[:, None], size)
            images.append((img * 255).round().to(torch.uint8))
            depths.append(dep.to(depth_dtype))
            if N >= 200 and s % 128 == 96:
                print(f"PreloadedBatches: decoded {s + len(frames)}/{N} frames", file=sys.stderr, flush=True)
        self.images, self.depths = torch.cat(images), torch.cat(depths)  # (N, 3, h, w) uint8, (N, 1, h, w)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _shard(self):
        N, ws = len(self.items), self.world_size
        g = torch.Generator().manual_seed(_seed(self.seed, self.epoch))
        perm = torch.randperm(N, generator=g) if self.shuffle else torch.arange(N)
        n = (N // ws if self.drop_last else -(-N // ws)) * ws
        return perm.repeat(-(-n // N))[:n][self.rank::ws]  # (n / ws,)

    def __len__(self):
        n = len(self._shard())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        idx, B, dev = self._shard(), self.batch_size, self.device
        g = torch.Generator(device=dev).manual_seed(_seed(self.seed, self.epoch, 1, self.rank))
        for b in range(len(self)):
            sel = idx[b * B:(b + 1) * B]
            img, depth = self.images[sel.to(dev)].float() / 255, self.depths[sel.to(dev)].float()
            if self.augment:
                flip = (torch.rand(len(sel), 1, 1, 1, generator=g, device=dev) < 0.5)  # same for image and depth
                img, depth = torch.where(flip, img.flip(-1), img), torch.where(flip, depth.flip(-1), depth)
                bright, contrast = 0.9 + 0.2 * torch.rand(2, len(sel), 1, 1, 1, generator=g, device=dev)
                mean = img.mean(dim=(1, 2, 3), keepdim=True)
                img = (((img - mean) * contrast + mean) * bright).clamp(0, 1)
            yield {**_batch(img, depth), "index": torch.from_numpy(self.items[sel.numpy()])}

# --------------------------------------------------------------------------------------------------
# the metrics (the one metrics function; train.py validates and evaluate.py scores with it)

CROPS = {  # (row0, row1, col0, col1), 0-based and end-exclusive on the 480x640 frame
    "eigen": (45, 471, 41, 601),      # BTS, AdaBins, mmsegmentation
    "depthclip": (45, 471, 46, 601),  # DepthCLIP's variant
    "none": None,
}
KEYS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")


def depth_metrics(pred, gt, crop="eigen", min_depth=MIN_DEPTH, max_depth=MAX_DEPTH):
    """pred, gt: (H, W) arrays or tensors in metres, one image. Returns a dict of KEYS, or None when the image
    has no valid pixel. Formulas as in BTS/AdaBins."""
    pred = np.nan_to_num(np.asarray(torch.as_tensor(pred).detach().cpu().float(), dtype=np.float64),
                         nan=min_depth, posinf=max_depth)
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
    return {k: float(np.mean([r[k] for r in rows])) for k in KEYS} if rows else {k: float("nan") for k in KEYS}
