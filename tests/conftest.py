"""
Shared pytest setup for the whole suite.

- Without CUDA, TRITON_INTERPRET=1 is set here, before any test imports kernels/, so Triton kernels run on
  the CPU through the interpreter (it must be set before the @triton.jit functions are created). With CUDA
  the kernels are compiled, and the TestCUDA tests run.
- Every test runs with its own empty CLIP cache ($XDG_CACHE_HOME), so nothing touches ~/.cache/clip.
  REAL_CLIP_CACHE remembers the user's real cache for the optional real-weights test.
- `http_server` is a throwaway HTTP server on 127.0.0.1 for the download tests: it honours Range
  requests and can be told to cut a transfer short or to answer with an error status.
"""

import os
import torch

if not torch.cuda.is_available():  # no GPU: run Triton kernels through the CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must come before any kernel import

import http.server
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import clip_vit

ROOT = Path(__file__).resolve().parents[1]
# seconds after which a subprocess has hung: a guard against hangs, never a speed test (a busy 2-core machine
# runs the suite several times slower than an idle one)
HANG = 1800
SHARED = ROOT.parent / "shared"  # real files for tests; may be absent
SHARED_DATA = SHARED / "data"
REAL_CLIP_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip"

# one private, empty cache for the whole session: the tokenizer must work from the vocabulary the repo ships
_cache_root = Path(tempfile.mkdtemp(prefix="moa-depthclip-cache-"))
(_cache_root / "clip").mkdir()
os.environ["XDG_CACHE_HOME"] = str(_cache_root)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_cache_root, ignore_errors=True)


def _shared_file(*parts):
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present (../shared is optional)")
    return p


@pytest.fixture(scope="session")
def shared_file():
    """shared_file("nyu", "splits.mat") -> the path of a real file under ../shared/data, or skips the test
    cleanly when ../shared is absent (a clone has none)."""
    return _shared_file


@pytest.fixture(scope="session")
def real_clip_cache():
    """The user's real CLIP cache folder (the optional real-weights test looks for ViT-B-32.pt there)."""
    return REAL_CLIP_CACHE


# -----------------------------------------------------------------------------
# a tiny HTTP server on 127.0.0.1 for download tests


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        route = srv.routes.get(self.path)
        if route is None:
            self.send_error(404)
            return
        if route.get("status"):  # forced error, e.g. 500 or 403
            self.send_error(route["status"])
            return
        data = route["data"]
        start = 0
        rng = self.headers.get("Range")
        if rng and route.get("ranges", True):
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = route.pop("cut_after", None)  # cut the connection once, after this many body bytes
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@pytest.fixture
def http_server():
    """Yields a server; register files with `srv.routes["/name"] = {"data": b"...", ...}` and fetch
    `srv.url + "/name"`. Route options: status=500 (error), cut_after=N (drop the connection once after
    N body bytes), ranges=False (ignore Range headers). `srv.requests` logs (path, Range header)."""
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.routes, srv.requests = {}, []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


# -----------------------------------------------------------------------------
# train.py / evaluate.py as a user runs them: subprocesses on a tiny random CLIP and synthetic rooms

SMALL = (
    "--input-size 64 --bottleneck 16 --gate-hidden 16 --num-bins 16 "
    "--synthetic-frames 12 --batch-size 4 --log-interval 1"
).split()


def _run(script, *args, ok=True, timeout=HANG):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # its own process group: a hung run is killed whole
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if ok:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="session")
def run_script():
    """run_script("train.py", *args, ok=True, timeout=HANG) -> CompletedProcess; asserts exit 0 when ok."""
    return _run


@pytest.fixture(scope="session")
def small_clip(tmp_path_factory):
    """A tiny random CLIP (ViT with width 64, 64x64 inputs) saved as a state dict."""
    path = tmp_path_factory.mktemp("clip") / "small_clip.pt"
    torch.save(
        clip_vit.random_state_dict(
            embed_dim=32,
            image_resolution=64,
            vision_layers=12,
            vision_width=64,
            patch=32,
            width=64,
            heads=1,
            layers=1,
        ),
        path,
    )
    return path


@pytest.fixture(scope="session")
def train_small(small_clip):
    """train_small(out, *extra, clip=small_clip, **run_kw): train.py on synthetic data at toy sizes."""

    def train(out, *extra, clip=small_clip, **kw):
        return _run("train.py", "--data", "synthetic", "--clip", clip, "--out", out, *SMALL, *extra, **kw)

    return train


@pytest.fixture(scope="session")
def trained(train_small, tmp_path_factory):
    """The checkpoint of a one-epoch toy run."""
    out = tmp_path_factory.mktemp("trained")
    train_small(out, "--epochs", "1")
    return out / "ckpt.pt"


@pytest.fixture(scope="session")
def fails():
    """fails(result, name): non-zero exit, no traceback, exactly one `error:` line, and it names `name`."""

    def check(r, name):
        assert r.returncode != 0
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
        lines = [line for line in r.stderr.strip().splitlines() if "error:" in line]
        assert len(lines) == 1 and str(name) in lines[0], r.stderr[-2000:]

    return check
