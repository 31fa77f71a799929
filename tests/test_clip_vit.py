"""
clip_vit.py: parity with Hugging Face's independent CLIP, the TorchScript archive reader, the tokenizer and
its shipped vocabulary, downloads against a local HTTP server, clear errors for bad files, atomic writes,
and the zero-shot command line.
Run: python -m pytest -q tests/test_clip_vit.py
"""

import hashlib
import importlib.util
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import clip_vit
from clip_fixtures import (
    hf_to_openai,
    official_dtypes,
    openai_reference,
    resnet_state_dict,
    small_resnet_state_dict,
    small_state_dict,
    write_torchscript_archive,
)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# -----------------------------------------------------------------------------
# parity with Hugging Face transformers on random ViT-B/32 weights, via an archive in the official layout


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """Hugging Face's CLIP run by tests/hf_reference.py in its own process (`python -I`, another folder), so
    that this repository's `kernels/` cannot shadow the `kernels` package transformers >= 5 imports."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install -r requirements-dev.txt)")
    tmp = tmp_path_factory.mktemp("hf")
    torch.manual_seed(1)
    inputs = {
        "images": torch.randn(2, 3, 224, 224),
        "wide": torch.randn(1, 3, 256, 384),  # an 8x12 grid: the positional embedding resized from 7x7
        "text": clip_vit.tokenize(["a diagram", "a photo of a chair."]),
    }
    torch.save(inputs, tmp / "inputs.pt")
    script = Path(__file__).with_name("hf_reference.py")
    run = subprocess.run(
        [sys.executable, "-I", str(script), "inputs.pt", "outputs.pt"],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = torch.load(tmp / "outputs.pt", weights_only=True)
    sd = official_dtypes(hf_to_openai(outputs["state_dict"]))
    path = write_torchscript_archive(sd, tmp / "ViT-B-32.pt")
    return inputs, outputs, path


def test_parity_with_huggingface(hf_reference):
    inputs, hf, path = hf_reference
    model = clip_vit.load(path)
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training
    with torch.no_grad():
        img = model.encode_image(inputs["images"])
        txt = model.encode_text(inputs["text"])
        logits, _ = model(inputs["images"], inputs["text"])
    assert img.shape == (2, 512) and txt.shape == (2, 512)
    assert rel_err(img, hf["image"]) < 1e-4, rel_err(img, hf["image"])
    assert rel_err(txt, hf["text"]) < 1e-4, rel_err(txt, hf["text"])
    with torch.no_grad():
        wide = model.encode_image(inputs["wide"])
    assert rel_err(wide, hf["wide"]) < 1e-4, rel_err(wide, hf["wide"])  # bicubic, as HF: not nearest
    assert rel_err(logits, hf["logits"]) < 1e-4


def test_the_repository_kernels_folder_cannot_shadow_an_installed_kernels_package(tmp_path):
    """The failure this guards against: transformers >= 5 imports Hugging Face's `kernels`, and with the
    repository root on sys.path (as under pytest) it found ours instead. In the isolated process that the
    parity test uses, `kernels` resolves to site-packages, or to nothing, never to this repository."""
    probe = (
        "import importlib.util, sys; s = importlib.util.find_spec('kernels'); print(s.origin if s else None)"
    )
    run = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert str(Path(__file__).resolve().parents[1] / "kernels") not in run.stdout, run.stdout


# -----------------------------------------------------------------------------
# parity with OpenAI's own clip/model.py (PyPI openai-clip), both towers, on archives in the official layout:
# fp16 weights as the real files store them, read by clip_vit without TorchScript, by OpenAI through torch.jit


def _openai_parity(path, image_size, n_images=2, logits=True):
    """[(ours, OpenAI's)] encode_image, encode_text (and logits) for the archive at path, on random pixels and
    two prompts shorter than the context (so the EOT token is not the last position)."""
    ours, ref = clip_vit.load(path), openai_reference(path)
    assert all(p.dtype == torch.float32 for p in ours.parameters()) and not ours.training
    g = torch.Generator().manual_seed(3)
    images = torch.randn(n_images, 3, image_size, image_size, generator=g)
    text = clip_vit.tokenize(["a diagram", "This object is a little remote"])
    with torch.no_grad():
        pairs = [
            (ours.encode_image(images), ref.encode_image(images)),
            (ours.encode_text(text), ref.encode_text(text)),
        ]
        if logits:
            pairs.append((ours(images, text)[0], ref(images, text)[0]))
    return pairs


def _assert_parity(pairs):
    for name, (a, b) in zip(("encode_image", "encode_text", "logits"), pairs):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert rel_err(a, b) < 1e-4, (name, rel_err(a, b))


def test_vit_parity_with_openai_model_py(tmp_path):
    """A second independent check of the ViT towers, beside Hugging Face's: QuickGELU's 1.702, the causal mask,
    the text features at the EOT token, the class token and ln_post all show here."""
    sd = clip_vit.random_state_dict(
        embed_dim=64,
        image_resolution=64,
        vision_layers=2,
        vision_width=128,
        patch=32,
        width=128,
        heads=2,
        layers=2,
        seed=4,
    )  # 2 heads per tower
    path = write_torchscript_archive(official_dtypes(sd), tmp_path / "vit.pt")
    _assert_parity(_openai_parity(path, 64))


def test_resnet_parity_with_openai_model_py(tmp_path):
    """A small CLIP ResNet: the stem, anti-aliased Bottlenecks with and without a downsampling shortcut, the
    BatchNorms (random statistics: not the identity) and the attention pool, fp16 convolutions."""
    sd = official_dtypes(small_resnet_state_dict(seed=2))
    assert sd["visual.layer2.0.conv1.weight"].dtype == torch.float16
    assert sd["visual.layer2.0.bn1.num_batches_tracked"].dtype == torch.int64
    path = write_torchscript_archive(sd, tmp_path / "rn.pt")
    model = clip_vit.load(path)
    assert isinstance(model.visual, clip_vit.ModifiedResNet)
    assert [len(model.visual.layer1), len(model.visual.layer2)] == [1, 2]  # read off the keys
    _assert_parity(_openai_parity(path, 64))


def test_rn50_parity_with_openai_model_py_at_full_size(tmp_path):
    """RN50's image tower at its real sizes: layers (3, 4, 6, 3), 2048 channels, 1024-d output, 224x224 (the
    text tower, ViT-B/32's, made small here to save time: the Hugging Face test has it at full size)."""
    sd = resnet_state_dict(seed=5, width=64, heads=1, layers=1)
    path = write_torchscript_archive(official_dtypes(sd), tmp_path / "RN50.pt")
    model = clip_vit.load(path)
    assert sum(p.numel() for p in model.visual.parameters()) == 38_316_896  # RN50's image tower: 38.32M
    pairs = _openai_parity(path, 224, n_images=1, logits=False)
    assert pairs[0][0].shape == (1, 1024)
    _assert_parity(pairs)
    with torch.no_grad():  # DepthCLIP's input: layer4's map, 2048 x 13 x 17 for a 416x544 crop
        assert model.visual.features(torch.zeros(1, 3, 416, 544)).shape == (1, 2048, 13, 17)


def test_build_model_tells_the_towers_apart():
    vit = clip_vit.build_model(small_state_dict())
    resnet = clip_vit.build_model(small_resnet_state_dict())
    assert isinstance(vit.visual, clip_vit.VisionTransformer)
    assert isinstance(resnet.visual, clip_vit.ModifiedResNet)
    assert [len(getattr(resnet.visual, f"layer{i}")) for i in (1, 2, 3, 4)] == [1, 2, 1, 1]
    sd = small_resnet_state_dict()
    del sd["visual.layer2.1.bn2.running_var"]
    with pytest.raises(RuntimeError, match="Missing key"):  # strict, as for the ViT
        clip_vit.build_model(sd)
    with pytest.raises(ValueError, match="not a CLIP state dict"):
        clip_vit.build_model({"visual.conv1.weight": torch.zeros(1)})


# -----------------------------------------------------------------------------
# the archive reader


def test_archive_reader_matches_torch_jit_load(tmp_path):
    sd = official_dtypes(small_state_dict())
    path = write_torchscript_archive(sd, tmp_path / "small.pt")
    ours = clip_vit.read_torchscript_state_dict(path)
    theirs = torch.jit.load(str(path)).state_dict()  # comparison only; clip_vit never calls it
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert {ours[k].dtype for k in ours} == {torch.float16, torch.float32, torch.int64}


def test_plain_state_dict_and_random(tmp_path):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    sd = small_state_dict()
    assert torch.equal(torch.rand(3), expected)  # building random weights leaves the caller's RNG alone
    assert torch.equal(small_state_dict()["visual.proj"], sd["visual.proj"])  # and is deterministic
    torch.save(sd, tmp_path / "plain.pt")
    m = clip_vit.load(tmp_path / "plain.pt")
    assert torch.equal(m.visual.proj, sd["visual.proj"])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert m.encode_image(x).shape == (1, 32)


def test_pos_embed_identity_and_interpolation():
    m = clip_vit.build_model(small_state_dict())  # 64x64 input, 2x2 grid
    pe = m.visual.positional_embedding
    assert m.visual.pos_embed(2, 2) is pe
    with torch.no_grad():
        assert m.visual.embed(torch.randn(1, 3, 96, 160)).shape == (1, 1 + 3 * 5, 64)
        pe[1:] = torch.tensor([0.0, 1.0, 0.0, 1.0])[:, None]  # 2x2 grid varying along columns only
        big = m.visual.pos_embed(3, 6)
    assert big.shape == (19, 64) and torch.equal(big[0], pe[0])  # the class position is never resized
    grid = big[1:, 0].reshape(3, 6)
    assert (
        torch.allclose(grid, grid[:1].expand(3, 6)) and grid[0, -1] > grid[0, 0]
    )  # rows equal: no transpose


# -----------------------------------------------------------------------------
# bad files: every one is a UserError naming the file


def _bad(path, match=None):
    with pytest.raises(clip_vit.UserError, match=match) as e:
        clip_vit.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_bad_files(tmp_path):
    good = write_torchscript_archive(official_dtypes(small_state_dict()), tmp_path / "good.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a model" * 10)
    _bad(tmp_path / "junk.pt")
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    _bad(tmp_path / "trunc.pt")
    _bad(tmp_path / "missing.pt", "no such file")
    (tmp_path / "notes.txt").write_text("my notes\n")
    _bad(tmp_path / "notes.txt", "not a CLIP weights file")  # once just "101"
    for i, obj in enumerate([[1, 2], {"model": {}}]):  # a torch.save file, but no CLIP state dict
        torch.save(obj, tmp_path / f"other{i}.pt")
        _bad(tmp_path / f"other{i}.pt", "not a CLIP state dict")

    sd = small_state_dict()
    cases = {
        "missing_key": ("ln_final.bias", None, "Missing key"),
        "extra_key": ("visual.extra", torch.zeros(3), "Unexpected key"),
        "bad_shape": ("visual.ln_post.bias", torch.zeros(7), "size mismatch"),
    }
    for name, (key, value, match) in cases.items():
        d = {k: v for k, v in sd.items() if k != key}
        if value is not None:
            d[key] = value
        _bad(write_torchscript_archive(official_dtypes(d), tmp_path / f"{name}.pt"), match)


def test_foreign_global_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps(Evil(), protocol=2))
        zf.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    _bad(path, "refusing global")


# -----------------------------------------------------------------------------
# the tokenizer, with the vocabulary shipped beside clip_vit.py

TABLE = [  # ids from openai/CLIP's own tokenizer
    ("a diagram", [320, 22697]),
    ("a dog", [320, 1929]),
    ("a cat", [320, 2368]),
    ("Hello, World!", [3306, 267, 1002, 256]),
    ("a photo of a chair.", [320, 1125, 539, 320, 4269, 269]),
    ("  multiple   spaces\n\tand TABS ", [6470, 9006, 537, 29163]),
    ("don't", [847, 713]),
    ("don\u2019t", [847, 713]),
    ("I'm here", [328, 880, 763]),
    ("1234", [272, 273, 274, 275]),
    ("na\u00efve caf\u00e9", [1097, 35689, 563, 15304]),
    ("&amp; &lt;3", [261, 283, 274]),
    ("\U0001f600 emoji", [7334, 16327]),
    ("<|startoftext|>hi<|endoftext|>", [49406, 1883, 49407]),
    ("\ufb01ne", [3797]),
    ("\uff21\uff22\uff23", [5334]),
    ("This object is giant", [589, 14115, 533, 4687]),
    ("This object is extremely close", [589, 14115, 533, 6519, 2660]),
    ("This object is close", [589, 14115, 533, 2660]),
    ("This object is not in distance", [589, 14115, 533, 783, 530, 7964]),
    ("This object is a little remote", [589, 14115, 533, 320, 1274, 9687]),
    ("This object is far", [589, 14115, 533, 2384]),
    ("This object is unseen", [589, 14115, 533, 19069]),
    ("A person riding a motorcycle", [320, 2533, 6765, 320, 10297]),
]


@pytest.fixture(scope="module")
def vocab():
    path = clip_vit.VOCAB_PATH
    assert (
        path.parent == Path(clip_vit.__file__).resolve().parent and (path.parent / "LICENSE-vocab").exists()
    )
    assert hashlib.sha256(path.read_bytes()).hexdigest() == clip_vit.VOCAB_SHA256
    return path


@pytest.mark.parametrize("text,ids", TABLE)
def test_tokenizer_reference_ids(vocab, text, ids):
    row = clip_vit.tokenize([text])[0]
    n = len(ids) + 2
    assert row.dtype == torch.long and row.shape == (77,)
    assert row[:n].tolist() == [49406] + ids + [49407] and not row[n:].any()


def test_tokenizer_context_length(vocab):
    row = clip_vit.tokenize(" ".join(["dog"] * 75))[0]  # SOT, 75 ids, EOT: exactly 77
    assert row[0] == 49406 and row[-1] == 49407 and (row[1:-1] == 1929).all()
    with pytest.raises(clip_vit.UserError, match="'dog dog dog.*: 78 tokens, more than CLIP's 77"):
        clip_vit.tokenize(["a cat", " ".join(["dog"] * 76)])
    assert clip_vit.tokenize(["a"] * 3, context_length=5).shape == (3, 5)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_tokenizer_fuzz(vocab, text):
    n = len(clip_vit._tokenizer().encode(text)) + 2  # with SOT and EOT
    if n > 77:  # too long for CLIP: one clear error
        with pytest.raises(clip_vit.UserError, match=f": {n} tokens, more than CLIP's 77"):
            clip_vit.tokenize(text)
        return
    row = clip_vit.tokenize(text)[0]
    assert row[0] == 49406 and row[n - 1] == 49407 and not row[n:].any()
    assert 0 <= row.min() and row.max() <= 49407 and row.argmax() == row.tolist().index(49407)


# -----------------------------------------------------------------------------
# downloads, against a local HTTP server


def test_download_progress_and_checksum(http_server, tmp_path, capsys):
    data = bytes(range(256)) * 20000  # 5 MB
    http_server.routes["/f.bin"] = {"data": data}
    out = clip_vit.download(
        http_server.url + "/f.bin", tmp_path / "f.bin", sha256=hashlib.sha256(data).hexdigest()
    )
    assert out.read_bytes() == data and not (tmp_path / "f.bin.part").exists()
    err = capsys.readouterr().err
    assert "f.bin" in err and "MB/s" in err and "5.1 MB" in err  # size and rate
    with pytest.raises(clip_vit.UserError, match="SHA-256 mismatch"):
        clip_vit.download(http_server.url + "/f.bin", tmp_path / "g.bin", sha256="0" * 64)
    assert not (tmp_path / "g.bin").exists() and not (tmp_path / "g.bin.part").exists()


def test_download_cut_then_resumed_by_the_next_call(http_server, tmp_path):
    data = bytes(range(251)) * 8000
    http_server.routes["/f.bin"] = {"data": data, "cut_after": 300_000}
    with pytest.raises(
        clip_vit.UserError,
        match="connection closed at 300000 of 2008000 bytes; run again to resume, or fetch it by hand",
    ) as e:
        clip_vit.download(http_server.url + "/f.bin", tmp_path / "f.bin")
    assert str(e.value).startswith(f"{tmp_path / 'f.bin'}: ") and not (tmp_path / "f.bin").exists()
    assert (tmp_path / "f.bin.part").stat().st_size == 300_000
    out = clip_vit.download(http_server.url + "/f.bin", tmp_path / "f.bin")
    assert out.read_bytes() == data and not (tmp_path / "f.bin.part").exists()
    assert http_server.requests == [("/f.bin", None), ("/f.bin", "bytes=300000-")]  # resumed, not restarted


def test_download_resumes_partial_file_and_restarts_without_range(http_server, tmp_path):
    data = b"abcdefgh" * 1000
    (tmp_path / "f.bin.part").write_bytes(data[:5000])
    http_server.routes["/f.bin"] = {"data": data}
    assert clip_vit.download(http_server.url + "/f.bin", tmp_path / "f.bin").read_bytes() == data
    assert http_server.requests == [("/f.bin", "bytes=5000-")]
    (tmp_path / "h.bin.part").write_bytes(b"zzzz")  # a server that ignores Range: start over, no corruption
    http_server.routes["/h.bin"] = {"data": data, "ranges": False}
    assert clip_vit.download(http_server.url + "/h.bin", tmp_path / "h.bin").read_bytes() == data


def test_download_server_errors(http_server, tmp_path):
    http_server.routes["/gone"] = {"data": b"", "status": 404}
    with pytest.raises(clip_vit.UserError, match="HTTP 404") as e:
        clip_vit.download(http_server.url + "/gone", tmp_path / "x", sha256="ab" * 32)
    assert f"put it at {tmp_path / 'x'} (SHA-256 {'ab' * 32})" in str(e.value)  # the way out, by hand
    assert len(http_server.requests) == 1
    http_server.routes["/broken"] = {"data": b"", "status": 500}
    with pytest.raises(clip_vit.UserError, match="HTTP 500"):
        clip_vit.download(http_server.url + "/broken", tmp_path / "y")
    assert len(http_server.requests) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_load_by_name_downloads_once_into_cache(http_server, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    buf = io.BytesIO()
    torch.save(small_state_dict(), buf)
    data = buf.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    http_server.routes[f"/clip/{sha}/ViT-B-32.pt"] = {"data": data}
    monkeypatch.setitem(clip_vit.MODELS, "ViT-B/32", f"{http_server.url}/clip/{sha}/ViT-B-32.pt")
    clip_vit.load("ViT-B/32")
    clip_vit.load("ViT-B/32")
    assert len(http_server.requests) == 1 and (tmp_path / "clip" / "ViT-B-32.pt").read_bytes() == data
    (tmp_path / "clip" / "ViT-B-32.pt").write_bytes(b"corrupt")  # a wrong cached file is fetched again
    clip_vit.load("ViT-B/32")
    assert len(http_server.requests) == 2


def test_rn50_by_name_downloads_resumably_checks_sha256_and_caches(http_server, monkeypatch, tmp_path):
    assert (
        clip_vit.official_sha256("RN50") == "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"
    )
    assert clip_vit.MODELS["RN50"].endswith("/RN50.pt")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    archive = write_torchscript_archive(official_dtypes(small_resnet_state_dict()), tmp_path / "src.pt")
    data = archive.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    url = f"{http_server.url}/clip/{sha}/RN50.pt"
    http_server.routes[f"/clip/{sha}/RN50.pt"] = {"data": data, "cut_after": len(data) // 3}
    monkeypatch.setitem(clip_vit.MODELS, "RN50", url)
    cached = tmp_path / "clip" / "RN50.pt"
    with pytest.raises(clip_vit.UserError, match="run again to resume"):  # the connection drops
        clip_vit.load("RN50")
    assert not cached.exists() and (tmp_path / "clip" / "RN50.pt.part").stat().st_size == len(data) // 3
    model = clip_vit.load("RN50")  # resumed where it stopped, checked, read
    assert isinstance(model.visual, clip_vit.ModifiedResNet) and cached.read_bytes() == data
    assert http_server.requests[1][1] == f"bytes={len(data) // 3}-"
    clip_vit.load("RN50")  # from the cache
    assert len(http_server.requests) == 2
    monkeypatch.setitem(clip_vit.MODELS, "RN50", f"{http_server.url}/clip/{'0' * 64}/RN50.pt")
    http_server.routes[f"/clip/{'0' * 64}/RN50.pt"] = {"data": data}
    cached.unlink()
    with pytest.raises(clip_vit.UserError, match="SHA-256 mismatch"):  # not the file the URL names
        clip_vit.load("RN50")
    assert not cached.exists()


def test_shipped_vocab_needs_no_network_or_cache(monkeypatch, tmp_path, vocab):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # any download would fail
    assert clip_vit.SimpleTokenizer().encode("a dog") == [320, 1929]
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_missing_or_damaged_vocab_is_one_clear_error(monkeypatch, tmp_path, vocab, damage):
    broken = tmp_path / vocab.name
    if damage == "truncated":  # say, a damaged clone
        broken.write_bytes(vocab.read_bytes()[:1000])
    monkeypatch.setattr(clip_vit, "VOCAB_PATH", broken)
    with pytest.raises(clip_vit.UserError) as e:
        clip_vit.SimpleTokenizer()
    assert str(e.value) == (
        f"{broken}: missing or not the official vocabulary (SHA-256 {clip_vit.VOCAB_SHA256}); "
        "restore it from the repository"
    )


# -----------------------------------------------------------------------------
# atomic writes, preprocessing, the command line, and the optional real-weights check


def test_atomic_write_respects_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        clip_vit.atomic_write(tmp_path / "a.txt", lambda f: f.write(b"a"))
        os.umask(0o022)
        clip_vit.atomic_write(tmp_path / "b.txt", lambda f: f.write(b"b"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640  # as open() would make it, not 0600
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob(".*.tmp"))

    def disk_full(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):  # a failed write leaves the old file and no temp file
        clip_vit.atomic_write(tmp_path / "a.txt", disk_full)
    assert (tmp_path / "a.txt").read_text() == "a" and not list(tmp_path.glob(".*.tmp"))


def test_command_line_zero_shot(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    torch.save(small_state_dict(), tmp_path / "small.pt")  # --clip random works too, but takes longer
    cli = [sys.executable, clip_vit.__file__, str(tmp_path / "red.png"), "a red square", "a dog"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cli + ["--clip", str(tmp_path / "small.pt")], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split(maxsplit=1) for line in r.stdout.splitlines()]
    assert [label for _, label in rows] == ["a red square", "a dog"]  # "--clip" and its value are no labels
    assert abs(sum(float(p) for p, _ in rows) - 1) < 1e-3
    r = subprocess.run(cli + ["--clip", str(tmp_path / "none.pt")], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert [line for line in r.stderr.splitlines() if "error:" in line] == [
        f"error: {tmp_path / 'none.pt'}: no such file (and not a model name: ViT-B/32, RN50, random)"
    ]


def test_preprocess_matches_openai_recipe():
    from PIL import Image
    import numpy as np

    rgb = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    x = clip_vit.preprocess(Image.fromarray(rgb))
    # torchvision's Resize(224, bicubic) + CenterCrop(224) on 640x480, as openai's transform does it
    ref = Image.fromarray(rgb).resize((298, 224), Image.BICUBIC).crop((37, 0, 261, 224))
    ref = torch.from_numpy(np.asarray(ref) / 255.0).permute(2, 0, 1).float()
    ref = (ref - torch.tensor(clip_vit.MEAN)[:, None, None]) / torch.tensor(clip_vit.STD)[:, None, None]
    assert x.shape == (3, 224, 224) and torch.allclose(x, ref, atol=1e-6)
    grey = clip_vit.preprocess(Image.fromarray(rgb[:, :, 0]).convert("L"))
    red, green = (grey[c] * clip_vit.STD[c] + clip_vit.MEAN[c] for c in (0, 1))
    assert torch.allclose(red, green, atol=1e-6)  # a grey picture has equal channels once unnormalised


def test_real_weights_classify_clip_png(vocab, shared_file, real_clip_cache):
    path = real_clip_cache / "ViT-B-32.pt"
    if not path.exists():
        pytest.skip(f"{path} not present (the real weights are optional)")
    from PIL import Image

    model = clip_vit.load(path)
    image = clip_vit.preprocess(Image.open(shared_file("clip", "CLIP.png"))).unsqueeze(0)
    with torch.no_grad():
        probs = model(image, clip_vit.tokenize(["a diagram", "a dog", "a cat"]))[0].softmax(-1)[0]
    assert torch.allclose(probs, torch.tensor([0.9928, 0.0042, 0.0030]), atol=2e-3), probs
