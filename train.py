"""
Train MoA-DepthCLIP on NYU Depth V2 with the paper's recipe (paper.md §6), as one flat script.

    python train.py --data nyu_depth_v2_labeled.mat               # downloads the data and CLIP if missing
    python train.py --data synthetic --clip random --epochs 2     # offline smoke run in seconds, no downloads
    torchrun --nproc_per_node=4 train.py --data ...               # DDP: per-rank shards, rank 0 logs and saves
    python train.py --data ... --resume                           # continue from --out/ckpt.pt

Every epoch writes --out/ckpt.pt atomically (the trainable parameters only, ~120 MB fp32 for the defaults),
plus best.pt by validation delta_1 on a held-out part of the train split; the test split is only touched by
evaluate.py. Logs go to stdout and --out/log.jsonl.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import clip_vit
import data_nyu
import moa

# -----------------------------------------------------------------------------
# defaults: the paper's recipe; every paper-silent choice is marked and is a flag
data = "nyu_depth_v2_labeled.mat"
splits = None            # splits.mat; None = next to the data file, or downloaded
clip = "ViT-B/32"        # or a path to ViT-B-32.pt / a state dict, or "random" (offline smoke runs)
out = "out"
epochs = 30
batch_size = 8
lr = 1e-5                # constant, AdamW (paper)
head_lr = 0.0            # 0 = same as lr (paper). paper.md §10.15: 1e-5 may under-train fresh heads; try 1e-4
weight_decay = 1e-4
train_gt = "dense"       # GUESS: in-painted depths for training (the authors' "gt_dense" lists); or "raw"
val_frac = 0.05          # our choice: hold out this fraction of train scenes for model selection (no test leak)
augment = False          # the paper mentions none
seed = 0
device = "auto"
log_interval = 10
synthetic_frames = 48    # size of --data synthetic
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().copy().items()
            if not k.startswith("_") and isinstance(v, (int, float, str, type(None)))}
p = argparse.ArgumentParser(description="Train MoA-DepthCLIP; defaults are the paper's recipe (see the docstring)")


def flag(name, default):  # bools are given as 0/1, tuples as 448,576
    if isinstance(default, bool):
        conv = lambda s: bool(int(s))  # noqa: E731
    elif isinstance(default, tuple):
        conv = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    else:
        conv = str if default is None else type(default)
    p.add_argument("--" + name.replace("_", "-"), type=conv, default=default, help="default: %(default)s")


for k, v in defaults.items():
    flag(k, v)
p.add_argument("--resume", action="store_true", help="continue from --out/ckpt.pt")
p.add_argument("--no-download", action="store_true")
p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = all epochs); for tests")
for f in fields(moa.DepthConfig):  # the model's ablation switches: --num-experts 8, --use-moa 0, --input-size 448,576
    flag(f.name, f.default)
args = p.parse_args()


def on_error(kind, err, tb):  # bad input from here on ends with one line, not a traceback; bugs keep theirs
    if issubclass(kind, clip_vit.UserError):
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    sys.__excepthook__(kind, err, tb)


sys.excepthook = on_error
cfg = moa.DepthConfig(**{f.name: getattr(args, f.name) for f in fields(moa.DepthConfig)})
if len(cfg.input_size) == 1:
    cfg.input_size = cfg.input_size * 2
if len(cfg.input_size) != 2 or any(s % 32 for s in cfg.input_size):  # ViT-B/32 patches
    raise clip_vit.UserError(f"--input-size {args.input_size}: give one or two sides that are multiples of 32, e.g. 384,512")

# -----------------------------------------------------------------------------
# distributed, device and dtype
ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
dev, amp_dtype = moa.runtime(f"cuda:{os.environ['LOCAL_RANK']}" if ddp and torch.cuda.is_available() else args.device)
if ddp:
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
master = rank == 0
autocast = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else nullcontext()
torch.manual_seed(args.seed)
out_dir = Path(args.out)
if master:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        clip_vit.atomic_write(out_dir / ".write_test", lambda tmp: Path(tmp).write_text("ok"))
        (out_dir / ".write_test").unlink()
        for stale in out_dir.glob(".*.pt.*.tmp"):  # a checkpoint write cut short by a kill
            stale.unlink()
    except OSError as e:
        raise clip_vit.UserError(f"{out_dir}: cannot write there ({e.strerror or e})") from None


def log(msg):
    if master:
        print(msg, flush=True)

# -----------------------------------------------------------------------------
# data: the official train split, a few scenes held out for validation, preloaded on the device
if args.data == "synthetic":
    ds = data_nyu.SyntheticDepth(n=args.synthetic_frames, seed=args.seed)
else:
    args.data = str(Path(args.data).resolve())  # absolute, so evaluate.py finds it from any directory
    ds = data_nyu.NYUDepthV2(args.data, split="train", splits_path=args.splits, raw_depth=args.train_gt == "raw",
                             download=not args.no_download)
scenes = sorted({ds.scene(i) for i in range(len(ds))})
n_val = max(1, round(args.val_frac * len(scenes))) if args.val_frac > 0 else 0
val_scenes = set(np.random.default_rng(args.seed).permutation(scenes)[:n_val].tolist())
train_items = [i for i in range(len(ds)) if ds.scene(i) not in val_scenes]
val_items = [i for i in range(len(ds)) if ds.scene(i) in val_scenes]
log(f"data: {len(train_items)} train / {len(val_items)} val frames ({n_val} held-out scenes: {sorted(val_scenes)})")
train_batches = data_nyu.PreloadedBatches(ds, size=cfg.input_size, batch_size=args.batch_size, device=dev,
                                          seed=args.seed, augment=args.augment, rank=rank, world_size=world,
                                          items=train_items)
val_batches = data_nyu.PreloadedBatches(ds, size=cfg.input_size, batch_size=args.batch_size, device=dev,
                                        shuffle=False, drop_last=False, items=val_items) if val_items else None

# -----------------------------------------------------------------------------
# model and optimizer
clip_model = clip_vit.load(args.clip)
clip_id = {"name": args.clip, "sha256": moa.clip_sha256(args.clip)}  # evaluate.py checks it against its CLIP file
model = moa.MoADepthCLIP(clip_model, cfg).to(dev)
del clip_model  # the text tower was used once, for the scene-context vector
log(moa.parameter_report(model)[1])
heads = [p for n, p in model.named_parameters() if p.requires_grad and "_head." in n]
rest = [p for n, p in model.named_parameters() if p.requires_grad and "_head." not in n]
optimizer = torch.optim.AdamW([{"params": rest}, {"params": heads, "lr": args.head_lr or args.lr}],
                              lr=args.lr, weight_decay=args.weight_decay)
start_epoch, step, best_d1, history = 0, 0, -1.0, []
ckpt_path = out_dir / "ckpt.pt"
if args.resume:
    if not ckpt_path.is_file():
        raise clip_vit.UserError(f"{ckpt_path}: --resume given but there is no checkpoint")
    ckpt = moa.load_checkpoint(ckpt_path)
    moa.check_clip(ckpt, args.clip, clip_id["sha256"], ckpt_path)
    try:
        moa.load_trainable_state_dict(model, ckpt["model"])
    except ValueError as e:  # trained with another model config
        raise clip_vit.UserError(f"{ckpt_path}: {e}") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    start_epoch, step, best_d1 = ckpt["epoch"] + 1, ckpt["step"], ckpt["best_d1"]
    torch.set_rng_state(ckpt["rng"])
    log(f"resumed from {ckpt_path}: epoch {start_epoch}, step {step}")
raw_model = model
if ddp:
    model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def save(path, epoch, with_optimizer=True):  # best.pt skips the optimizer: 1/3 of the size
    moa.save_checkpoint(path, raw_model, clip=clip_id, optimizer=optimizer.state_dict() if with_optimizer else None,
                        epoch=epoch, step=step, best_d1=best_d1, rng=torch.get_rng_state(), config=vars(args),
                        git=git_commit())


@torch.no_grad()
def validate():
    raw_model.eval()
    rows = []
    for b in val_batches:
        with autocast:
            pred = raw_model(b["image"])["depth"].float()
        rows += [m for pr, gt in zip(pred[:, 0], b["depth"][:, 0]) if (m := data_nyu.depth_metrics(pr, gt, crop="none"))]
    raw_model.train()
    return data_nyu.mean_metrics(rows)

# -----------------------------------------------------------------------------
# training loop
total = args.epochs * len(train_batches)
total = min(total, args.max_steps) if args.max_steps else total
log(f"training {total} steps: {args.epochs} epochs x {len(train_batches)} batches of {args.batch_size} x {world} ranks "
    f"on {dev}{' with bf16 autocast' if amp_dtype else ''}")
model.train()
t0, t_last, seen = time.time(), time.time(), 0
for epoch in range(start_epoch, args.epochs):
    train_batches.set_epoch(epoch)
    for b in train_batches:
        with autocast:
            outputs = model(b["image"])
        loss, terms = moa.depth_loss(outputs, b["depth"], b["mask"], cfg)
        check = loss.detach().clone()
        if ddp:  # every rank must see the same verdict, or one would wait forever in the next all-reduce
            dist.all_reduce(check)
        if not torch.isfinite(check):
            if master:
                print(f"error: non-finite loss ({check.item()}) at step {step}; stopped. {ckpt_path} keeps the last "
                      f"good epoch", file=sys.stderr)
            sys.exit(1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        seen += b["image"].shape[0] * world
        if step % args.log_interval == 0 or step == total:
            now = time.time()
            ips, eta = seen / (now - t_last), (now - t0) / (step - start_epoch * len(train_batches)) * (total - step)
            log(f"step {step}/{total} | loss {loss.item():.4f} (ce {terms['cls']:.3f} l1 {terms['l1']:.3f} silog "
                f"{terms['silog']:.3f}) | lr {args.lr:.1e} | {ips:.1f} img/s | gate H {raw_model.gate_entropy():.3f} "
                f"| eta {eta / 60:.1f} min")
            if master:
                with open(out_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "epoch": epoch, "loss": loss.item(), **terms, "img_s": ips,
                                        "gate_entropy": raw_model.gate_entropy()}) + "\n")
            t_last, seen = now, 0
        if step >= total:
            break
    val = validate() if val_batches is not None else {}
    if val:
        log(f"epoch {epoch} | val d1 {val['d1']:.4f} abs_rel {val['abs_rel']:.4f} rmse {val['rmse']:.4f}")
    if master:
        if val and val["d1"] > best_d1:
            best_d1 = val["d1"]
            save(out_dir / "best.pt", epoch, with_optimizer=False)
        save(ckpt_path, epoch)
        with open(out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, **{f"val_{k}": v for k, v in val.items()}}) + "\n")
    if step >= total:
        break
log(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; checkpoint {ckpt_path}")
if ddp:
    dist.destroy_process_group()
