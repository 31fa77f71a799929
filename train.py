"""
Train MoA-DepthCLIP on NYU Depth V2, as one script read top to bottom: flags, then main(), which sets up
the run and loops over the epochs. One process on one device: the paper trained on a single H100
(30 epochs x 795 frames, batch 8).

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
import fcntl
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import clip_vit
import data_nyu
import moa

# -----------------------------------------------------------------------------
# recipes: the paper's (every flag's own default), and Table 1 rows 2-4 as the authors' earlier code
# trained them (AdaDepthCLIP: train_vit_b32_losses.py, and the compiled MoA model; docs/paper-notes.md §4).
# A preset only moves defaults: a flag given on the command line wins over it.
RECIPES = {
    "paper": {},
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
        "use_context": 0,
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
# --lr-schedule plateau: halve every rate after 5 epochs without a lower val loss
PLATEAU_PATIENCE = 5
PLATEAU_FACTOR = 0.5
# what a run leaves in --out, besides log.jsonl
RUN_FILES = ("ckpt.pt", "model.pt", "best.pt")
# in --out: holds the PID of the run that uses the folder
LOCK_NAME = "train.lock"

# -----------------------------------------------------------------------------
# flags: the defaults are the paper's recipe; every choice it leaves open is a flag


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, except that a bad flag ends in one `error:` line and a pointer to --help,
    without the whole usage before it."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        print(f"(python {self.prog} --help lists every flag)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's line breaks and ends each flag's line with its default."""


# "2,5,8,11" -> (2, 5, 8, 11); a typo reads "invalid int_list value"
def int_list(text):
    return tuple(int(x) for x in text.split(","))


