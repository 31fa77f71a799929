"""
train.py as a user runs it (subprocesses on a tiny random CLIP and synthetic rooms): an end-to-end run,
resume, kill-and-resume equivalence, Ctrl-C, the non-finite-loss stop, the paper recipe's frame count,
what training moves, and every user mistake ending in one `error:` line.
Run: python -m pytest -q tests/test_train.py
"""

import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
import clip_vit
import moa
import train

ROOT = Path(__file__).resolve().parents[1]
SMALL = "--input-size 64 --bottleneck 16 --gate-hidden 16 --num-bins 16 --synthetic-frames 12 --batch-size 4".split()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network (every HTTP(S) request goes to a closed local port) and an empty cache, for the
    subprocesses a test starts. Yields the cache folder, so a test can check nothing landed there."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # the discard port: nothing listens there
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return cache


def start(args, **kw):
    """train.py as a background process that Ctrl-C reaches (a shell may start it with SIGINT ignored)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *map(str, args)],
        cwd=ROOT,
        env=env,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **kw,
    )


def wait_for(path, proc):
    while not path.exists() and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"


def logs(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# -----------------------------------------------------------------------------
# runs that work


def test_end_to_end_train_resume_evaluate(small_clip, tmp_path, run_script, train_small):
    r = train_small(tmp_path / "run", "--epochs", "1", "--val-frac", "0.1", "--head-lr", "1e-4")
    assert "step 2/2" in r.stdout and "gate H" in r.stdout and "img/s" in r.stdout and "eta" in r.stdout
    assert "lr 1.0e-05 head lr 1.0e-04" in r.stdout  # the rate the heads really get is logged too
    for output in ("depth", "binned", "regressed"):  # validation scores each output on its own
        assert f"{output} d1 " in r.stdout
    r = train_small(tmp_path / "run", "--epochs", "2", "--val-frac", "0.1", "--head-lr", "1e-4", "--resume")
    assert "resumed from" in r.stdout and "step 4/4" in r.stdout
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert (
        ckpt["epoch"] == 1 and ckpt["step"] == 4 and ckpt["clip"]["sha256"] == clip_vit.sha256sum(small_clip)
    )
    assert all(
        not k.startswith("visual.") or k.startswith("visual.transformer.resblocks.") for k in ckpt["model"]
    )
    entries = logs(tmp_path / "run")
    val = [e for e in entries if "val_d1" in e]
    assert len(val) == 2 and all("val_binned_d1" in e and "val_regressed_rmse" in e for e in val)
    assert any("gate_entropy" in e for e in entries) and (tmp_path / "run" / "best.pt").exists()
    assert oct((tmp_path / "run" / "ckpt.pt").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    r = run_script("evaluate.py", tmp_path / "run" / "ckpt.pt", "--limit", "16")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n_images"] == 16


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_paper_recipe_trains_on_every_train_frame(small_clip, tmp_path, run_script):
    """The default (--val-frac 0) holds nothing out: every frame of the official-layout train split is a
    training frame, and ckpt.pt is the last epoch (no best.pt)."""
    from nyu_fixtures import asymmetric_frames, write_splits, write_v73

    images, depths, raw = asymmetric_frames(7)
    scenes = ["kitchen", "office", "kitchen", "bedroom", "office", "kitchen", "office"]
    write_v73(tmp_path / "nyu.mat", images, depths, raw_depths=raw, scene_types=scenes)
    train = [1, 2, 3, 4, 6]
    write_splits(tmp_path / "splits.mat", train, [5, 7])
    r = run_script(
        "train.py",
        "--data",
        tmp_path / "nyu.mat",
        "--clip",
        small_clip,
        "--out",
        tmp_path / "run",
        "--epochs",
        "1",
        *SMALL[:8],
        "--batch-size",
        "1",
    )
    assert f"data: {len(train)} train frames, 0 held out" in r.stdout
    assert f"step {len(train)}/{len(train)}" in r.stdout  # one step per frame at batch 1: all were used
    assert not (tmp_path / "run" / "best.pt").exists()
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == len(train)
    r = run_script("evaluate.py", tmp_path / "run" / "ckpt.pt", "--no-download")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n_images"] == 2


def test_training_moves_exactly_what_it_should(small_clip, tmp_path, monkeypatch):
    """train.main itself, run in this process, three steps: every trainable parameter (image blocks 8-11,
    each MoA, every head) has moved, no frozen one has, and AdamW holds exactly the trainable ones."""
    start_values = []

    class Recorded(moa.MoADepthCLIP):  # remembers the parameters as train.py built them
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            start_values.append({n: p.detach().cpu().clone() for n, p in self.named_parameters()})

    monkeypatch.setattr(moa, "MoADepthCLIP", Recorded)
    args = train.parse_args(
        [
            "--data",
            "synthetic",
            "--clip",
            str(small_clip),
            "--out",
            str(tmp_path / "run"),
            *SMALL,
            "--max-steps",
            "3",
        ]
    )
    model, optimizer = train.main(args)
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 3 and len(start_values) == 1

    def should_train(name):
        if name.startswith("visual.transformer.resblocks."):
            return int(name.split(".")[3]) >= 8
        return name.startswith("moa.") or name.startswith(("cls_head.", "reg_head."))

    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.requires_grad} == {n for n in params if should_train(n)}
    moved = {n for n, p in params.items() if not torch.equal(p.detach().cpu(), start_values[0][n])}
    assert moved == {n for n in params if should_train(n)}
    for part in (
        "visual.transformer.resblocks.8.",
        "visual.transformer.resblocks.11.",
        "moa.0.",
        "moa.3.",
        "cls_head.",
        "reg_head.",
    ):
        assert any(n.startswith(part) for n in moved), part
    in_optimizer = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(in_optimizer) == sorted(id(p) for n, p in params.items() if should_train(n))


def test_the_random_projection_is_in_no_optimizer_group_and_never_moves(small_clip, tmp_path, monkeypatch):
    """train.main in this process, --recipe adadepthclip's head (similarity, a random frozen projection,
    adapters from nn.Linear's init), three steps: the projection is in no optimizer group, is exactly as it
    was drawn after training, and model.pt carries it; the adapters started away from zero and moved."""
    start = []

    class Recorded(moa.MoADepthCLIP):  # remembers the parameters as train.py built them
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            start.append({n: p.detach().clone() for n, p in self.named_parameters()})

    monkeypatch.setattr(moa, "MoADepthCLIP", Recorded)
    flags = "--head similarity --use-context 0 --sim-proj random --adapter-init default --max-steps 3"
    run = tmp_path / "run"
    args = train.parse_args(
        ["--data", "synthetic", "--clip", str(small_clip), "--out", str(run), *SMALL, *flags.split()]
    )
    model, optimizer = train.main(args)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name in ("project.weight", "project.bias"):
        p = dict(model.named_parameters())[name]
        assert id(p) not in in_optimizer and not p.requires_grad
        assert torch.equal(p, start[0][name])
        assert torch.equal(torch.load(run / "model.pt", weights_only=True)["model"][name], p)
    assert start[0]["moa.0.up_w"].abs().min() > 0  # nn.Linear's init: no zero
    assert not torch.equal(model.moa[0].up_w, start[0]["moa.0.up_w"])  # and they train


def test_each_parameter_group_trains_at_its_own_rate(small_clip):
    """--lr for CLIP's tuned blocks, --adapter-lr for the MoA modules, --head-lr for the fresh heads, all
    different here, so a rate given to the wrong group fails; 0 means --lr."""
    clip = clip_vit.load(small_clip)
    args = train.parse_args(
        [
            "--clip",
            str(small_clip),
            *SMALL,
            *"--lr 1e-5 --adapter-lr 2e-4 --head-lr 3e-4 --weight-decay 0.02".split(),
        ]
    )
    model = moa.MoADepthCLIP(clip, cli.config_of(moa.DepthConfig, args))
    optimizer = train.make_optimizer(model, args)
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    expected = {"visual.": 1e-5, "moa.": 2e-4, "cls_head.": 3e-4, "reg_head.": 3e-4}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for name, p in trainable:
        (prefix,) = [prefix for prefix in expected if name.startswith(prefix)]
        assert rate[id(p)] == expected[prefix], name
        assert decay[id(p)] == 0.02, name
    assert len(rate) == len(trainable)
    assert train.describe_rates(optimizer) == "lr 1.0e-05 adapter lr 2.0e-04 head lr 3.0e-04"
    plain = train.parse_args(["--clip", str(small_clip), *SMALL])  # 0: the same rate as --lr everywhere
    optimizer = train.make_optimizer(model, plain)
    assert {group["lr"] for group in optimizer.param_groups} == {1e-5}
    assert train.make_scheduler(optimizer, plain) is None  # the paper: a constant rate


def test_adadepthclip_recipe_sets_what_it_names_and_given_flags_win(small_clip):
    """--recipe adadepthclip: Table 1 rows 2-4 as the authors' earlier code trained them. The values below
    are read off their train_vit_b32_losses.py (and their compiled MoA's plain softmax), not off RECIPES."""
    authors = {
        "epochs": 50,
        "batch_size": 8,
        "lr": 1e-5,
        "adapter_lr": 1e-4,
        "weight_decay": 0.01,
        "lr_schedule": "plateau",
        "early_stop": 10,
        "best_by": "loss",
        "val_frac": 0.05,
        "train_gt": "raw",
        "head": "similarity",
        "sim_bins": 7,
        "use_context": 0,
        "loss": "composite",
        "composite": "authors",
        "temperature": 1.0,
        "sim_proj": "random",
        "adapter_init": "default",
    }
    args = train.parse_args(["--recipe", "adadepthclip", "--clip", "random"])
    assert {name: getattr(args, name) for name in authors} == authors
    assert set(train.RECIPES["adadepthclip"]) <= set(authors)  # every value the preset names is checked here
    cfg = cli.config_of(moa.DepthConfig, args)
    assert (cfg.temperature, cfg.composite, cfg.loss, cfg.head, cfg.use_context) == (
        1.0,
        "authors",
        "composite",
        "similarity",
        False,
    )
    assert (cfg.sim_proj, cfg.adapter_init) == ("random", "default")
    model = moa.MoADepthCLIP(
        clip_vit.load(small_clip),
        cli.config_of(
            moa.DepthConfig, train.parse_args(["--recipe", "adadepthclip", "--clip", str(small_clip), *SMALL])
        ),
    )
    optimizer = train.make_optimizer(model, args)
    rates = {group["name"]: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups}
    assert rates["backbone"] == (1e-5, 0.01) and rates["adapters"] == (1e-4, 0.01)
    scheduler = train.make_scheduler(optimizer, args)
    assert isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (scheduler.patience, scheduler.factor, scheduler.mode) == (5, 0.5, "min")
    # a flag given on the command line wins, also one that equals the paper's own default
    given = train.parse_args(
        "--recipe adadepthclip --clip random --epochs 7 --temperature 2 --composite ours --val-frac 0.1".split()
    )
    assert (given.epochs, given.temperature, given.composite, given.val_frac) == (7, 2.0, "ours", 0.1)
    assert given.adapter_lr == 1e-4 and given.lr_schedule == "plateau"  # the rest of the preset stays
    paper = train.parse_args(["--clip", "random"])  # the paper's recipe: the flags' own defaults
    assert (paper.epochs, paper.adapter_lr, paper.weight_decay, paper.lr_schedule, paper.temperature) == (
        30,
        0.0,
        1e-4,
        "constant",
        2.0,
    )


def test_similarity_head_and_composite_loss_end_to_end(tmp_path, train_small, run_script):
    """Table 1's baseline switches in one synthetic run: DepthCLIP's similarity head, the composite loss."""
    r = train_small(
        tmp_path / "run",
        "--epochs",
        "1",
        "--head",
        "similarity",
        "--use-context",
        "0",
        "--loss",
        "composite",
        "--val-frac",
        "0.1",
    )
    assert "depth d1 " in r.stdout and "binned" not in r.stdout  # that head has one output
    assert "ssim" in r.stdout and "grad" in r.stdout  # the composite loss's terms are logged
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ckpt["model_config"]["head"] == "similarity" and ckpt["model_config"]["loss"] == "composite"
    r = run_script("evaluate.py", tmp_path / "run" / "ckpt.pt", "--limit", "16")
    assert json.loads(r.stdout.strip().splitlines()[-1])["n_images"] == 16


def test_help_says_meaning_format_and_default():
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0
    assert "python train.py --data synthetic --clip random --epochs 2" in r.stdout  # the docstring's usage
    for block in r.stdout.split("\n  --")[1:]:  # one per option: "epochs N   passes over ... (default: 30)"
        metavar = block.split()[1]
        if metavar[0] in "ABCDEFGHIJKLMNOPQRSTUVWXYZ{0":  # N, X, PATH, 0/1, {a,b}: it takes a value
            assert "(default:" in block, block
    text = " ".join(r.stdout.split())
    for phrase in (
        "0 = same as --lr",
        "0 = all experts",
        "--use-moa 0/1",
        "--moa-layers LIST",
        "2,5,8,11",
        "--fusion {mean,cls,reg}",
        "--train-gt {dense,raw}",
        "--bin-spacing {uniform,log}",
        "--silog {paper,bts}",
        "synthetic",
        "random",
        "--input-size H,W",
        "METRES",
    ):
        assert phrase in text, phrase


def test_offline_smoke_run_with_an_empty_cache(tmp_path, offline, run_script):
    """The README's smoke run (--data synthetic --clip random, small sizes here) with no network and an
    empty cache: the tokenizer's vocabulary ships in the repository, so nothing is fetched."""
    r = run_script(
        "train.py",
        "--data",
        "synthetic",
        "--clip",
        "random",
        "--out",
        tmp_path / "smoke",
        "--epochs",
        "1",
        *SMALL,
    )
    assert "done:" in r.stdout and (tmp_path / "smoke" / "ckpt.pt").exists()
    assert list(offline.rglob("*")) == []  # nothing downloaded, nothing cached


def test_plateau_schedule_and_early_stop_and_their_resume(tmp_path, train_small):
    """--recipe adadepthclip at a rate too small to move any fp32 weight: the validation loss never falls, so
    ReduceLROnPlateau halves every rate after the 6th epoch without a lower loss (patience 5), and
    --early-stop 8 ends the run after epoch 8 of 12. A run stopped after 5 epochs and resumed ends the same."""
    flags = (
        "--recipe adadepthclip --lr 1e-30 --adapter-lr 0 --early-stop 8 --val-frac 0.2 --device cpu".split()
    )
    r = train_small(tmp_path / "a", *flags, "--epochs", "12")
    assert "early stop after epoch 8: 8 epochs without a lower validation loss" in r.stdout
    rows = logs(tmp_path / "a")
    lr_by_epoch = {row["epoch"]: row["lr"] for row in rows if "lr" in row}
    assert lr_by_epoch[6] == 1e-30 and lr_by_epoch[7] == pytest.approx(0.5e-30) and max(lr_by_epoch) == 8
    assert len({row["val_loss"] for row in rows if "val_loss" in row}) == 1  # no epoch lowered it
    train_small(tmp_path / "b", *flags, "--epochs", "5")
    r = train_small(tmp_path / "b", *flags, "--epochs", "12", "--resume")
    assert "early stop after epoch 8" in r.stdout
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["scheduler"] == b["scheduler"] and a["bad_epochs"] == b["bad_epochs"] == 8
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [
        g["lr"] for g in b["optimizer"]["param_groups"]
    ]
    r = train_small(tmp_path / "b", *flags, "--epochs", "12", "--resume")  # early stopping ended it
    assert r.stdout.startswith("nothing to do:") and "raise --early-stop" in r.stdout


def test_weights_only_model_pt_evaluates_like_ckpt(trained, run_script):
    """model.pt (written every epoch beside ckpt.pt) holds the weights, config and CLIP id without AdamW's
    state: a third of ckpt.pt, and evaluate.py scores it exactly as it scores ckpt.pt."""
    weights = trained.parent / "model.pt"
    full = torch.load(trained, weights_only=True)
    light = torch.load(weights, weights_only=True)
    assert "optimizer" not in light and "rng" not in light and full["optimizer"]["state"]
    assert light["clip"] == full["clip"] and light["model_config"] == full["model_config"]
    assert light["model"].keys() == full["model"].keys()
    assert all(torch.equal(light["model"][k], full["model"][k]) for k in full["model"])
    assert weights.stat().st_size < 0.5 * trained.stat().st_size
    results = []
    for path in (trained, weights):
        r = run_script("evaluate.py", path, "--limit", "8")
        results.append(json.loads(r.stdout.strip().splitlines()[-1])["metrics"])
    assert results[0] == results[1]


def test_resume_restores_the_fp16_loss_scale(small_clip, tmp_path, monkeypatch):
    """On fp16 (a T4) the GradScaler's scale is part of the run: ckpt.pt carries it and --resume
    starts from it, not from 65536 again. Here on the CPU with the scaler forced on (fp32 maths):
    the scale written after epoch 1 is changed to 1024, and after a resumed epoch 2 (2 steps, far
    from a growth step) it is still 1024."""
    runtime = moa.Runtime(torch.device("cpu"), None, True, "fp32 with a GradScaler (test)")
    monkeypatch.setattr(moa, "runtime", lambda device="auto": runtime)
    out = tmp_path / "run"
    flags = ["--data", "synthetic", "--clip", str(small_clip), "--out", str(out), *SMALL]
    train.main(train.parse_args([*flags, "--epochs", "1"]))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["grad_scaler"]["scale"] == 65536.0
    ckpt["grad_scaler"]["scale"] = 1024.0
    torch.save(ckpt, out / "ckpt.pt")
    train.main(train.parse_args([*flags, "--epochs", "2", "--resume"]))
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["grad_scaler"]["scale"] == 1024.0
    # without a scaler (bf16, fp32) nothing is stored, and nothing is restored
    monkeypatch.setattr(moa, "runtime", lambda device="auto": runtime._replace(grad_scaler=False))
    train.main(train.parse_args([*flags, "--epochs", "3", "--resume"]))
    assert torch.load(out / "ckpt.pt", weights_only=True)["grad_scaler"] == {}


def test_resume_with_nothing_left_says_so_and_changes_nothing(tmp_path, train_small):
    out = tmp_path / "run"
    train_small(out, "--epochs", "2")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = train_small(out, "--epochs", "2", "--resume")  # exit 0: the run asked for is already complete
    (line,) = r.stdout.strip().splitlines()
    assert (
        line.startswith("nothing to do:") and "2 of --epochs 2 are done" in line and "raise --epochs" in line
    )
    assert r.stderr.strip() == ""
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no log line, no checkpoint rewritten
    r = train_small(out, "--epochs", "1", "--resume")
    assert "nothing to do:" in r.stdout and "raise --epochs above 2" in r.stdout


def test_one_live_run_per_out_and_a_killed_runs_lock_does_not_block(small_clip, tmp_path, train_small, fails):
    """A second run into an --out that a live run holds stops at once, naming that run's PID; once that run
    is SIGKILLed, the lock file it leaves (its PID still inside) blocks nobody."""
    out = tmp_path / "run"
    first = start(
        ["--data", "synthetic", "--clip", small_clip, "--out", out, *SMALL, "--epochs", "200"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(out / "ckpt.pt", first)
        for extra in ([], ["--resume"], ["--overwrite"]):
            r = train_small(out, "--epochs", "2", *extra, ok=False)
            fails(r, f"PID {first.pid}")
            assert "in use by a running train.py" in r.stderr and "training" not in r.stdout
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
    assert (out / "train.lock").read_text().strip() == str(first.pid)  # stale: its run is gone
    saved = torch.load(out / "ckpt.pt", weights_only=True)["epoch"]
    r = train_small(out, "--epochs", str(saved + 2), "--resume")
    assert f"resumed from {out / 'ckpt.pt'}: epoch {saved + 1}" in r.stdout
    assert (out / "train.lock").read_text().strip() != str(first.pid)  # the new run's PID


# -----------------------------------------------------------------------------
# interruptions


def test_kill_and_resume_is_bit_identical(small_clip, tmp_path, train_small):
    """SIGKILL a run once its first checkpoint lands, resume it, and compare with an uninterrupted run.
    On the CPU, where every kernel is deterministic (a GPU's atomic adds are not)."""
    train_small(tmp_path / "a", "--epochs", "4", "--device", "cpu")
    args = [
        "--data",
        "synthetic",
        "--clip",
        small_clip,
        "--out",
        tmp_path / "b",
        *SMALL,
        *"--epochs 4 --device cpu".split(),
    ]
    proc = start(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "b" / "ckpt.pt"
    wait_for(ckpt, proc)
    proc.kill()
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=True)["epoch"]
    assert killed_at < 3, "the run finished before it could be killed"
    stale = tmp_path / "b" / ".ckpt.pt.x1y2.tmp"  # what a kill during a checkpoint write would leave
    stale.write_bytes(b"partial")
    r = train_small(tmp_path / "b", "--epochs", "4", "--resume", "--device", "cpu")
    assert f"resumed from {ckpt}: epoch {killed_at + 1}" in r.stdout and not stale.exists()
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["step"] == b["step"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_ctrl_c_says_how_to_resume_and_the_hint_works(small_clip, tmp_path):
    out = tmp_path / "run"
    proc = start(
        ["--data", "synthetic", "--clip", small_clip, "--out", out, *SMALL, "--epochs", "200"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(out / "ckpt.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    (line,) = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert f"the last checkpoint is {out / 'ckpt.pt'}" in line and "--resume" in line
    saved = torch.load(out / "ckpt.pt", weights_only=True)["epoch"]
    again = shlex.split(line.split("continue with: ")[1])  # exactly what the user is told to run
    assert again[0] == "python" and again[-1] == "--resume"
    again = again[1:-1] + ["--epochs", str(saved + 2), "--resume"]  # a shorter run than 200 epochs
    r = subprocess.run([sys.executable, *again], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {out / 'ckpt.pt'}: epoch {saved + 1}" in r.stdout
    assert torch.load(out / "ckpt.pt", weights_only=True)["epoch"] == saved + 1


def test_non_finite_loss_stops_and_keeps_the_checkpoint(small_clip, tmp_path, train_small, fails):
    train_small(tmp_path / "run", "--epochs", "1")
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    r = train_small(tmp_path / "run", "--epochs", "2", "--resume", "--w-silog", "nan", ok=False)
    fails(r, "non-finite loss")
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before


# -----------------------------------------------------------------------------
# user mistakes: one `error:` line naming the flag or file, no traceback, nothing created or fetched


def test_an_earlier_run_is_never_overwritten(tmp_path, train_small, fails):
    out = tmp_path / "run"
    train_small(out, "--epochs", "1", "--val-frac", "0.1")
    files = {name: (out / name).read_bytes() for name in ("ckpt.pt", "best.pt", "log.jsonl")}
    r = train_small(out, "--epochs", "1", ok=False)
    fails(r, out)
    assert "--resume" in r.stderr and "--overwrite" in r.stderr and "another --out" in r.stderr
    assert {name: (out / name).read_bytes() for name in files} == files  # byte-identical
    fails(train_small(out, "--resume", "--overwrite", ok=False), "--overwrite")
    train_small(out, "--epochs", "1", "--overwrite")  # replaces it: a fresh log, no stale best.pt
    assert not (out / "best.pt").exists() and len(logs(out)) == 3 + 1  # 3 steps and 1 epoch, this run's alone


TRAIN_MISTAKES = {  # name: (extra flags, what the error line names)
    "unknown fusion": (["--fusion", "foo"], "--fusion"),
    "unknown train gt": (["--train-gt", "foo"], "--train-gt"),
    "layer beyond the 12 blocks": (["--moa-layers", "2,5,20"], "--moa-layers"),
    "zero batch": (["--batch-size", "0"], "--batch-size"),
    "negative epochs": (["--epochs", "-1"], "--epochs"),
    "val-frac of 1": (["--val-frac", "1"], "--val-frac"),
    "bool that is not 0/1": (["--use-moa", "2"], "--use-moa"),
    "top-k above the experts": (["--top-k", "9"], "--top-k"),
    "input not a multiple of 32": (["--input-size", "100"], "--input-size"),
    "batch larger than the data": (["--batch-size", "13"], "--batch-size"),
    "similarity head with context": (["--head", "similarity"], "--head similarity"),
    "resume without a checkpoint": (["--resume"], "ckpt.pt"),
    "resume and overwrite": (["--resume", "--overwrite"], "--overwrite"),
    "missing clip file": (["--clip", "no/such/ViT-B-32.pt"], "no/such/ViT-B-32.pt"),
}


@pytest.mark.parametrize("name", TRAIN_MISTAKES)
def test_bad_flag(name, tmp_path, offline, train_small, fails):
    extra, named = TRAIN_MISTAKES[name]
    r = train_small(tmp_path / "out", *extra, ok=False)
    fails(r, named)
    assert (
        "usage:" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    )  # the error, a pointer to --help
    if r.returncode == 2:  # a flag error (argparse's exit code): the second line says where help is
        assert r.stderr.strip().splitlines()[1] == "(python train.py --help lists every flag)"
    assert not (tmp_path / "out").exists() and list(offline.rglob("*")) == []


def test_device_that_does_not_exist(tmp_path, offline, train_small, fails):
    device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent on every machine
    fails(train_small(tmp_path / "out", "--device", device, ok=False), f"--device {device}")
    assert not (tmp_path / "out").exists()


def test_triton_moa_needs_cuda(tmp_path, offline, monkeypatch, train_small, fails):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: --moa-impl triton is valid here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fails(train_small(tmp_path / "out", "--moa-impl", "triton", ok=False), "--moa-impl triton")
    assert not (tmp_path / "out").exists()


def test_clip_file_that_is_not_clip(tmp_path, offline, train_small, fails):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, not weights\n")
    r = train_small(tmp_path / "out", clip=notes, ok=False)
    fails(r, notes)
    assert "not a CLIP weights file" in r.stderr and not (tmp_path / "out").exists()


def test_data_paths_download_only_when_meant(small_clip, tmp_path, offline, run_script, fails):
    def train(data, *extra):
        return run_script(
            "train.py", "--data", data, "--clip", small_clip, "--out", tmp_path / "out", *extra, ok=False
        )

    typo = tmp_path / "typo" / "nyu_depth_v2_labeled.mat"
    fails(train(typo), typo)  # a path into a missing folder: no folder, no download
    assert not typo.parent.exists()
    other = tmp_path / "nyu.mat"  # another name in an existing folder: only with --download
    r = train(other)
    fails(r, other)
    assert "--download" in r.stderr and "2.97 GB" in r.stderr and "put a copy" in r.stderr
    official = tmp_path / "nyu_depth_v2_labeled.mat"
    r = train(official, "--no-download")
    fails(r, official)
    assert "--download" in r.stderr and "download=" not in r.stderr
    r = train(official)  # the one case that downloads: here the network is down
    fails(r, official)
    assert f"put it at {official}" in r.stderr  # where a copy fetched by hand goes
    assert not official.exists() and not (tmp_path / "out").exists()


def test_failed_clip_download_says_where_the_file_goes(tmp_path, offline, run_script, fails):
    r = run_script(
        "train.py", "--data", "synthetic", "--clip", "ViT-B/32", "--out", tmp_path / "out", *SMALL, ok=False
    )
    path = offline / "clip" / "ViT-B-32.pt"
    fails(r, path)
    assert f"put it at {path} (SHA-256 {clip_vit.official_sha256('ViT-B/32')})" in r.stderr
    assert not path.exists() and not (tmp_path / "out").exists()


def test_bad_data_clip_out_and_images(trained, small_clip, tmp_path, run_script, fails):
    junk = tmp_path / "junk.mat"
    junk.write_bytes(os.urandom(4096))
    fails(run_script("evaluate.py", trained, "--data", junk, ok=False), junk)
    fails(
        run_script("train.py", "--data", junk, "--clip", small_clip, "--out", tmp_path / "o", ok=False), junk
    )
    half = tmp_path / "half.pt"
    half.write_bytes(small_clip.read_bytes()[:5000])
    fails(
        run_script(
            "train.py", "--data", "synthetic", "--clip", half, "--out", tmp_path / "o2", *SMALL, ok=False
        ),
        half,
    )
    fails(
        run_script(
            "train.py", "--data", "synthetic", "--clip", "ViT-L/99", "--out", tmp_path / "o3", ok=False
        ),
        "ViT-L/99",
    )
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a directory")
    fails(
        run_script(
            "train.py",
            "--data",
            "synthetic",
            "--clip",
            small_clip,
            "--out",
            blocker / "sub",
            *SMALL,
            ok=False,
        ),
        blocker / "sub",
    )
    assert not any((tmp_path / name).exists() for name in ("o", "o2", "o3"))
    notimg = tmp_path / "photo.jpg"
    notimg.write_text("not an image")
    fails(run_script("evaluate.py", trained, "--image", notimg, ok=False), notimg)
    assert not list(tmp_path.glob("photo_depth*"))


# -----------------------------------------------------------------------------
# nothing silent, nothing lost (resume, Ctrl-C in a write, a full disk, the wrong file, millimetres)


def test_resume_applies_new_rates_says_so_and_refuses_a_new_data_plan(tmp_path, train_small, fails):
    """--resume with a new --lr: AdamW's groups take it, the first line says what changed, the checkpoint
    records what ran, and the step plan stays whole. A new --batch-size (the data plan) is refused before
    any work, every file byte-identical."""
    out = tmp_path / "run"
    train_small(out, "--epochs", "1")
    r = train_small(out, "--epochs", "2", "--lr", "1e-4", "--resume")
    assert "resumed from" in r.stdout and "changed: --epochs 1 -> 2, --lr 1e-05 -> 0.0001" in r.stdout
    assert "step 6/6 " in r.stdout  # 12 frames / 4 per batch = 3 steps an epoch: the plan of the whole run
    assert {row["lr"] for row in logs(out) if row.get("epoch") == 1 and "lr" in row} == {1e-4}
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["train_config"]["lr"] == 1e-4 and ckpt["train_config"]["epochs"] == 2
    assert {group["lr"] for group in ckpt["optimizer"]["param_groups"]} == {1e-4}
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "model.pt", "log.jsonl")}
    r = train_small(out, "--epochs", "3", "--batch-size", "3", "--resume", ok=False)
    fails(r, "--batch-size")
    assert "trained with --batch-size 4" in r.stderr
    assert {name: (out / name).read_bytes() for name in before} == before


SLOW_CHECKPOINT = """
import runpy, sys, time, torch
save = torch.save
def slow_save(obj, f, *args, **kw):
    save(obj, f, *args, **kw)
    if "optimizer" in obj:  # ckpt.pt, inside its atomic write
        print("writing ckpt.pt", file=sys.stderr, flush=True)
        time.sleep(2)
torch.save = slow_save
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def test_ctrl_c_during_a_checkpoint_write_waits_for_it_then_stops(small_clip, tmp_path):
    """A real SIGINT while ckpt.pt is being written: the write completes, then the run stops with exit 130
    and the resume hint, and ckpt.pt is whole (epoch 0 of 200)."""
    out = tmp_path / "run"
    args = ["--data", "synthetic", "--clip", small_clip, "--out", out, *SMALL, "--epochs", "200"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CHECKPOINT, *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in proc.stderr:
        if line.startswith("writing ckpt.pt"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    (line,) = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert "after epoch 1 of 200" in line and "--resume" in line
    assert torch.load(out / "ckpt.pt", weights_only=True)["epoch"] == 0
    assert not list(out.glob(".*.tmp"))


def test_a_full_disk_ends_in_one_line_and_the_folder_says_what_it_holds(
    small_clip, tmp_path, train_small, fails
):
    """A file-size limit as a full disk: model.pt fits, ckpt.pt does not. One line names ckpt.pt and the
    cause; no temporary file is left; the folder then says it has no ckpt.pt to resume from."""
    out = tmp_path / "run"
    train_small(tmp_path / "sizes", "--epochs", "1")
    limit = (tmp_path / "sizes" / "model.pt").stat().st_size + 4096
    assert (tmp_path / "sizes" / "ckpt.pt").stat().st_size > limit

    def full_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not the process

    args = f"train.py --data synthetic --clip {small_clip} --out {out} --epochs 1".split()
    r = subprocess.run(
        [sys.executable, *args, *SMALL],
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=full_disk,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    fails(r, out / "ckpt.pt")
    assert "cannot write it (File too large)" in r.stderr
    assert (out / "model.pt").exists() and not (out / "ckpt.pt").exists() and not list(out.glob(".*.tmp"))
    fails(train_small(out, "--epochs", "1", ok=False), "no ckpt.pt to resume from")


def test_weights_only_file_given_to_resume_is_refused_before_any_work(trained, tmp_path, train_small, fails):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes((trained.parent / "model.pt").read_bytes())  # model.pt copied as ckpt.pt
    (out / "log.jsonl").write_text('{"step": 3}\n')
    r = train_small(out, "--epochs", "2", "--resume", ok=False)
    fails(r, out / "ckpt.pt")
    assert "weights only" in r.stderr and "--overwrite" in r.stderr
    assert (out / "log.jsonl").read_text() == '{"step": 3}\n'  # nothing emptied


def test_depths_in_millimetres_are_refused(small_clip, tmp_path, run_script, fails):
    from nyu_fixtures import asymmetric_frames, write_splits, write_v73

    images, depths, raw = asymmetric_frames(3)
    write_v73(tmp_path / "nyu.mat", images, depths * 1000, raw_depths=raw * 1000)
    write_splits(tmp_path / "splits.mat", [1, 2], [3])
    flags = ["--data", tmp_path / "nyu.mat", "--clip", small_clip, "--out", tmp_path / "run", *SMALL[:8]]
    r = run_script("train.py", *flags, "--batch-size", "1", ok=False)
    fails(r, "no train frame has a valid depth")
    assert "millimetres" in r.stderr and not (tmp_path / "run" / "ckpt.pt").exists()
