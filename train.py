"""
Train MoA-DepthCLIP on NYU Depth V2 as the paper does (§4.2): AdamW at 1e-5 for 30 epochs over the 795
train frames, batch 8, one GPU. main() reads as the algorithm: config, data, model, optimizer, the loop,
save. The machinery (flags, the run folder, --resume) follows it under a banner.

    python train.py                          # the paper recipe; fetches NYU and CLIP once
    python train.py --data synthetic --clip random --epochs 2 --out /tmp/smoke   # offline
    python train.py --resume                 # continue from --out/ckpt.pt
    python train.py --recipe adadepthclip    # Table 1's "+ MoA" row as the authors' earlier code trained it

Every epoch writes --out/ckpt.pt (the trainable weights, AdamW's state and the config: what --resume
needs) and --out/model.pt (the same without AdamW's state, a third of the size: the file to share).
The paper recipe trains on all 795 train frames and keeps the last epoch. --val-frac 0.05 holds out train
scenes to validate on and keeps best.pt too (model selection without the test split).
Logs go to stdout and --out/log.jsonl. A bad flag stops with one `error:` line before any work.
"""

import argparse
import contextlib
import fcntl
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch

import cli
import clip_vit
import data_nyu
import moa
from moa import option, require


@dataclass
class TrainConfig:
    """The optimisation and the data plan; the defaults are the paper's (§4.2)."""

    epochs: int = option(30, "passes over the train frames", low=1)
    batch_size: int = option(8, "frames per optimizer step", low=1)
    lr: float = option(1e-5, "AdamW learning rate of CLIP's tuned blocks, and of each group whose rate is 0")
    adapter_lr: float = option(0.0, "learning rate of the MoA modules (or adapters); 0 = same as --lr", low=0)
    head_lr: float = option(
        0.0, "learning rate of the fresh heads; 0 = same as --lr (1e-4 may suit: G17)", low=0
    )
    weight_decay: float = option(1e-4, "AdamW weight decay", low=0)
    lr_schedule: str = option(
        "constant",
        "constant, or plateau: halve every rate after 5 epochs without a lower val loss",
        ("constant", "plateau"),
    )
    early_stop: int = option(0, "stop after N epochs without a lower validation loss; 0 = never", low=0)
    best_by: str = option(
        "d1", "what picks best.pt on the held-out scenes: the depth's d1, or the loss", ("d1", "loss")
    )
    max_steps: int = option(0, "stop after N steps; 0 = never", low=0)
    val_frac: float = option(
        0.0, "share of train scenes held out for validation and best.pt; never test", low=0
    )
    train_gt: str = option(
        "raw",
        "training depth: Kinect rawDepths, holes left out (probably what the authors used), or in-painted (G12)",
        ("dense", "raw"),
    )
    augment: bool = option(False, "flips, brightness and contrast")
    seed: int = option(0, "seeds the init, the shuffling and the held-out scenes")
    synthetic_frames: int = option(48, "frames of --data synthetic", low=1)
    log_interval: int = option(10, "steps between log lines", low=1)

    def __post_init__(self):
        moa.check_options(self)
        require(self.lr > 0, f"--lr {self.lr}: not > 0")
        require(self.val_frac < 1, f"--val-frac {self.val_frac}: not below 1")
        watched = "" if self.lr_schedule == "constant" else "--lr-schedule plateau"
        watched = watched or (f"--early-stop {self.early_stop}" if self.early_stop else "")
        require(
            self.val_frac > 0 or not watched,
            f"{watched}: needs a validation loss; add --val-frac 0.05 (held-out train scenes, never the test split)",
        )


