"""
Training-step throughput, measured side by side in one run: the path train.py uses (PreloadedBatches on the device,
the MoA layer's default implementation: the Triton kernel on CUDA, the PyTorch reference on CPU) against a naive path
(a per-sample DataLoader and an eager per-expert MoA loop, the authors' style). Random ViT-B/32 weights, synthetic
480x640 frames, the paper's batch 8 at 224. On CUDA also the train.py path with the PyTorch MoA (--moa-impl
torch), and with --profile the torch profiler's top GPU and CPU ops of each. A benchmark, not a test: pytest does not
collect it.

    python bench/bench_train.py [--steps 10] [--device auto] [--batch-size 8] [--profile]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test fixtures
import clip_vit  # noqa: E402
import data_nyu  # noqa: E402
import moa  # noqa: E402
from bench_moa import moa_loop  # noqa: E402  (the authors' per-expert loop)
from nyu_fixtures import NYUTorchDataset  # noqa: E402


def images_per_second(model, batches, steps, dev, dtype, sync):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=1e-4)
    it, n, t0 = iter(batches), 0, None
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            sync()
            t0 = time.perf_counter()
        b = {k: v.to(dev) for k, v in next(it).items()}
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out = model(b["image"])
        loss, _ = moa.depth_loss(out, b["depth"], b["mask"], model.cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += b["image"].shape[0] if step >= 2 else 0
    sync()
    return n / (time.perf_counter() - t0)


def profiled(model, batches, steps, dev, dtype, sync, title):
    """Steps of images_per_second under the torch profiler; prints its top ops by GPU and by CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        images_per_second(model, batches, steps, dev, dtype, sync)
    print(f"\n# profile: {title}, {steps + 2} steps")
    for key in ("self_cuda_time_total", "self_cpu_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=50))


def set_moa_impl(model, impl):  # every MoA layer's implementation: auto, triton or torch
    for layer in model.moa:
        layer.impl = impl


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--profile", action="store_true", help="also print the torch profiler's top ops (CUDA)")
    args = p.parse_args()
    rt = moa.runtime(args.device)
    dev, dtype = rt.device, rt.dtype
    bs, on_gpu = args.batch_size, dev.type == "cuda"
    if args.profile and not on_gpu:
        p.error("--profile needs a CUDA device")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    model = moa.MoADepthCLIP(clip_vit.build_model(clip_vit.random_state_dict()), moa.DepthConfig()).to(dev)
    ds = data_nyu.SyntheticDepth(n=bs * (args.steps + 2))
    t0 = time.perf_counter()
    fast_batches = data_nyu.PreloadedBatches(ds, size=224, batch_size=bs, device=dev)
    t_preload = time.perf_counter() - t0
    fast = images_per_second(model, fast_batches, args.steps, dev, dtype, sync)
    if on_gpu:  # the same path with the PyTorch MoA, then each again under the profiler
        set_moa_impl(model, "torch")
        fast_torch = images_per_second(model, fast_batches, args.steps, dev, dtype, sync)
        for impl in ("auto", "torch") if args.profile else ():
            set_moa_impl(model, impl)
            profiled(model, fast_batches, args.steps, dev, dtype, sync, f"MoA {impl}, batch {bs}")
        set_moa_impl(model, "auto")
    naive_batches = torch.utils.data.DataLoader(
        NYUTorchDataset(ds, 224), batch_size=bs, shuffle=True, num_workers=2, drop_last=True
    )
    set_moa_impl(model, "torch")
    moa_reference = moa.moa_reference
    moa.moa_reference = moa_loop  # the eager per-expert loop in place of the dense reference
    try:
        naive = images_per_second(model, naive_batches, args.steps, dev, dtype, sync)
    finally:
        set_moa_impl(model, "auto")
        moa.moa_reference = moa_reference
    name = torch.cuda.get_device_name() if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}, batch {bs} at 224, {args.steps} timed steps, random ViT-B/32")
    print(f"preload of {len(ds)} frames: {t_preload:.1f} s")
    print(f"naive (DataLoader + eager per-expert loop): {naive:7.2f} img/s")
    print(f"train.py path (preloaded + default MoA)   : {fast:7.2f} img/s   ({fast / naive:.2f}x)")
    if on_gpu:
        print(
            f"train.py path, --moa-impl torch           : {fast_torch:7.2f} img/s   ({fast_torch / naive:.2f}x)"
        )
    print(f"projected 30-epoch recipe (23,850 samples): {23850 / fast / 60:.1f} min")