def make_parser():
    parser = ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False
    )
    add = parser.add_argument
    # files and data
    add(
        "--data",
        default=data_nyu.FILE_NAME,
        metavar="PATH",
        help="NYU Depth V2 labeled .mat, or synthetic (procedural rooms); if missing, downloaded (2.97 GB) "
        "only under this name in an existing folder, or with --download",
    )
    add(
        "--splits",
        metavar="PATH",
        help="the official splits.mat; None: the one next to --data, else in ~/.cache/nyu_depth_v2/, "
        "else downloaded there (2.6 KB)",
    )
    add(
        "--clip",
        default="ViT-B/32",
        metavar="NAME|PATH",
        help="CLIP weights: ViT-B/32 (downloaded once to ~/.cache/clip, 354 MB), a ViT-B-32.pt or "
        "state-dict file, or random (offline)",
    )
    add("--out", default="out", metavar="DIR", help="folder for ckpt.pt, model.pt, best.pt and log.jsonl")
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
        "--train-gt",
        choices=("dense", "raw"),
        default="raw",
        help="training depth: Kinect `rawDepths`, holes left out, as the authors' sync_depth files probably "
        "were; or the in-painted `depths` (GUESS G12)",
    )
    add(
        "--val-frac",
        type=float,
        default=0.0,
        metavar="X",
        help="train scenes held out to validate on and pick best.pt; 0 = train on all 795 frames (the "
        "paper). Never the test split",
    )
    add(
        "--augment", type=int, choices=(0, 1), default=0, metavar="0/1", help="flips, brightness and contrast"
    )
    add("--synthetic-frames", type=int, default=48, metavar="N", help="frames of --data synthetic")
    # optimisation
    add(
        "--recipe",
        choices=tuple(RECIPES),
        default="paper",
        help="paper: §4.2's recipe, the flags' defaults. adadepthclip: Table 1 rows 2-4 as the authors' "
        "earlier code trained them (50 epochs, adapter lr 1e-4, weight decay 0.01, plateau schedule, "
        "early stopping, their composite loss, similarity head with a random frozen projection, adapters "
        "from nn.Linear's init, gate temperature 1); flags given win",
    )
    add("--epochs", type=int, default=30, metavar="N", help="passes over the train frames")
    add("--batch-size", type=int, default=8, metavar="N", help="frames per optimizer step")
    add(
        "--lr",
        type=float,
        default=1e-5,
        metavar="X",
        help="AdamW learning rate of CLIP's tuned blocks, and of each group whose own rate is 0",
    )
    add(
        "--adapter-lr",
        type=float,
        default=0.0,
        metavar="X",
        help="learning rate of the MoA modules (or adapters); 0 = same as --lr (the paper)",
    )
    add(
        "--head-lr",
        type=float,
        default=0.0,
        metavar="X",
        help="learning rate of the fresh depth heads; 0 = same as --lr (the paper); 1e-4 may suit them "
        "better (G17)",
    )
    add("--weight-decay", type=float, default=1e-4, metavar="X", help="AdamW weight decay")
    add(
        "--lr-schedule",
        choices=("constant", "plateau"),
        default="constant",
        help="constant (the paper), or plateau: halve every rate after 5 epochs without a lower "
        "validation loss (needs --val-frac)",
    )
    add(
        "--early-stop",
        type=int,
        default=0,
        metavar="N",
        help="stop after N epochs without a lower validation loss (needs --val-frac); 0 = never",
    )
    add(
        "--best-by",
        choices=("d1", "loss"),
        default="d1",
        help="what picks best.pt on the held-out scenes: the fused output's d1, or the loss",
    )
    add("--max-steps", type=int, default=0, metavar="N", help="stop after N steps; 0 = never")
    # runtime
    add("--seed", type=int, default=0, metavar="N", help="seeds the init, shuffling, held-out scenes")
    add("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda or cuda:N")
    add(
        "--moa-impl",
        choices=("auto", "triton", "torch"),
        default="auto",
        help="the MoA layer's code: the fused Triton kernel or plain PyTorch; auto = Triton on CUDA",
    )
    add("--log-interval", type=int, default=10, metavar="N", help="steps between log lines")
    # the model: one flag per moa.DepthConfig field
    add("--num-experts", type=int, default=4, metavar="N", help="experts K per MoA layer (Table 2)")
    add(
        "--top-k",
        type=int,
        default=0,
        metavar="N",
        help="experts each token mixes; 0 = all experts (the paper)",
    )
    add("--bottleneck", type=int, default=64, metavar="N", help="expert width d_b, channels")
    add("--gate-hidden", type=int, default=128, metavar="N", help="hidden width of the gate MLP, channels")
    add("--temperature", type=float, default=2.0, metavar="X", help="gate softmax temperature tau")
    add(
        "--moa-layers",
        type=int_list,
        default="2,5,8,11",
        metavar="LIST",
        help="0-based image blocks followed by a MoA (ViT-B/32: 0..11; G9)",
    )
    add("--trainable-blocks", type=int, default=4, metavar="N", help="last image blocks tuned, 0..12")
    add(
        "--use-moa",
        type=int,
        choices=(0, 1),
        default=1,
        metavar="0/1",
        help="MoA modules; 0 = one plain adapter each (Table 1's baseline)",
    )
    add(
        "--use-context",
        type=int,
        choices=(0, 1),
        default=1,
        metavar="0/1",
        help="append the text scene-context vector (dual head only)",
    )
    add(
        "--head",
        choices=moa.CHOICES["head"],
        default="dual",
        help="the paper's dual head, or DepthCLIP's similarity head (Table 1)",
    )
    add(
        "--sim-bins",
        type=int,
        choices=moa.CHOICES["sim_bins"],
        default=7,
        help="bins of the similarity head: DepthCLIP's 7 or the paper's 10 (G24)",
    )
    add(
        "--sim-proj",
        choices=moa.CHOICES["sim_proj"],
        default="clip",
        help="the similarity head's 768 -> 512 map: CLIP's ln_post and proj, or random: the authors' fresh linear "
        "layer, never trained (G23)",
    )
    add(
        "--adapter-init",
        choices=moa.CHOICES["adapter_init"],
        default="zero",
        help="the adapters' up-projections start at zero (identity) or at nn.Linear's init, as the authors' (G20)",
    )
    add("--num-bins", type=int, default=128, metavar="N", help="bins N of the dual head (Table 3)")
    add(
        "--bin-spacing",
        choices=moa.CHOICES["bin_spacing"],
        default="uniform",
        help="how the dual head's bin centres spread over the depth range (G3)",
    )
    add("--min-depth", type=float, default=1e-3, metavar="METRES", help="smallest depth predicted")
    add("--max-depth", type=float, default=10.0, metavar="METRES", help="largest depth predicted")
    add(
        "--fusion",
        choices=moa.CHOICES["fusion"],
        default="mean",
        help="the dual head's final depth: the mean of both maps, or one of them (G2)",
    )
    add(
        "--input-size",
        type=int_list,
        default="224",
        metavar="H,W",
        help="network input in pixels, multiples of 32; one side = square (G16)",
    )
    # the loss
    add(
        "--loss",
        choices=moa.CHOICES["loss"],
        default="paper",
        help="the paper's loss, or Table 1's composite loss (G25)",
    )
    add(
        "--silog",
        choices=moa.CHOICES["silog"],
        default="paper",
        help="the SILog form in the paper's loss (G6)",
    )
    add(
        "--composite",
        choices=moa.CHOICES["composite"],
        default="ours",
        help="the composite loss's SSIM and L1: ours (reflection padding, valid pixels) or the authors' "
        "(zero padding, every pixel, holes included)",
    )
    add(
        "--w-cls",
        type=float,
        default=1.0,
        metavar="X",
        help="weight of the bins' cross-entropy in the paper's loss",
    )
    add("--w-reg", type=float, default=1.0, metavar="X", help="weight of the L1 term in the paper's loss")
    add(
        "--w-silog", type=float, default=0.5, metavar="X", help="weight of the SILog term in the paper's loss"
    )
    return parser