# -----------------------------------------------------------------------------
# the training run
def main(args):
    """One training run. Returns the model and its optimizer (None when a resumed run had nothing left)."""
    cfg, tc = cli.config_of(moa.DepthConfig, args), cli.config_of(TrainConfig, args)
    out_dir = Path(args.out)
    rt = moa.runtime(args.device)
    record = run_record(args, tc)
    ckpt = check_run_folder(args, cfg, record)
    if ckpt is not None and (why := nothing_left(ckpt, tc)):
        print(f"nothing to do: {out_dir / 'ckpt.pt'}: {why}")
        return None
    torch.manual_seed(tc.seed)

    # data: the official train split, minus a few scenes held out with --val-frac
    ds = open_train_data(args, tc)
    frame_scenes = [ds.scene(i) for i in range(len(ds))]
    train_items, val_items, val_scenes = hold_out_scenes(frame_scenes, tc.val_frac, tc.seed)
    require(len(train_items) >= tc.batch_size, f"--batch-size {tc.batch_size}: more than the train frames")

    # model: CLIP (a bad file fails before the slow decode), then the run folder is taken
    model = moa.build_model(clip_vit.load(args.clip), cfg, moa_impl=args.moa_impl)
    lock, log_file = open_run_folder(args)
    held_out = (
        f"{len(val_scenes)} scene{'s' * (len(val_scenes) != 1)}: {', '.join(sorted(val_scenes)) or 'none'}"
    )
    print(f"data: {len(train_items)} train frames, {len(val_items)} held out ({held_out})")
    # decoded once, onto the device: a step never waits for a DataLoader
    batches = partial(data_nyu.PreloadedBatches, ds, cfg.input_size, tc.batch_size, rt.device)
    train_batches = batches(seed=tc.seed, augment=tc.augment, items=train_items)
    val_batches = batches(shuffle=False, items=val_items) if val_items else None
    require(
        data_nyu.valid_depth(train_batches.depths).any(),
        f"{args.data}: no train frame has a valid depth ({data_nyu.VALID}): in millimetres?",
    )
    print(moa.parameter_table(model.to(rt.device)))

    # optimizer: AdamW in three groups at their own rates; fp16 scales its loss
    optimizer = make_optimizer(model, tc)
    scheduler = make_scheduler(optimizer, tc)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.grad_scaler)
    autocast = torch.autocast(rt.device.type, dtype=rt.dtype, enabled=rt.dtype is not None)
    progress = Progress() if ckpt is None else restore(ckpt, model, optimizer, scheduler, scaler, args, tc)
    if args.recipe != "paper":
        print(
            f"recipe {args.recipe}: "
            + " ".join(f"{moa.flag(k)} {moa.typed(getattr(args, k))}" for k in RECIPES[args.recipe])
        )
    total = min(tc.epochs * len(train_batches), tc.max_steps or math.inf)
    print(
        f"training {total} steps: {tc.epochs} epochs x {len(train_batches)} batches of {tc.batch_size} on {rt.device}, {rt.precision}"
    )

    # the loop
    model.train()
    clock = Clock(progress.step, total, tc.batch_size)
    for epoch in range(progress.epoch + 1, tc.epochs):
        train_batches.set_epoch(epoch)
        for b in train_batches:
            with autocast:
                out = model(b["image"])
            loss, terms = moa.depth_loss(out, b["depth"], b["mask"], cfg)
            require(
                torch.isfinite(loss),
                f"non-finite loss at step {progress.step}; ckpt.pt keeps the last good epoch",
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            progress.step += 1
            cli.stop_if_interrupted()
            if progress.step % tc.log_interval == 0 or progress.step == total:
                log_step(progress, epoch, loss, terms, model, optimizer, clock, log_file)
            if progress.step >= total:
                break

        # end of an epoch: validate (with --val-frac), then best.pt, model.pt and ckpt.pt
        progress.epoch = epoch
        row = {"epoch": epoch, "step": progress.step}
        if val_batches:
            row |= validate_epoch(model, val_batches, autocast, cfg, tc, progress, scheduler)
        # a Ctrl-C from here waits for the files to be whole
        with cli.sigint_held():
            if row.pop("improved", False):
                save_checkpoint(out_dir / "best.pt", model, record, progress)
            save_checkpoint(out_dir / "model.pt", model, record, progress)
            save_checkpoint(out_dir / "ckpt.pt", model, record, progress, optimizer, scheduler, scaler)
            print(json.dumps(row), file=log_file)
        if progress.step >= total:
            break
        if tc.early_stop and progress.bad_epochs >= tc.early_stop:
            print(
                f"early stop after epoch {epoch}: {progress.bad_epochs} epochs without a lower validation loss"
            )
            break
    print(
        f"done: {progress.step} steps in {clock.minutes():.1f} min; checkpoint {out_dir / 'ckpt.pt'}, weights {out_dir / 'model.pt'}"
    )
    return model, optimizer


@dataclass
class Progress:
    """How far a run got: what ckpt.pt records beside the weights, and --resume restores."""

    epoch: int = -1  # the last finished epoch
    step: int = 0
    best_d1: float = -1.0
    best_val_loss: float = math.inf
    # epochs since the validation loss last fell: --early-stop
    bad_epochs: int = 0


def hold_out_scenes(frame_scenes, val_frac, seed):
    """(train items, validation items, held-out scenes): whole scenes are held out, not frames, so that
    neighbouring frames of one room cannot leak into validation. val_frac > 0 holds out >= 1 scene."""
    scenes = sorted(set(frame_scenes))
    n_val = max(1, round(val_frac * len(scenes))) if val_frac > 0 else 0
    held_out = set(np.random.default_rng(seed).permutation(scenes)[:n_val].tolist())
    return (
        [i for i, scene in enumerate(frame_scenes) if scene not in held_out],
        [i for i, scene in enumerate(frame_scenes) if scene in held_out],
        held_out,
    )


def make_optimizer(model, tc):
    """AdamW over the trainable parameters in three named groups, each at its own rate: CLIP's tuned blocks
    (--lr), the MoA modules or adapters (--adapter-lr), the fresh heads (--head-lr); 0 means --lr."""
    groups = [{"name": name, "params": [], "lr": rate} for name, rate in group_rates(tc).items()]
    for name, p in model.named_parameters():
        if p.requires_grad:
            part = {"visual": 0, "moa": 1}.get(name.split(".")[0], 2)  # backbone, adapters, heads
            groups[part]["params"].append(p)
    return torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)


