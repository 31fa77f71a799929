"""
Train MoA-DepthCLIP on NYU Depth V2 with the paper's recipe, as one flat script read top to bottom.
One process on one device: the paper trained on a single H100 (30 epochs x 795 frames, batch 8).

    python train.py                          # the paper recipe; fetches NYU and CLIP once
    python train.py --data synthetic --clip random --epochs 2 --out /tmp/smoke   # offline
    python train.py --resume                 # continue from --out/ckpt.pt
    python train.py --head similarity --use-context 0 --loss composite   # a Table 1 row

The recipe trains on all 795 train frames and keeps the last epoch: every epoch writes
--out/ckpt.pt (the trainable parameters, AdamW's state, the config). --val-frac 0.05 holds out
train scenes to validate on and keeps best.pt too (model selection without the test split).
Logs go to stdout and --out/log.jsonl. A bad flag stops with one `error:` line before any work.
"""
import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

import clip_vit
import data_nyu
import moa

# -----------------------------------------------------------------------------
# flags: the defaults are the paper's recipe; every choice it leaves open is a flag.
# Each type below refuses a bad value, so argparse stops with one line before any work.


def checked(kind, ok, rule):  # an argparse type: kind(text), refused with "<text> is not <rule>"
    def convert(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {rule}")
        return value
    convert.__name__ = kind.__name__  # argparse's "invalid int value: 'x'" names the type
    return convert


def int_list(text):  # "2,5,8,11" -> (2, 5, 8, 11); a typo reads "invalid int_list value"
    return tuple(int(x) for x in text.split(","))


def typed(value):  # a default as a user types it: (2, 5, 8, 11) -> "2,5,8,11", True -> "1"
    # argparse runs a string default through the flag's type, and --help shows it as typed
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(int(value)) if isinstance(value, bool) else value


class Help(argparse.RawDescriptionHelpFormatter):  # keeps the docstring's examples; adds defaults
    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None:  # switches, and flags unset by default
            return action.help
        return action.help + " (default: %(default)s)"


count = checked(int, lambda v: v >= 1, ">= 1")
at_least_0 = checked(int, lambda v: v >= 0, ">= 0")  # where 0 means "off" or "all"
positive = checked(float, lambda v: v > 0, "> 0")
non_negative = checked(float, lambda v: v >= 0, ">= 0")
boolean = checked(int, lambda v: v in (0, 1), "0 or 1")  # 0/1, the way the help prints defaults
layers = checked(int_list, lambda v: list(v) == sorted(set(v)) and 0 <= v[0] <= v[-1] <= 11,
                 "increasing block numbers in 0..11")
sizes = checked(int_list, lambda v: len(v) <= 2 and all(x > 0 and x % 32 == 0 for x in v),
                "one or two multiples of 32")  # ViT-B/32's patches tile the input exactly
p = argparse.ArgumentParser(description=__doc__, formatter_class=Help, allow_abbrev=False)
add = p.add_argument
add("--data", default=data_nyu.FILE_NAME, metavar="PATH", help="NYU Depth V2 labeled .mat, or "
    "synthetic (procedural rooms); if missing, downloaded (2.97 GB) only under this name in an "
    "existing folder, or with --download")
add("--splits", metavar="PATH", help="the official splits.mat (default: the one next to --data, "
    "else in ~/.cache/nyu_depth_v2/, else downloaded there, 2.6 KB)")
add("--clip", default="ViT-B/32", metavar="NAME|PATH", help="CLIP weights: ViT-B/32 (downloaded "
    "once to ~/.cache/clip, 354 MB), a ViT-B-32.pt or state-dict file, or random (offline)")
add("--out", default="out", metavar="DIR", help="folder for ckpt.pt, best.pt and log.jsonl")
add("--resume", action="store_true", help="continue the run in --out from its ckpt.pt")
add("--overwrite", action="store_true", help="start afresh in an --out that holds a checkpoint")
either = p.add_mutually_exclusive_group().add_argument  # args.download: True, False or None
either("--download", action="store_const", const=True, help="fetch a missing --data, any name")
either("--no-download", dest="download", action="store_const", const=False, help="fetch nothing")
add("--epochs", type=count, default=30, metavar="N", help="passes over the train frames")
add("--batch-size", type=count, default=8, metavar="N", help="frames per optimizer step")
add("--lr", type=positive, default=1e-5, metavar="X", help="AdamW learning rate, constant")
add("--head-lr", type=non_negative, default=0.0, metavar="X", help="learning rate of the fresh "
    "depth heads; 0 = same as --lr (the paper); 1e-4 may suit them better")
add("--weight-decay", type=non_negative, default=1e-4, metavar="X", help="AdamW weight decay")
add("--train-gt", choices=("dense", "raw"), default="dense", help="training depth: in-painted "
    "`depths` or Kinect `rawDepths` with holes (a GUESS: the paper does not say)")
add("--val-frac", type=checked(float, lambda v: 0 <= v < 1, "in [0, 1)"), default=0.0, metavar="X",
    help="train scenes held out to pick best.pt; 0 = train on all 795 frames (the paper)")
add("--augment", type=boolean, default=0, metavar="0/1", help="flips, brightness and contrast")
add("--seed", type=int, default=0, metavar="N", help="seeds the init, shuffling, held-out scenes")
add("--device", default="auto", help="auto (cuda if present, else cpu), cpu, cuda or cuda:N")
add("--moa-impl", choices=("auto", "triton", "torch"), default="auto", help="the MoA layer's "
    "code: the fused Triton kernel or plain PyTorch; auto = Triton on CUDA")
add("--log-interval", type=count, default=10, metavar="N", help="steps between log lines")
add("--synthetic-frames", type=count, default=48, metavar="N", help="frames of --data synthetic")
add("--max-steps", type=at_least_0, default=0, metavar="N", help="stop after N steps; 0 = never")
# the model's switches: one flag per moa.DepthConfig field, with the field's default
MODEL_FLAGS = {  # field: (type, format, meaning); a field not listed gets its default's type
    "num_experts": (count, "N", "experts K per MoA layer (Table 2)"),
    "top_k": (at_least_0, "N", "experts each token mixes; 0 = all experts (the paper)"),
    "bottleneck": (count, "N", "expert width d_b, channels"),
    "gate_hidden": (count, "N", "hidden width of the gate MLP, channels"),
    "temperature": (positive, "X", "gate softmax temperature tau"),
    "moa_layers": (layers, "LIST", "0-based image blocks followed by a MoA (ViT-B/32: 0..11)"),
    "trainable_blocks": (checked(int, lambda v: 0 <= v <= 12, "in 0..12"), "N", "last blocks tuned"),
    "use_moa": (boolean, "0/1", "MoA modules; 0 = one plain adapter each (Table 1's baseline)"),
    "use_context": (boolean, "0/1", "append the text scene-context vector (dual head only)"),
    "head": (str, None, "the paper's dual head, or DepthCLIP's similarity head (Table 1)"),
    "sim_bins": (int, None, "bins of the similarity head: DepthCLIP's 7 or the paper's 10"),
    "num_bins": (checked(int, lambda v: v >= 2, ">= 2"), "N", "bins N of the dual head (Table 3)"),
    "bin_spacing": (str, None, "how the dual head's bin centres spread over the depth range"),
    "min_depth": (positive, "METRES", "smallest depth predicted"),
    "max_depth": (positive, "METRES", "largest depth predicted"),
    "fusion": (str, None, "the dual head's final depth: the mean of both maps, or one of them"),
    "input_size": (sizes, "H,W", "network input in pixels, multiples of 32; one side = square"),
    "loss": (str, None, "the paper's loss, or Table 1's composite loss"),
    "silog": (str, None, "the SILog form in the paper's loss"),
    "w_cls": (float, "X", "weight of the bins' cross-entropy in the paper's loss"),
    "w_reg": (float, "X", "weight of the L1 term in the paper's loss"),
    "w_silog": (float, "X", "weight of the SILog term in the paper's loss"),
}
for f in fields(moa.DepthConfig):
    kind, metavar, meaning = MODEL_FLAGS.get(f.name, (type(f.default), None, "moa.DepthConfig"))
    add("--" + f.name.replace("_", "-"), type=kind, default=typed(f.default), metavar=metavar,
        choices=moa.CHOICES.get(f.name), help=meaning)
args = p.parse_args()  # a bad flag ends here: usage and one `error:` line
# what one flag alone cannot tell: flags that must agree with each other, and files that must exist
if args.resume and args.overwrite:
    p.error("--resume continues the run in --out and --overwrite replaces it: give one")
if args.top_k > args.num_experts:
    p.error(f"--top-k {args.top_k}: more than the {args.num_experts} experts (0 = all experts)")
if args.min_depth >= args.max_depth:
    p.error(f"--min-depth {args.min_depth} must be below --max-depth {args.max_depth}")
if args.clip not in (*clip_vit.MODELS, "random") and not Path(args.clip).is_file():
    p.error(f"--clip {args.clip}: no such file, nor one of {', '.join(clip_vit.MODELS)}, random")
moa.MOA_IMPL = args.moa_impl  # the one switch moa.py reads

# -----------------------------------------------------------------------------
# errors: a problem the user can fix ends in one line, Ctrl-C in how to resume, a bug in its traceback
saved_epoch = None  # the epoch in --out/ckpt.pt, once there is one


def on_error(kind, err, tb):
    if issubclass(kind, KeyboardInterrupt):
        if saved_epoch is None:
            where = f"no checkpoint was written in {args.out}; rerun to start again"
        else:  # the same command with --resume (and without --overwrite, which would start afresh)
            again = [a for a in sys.argv if a not in ("--resume", "--overwrite")] + ["--resume"]
            where = (f"the last checkpoint is {ckpt_path} (after epoch {saved_epoch + 1} of "
                     f"{args.epochs}); continue with: python {shlex.join(again)}")
        print(f"interrupted: {where}", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT: what a shell reports for a program stopped by Ctrl-C
    if issubclass(kind, clip_vit.UserError):  # bad input, not a bug
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    sys.__excepthook__(kind, err, tb)  # a bug: the full traceback


sys.excepthook = on_error  # from here on; a hook, not a try around it all, keeps the script flat
cfg = moa.DepthConfig(**{f.name: getattr(args, f.name) for f in fields(moa.DepthConfig)})
if len(cfg.input_size) == 1:  # one side means a square input
    cfg.input_size = cfg.input_size * 2

# -----------------------------------------------------------------------------
# device and dtype
dev, amp_dtype = moa.runtime(args.device)  # a device this machine lacks is a UserError
# checked here, not at step 1: the kernel would fail only after the slow data decode
if args.moa_impl == "triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
    p.error("--moa-impl triton needs a CUDA device (or TRITON_INTERPRET=1, slowly)")
autocast = torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # bf16 on CUDA
torch.manual_seed(args.seed)  # the init of the MoA and the heads
sys.stdout.reconfigure(line_buffering=True)  # each log line at once, also through a pipe or tee

# -----------------------------------------------------------------------------
# the run folder: an earlier run is never replaced by accident, and --resume never mixes two models
out_dir = Path(args.out)
ckpt_path = out_dir / "ckpt.pt"
earlier = [name for name in ("ckpt.pt", "best.pt") if (out_dir / name).exists()]
if args.resume and "ckpt.pt" not in earlier:
    raise clip_vit.UserError(f"{ckpt_path}: --resume given but there is no checkpoint")
if earlier and not (args.resume or args.overwrite):
    raise clip_vit.UserError(f"{out_dir}: holds {' and '.join(earlier)} of an earlier run; "
                             "continue it with --resume, pick another --out, or replace it with "
                             "--overwrite")
clip_id = {"name": args.clip, "sha256": moa.clip_sha256(args.clip)}  # hashed once; evaluate.py checks it
if args.resume:
    ckpt = moa.load_checkpoint(ckpt_path)
    moa.check_clip(ckpt, args.clip, clip_id["sha256"], ckpt_path)
    saved = ckpt["model_config"]  # asdict(DepthConfig) as it was trained
    for k, v in asdict(cfg).items():  # the loss may change between runs, the model may not
        if saved.get(k, v) != v and k not in ("loss", "silog", "w_cls", "w_reg", "w_silog"):
            raise clip_vit.UserError(f"{ckpt_path}: trained with --{k.replace('_', '-')} "
                                     f"{typed(saved[k])}; --resume needs the same model flags")
    saved_epoch = ckpt["epoch"]  # for the Ctrl-C hint

# -----------------------------------------------------------------------------
# data: the official train split, optionally minus a few scenes held out for validation
if args.data == "synthetic":
    ds = data_nyu.SyntheticDepth(n=args.synthetic_frames, seed=args.seed)
else:
    args.data = str(Path(args.data).resolve())  # absolute, so evaluate.py finds it from anywhere
    ds = data_nyu.NYUDepthV2(args.data, split="train", splits_path=args.splits,
                             raw_depth=args.train_gt == "raw", download=args.download)
frame_scenes = [ds.scene(i) for i in range(len(ds))]  # read once: an HDF5 lookup per frame
scenes = sorted(set(frame_scenes))
n_val = max(1, round(args.val_frac * len(scenes))) if args.val_frac > 0 else 0  # asked: >= 1 scene
# held out by scene, not by frame: neighbouring frames of one room would leak into validation
val_scenes = set(np.random.default_rng(args.seed).permutation(scenes)[:n_val].tolist())
train_items = [i for i, scene in enumerate(frame_scenes) if scene not in val_scenes]
val_items = [i for i, scene in enumerate(frame_scenes) if scene in val_scenes]
if len(train_items) < args.batch_size:  # every step is one full batch: there would be no step
    raise clip_vit.UserError(f"--batch-size {args.batch_size}: more than the "
                             f"{len(train_items)} train frames")
clip_model = clip_vit.load(args.clip)  # before the slow decode below: a bad CLIP file fails fast
try:  # nothing is written before every check above has passed
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.overwrite:  # no stale best.pt from the run it replaces
        for name in earlier:
            (out_dir / name).unlink()
    for stale in out_dir.glob(".*.pt.*.tmp"):  # a checkpoint write cut short by a kill
        stale.unlink()
    # a new run, a new log; line-buffered: each entry is on disk at once, even if the run is killed
    log_file = open(out_dir / "log.jsonl", "a" if args.resume else "w", buffering=1)
except OSError as e:
    raise clip_vit.UserError(f"{out_dir}: cannot write there ({e.strerror or e})") from None
print(f"data: {len(train_items)} train frames, {len(val_items)} held out "
      f"({n_val} scenes: {', '.join(sorted(val_scenes)) or 'none'})")
# decoded once, onto the device: a step never waits for a DataLoader
train_batches = data_nyu.PreloadedBatches(ds, cfg.input_size, args.batch_size, dev, seed=args.seed,
                                          augment=args.augment, items=train_items)
if val_items:  # every held-out frame once, in order
    val_batches = data_nyu.PreloadedBatches(ds, cfg.input_size, args.batch_size, dev, shuffle=False,
                                            items=val_items)

# -----------------------------------------------------------------------------
# model and optimizer
model = moa.MoADepthCLIP(clip_model, cfg).to(dev)
del clip_model  # the text tower was used once, for the prompt embeddings
print(moa.parameter_report(model)[1])  # the table of trained and frozen parameters per part
trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
# the heads start from scratch, the rest from CLIP: --head-lr can give the heads their own rate
backbone = [p for n, p in trainable if n.startswith(("visual.", "moa."))]
heads = [p for n, p in trainable if not n.startswith(("visual.", "moa."))]
head_lr = args.head_lr or args.lr
groups = [{"params": backbone}]
if heads:  # the similarity head has no weights of its own
    groups.append({"params": heads, "lr": head_lr})
optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
start_epoch, step, best_d1 = 0, 0, -1.0  # a fresh run
if args.resume:
    moa.load_trainable_state_dict(model, ckpt["model"], ckpt_path)  # the frozen rest: --clip
    optimizer.load_state_dict(ckpt["optimizer"])  # AdamW's moments: no restart bump
    start_epoch, step, best_d1 = ckpt["epoch"] + 1, ckpt["step"], ckpt["best_d1"]
    torch.set_rng_state(ckpt["rng"])  # the random stream of an uninterrupted run
    print(f"resumed from {ckpt_path}: epoch {start_epoch}, step {step}")


def save(path, epoch, with_optimizer=True):  # best.pt skips the optimizer: a third of the size
    state = optimizer.state_dict() if with_optimizer else None
    # config: every flag of the run, so evaluate.py (and a reader) can see how it was trained
    moa.save_checkpoint(path, model, clip=clip_id, optimizer=state, epoch=epoch, step=step,
                        best_d1=best_d1, rng=torch.get_rng_state(), config=vars(args))


@torch.no_grad()
def validate():
    """Mean metrics of each output on the held-out scenes: {"depth": {"d1": ...}, ...}."""
    model.eval()
    rows = {}
    for b in val_batches:
        with autocast:
            out = model(b["image"])
        for key in [k for k in moa.OUTPUTS if k in out]:  # the similarity head has "depth" only
            for pred, gt in zip(out[key][:, 0].float(), b["depth"][:, 0]):
                metrics = data_nyu.depth_metrics(pred, gt, crop="none")  # resized frames: no crop
                if metrics is not None:  # None: a frame with no valid pixel
                    rows.setdefault(key, []).append(metrics)
    model.train()
    return {key: data_nyu.mean_metrics(r) for key, r in rows.items()}


# -----------------------------------------------------------------------------
# training loop
total = args.epochs * len(train_batches)  # steps of the whole run, resumed or not
total = min(total, args.max_steps or total)  # --max-steps 0: no cap
lrs = f"lr {args.lr:.1e}"  # and the heads' rate where it differs: the log says what ran
if heads and head_lr != args.lr:
    lrs += f" head lr {head_lr:.1e}"
print(f"training {total} steps: {args.epochs} epochs x {len(train_batches)} batches of "
      f"{args.batch_size} on {dev}{' with bf16 autocast' if amp_dtype else ''}")
model.train()
t0 = t_last = time.time()  # the eta counts from t0, each log line's img/s from t_last
seen = 0  # images since the last log line
for epoch in range(start_epoch, args.epochs):
    train_batches.set_epoch(epoch)  # a new shuffle each epoch, the same after a resume
    for b in train_batches:
        with autocast:
            outputs = model(b["image"])
        loss, terms = moa.depth_loss(outputs, b["depth"], b["mask"], cfg)
        if not torch.isfinite(loss):  # stop before the step: ckpt.pt keeps the last good epoch
            print(f"error: non-finite loss ({loss.item()}) at step {step}; stopped. "
                  f"{ckpt_path} keeps the last good epoch", file=sys.stderr)
            sys.exit(1)
        optimizer.zero_grad(set_to_none=True)  # frees the grads' memory
        loss.backward()
        optimizer.step()
        step += 1
        seen += b["image"].shape[0]
        if step % args.log_interval == 0 or step == total:
            now = time.time()
            ips = seen / (now - t_last)  # images per second since the last line
            # the pace of this process's own steps: a resumed run did not take the first ones
            eta = (now - t0) / (step - start_epoch * len(train_batches)) * (total - step)
            row = {"step": step, "epoch": epoch, "loss": loss.item(), **terms, "lr": args.lr,
                   "head_lr": head_lr, "img_s": ips, "gate_entropy": model.gate_entropy()}
            parts = " ".join(f"{k} {v:.3f}" for k, v in terms.items())
            print(f"step {step}/{total} | loss {row['loss']:.4f} ({parts}) | {lrs} | {ips:.1f} "
                  f"img/s | gate H {row['gate_entropy']:.3f} | eta {eta / 60:.1f} min")
            print(json.dumps(row), file=log_file)  # the same numbers, machine-readable, for plots
            t_last, seen = now, 0  # the next line's rate starts here
        if step >= total:
            break
    val = validate() if val_items else {}  # --val-frac 0: nothing held out, nothing to pick
    if val:  # each output on its own: only the losses' targets, binned and regressed, are trained
        scores = [f"{moa.OUTPUTS[k]} d1 {m['d1']:.4f} abs_rel {m['abs_rel']:.4f} rmse {m['rmse']:.4f}"
                  for k, m in val.items()]
        print(f"epoch {epoch} | val " + " | ".join(scores))
    if val and val["depth"]["d1"] > best_d1:  # selected on the output evaluate.py scores
        best_d1 = val["depth"]["d1"]
        save(out_dir / "best.pt", epoch, with_optimizer=False)
    save(ckpt_path, epoch)  # every epoch: the last one is the result (the paper's model selection)
    saved_epoch = epoch  # what a Ctrl-C from now on reports
    row = {"epoch": epoch, "step": step}
    for key, metrics in val.items():  # val_d1: the fused output; val_binned_d1: the binned...
        prefix = "val_" if key == "depth" else f"val_{moa.OUTPUTS[key]}_"
        row.update({prefix + k: v for k, v in metrics.items()})
    print(json.dumps(row), file=log_file)
    if step >= total:  # --max-steps ended the run inside this epoch
        break
log_file.close()
print(f"done: {step} steps in {(time.time() - t0) / 60:.1f} min; checkpoint {ckpt_path}")
