"""
data_nyu.py speed: random access of one frame from a v7.3 file at official frame size, and one 795-frame epoch of
batches at 224 from PreloadedBatches against a per-sample DataLoader, measured in the same run (best of 3 epochs
each). A benchmark, not a test: pytest does not collect it.

    python bench/bench_data.py [cpu|cuda]
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test fixtures
from data_nyu import NYUDepthV2, PreloadedBatches, SyntheticDepth  # noqa: E402
from nyu_fixtures import NYUTorchDataset, write_v73  # noqa: E402


class OpenedPerWorker:
    """NYUDepthV2(path, split="all"), opened on first use in each DataLoader worker: an open h5py file can be
    neither pickled nor shared with a child process."""

    def __init__(self, path, n):
        self.path, self.n, self.ds = path, n, None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if self.ds is None:
            self.ds = NYUDepthV2(self.path, split="all", download=False)
        return self.ds[i]


if __name__ == "__main__":
    device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n, B, size, workers, syn = 64, 8, 224, min(4, os.cpu_count()), SyntheticDepth(n=64)
    items = [i % n for i in range(795)]  # an epoch as long as the official train split
    with tempfile.TemporaryDirectory() as tmp:
        frames = [syn[i] for i in range(n)]
        write_v73(Path(tmp) / "syn.mat", np.stack([f[0] for f in frames]), np.stack([f[1] for f in frames]))
        ds = NYUDepthV2(Path(tmp) / "syn.mat", split="all")
        t0 = time.perf_counter()
        for i in np.random.default_rng(0).permutation(n):
            ds[int(i)]
        t1 = time.perf_counter()
        pb = PreloadedBatches(ds, size=size, batch_size=B, device=device, items=items)
        t2, best = time.perf_counter(), float("inf")
        for epoch in range(3):  # best of 3 epochs: the copy in memory is the same each time
            pb.set_epoch(epoch)
            t = time.perf_counter()
            for batch in pb:
                pass
            sync()
            best = min(best, time.perf_counter() - t)
        t3 = time.perf_counter()
        per_sample = NYUTorchDataset(OpenedPerWorker(Path(tmp) / "syn.mat", n), size)
        dl = torch.utils.data.DataLoader(
            torch.utils.data.Subset(per_sample, items),
            batch_size=B,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            multiprocessing_context="spawn",
            persistent_workers=True,
        )  # spawn: no h5py state crosses a fork
        best_dl = float("inf")
        for epoch in range(3):  # best of 3 epochs for both, so the comparison is fair
            t = time.perf_counter()
            for batch in dl:
                batch = {k: v.to(device) for k, v in batch.items()}
            sync()
            best_dl = min(best_dl, time.perf_counter() - t)
        t_pb, t_dl = best / len(pb) * 1e3, best_dl / len(dl) * 1e3
    print(f"random access ds[i] (v7.3, 480x640): {(t1 - t0) / n * 1e3:.2f} ms/frame")
    print(f"{device}, one epoch of {len(pb)} batches of {B} at {size}x{size}:")
    print(f"  PreloadedBatches: {t_pb:.2f} ms/batch (after decoding once in {t2 - t1:.1f} s)")
    print(f"  DataLoader(NYUTorchDataset, {workers} workers): {t_dl:.2f} ms/batch, {t_dl / t_pb:.0f}x slower")