def group_rates(tc):
    return {"backbone": tc.lr, "adapters": tc.adapter_lr or tc.lr, "heads": tc.head_lr or tc.lr}


# --lr-schedule plateau: halve every rate after 5 epochs without a lower val loss; None: the constant
# rate of the paper
def make_scheduler(optimizer, tc):
    if tc.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=5, factor=0.5)
    return None


@torch.no_grad()
def validate(model, batches, autocast):
    """On the held-out scenes: ({output: mean metrics}, mean loss). The metrics of each output
    ({"depth": {"d1": ...}, "depth_cls": ...}), and the training loss averaged over the batches, which the
    plateau schedule, early stopping and --best-by loss watch."""
    model.eval()
    rows = {}
    losses = []
    for b in batches:
        with autocast:
            out = model(b["image"])
        losses.append(moa.depth_loss(out, b["depth"], b["mask"], model.cfg)[0].item())
        # each output; resized frames: no crop; a frame without a valid pixel scores NaN, left out
        for key in [k for k in moa.OUTPUTS if k in out]:
            rows.setdefault(key, []).append(
                data_nyu.depth_metrics(out[key][:, 0].float(), b["depth"][:, 0], crop="none")
            )
    model.train()
    return {key: data_nyu.mean_metrics(r) for key, r in rows.items()}, sum(losses) / len(losses)


def validate_epoch(model, batches, autocast, cfg, tc, progress, scheduler):
    """validate(), printed, and what it decides: the best scores so far, early stopping's count, the plateau
    schedule's step. -> the epoch's log fields, "improved": whether best.pt should take this epoch."""
    val, val_loss = validate(model, batches, autocast)
    scores = [
        f"{moa.OUTPUTS[k]} d1 {m['d1']:.4f} abs_rel {m['abs_rel']:.4f} rmse {m['rmse']:.4f}"
        for k, m in val.items()
    ]
    print(f"epoch {progress.epoch} | val loss {val_loss:.4f} | " + " | ".join(scores))
    improved = {"d1": val["depth"]["d1"] > progress.best_d1, "loss": val_loss < progress.best_val_loss}
    progress.bad_epochs = 0 if improved["loss"] else progress.bad_epochs + 1
    progress.best_d1 = max(progress.best_d1, val["depth"]["d1"])
    progress.best_val_loss = min(progress.best_val_loss, val_loss)
    if scheduler:
        scheduler.step(val_loss)
    row = {"val_loss": val_loss, "improved": improved[tc.best_by]}
    # val_d1: the fused output; val_binned_d1: the binned...
    for key, metrics in val.items():
        prefix = "val_" if key == "depth" else f"val_{moa.OUTPUTS[key]}_"
        row.update({prefix + k: v for k, v in metrics.items()})
    return row


