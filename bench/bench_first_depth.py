"""
Time to first depth: `python evaluate.py ckpt.pt --image photo.jpg` against a bare `python -c "import torch"`,
both as fresh subprocesses, alternated run by run so that machine drift hits them alike (a benchmark, not a
test: pytest does not collect it). The CLIP weights are a ViT-B/32-sized random archive in OpenAI's layout
(fp16/fp32 mix, TorchScript zip, 354 MB) read from a local file, and the photo a 640x480 JPEG, both made once
and removed at the end unless --keep; the checkpoint, an untrained model's, is written by moa.save_checkpoint at
every start. --baseline REV times the same command with the code of a git revision as well (git archive
unpacks it beside the files; its own code writes its checkpoint).

    python bench/bench_first_depth.py [--reps 7] [--threads 2] [--baseline REV] [--profile]
"""

import argparse
import io
import os
import resource
import statistics
import subprocess
import sys
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import clip_vit  # noqa: E402
from clip_fixtures import official_dtypes, write_torchscript_archive  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "moa-depthclip-bench-first-depth"


def make_inputs(folder):
    """(archive, photo) in folder, each written once and reused by later runs."""
    folder.mkdir(parents=True, exist_ok=True)
    archive, photo = folder / "ViT-B-32-random.pt", folder / "photo.jpg"
    if not archive.is_file():  # the same layout and dtypes as OpenAI's 354 MB file
        print(f"writing {archive} ...", file=sys.stderr)
        sd = official_dtypes(clip_vit.random_state_dict(seed=0))
        write_torchscript_archive(sd, archive.with_suffix(".tmp"))
        os.replace(archive.with_suffix(".tmp"), archive)
    if not photo.is_file():  # a 640x480 photo
        pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photo, quality=90)
    return archive, photo


# an untrained model on the archive, saved as train.py saves it, by the code in the working folder
WRITE_CHECKPOINT = """
import sys, clip_vit, moa
archive, ckpt = sys.argv[1:]
model = moa.MoADepthCLIP(clip_vit.load(archive), moa.DepthConfig())
moa.save_checkpoint(ckpt, model, clip={"name": archive, "sha256": getattr(clip_vit, "weights_sha256", getattr(moa, "clip_sha256", None))(archive)})
"""


def write_checkpoint(code, archive, ckpt, env):
    """The checkpoint as the code in folder `code` writes it (a revision reads its own format)."""
    print(f"writing {ckpt} ...", file=sys.stderr)
    command = [sys.executable, "-c", WRITE_CHECKPOINT, str(archive), str(ckpt)]
    subprocess.run(command, cwd=code, env=env, check=True)
    return ckpt


def export_revision(rev, folder):
    """The repository's files at git revision rev, unpacked into folder (read-only for the repository:
    git archive): the path to time against, in the same run."""
    if not (folder / "evaluate.py").is_file():
        tar = subprocess.run(
            ["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True, check=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            archive.extractall(folder, filter="data")
    return folder


def run_seconds(cmd, env):
    """(wall, CPU) seconds of one subprocess run, CPU = user + system of all its threads; a failure
    stops the benchmark with its output. On a busy machine the CPU seconds vary less than the wall."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=7, help="runs of each command, alternated (default: 7)")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of the runs (default: 2)")
    p.add_argument("--profile", action="store_true", help="then one cProfile of evaluate.py, top 40")
    p.add_argument("--baseline", metavar="REV", help="also time evaluate.py as of git revision REV")
    p.add_argument(
        "--keep", action="store_true", help=f"keep the ~600 MB of inputs in {CACHE} for the next run"
    )
    args = p.parse_args()
    archive, photo = make_inputs(CACHE)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "XDG_CACHE_HOME": str(CACHE / "cache"),
    }  # the CLIP hash is remembered there, not in ~/.cache
    codes = {"evaluate.py --image": ROOT}  # the code to time: this tree, and --baseline's
    if args.baseline:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", args.baseline],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
        codes[f"evaluate.py at {rev}"] = export_revision(rev, CACHE / f"rev-{rev}")
    commands = {"import torch": [sys.executable, "-c", "import torch"]}
    for i, (name, code) in enumerate(codes.items()):
        ckpt = write_checkpoint(code, archive, CACHE / f"ckpt{i}.pt", env)
        commands[name] = [
            sys.executable,
            str(code / "evaluate.py"),
            str(ckpt),
            "--image",
            str(photo),
            "--clip",
            str(archive),
            "--out-dir",
            str(CACHE / f"out{i}"),
        ]
    # warm-up: the page cache then holds the files and Python's bytecode
    for cmd in commands.values():
        run_seconds(cmd, env)
    runs = {name: [] for name in commands}  # (wall, cpu) per run
    for _ in range(args.reps):
        for name, cmd in commands.items():
            runs[name].append(run_seconds(cmd, env))
    wall = {name: statistics.median(w for w, _ in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(c for _, c in rs) for name, rs in runs.items()}
    load = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} threads, load average "
        f"{load:.1f}; medians of {args.reps} alternated runs each"
    )
    for name, rs in runs.items():
        spread = f"wall min {min(w for w, _ in rs):.2f} max {max(w for w, _ in rs):.2f}"
        print(f"{name:<22}: wall {wall[name]:6.2f} s, CPU {cpu[name]:6.2f} s  ({spread})")
    bare = "import torch"
    for name in list(commands)[1:]:
        ratio = f"wall {wall[name] / wall[bare]:6.2f}x, CPU {cpu[name] / cpu[bare]:6.2f}x"
        print(f"{name + ' / import torch':<37}: {ratio}  (target for evaluate.py: wall <= 2x)")
    if args.profile:
        profile = [sys.executable, "-m", "cProfile", "-s", "cumulative", *commands["evaluate.py --image"][1:]]
        out = subprocess.run(profile, cwd=ROOT, env=env, capture_output=True, text=True).stdout
        print("\n".join(out.splitlines()[:40]))
    if not args.keep:
        shutil.rmtree(CACHE, ignore_errors=True)