def check_args(parser, args):
    """The rules that argparse's types and choices cannot say: ranges, and flags that must agree with each
    other. A broken rule ends in parser.error, one line, before any work."""
    at_least = {
        "epochs": 1,
        "batch_size": 1,
        "synthetic_frames": 1,
        "log_interval": 1,
        "num_experts": 1,
        "bottleneck": 1,
        "gate_hidden": 1,
        "num_bins": 2,
        "top_k": 0,
        "trainable_blocks": 0,
        "max_steps": 0,
        "early_stop": 0,
        "adapter_lr": 0,
        "head_lr": 0,
        "weight_decay": 0,
    }
    for name, low in at_least.items():
        value = getattr(args, name)
        # "not": a nan is refused too
        if not value >= low:
            parser.error(f"argument --{name.replace('_', '-')}: {value} is not >= {low}")
    for name in ("lr", "temperature", "min_depth", "max_depth"):
        value = getattr(args, name)
        if not value > 0:
            parser.error(f"argument --{name.replace('_', '-')}: {value} is not > 0")
    if args.trainable_blocks > 12:
        parser.error(f"argument --trainable-blocks: {args.trainable_blocks} is not in 0..12")
    if not 0 <= args.val_frac < 1:
        parser.error(f"argument --val-frac: {args.val_frac} is not in [0, 1)")
    layers = args.moa_layers
    if list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] > 11:
        parser.error(
            f"argument --moa-layers: {','.join(map(str, layers))} is not increasing block numbers in 0..11"
        )
    if len(args.input_size) > 2 or any(side <= 0 or side % 32 for side in args.input_size):
        # ViT-B/32's patches must tile the input exactly
        parser.error(
            f"argument --input-size: {','.join(map(str, args.input_size))} is not one or two multiples of 32"
        )
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --out and --overwrite replaces it: give one")
    if args.top_k > args.num_experts:
        parser.error(f"--top-k {args.top_k}: more than the {args.num_experts} experts (0 = all experts)")
    if args.min_depth >= args.max_depth:
        parser.error(f"--min-depth {args.min_depth} must be below --max-depth {args.max_depth}")
    if args.head == "similarity" and args.use_context:
        parser.error("--head similarity: it has no context input; add --use-context 0")
    if args.val_frac == 0 and args.lr_schedule == "plateau":
        parser.error(
            "--lr-schedule plateau: needs a validation loss; add --val-frac 0.05 (held-out "
            "train scenes; the test split is never used)"
        )
    if args.val_frac == 0 and args.early_stop:
        parser.error(f"--early-stop {args.early_stop}: needs a validation loss; add --val-frac 0.05")
    if args.clip not in (*clip_vit.MODELS, "random") and not Path(args.clip).is_file():
        parser.error(f"--clip {args.clip}: no such file, nor one of {', '.join(clip_vit.MODELS)}, random")


