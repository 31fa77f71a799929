"""
Small synthetic NYU Depth V2 files in the official layouts (docs/files.md), and the per-sample baseline that
PreloadedBatches is tested and benchmarked against. Frames go in in the usual layout: images (N, 480, 640, 3)
uint8, depths (N, 480, 640) float32.

- write_v73: MATLAB v7.3 = HDF5 with a 512-byte user block, axes reversed as h5py sees the real file.
- write_v5: the same frames through scipy.io.savemat (MATLAB v5), a format data_nyu refuses.
- write_splits: a splits.mat with 1-based trainNdxs/testNdxs.
- asymmetric_frames: frames whose pixels encode (row, col, frame), so any transpose or flip shows.
- frames_to_tensors / NYUTorchDataset: one frame at a time through data_nyu's resize, for a plain DataLoader:
  the per-sample reference PreloadedBatches is tested and benchmarked against.
"""

import time

import numpy as np
import torch

import data_nyu


def write_v73(path, images, depths, raw_depths=None, scene_types=None):
    """scene_types: one name per frame (default: all "kitchen"), stored as MATLAB strings like the real file."""
    import h5py

    images, depths = np.asarray(images, np.uint8), np.asarray(depths, np.float32)
    assert images.ndim == 4 and images.shape[3] == 3 and depths.shape == images.shape[:3]
    if scene_types is None:
        scene_types = ["kitchen"] * len(images)
    with h5py.File(path, "w", userblock_size=512) as f:
        f["images"] = images.transpose(0, 3, 2, 1)  # (N, H, W, 3) -> (N, 3, W, H)
        f["depths"] = depths.transpose(0, 2, 1)  # (N, H, W) -> (N, W, H)
        if raw_depths is not None:
            f["rawDepths"] = np.asarray(raw_depths, np.float32).transpose(0, 2, 1)
        refs = f.create_group("#refs#")
        sceneTypes = f.create_dataset("sceneTypes", (1, len(scene_types)), dtype=h5py.ref_dtype)
        for i, s in enumerate(scene_types):  # MATLAB char arrays: uint16 codes, shape (L, 1)
            d = refs.create_dataset(f"s{i}", data=np.array([[ord(c)] for c in s], np.uint16))
            sceneTypes[0, i] = d.ref
    text = (
        (
            "MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: "
            + time.strftime("%a %b %d %H:%M:%S %Y")
            + " HDF5 schema 1.00 ."
        )
        .ljust(116)
        .encode()
    )
    header = text + b"\x00" * 8 + b"\x00\x02" + b"IM"  # 116 text, 8 subsys offset, version 0x0200, endian
    assert len(header) == 128
    with open(path, "r+b") as fh:
        fh.write(header)


def write_v5(path, images, depths, raw_depths=None, scene_types=None):
    import scipy.io

    images, depths = np.asarray(images, np.uint8), np.asarray(depths, np.float32)
    m = {
        "images": images.transpose(1, 2, 3, 0),
        "depths": depths.transpose(1, 2, 0),
    }  # (H, W, 3, N), (H, W, N)
    if raw_depths is not None:
        m["rawDepths"] = np.asarray(raw_depths, np.float32).transpose(1, 2, 0)
    if scene_types is not None:
        cells = np.empty((len(scene_types), 1), dtype=object)
        for i, s in enumerate(scene_types):
            cells[i, 0] = s
        m["sceneTypes"] = cells
    scipy.io.savemat(path, m)


def write_splits(path, train_1based, test_1based):
    import scipy.io

    scipy.io.savemat(
        path,
        {
            "trainNdxs": np.asarray(train_1based, np.uint16).reshape(-1, 1),
            "testNdxs": np.asarray(test_1based, np.uint16).reshape(-1, 1),
        },
    )


def asymmetric_frames(n, h=480, w=640):
    """images (n, h, w, 3) uint8 and depths/raw_depths (n, h, w) float32 that differ under any flip/transpose."""
    row, col = np.mgrid[0:h, 0:w]
    images = np.empty((n, h, w, 3), np.uint8)
    depths = np.empty((n, h, w), np.float32)
    for i in range(n):
        images[i, ..., 0] = row % 256
        images[i, ..., 1] = col % 256
        images[i, ..., 2] = (row // 256 * 16 + col // 256 + 40 * i) % 256
        depths[i] = 0.5 + row / h * 3 + col / w * 5 + 0.1 * i  # 0.5 .. ~8.5 m
    raw = depths.copy()
    raw[:, ::7, ::5] = 0  # holes in the raw depth, like the Kinect's
    return images, depths, raw


def frames_to_tensors(rgb, depth, size):
    """rgb uint8 (H, W, 3), depth float32 (H, W) -> image float32 (3, h, w) in [0, 1], depth float32
    (1, h, w), through data_nyu.resize, the pipeline's one resize."""
    img = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    depth = torch.from_numpy(np.ascontiguousarray(depth, np.float32))[None, None]  # (1, 1, H, W)
    img, depth = data_nyu.resize(img, depth, size)
    return img[0], depth[0]


class NYUTorchDataset(torch.utils.data.Dataset):
    """Per-sample training dicts {"image", "depth", "mask"} for a plain DataLoader (the naive baseline), built
    here independently of PreloadedBatches. The resized image is rounded to uint8 as PreloadedBatches stores it,
    so both give the same numbers."""

    def __init__(self, dataset, size):
        self.dataset, self.size = dataset, size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, depth = frames_to_tensors(*self.dataset[i], self.size)
        img = (img * 255).round() / 255  # (3, h, w), through uint8
        mask = (depth > data_nyu.MIN_DEPTH) & (depth < data_nyu.MAX_DEPTH)  # (1, h, w)
        return {"image": data_nyu.normalize(img[None])[0], "depth": depth, "mask": mask}