# -----------------------------------------------------------------------------
# logging and checkpoints
@dataclass
class Clock:
    """Images per second since the last log line, and the time left at this process's own pace (a resumed
    run did not take the first steps)."""

    first_step: int
    total: int
    batch_size: int

    def __post_init__(self):
        self.t0 = self.last = time.time()
        self.last_step = self.first_step

    def tick(self, step):
        """-> (images per second since the last tick, minutes left)"""
        now = time.time()
        ips = (step - self.last_step) * self.batch_size / (now - self.last)
        eta = (now - self.t0) / (step - self.first_step) * (self.total - step) / 60
        self.last, self.last_step = now, step
        return ips, eta

    def minutes(self):
        return (time.time() - self.t0) / 60


def log_step(progress, epoch, loss, terms, model, optimizer, clock, log_file):
    """One log line on stdout and the same numbers as JSON in log.jsonl, for plots."""
    ips, eta = clock.tick(progress.step)
    row = {"step": progress.step, "epoch": epoch, "loss": loss.item(), **terms}
    # each group's rate now, in make_optimizer's order: backbone, adapters, heads
    row |= {key: group["lr"] for key, group in zip(("lr", "adapter_lr", "head_lr"), optimizer.param_groups)}
    row |= {"img_s": ips, "gate_entropy": model.gate_entropy()}
    parts = " ".join(f"{k} {v:.3f}" for k, v in terms.items())
    print(
        f"step {progress.step}/{clock.total} | loss {row['loss']:.4f} ({parts}) | {describe_rates(optimizer)} "
        f"| {ips:.1f} img/s | gate H {row['gate_entropy']:.3f} | eta {eta:.1f} min"
    )
    print(json.dumps(row), file=log_file)


def describe_rates(optimizer):
    """'lr 1.0e-05 adapter lr 1.0e-04': the backbone's rate now, then any other group's that differs (the
    groups in make_optimizer's order: backbone, adapters, heads)."""
    backbone, *others = optimizer.param_groups
    text = f"lr {backbone['lr']:.1e}"
    for group, label in zip(others, ("adapter", "head")):
        if group["params"] and group["lr"] != backbone["lr"]:
            text += f" {label} lr {group['lr']:.1e}"
    return text


def save_checkpoint(path, model, record, progress, optimizer=None, scheduler=None, scaler=None):
    """moa.save_checkpoint with what this run adds: its record (run_record) and its progress. With the
    optimizer (ckpt.pt): AdamW's moments, the schedule, fp16's loss scale and the random stream, which
    --resume restores."""
    extra = {**record, **asdict(progress)}
    if optimizer:
        extra |= {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler else None,
            "grad_scaler": scaler.state_dict(),
            "rng": torch.get_rng_state(),
        }
    moa.save_checkpoint(path, model, **extra)


# -----------------------------------------------------------------------------
# the run folder: one live run per --out, an earlier run never replaced by accident, --resume
RUN_FILES = ("ckpt.pt", "model.pt", "best.pt")
# in --out: holds the PID of the run that uses the folder
LOCK_NAME = "train.lock"


def run_record(args, tc):
    """What each checkpoint records of the run beside the model: the CLIP weights (name and SHA-256, which
    evaluate.py checks), the data (an absolute path, so that evaluate.py finds it from anywhere) and seed
    evaluate.py reads, and the training config."""
    data = args.data if args.data == "synthetic" else str(Path(args.data).resolve())
    clip = {"name": args.clip, "sha256": clip_vit.weights_sha256(args.clip)}
    return {"clip": clip, "data": data, "seed": tc.seed, "train_config": asdict(tc)}