def parse_args(argv=None):
    """The flags of argv (default: the command line), with --recipe's values as the defaults."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if RECIPES[args.recipe]:
        # a second pass with the preset's values as the defaults: a flag given explicitly still wins
        parser.set_defaults(**RECIPES[args.recipe])
        args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def model_config(args):
    """The moa.DepthConfig of the flags; one --input-size side means a square input."""
    input_size = args.input_size * 2 if len(args.input_size) == 1 else args.input_size
    return moa.DepthConfig(
        num_experts=args.num_experts,
        top_k=args.top_k,
        bottleneck=args.bottleneck,
        gate_hidden=args.gate_hidden,
        temperature=args.temperature,
        moa_layers=args.moa_layers,
        trainable_blocks=args.trainable_blocks,
        use_moa=bool(args.use_moa),
        use_context=bool(args.use_context),
        head=args.head,
        sim_bins=args.sim_bins,
        sim_proj=args.sim_proj,
        adapter_init=args.adapter_init,
        num_bins=args.num_bins,
        bin_spacing=args.bin_spacing,
        min_depth=args.min_depth,
        max_depth=args.max_depth,
        fusion=args.fusion,
        input_size=input_size,
        loss=args.loss,
        silog=args.silog,
        w_cls=args.w_cls,
        w_reg=args.w_reg,
        w_silog=args.w_silog,
        composite=args.composite,
    )


LOSS_FIELDS = ("loss", "silog", "composite", "w_cls", "w_reg", "w_silog")  # may change on --resume


# a config value as a user types it: (2, 5, 8, 11) -> "2,5,8,11", True -> 1
def as_typed(value):
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return int(value) if isinstance(value, bool) else value


# -----------------------------------------------------------------------------
# the run folder: one live run per --out, and an earlier run is never replaced by accident


# the one line for an --out that a live run holds
def in_use(out_dir, pid):
    return clip_vit.UserError(
        f"{out_dir}: in use by a running train.py (PID {pid}); wait for it to end, or pick another --out"
    )


def lock_holder(out_dir):
    """The PID (as text) of a live train.py that holds out_dir, or None. Creates nothing."""
    try:
        with open(out_dir / LOCK_NAME) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when f closes
            except BlockingIOError:
                return f.read().strip() or "unknown"
    # no lock file (or no folder): nobody holds it
    except OSError:
        return None
    # a lock file whose run has ended, even by a kill: the kernel dropped its lock
    return None


def take_lock(out_dir):
    """Hold out_dir for this process: an exclusive flock on out_dir/train.lock, which then holds our PID.
    The kernel drops a flock when its process ends, however it ends, so a killed run never blocks the
    next one. Keep the returned file open for as long as the run lasts."""
    lock_file = open(out_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # a run started at the same moment got there first
    except BlockingIOError:
        lock_file.seek(0)
        pid = lock_file.read().strip() or "unknown"
        lock_file.close()
        raise in_use(out_dir, pid) from None
    lock_file.truncate(0)
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file


def load_resume_checkpoint(ckpt_path, args, cfg, clip_sha):
    """--out/ckpt.pt, checked: the same CLIP weights and the same model flags (the loss may change)."""
    ckpt = moa.load_checkpoint(ckpt_path)
    moa.check_clip(ckpt, args.clip, clip_sha, ckpt_path)
    saved = ckpt["model_config"]  # asdict(DepthConfig) as it was trained
    for name, value in vars(cfg).items():
        if name not in LOSS_FIELDS and saved.get(name, value) != value:
            raise clip_vit.UserError(
                f"{ckpt_path}: trained with --{name.replace('_', '-')} "
                f"{as_typed(saved[name])}; --resume needs the same model flags"
            )
    return ckpt


def nothing_left(ckpt, args):
    """Why a resumed run has nothing left to do, as one line, or None when it has."""
    done = ckpt["epoch"] + 1
    if done >= args.epochs:
        return f"{done} of --epochs {args.epochs} are done; raise --epochs above {done} to train on"
    if args.max_steps and ckpt["step"] >= args.max_steps:
        return (
            f"{ckpt['step']} steps of --max-steps {args.max_steps} are done; raise --max-steps "
            "(0 = no cap) to train on"
        )
    if args.early_stop and ckpt.get("bad_epochs", 0) >= args.early_stop:
        return (
            f"early stopping ended it after {done} epochs ({ckpt['bad_epochs']} without a lower "
            "validation loss); raise --early-stop (0 = never) to train on"
        )
    return None


def hold_out_scenes(frame_scenes, val_frac, seed):
    """(train items, validation items, held-out scenes): whole scenes are held out, not frames, so that
    neighbouring frames of one room cannot leak into validation. val_frac > 0 holds out >= 1 scene."""
    scenes = sorted(set(frame_scenes))
    n_val = max(1, round(val_frac * len(scenes))) if val_frac > 0 else 0
    held_out = set(np.random.default_rng(seed).permutation(scenes)[:n_val].tolist())
    train_items = [i for i, scene in enumerate(frame_scenes) if scene not in held_out]
    val_items = [i for i, scene in enumerate(frame_scenes) if scene in held_out]
    return train_items, val_items, held_out


# -----------------------------------------------------------------------------
# optimizer, schedule, validation


def make_optimizer(model, args):
    """AdamW over the trainable parameters in three named groups, each at its own rate: CLIP's tuned blocks
    (--lr), the MoA modules or adapters (--adapter-lr), the fresh heads (--head-lr); 0 means --lr."""
    params = {"backbone": [], "adapters": [], "heads": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("visual."):
            params["backbone"].append(p)
        elif name.startswith("moa."):
            params["adapters"].append(p)
        # cls_head, reg_head (the similarity head has no weights: an empty group)
        else:
            params["heads"].append(p)
    rates = {"backbone": args.lr, "adapters": args.adapter_lr or args.lr, "heads": args.head_lr or args.lr}
    groups = [{"name": name, "params": params[name], "lr": rates[name]} for name in params]
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


# None: the constant rate of the paper
def make_scheduler(optimizer, args):
    if args.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", patience=PLATEAU_PATIENCE, factor=PLATEAU_FACTOR
        )
    return None


def describe_rates(optimizer):
    """'lr 1.0e-05 adapter lr 1.0e-04': the backbone's rate now, then any other group's that differs."""
    groups = {group["name"]: group for group in optimizer.param_groups}
    base = groups["backbone"]["lr"]
    text = f"lr {base:.1e}"
    for name, label in (("adapters", "adapter"), ("heads", "head")):
        if groups[name]["params"] and groups[name]["lr"] != base:
            text += f" {label} lr {groups[name]['lr']:.1e}"
    return text


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
        loss, _ = moa.depth_loss(out, b["depth"], b["mask"], model.cfg)
        losses.append(loss.item())
        # the similarity head has "depth" only
        for key in [k for k in moa.OUTPUTS if k in out]:
            # each frame's metrics, the batch at once; resized frames: no crop. A frame without a valid
            # pixel scores NaN, and mean_metrics leaves it out
            metrics = data_nyu.depth_metrics(out[key][:, 0].float(), b["depth"][:, 0], crop="none")
            rows.setdefault(key, []).append(metrics)
    model.train()
    return {key: data_nyu.mean_metrics(r) for key, r in rows.items()}, sum(losses) / len(losses)


# -----------------------------------------------------------------------------
# the run

# the epoch --out/ckpt.pt holds, once this run resumed from it or wrote it: Ctrl-C says
saved_epoch = None


def main(args):
    """One training run. Returns the model and its optimizer (None when a resumed run had nothing left)."""
    global saved_epoch
    cfg = model_config(args)
    # a device this machine lacks: UserError
    dev, amp_dtype, use_scaler, precision = moa.runtime(args.device)
    # checked here, not at step 1: the kernel would fail only after the slow data decode
    if args.moa_impl == "triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise clip_vit.UserError("--moa-impl triton needs a CUDA device (or TRITON_INTERPRET=1, slowly)")
    autocast = torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # bf16/fp16 on CUDA
    # fp16: the loss scaled, the step unscaled
    scaler = torch.amp.GradScaler(dev.type, enabled=use_scaler)
    # the init of the MoA and the heads
    torch.manual_seed(args.seed)
    # each log line at once, also through a pipe or tee
    sys.stdout.reconfigure(line_buffering=True)

    # the run folder: nothing is written before every check has passed
    out_dir = Path(args.out)
    ckpt_path = out_dir / "ckpt.pt"
    holder = lock_holder(out_dir)
    if holder is not None:
        raise in_use(out_dir, holder)
    earlier = [name for name in RUN_FILES if (out_dir / name).exists()]
    if args.resume and "ckpt.pt" not in earlier:
        raise clip_vit.UserError(f"{ckpt_path}: --resume given but there is no checkpoint")
    if earlier and not (args.resume or args.overwrite):
        raise clip_vit.UserError(
            f"{out_dir}: holds {' and '.join(earlier)} of an earlier run; continue it "
            "with --resume, pick another --out, or replace it with --overwrite"
        )
    clip_id = {"name": args.clip, "sha256": moa.clip_sha256(args.clip)}  # hashed once; evaluate.py checks it
    if args.resume:
        ckpt = load_resume_checkpoint(ckpt_path, args, cfg, clip_id["sha256"])
        why = nothing_left(ckpt, args)
        # a finished run: say so, and change nothing
        if why is not None:
            print(f"nothing to do: {ckpt_path}: {why}")
            return None
        saved_epoch = ckpt["epoch"]  # for the Ctrl-C hint

    # data: the official train split, optionally minus a few scenes held out for validation
    if args.data == "synthetic":
        ds = data_nyu.SyntheticDepth(n=args.synthetic_frames, seed=args.seed)
    else:
        # absolute, so evaluate.py finds it from anywhere
        args.data = str(Path(args.data).resolve())
        ds = data_nyu.NYUDepthV2(
            args.data,
            split="train",
            splits_path=args.splits,
            raw_depth=args.train_gt == "raw",
            download=args.download,
        )
    # read once: an HDF5 lookup per frame
    frame_scenes = [ds.scene(i) for i in range(len(ds))]
    train_items, val_items, val_scenes = hold_out_scenes(frame_scenes, args.val_frac, args.seed)
    # every step is one full batch: there would be no step
    if len(train_items) < args.batch_size:
        raise clip_vit.UserError(
            f"--batch-size {args.batch_size}: more than the {len(train_items)} train frames"
        )
    # before the slow decode below: a bad CLIP file fails fast
    clip_model = clip_vit.load(args.clip)
    # before anything is written: a ResNet CLIP cannot be trained here
    moa.require_vit(clip_model)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock_file = take_lock(out_dir)  # held until this process ends
        # no stale best.pt from the run it replaces
        if args.overwrite:
            for name in earlier:
                (out_dir / name).unlink()
        # a checkpoint write cut short by a kill
        for stale in out_dir.glob(".*.pt.*.tmp"):
            stale.unlink()
        # a new run, a new log; line-buffered: each entry is on disk at once, even if the run is killed
        log_file = open(out_dir / "log.jsonl", "a" if args.resume else "w", buffering=1)
    except OSError as e:
        raise clip_vit.UserError(f"{out_dir}: cannot write there ({e.strerror or e})") from None
    print(
        f"data: {len(train_items)} train frames, {len(val_items)} held out "
        f"({len(val_scenes)} scenes: {', '.join(sorted(val_scenes)) or 'none'})"
    )
    # decoded once, onto the device: a step never waits for a DataLoader
    train_batches = data_nyu.PreloadedBatches(
        ds, cfg.input_size, args.batch_size, dev, seed=args.seed, augment=args.augment, items=train_items
    )
    # every held-out frame once, in order
    if val_items:
        val_batches = data_nyu.PreloadedBatches(
            ds, cfg.input_size, args.batch_size, dev, shuffle=False, items=val_items
        )

    # model, optimizer, schedule
    model = moa.MoADepthCLIP(clip_model, cfg, moa_impl=args.moa_impl).to(dev)
    # the text tower was used once, for the prompt embeddings
    del clip_model
    # the table of trained and frozen parameters per part
    print(moa.parameter_report(model)[1])
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args)
    start_epoch = 0
    step = 0
    best_d1 = -1.0
    best_val_loss = math.inf
    # epochs since the validation loss last fell: --early-stop
    bad_epochs = 0
    if args.resume:
        moa.load_trainable_state_dict(model, ckpt["model"], ckpt_path)  # the frozen rest: --clip
        try:
            optimizer.load_state_dict(ckpt["optimizer"])  # AdamW's moments: no restart bump
        # other parameter groups: written by an older train.py
        except ValueError as e:
            raise clip_vit.UserError(
                f"{ckpt_path}: its optimizer state does not fit ({e}); start afresh with --overwrite"
            ) from None
        if scheduler is not None and ckpt.get("scheduler"):
            scheduler.load_state_dict(ckpt["scheduler"])
        # fp16's loss scale as it had grown: empty when the run had no scaler (bf16, fp32)
        if use_scaler and ckpt.get("grad_scaler"):
            scaler.load_state_dict(ckpt["grad_scaler"])
        start_epoch = ckpt["epoch"] + 1
        step = ckpt["step"]
        best_d1 = ckpt["best_d1"]
        best_val_loss = ckpt.get("best_val_loss", math.inf)
        bad_epochs = ckpt.get("bad_epochs", 0)
        # the random stream of an uninterrupted run
        torch.set_rng_state(ckpt["rng"])
        print(f"resumed from {ckpt_path}: epoch {start_epoch}, step {step}")

    def save(path, with_optimizer):
        """A checkpoint of now: trainable weights, DepthConfig, CLIP id, every flag (moa.save_checkpoint).
        ckpt.pt adds the state of AdamW, the schedule, fp16's loss scale and the random stream: what --resume
        needs."""
        extra = {
            "clip": clip_id,
            "config": vars(args),
            "epoch": epoch,
            "step": step,
            "best_d1": best_d1,
            "best_val_loss": best_val_loss,
            "bad_epochs": bad_epochs,
        }
        if with_optimizer:
            extra["optimizer"] = optimizer.state_dict()
            extra["scheduler"] = scheduler.state_dict() if scheduler is not None else None
            extra["rng"] = torch.get_rng_state()
            extra["grad_scaler"] = scaler.state_dict()
        moa.save_checkpoint(path, model, **extra)

    # the training loop
    # steps of the whole run, resumed or not
    total = args.epochs * len(train_batches)
    if args.max_steps:
        total = min(total, args.max_steps)
    # the values that ran: the preset's, or a flag given instead
    if args.recipe != "paper":
        preset = " ".join(
            f"--{name.replace('_', '-')} {as_typed(getattr(args, name))}" for name in RECIPES[args.recipe]
        )
        print(f"recipe {args.recipe}: {preset}")
    print(
        f"training {total} steps: {args.epochs} epochs x {len(train_batches)} batches of "
        f"{args.batch_size} on {dev}, {precision}"
    )
    model.train()
    t0 = time.time()  # the eta counts from here
    # each log line's img/s counts from the line before
    t_last = t0
    # images since the last log line
    seen = 0
    for epoch in range(start_epoch, args.epochs):
        # a new shuffle each epoch, the same after a resume
        train_batches.set_epoch(epoch)
        for b in train_batches:
            with autocast:
                outputs = model(b["image"])
            loss, terms = moa.depth_loss(outputs, b["depth"], b["mask"], cfg)
            # stop before the step: ckpt.pt keeps the last good epoch
            if not torch.isfinite(loss):
                raise clip_vit.UserError(
                    f"non-finite loss ({loss.item()}) at step {step}; stopped. "
                    f"{ckpt_path} keeps the last good epoch"
                )
            optimizer.zero_grad(set_to_none=True)  # frees the grads' memory
            # without a scaler (bf16, fp32): a plain backward and step
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            seen += b["image"].shape[0]
            if step % args.log_interval == 0 or step == total:
                now = time.time()
                # images per second since the last line
                ips = seen / (now - t_last)
                # the pace of this process's own steps: a resumed run did not take the first ones
                eta = (now - t0) / (step - start_epoch * len(train_batches)) * (total - step)
                rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
                row = {
                    "step": step,
                    "epoch": epoch,
                    "loss": loss.item(),
                    **terms,
                    "lr": rates["backbone"],
                    "adapter_lr": rates["adapters"],
                    "head_lr": rates["heads"],
                    "img_s": ips,
                    "gate_entropy": model.gate_entropy(),
                }
                parts = " ".join(f"{k} {v:.3f}" for k, v in terms.items())
                print(
                    f"step {step}/{total} | loss {row['loss']:.4f} ({parts}) | {describe_rates(optimizer)} "
                    f"| {ips:.1f} img/s | gate H {row['gate_entropy']:.3f} | eta {eta / 60:.1f} min"
                )
                # the same numbers, machine-readable, for plots
                print(json.dumps(row), file=log_file)
                t_last = now
                seen = 0
            if step >= total:
                break

        # end of an epoch: validate (with --val-frac), then best.pt, model.pt and ckpt.pt
        row = {"epoch": epoch, "step": step}
        if val_items:
            val, val_loss = validate(model, val_batches, autocast)
            # each output on its own: only the losses' targets, binned and regressed, are trained
            scores = [
                f"{moa.OUTPUTS[k]} d1 {m['d1']:.4f} abs_rel {m['abs_rel']:.4f} rmse {m['rmse']:.4f}"
                for k, m in val.items()
            ]
            print(f"epoch {epoch} | val loss {val_loss:.4f} | " + " | ".join(scores))
            improved = {"d1": val["depth"]["d1"] > best_d1, "loss": val_loss < best_val_loss}
            bad_epochs = 0 if improved["loss"] else bad_epochs + 1
            best_d1 = max(best_d1, val["depth"]["d1"])  # the output evaluate.py scores
            best_val_loss = min(best_val_loss, val_loss)
            if improved[args.best_by]:
                save(out_dir / "best.pt", with_optimizer=False)
            if scheduler is not None:
                scheduler.step(val_loss)
            row["val_loss"] = val_loss
            # val_d1: the fused output; val_binned_d1: the binned...
            for key, metrics in val.items():
                prefix = "val_" if key == "depth" else f"val_{moa.OUTPUTS[key]}_"
                row.update({prefix + k: v for k, v in metrics.items()})
        # the weights alone: the file to share
        save(out_dir / "model.pt", with_optimizer=False)
        # every epoch: the last one is the result (the paper's way)
        save(ckpt_path, with_optimizer=True)
        # what a Ctrl-C from now on reports
        saved_epoch = epoch
        print(json.dumps(row), file=log_file)
        # --max-steps ended the run inside this epoch
        if step >= total:
            break
        if args.early_stop and bad_epochs >= args.early_stop:
            print(f"early stop after epoch {epoch}: {bad_epochs} epochs without a lower validation loss")
            break
    log_file.close()
    lock_file.close()
    print(
        f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; checkpoint {ckpt_path}, weights "
        f"{out_dir / 'model.pt'}"
    )
    return model, optimizer


def resume_hint(args):
    """What Ctrl-C prints: the last checkpoint, and the command that continues from it."""
    if saved_epoch is None:
        return f"no checkpoint was written in {args.out}; rerun to start again"
    # the same command with --resume (and without --overwrite, which would start afresh)
    again = [a for a in sys.argv if a not in ("--resume", "--overwrite")] + ["--resume"]
    return (
        f"the last checkpoint is {Path(args.out) / 'ckpt.pt'} (after epoch {saved_epoch + 1} of "
        f"{args.epochs}); continue with: python {shlex.join(again)}"
    )


if __name__ == "__main__":
    # a bad flag ends here: one `error:` line, exit 2
    args = parse_args()
    try:
        main(args)
    # bad input, not a bug: one line (a bug keeps its traceback)
    except clip_vit.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"interrupted: {resume_hint(args)}", file=sys.stderr)
        # 128 + SIGINT: what a shell reports for a program stopped by Ctrl-C
        sys.exit(130)
