"""
Shared pytest setup for the whole suite.

- Without CUDA, TRITON_INTERPRET=1 is set here, before any test imports kernels/, so Triton kernels run on
  the CPU through the interpreter (it must be set before the @triton.jit functions are created). With CUDA
  the kernels are compiled, and the TestCUDA tests run.
- Every test runs with its own empty CLIP cache ($XDG_CACHE_HOME), so nothing touches ~/.cache/clip.
  The official tokenizer vocabulary from ../shared/data/clip is linked into it when present.
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
import socketserver
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"                     # real files for tests; may be absent
SHARED_DATA = SHARED / "data"
REAL_CLIP_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip"

# one private cache for the whole session, with the real vocabulary linked in when we have it
_cache_root = Path(tempfile.mkdtemp(prefix="moa-depthclip-cache-"))
(_cache_root / "clip").mkdir()
_vocab = SHARED_DATA / "clip" / "bpe_simple_vocab_16e6.txt.gz"
if _vocab.exists():
    os.symlink(_vocab, _cache_root / "clip" / _vocab.name)
os.environ["XDG_CACHE_HOME"] = str(_cache_root)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_cache_root, ignore_errors=True)


def shared_file(*parts):
    """Path to a file under ../shared/data, or skip the test cleanly when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not present (../shared is optional)")
    return p


# ----------------------------------------------------------------------------------------------------
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