def check_run_folder(args, cfg, record):
    """Before any work: --out is not in use, holds no earlier run unless --resume or --overwrite says what to
    do with it, and with --resume its ckpt.pt fits these flags. -> that checkpoint, or None."""
    out_dir = Path(args.out)
    check_lock(out_dir)
    earlier = [name for name in RUN_FILES if (out_dir / name).exists()]
    ckpt_path = out_dir / "ckpt.pt"
    require(not args.resume or ckpt_path.exists(), f"{ckpt_path}: --resume given but there is no checkpoint")
    resumable = "continue it with --resume, " if "ckpt.pt" in earlier else "no ckpt.pt to resume from; "
    require(
        not earlier or args.resume or args.overwrite,
        f"{out_dir}: holds {' and '.join(earlier)} of an earlier run; {resumable}pick another --out, or "
        "replace it with --overwrite",
    )
    if not args.resume:
        return None
    ckpt = moa.load_checkpoint(ckpt_path)
    require(
        "optimizer" in ckpt,
        f"{ckpt_path}: weights only (a model.pt), without AdamW's state; --resume continues from the ckpt.pt "
        "that train.py writes beside it (evaluate.py reads this one), or start afresh with --overwrite",
    )
    moa.check_clip(ckpt, args.clip, record["clip"]["sha256"], ckpt_path)
    # the model and the data plan stay; a flag that would change them is refused
    saved = {**ckpt.get("train_config", {}), **ckpt["model_config"], "data": ckpt["data"]}
    for name, value in {**record["train_config"], **asdict(cfg), "data": record["data"]}.items():
        flag = moa.flag(name)
        require(
            name in MAY_CHANGE or saved.get(name, value) == value,
            f"{ckpt_path}: trained with {flag} {moa.typed(saved.get(name))}; --resume keeps the model and "
            f"the data plan: drop {flag}, or start afresh with --overwrite",
        )
    return ckpt


# what --resume may change mid-run: the loss, the rates and the schedule, how long and how it logs
MAY_CHANGE = (
    "loss",
    "silog",
    "composite",
    "w_cls",
    "w_reg",
    "w_silog",
    "epochs",
    "lr",
    "adapter_lr",
    "head_lr",
    "weight_decay",
    "lr_schedule",
    "early_stop",
    "best_by",
    "max_steps",
    "log_interval",
)


def nothing_left(ckpt, tc):
    """Why a resumed run has nothing left to do, as one line, or None when it has."""
    done = ckpt["epoch"] + 1
    if done >= tc.epochs:
        return f"{done} of --epochs {tc.epochs} are done; raise --epochs above {done} to train on"
    if tc.max_steps and ckpt["step"] >= tc.max_steps:
        return f"{ckpt['step']} steps of --max-steps {tc.max_steps} are done; raise --max-steps (0 = no cap) to train on"
    if tc.early_stop and ckpt.get("bad_epochs", 0) >= tc.early_stop:
        return (
            f"early stopping ended it after {done} epochs ({ckpt['bad_epochs']} without a lower validation "
            "loss); raise --early-stop (0 = never) to train on"
        )
    return None


def open_train_data(args, tc):
    if args.data == "synthetic":
        return data_nyu.SyntheticDepth(n=tc.synthetic_frames, seed=tc.seed)
    return data_nyu.NYUDepthV2(
        args.data, "train", splits_path=args.splits, raw_depth=tc.train_gt == "raw", download=args.download
    )


def open_run_folder(args):
    """Take --out: make it, lock it for this process, clear what --overwrite replaces and what a killed
    checkpoint write left. -> (the lock, held while the file is open; the log file, appended to on --resume,
    line-buffered: each entry is on disk at once, even if the run is killed)."""
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = take_lock(out_dir)
        for name in RUN_FILES if args.overwrite else ():
            (out_dir / name).unlink(missing_ok=True)
        for stale in out_dir.glob(".*.pt.*.tmp"):
            stale.unlink()
        return lock, open(out_dir / "log.jsonl", "a" if args.resume else "w", buffering=1)
    except OSError as e:
        raise clip_vit.UserError(f"{out_dir}: cannot write there ({e.strerror or e})") from None


def take_lock(out_dir):
    """Hold out_dir for this process: an exclusive flock on out_dir/train.lock, which then holds our PID.
    The kernel drops a flock when its process ends, however it ends, so a killed run never blocks the
    next one. The file stays open (and locked) until the process ends."""
    lock_file = open(out_dir / LOCK_NAME, "a+")
    # a run started at the same moment may have got there first
    flock(lock_file, out_dir)
    lock_file.truncate(0)
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file


def check_lock(out_dir):
    """Stop if a live train.py holds out_dir. Creates nothing: no lock file (or no folder), nobody holds it;
    a lock file whose run has ended, even by a kill, is free (the kernel dropped its lock)."""
    with contextlib.suppress(OSError), open(out_dir / LOCK_NAME) as f:
        flock(f, out_dir)


def flock(lock_file, out_dir):
    """An exclusive flock on lock_file (released when it closes); held by a live run: UserError with its PID."""
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        raise clip_vit.UserError(
            f"{out_dir}: in use by a running train.py (PID {lock_file.read().strip() or 'unknown'}); wait for it "
            "to end, or pick another --out"
        ) from None


def restore(ckpt, model, optimizer, scheduler, scaler, args, tc):
    """--resume: the trainable weights, AdamW's moments (no restart bump), the schedule, fp16's loss scale
    and the random stream of an uninterrupted run; then the rates and weight decay of this command where it
    changed them (else those restored, the plateau schedule's cuts included). -> the run's Progress."""
    ckpt_path = Path(args.out) / "ckpt.pt"
    moa.load_trainable_state_dict(model, ckpt["model"], ckpt_path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    # other parameter groups: written by an older train.py
    except ValueError as e:
        raise clip_vit.UserError(
            f"{ckpt_path}: its optimizer state does not fit ({e}); start afresh with --overwrite"
        ) from None
    if scheduler and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler.is_enabled() and ckpt.get("grad_scaler"):
        scaler.load_state_dict(ckpt["grad_scaler"])
    torch.set_rng_state(ckpt["rng"])
    before = ckpt.get("train_config", {})
    changed = {k: (before[k], v) for k, v in asdict(tc).items() if k in before and before[k] != v}
    for group in optimizer.param_groups:
        if changed.keys() & {"lr", "adapter_lr", "head_lr"}:
            group["lr"] = group_rates(tc)[group["name"]]
        group["weight_decay"] = tc.weight_decay
    progress = Progress(**{f.name: ckpt.get(f.name, f.default) for f in fields(Progress)})
    news = ", ".join(f"{moa.flag(k)} {moa.typed(a)} -> {moa.typed(b)}" for k, (a, b) in changed.items())
    print(
        f"resumed from {ckpt_path}: epoch {progress.epoch + 1}, step {progress.step}; changed: {news or 'nothing'}"
    )
    return progress


def resume_hint(args):
    """What Ctrl-C prints: the checkpoint in --out and the command that continues from it."""
    ckpt_path = Path(args.out) / "ckpt.pt"
    try:
        epoch = moa.load_checkpoint(ckpt_path)["epoch"]
    except clip_vit.UserError:
        return f"no checkpoint was written in {args.out}; rerun to start again"
    # the same command with --resume (and without --overwrite, which would start afresh)
    again = [a for a in sys.argv if a not in ("--resume", "--overwrite")] + ["--resume"]
    return f"the last checkpoint is {ckpt_path} (after epoch {epoch + 1} of {args.epochs}); continue with: python {shlex.join(again)}"


# -----------------------------------------------------------------------------
# flags: the run's own, then one per TrainConfig and DepthConfig field
RECIPES = {
    # every flag's own default
    "paper": {},
    # Table 1 rows 2-4 as the authors' earlier code trained them (AdaDepthCLIP: train_vit_b32_losses.py and
    # the compiled MoA model; docs/paper-notes.md §4)
    "adadepthclip": {
        "epochs": 50,
        "batch_size": 8,
        "lr": 1e-5,  # their lr_backbone: CLIP's blocks 8-11
        # their lr_adapters: the adapters or MoA modules, gates included
        "adapter_lr": 1e-4,
        "weight_decay": 0.01,
        # ReduceLROnPlateau on the validation loss, patience 5, factor 0.5
        "lr_schedule": "plateau",
        # their --patience: stop after 10 epochs without a lower validation loss
        "early_stop": 10,
        # their best_model.pth: the epoch with the lowest validation loss
        "best_by": "loss",
        # they validated on the TEST split; here: held-out train scenes
        "val_frac": 0.05,
        # their sync_depth_*.png: probably rawDepths, holes 0 (G12)
        "train_gt": "raw",
        # DepthCLIP's 7 prompts and bin depths
        "head": "similarity",
        "sim_bins": 7,
        "use_context": False,
        "loss": "composite",
        # SSIM from zero-padded maps; SSIM and L1 over every pixel
        "composite": "authors",
        # their fresh nn.Linear(768, 512), in no optimizer group: random and frozen (G23)
        "sim_proj": "random",
        # their adapters start from nn.Linear's init (G20)
        "adapter_init": "default",
        # their MoA gate ends in a plain softmax
        "temperature": 1.0,
    },
}


def make_parser():
    parser = cli.ArgumentParser(
        prog="train.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add = parser.add_argument
    add(
        "--data",
        default=data_nyu.FILE_NAME,
        metavar="PATH",
        help="NYU Depth V2 labeled .mat, or synthetic (procedural rooms); if missing, downloaded (2.97 GB) only under this name in an existing folder, or with --download (default: %(default)s)",
    )
    add(
        "--splits",
        metavar="PATH",
        help="the official splits.mat (default: the one next to --data, else in ~/.cache/nyu_depth_v2/, else downloaded there, 2.6 KB)",
    )
    add(
        "--clip",
        default="ViT-B/32",
        metavar="NAME|PATH",
        help="CLIP weights: ViT-B/32 (downloaded once to ~/.cache/clip, 354 MB), a ViT-B-32.pt or state-dict file, or random (offline) (default: %(default)s)",
    )
    add(
        "--out",
        default="out",
        metavar="DIR",
        help="folder for ckpt.pt, model.pt, best.pt and log.jsonl (default: %(default)s)",
    )
    add("--resume", action="store_true", help="continue the run in --out from its ckpt.pt")
    add("--overwrite", action="store_true", help="start afresh in an --out that holds a checkpoint")
    download = parser.add_mutually_exclusive_group()
    download.add_argument(
        "--download", action="store_const", const=True, help="fetch a missing --data, whatever its name"
    )
    download.add_argument(
        "--no-download", dest="download", action="store_const", const=False, help="fetch nothing"
    )
    add(
        "--recipe",
        choices=tuple(RECIPES),
        default="paper",
        help="paper: §4.2's recipe, the flags' defaults. adadepthclip: Table 1 rows 2-4 as the authors' earlier code trained them (50 epochs, adapter lr 1e-4, weight decay 0.01, plateau schedule, early stopping, their composite loss, similarity head, gate temperature 1); flags given win (default: %(default)s)",
    )
    add(
        "--device",
        default="auto",
        help="auto (cuda if present, else cpu), cpu, cuda or cuda:N (default: %(default)s)",
    )
    add(
        "--moa-impl",
        choices=moa.MOA_IMPLS,
        default="auto",
        help="the MoA layer's code: the fused Triton kernel or plain PyTorch; auto = Triton on CUDA (default: %(default)s)",
    )
    cli.add_options(parser, TrainConfig)
    cli.add_options(parser, moa.DepthConfig)
    return parser


def parse_args(argv=None):
    """The flags of argv (default: the command line), with --recipe's values as the defaults. A bad flag or a
    broken rule of the configs: one `error:` line, exit 2."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if RECIPES[args.recipe]:
        # a second pass with the preset's values as the defaults: a flag given explicitly still wins
        parser.set_defaults(**RECIPES[args.recipe])
        args = parser.parse_args(argv)
    try:
        cli.config_of(TrainConfig, args)
        cli.config_of(moa.DepthConfig, args)
    except clip_vit.UserError as e:
        parser.error(str(e))
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --out and --overwrite replaces it: give one")
    if args.clip not in (*clip_vit.MODELS, "random") and not Path(args.clip).is_file():
        parser.error(f"--clip {args.clip}: no such file, nor one of {', '.join(clip_vit.MODELS)}, random")
    on_cpu = args.device == "cpu" or not torch.cuda.is_available()
    if args.moa_impl == "triton" and on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--moa-impl triton needs a CUDA device (or TRITON_INTERPRET=1, slowly)")
    return args


if __name__ == "__main__":
    args = parse_args()
    # each log line at once, also through a pipe or tee
    sys.stdout.reconfigure(line_buffering=True)
    cli.run(lambda: main(args), lambda: resume_hint(args), "lower --batch-size")
