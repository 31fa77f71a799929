"""
Tests for data_nyu.py on small synthetic files in the official layout (tests/nyu_fixtures.py), plus the real
splits.mat and 10 real NYU frames when the shared test data is present; downloads against a local HTTP
server; and the metrics. CPU only, a few seconds.
    python -m pytest -q tests/test_data_nyu.py
"""

import hashlib

import h5py
import numpy as np
import pytest
import scipy.io
import torch

import clip_vit
import data_nyu
from clip_vit import UserError
from data_nyu import depth_metrics, NYUDepthV2, PreloadedBatches
from nyu_fixtures import (
    NYUTorchDataset,
    asymmetric_frames,
    frames_to_tensors,
    write_splits,
    write_v5,
    write_v73,
)

SCENES = ["kitchen", "office", "living_room", "bathroom"]


@pytest.fixture(scope="module")
def frames():
    return asymmetric_frames(4)  # images (4, 480, 640, 3), depths (4, 480, 640), raw depths with holes


@pytest.fixture(scope="module")
def v73(tmp_path_factory, frames):
    path = tmp_path_factory.mktemp("v73") / "labeled.bin"  # odd extension: the header decides, not the name
    write_v73(path, *frames, scene_types=SCENES)
    return path


# -----------------------------------------------------------------------------
# reading the official container


def _check_all_frames(path, frames):
    images, depths, raw = frames
    for raw_depth, want_depths in ((False, depths), (True, raw)):
        ds = NYUDepthV2(path, split="all", raw_depth=raw_depth, download=False)
        assert len(ds) == len(images)
        assert ds.indices.tolist() == list(range(len(images)))
        for i in range(len(ds)):
            rgb, depth = ds[i]
            assert rgb.dtype == np.uint8 and rgb.shape == (480, 640, 3)
            assert depth.dtype == np.float32 and depth.shape == (480, 640)
            np.testing.assert_array_equal(rgb, images[i])
            np.testing.assert_array_equal(depth, want_depths[i])
            assert ds.scene(i) == SCENES[i]
        with pytest.raises(IndexError):
            ds[len(ds)]


def test_v73_reads_exact_frames_and_scipy_refuses(v73, frames):
    with pytest.raises(NotImplementedError):
        scipy.io.loadmat(v73)  # the real container really is beyond scipy...
    _check_all_frames(v73, frames)  # ...and we read it exactly, axes un-reversed
    assert (frames[2][0] == 0).any()  # the raw depth in the check above really has holes


def test_split_selection_order(tmp_path, v73, frames):
    splits = tmp_path / "splits.mat"
    write_splits(splits, [4, 2], [1, 3])  # 1-based; deliberately unsorted
    for split, want in (("train", [1, 3]), ("test", [0, 2])):
        ds = NYUDepthV2(v73, split=split, splits_path=splits, download=False)
        assert ds.indices.dtype == np.int64 and ds.indices.tolist() == want
        for k, j in enumerate(want):
            np.testing.assert_array_equal(ds[k][0], frames[0][j])
            np.testing.assert_array_equal(ds[k][1], frames[1][j])
            assert ds.scene(k) == SCENES[j]


def test_read_splits_rejects_overlap_zero_and_missing(tmp_path):
    bad = tmp_path / "overlap.mat"
    write_splits(bad, [1, 2], [2, 3])
    with pytest.raises(UserError, match="overlap"):
        data_nyu.read_splits(bad)
    zero = tmp_path / "zero.mat"
    write_splits(zero, [0, 1], [2, 3])  # 0 cannot appear in a 1-based file
    with pytest.raises(UserError, match="'trainNdxs' .*1-based"):
        data_nyu.read_splits(zero)
    missing = tmp_path / "missing.mat"
    scipy.io.savemat(missing, {"trainNdxs": np.array([[1], [2]], np.uint16)})
    with pytest.raises(UserError, match="'testNdxs' missing"):
        data_nyu.read_splits(missing)
    text = tmp_path / "notes.mat"
    text.write_text("not a MAT-file\n")
    with pytest.raises(UserError, match="cannot read as a MATLAB v5 MAT-file") as e:
        data_nyu.read_splits(text)
    assert str(e.value).startswith(f"{text}: ") and "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# real files from the shared test data (skipped when absent)


def test_real_splits(shared_file):
    path = shared_file("nyu", "splits.mat")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data_nyu.SPLITS_SHA256
    s = data_nyu.read_splits(path)
    train, test = s["train"], s["test"]
    assert len(train) == 795 and len(test) == 654
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(1449))
    assert (test + 1).sum() == 498_838 and (train + 1).sum() == 551_687
    assert (test[:5] + 1).tolist() == [1, 2, 9, 14, 15]


def test_real_pixels_roundtrip(tmp_path, shared_file):
    from PIL import Image

    root = shared_file("nyu2_mini_test")
    images = np.stack([np.array(Image.open(root / f"image_{i}.png").convert("RGB")) for i in range(10)])
    depths = (
        np.stack([np.array(Image.open(root / f"depth_{i}.png")) for i in range(10)]).astype(np.float32) / 1000
    )
    assert images.shape == (10, 480, 640, 3) and depths.shape == (10, 480, 640)
    path = tmp_path / "nyu_depth_v2_labeled.mat"
    write_v73(path, images, depths, scene_types=["kitchen"] * 10)
    ds = NYUDepthV2(path, split="all", download=False)
    for i in range(10):
        rgb, depth = ds[i]
        np.testing.assert_array_equal(rgb, images[i])
        np.testing.assert_array_equal(depth, depths[i])


# -----------------------------------------------------------------------------
# bad files: one clear UserError naming the file


def _bad_random_bytes(tmp_path, frames):
    p = tmp_path / "random.mat"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    return p, "not a MATLAB"


def _bad_without(key, message):
    """A labeled file with the variable `key` deleted, and the error expected for it."""

    def make(tmp_path, frames):
        p = tmp_path / f"no_{key}.mat"
        write_v73(p, *frames)
        with h5py.File(p, "r+") as f:
            del f[key]
        return p, message

    return make


_bad_no_images = _bad_without(
    "images", "not NYU's labeled file: images, depths, sceneTypes are None, (4, 640, 480), (1, 4)"
)
_bad_no_scene_types = _bad_without("sceneTypes", "sceneTypes are (4, 3, 640, 480), (4, 640, 480), None, not")


def _bad_frame_counts(tmp_path, frames):
    p = tmp_path / "counts.mat"
    write_v73(p, *frames)
    with h5py.File(p, "r+") as f:
        d = f["depths"][:3]
        del f["depths"]
        f["depths"] = d
    return p, "(4, 3, 640, 480), (3, 640, 480), (1, 4), not (N, 3, W, H), (N, W, H), (1, N)"


def _bad_v5(tmp_path, frames):
    p = tmp_path / "labeled_v5.mat"  # a v5 copy: scipy would load all 3 GB of a real one at once
    write_v5(p, *frames)
    return p, "not a MATLAB v7.3 MAT-file"


def _bad_truncated(tmp_path, frames):
    good = tmp_path / "good.mat"
    write_v73(good, *frames)
    p = tmp_path / "truncated.mat"
    data = good.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p, "truncated: "


@pytest.mark.parametrize(
    "make",
    [_bad_random_bytes, _bad_no_images, _bad_no_scene_types, _bad_frame_counts, _bad_truncated, _bad_v5],
)
def test_bad_files(tmp_path, frames, make):
    path, problem = make(tmp_path, frames)
    with pytest.raises(UserError) as e:
        NYUDepthV2(path, split="all", download=False)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and problem in msg and "\n" not in msg


def test_split_index_out_of_range(tmp_path, v73):
    splits = tmp_path / "splits.mat"
    write_splits(splits, [1, 2], [3, 5])  # frame 5 does not exist in a 4-frame file
    with pytest.raises(UserError) as e:
        NYUDepthV2(v73, split="test", splits_path=splits, download=False)
    assert str(splits) in str(e.value) and str(v73) in str(e.value) and "out of range" in str(e.value)
    NYUDepthV2(v73, split="train", splits_path=splits, download=False)  # the in-range split still opens


def test_missing_file_downloads_only_when_meant(tmp_path, monkeypatch, http_server):
    """download=None (the scripts' default) fetches only the official file name, True any name, False none;
    a path into a missing folder is a typo: refused, and no folder is made."""
    http_server.routes["/labeled.mat"] = {"data": b"never served"}
    monkeypatch.setattr(data_nyu, "URL", http_server.url + "/labeled.mat")
    cases = [
        (tmp_path / "absent.mat", None, "--download"),
        (tmp_path / "absent.mat", False, "--download"),
        (tmp_path / data_nyu.FILE_NAME, False, "2.97 GB"),
        (tmp_path / "typo" / data_nyu.FILE_NAME, True, "no folder"),
    ]
    for path, download, says in cases:
        with pytest.raises(UserError) as e:
            NYUDepthV2(path, download=download)
        assert str(e.value).startswith(f"{path}: ") and says in str(e.value) and "\n" not in str(e.value)
    assert http_server.requests == [] and not (tmp_path / "typo").exists()


@pytest.mark.parametrize("name,download", [(data_nyu.FILE_NAME, None), ("my_copy.mat", True)])
def test_missing_data_file_downloads_resumably(tmp_path, monkeypatch, http_server, frames, name, download):
    """The official name, or any name with download=True, is fetched from data_nyu.URL; a cut transfer
    fails with one line, and the next run resumes it with Range."""
    write_v73(tmp_path / "served.mat", *frames, scene_types=SCENES)
    blob = (tmp_path / "served.mat").read_bytes()
    http_server.routes["/labeled.mat"] = {"data": blob, "cut_after": len(blob) // 3}
    monkeypatch.setattr(data_nyu, "URL", http_server.url + "/labeled.mat")
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError, match="run again to resume") as e:
        NYUDepthV2(tmp_path / "data" / name, split="all", download=download)
    assert str(e.value).startswith(f"{tmp_path / 'data' / name}: ") and "\n" not in str(e.value)
    ds = NYUDepthV2(tmp_path / "data" / name, split="all", download=download)
    assert (tmp_path / "data" / name).read_bytes() == blob
    assert [r for _, r in http_server.requests] == [None, f"bytes={len(blob) // 3}-"]
    np.testing.assert_array_equal(ds[1][0], frames[0][1])


def test_failed_download_says_where_to_put_the_file(tmp_path, monkeypatch, http_server):
    http_server.routes["/labeled.mat"] = {"data": b"", "status": 404}
    monkeypatch.setattr(data_nyu, "URL", http_server.url + "/labeled.mat")
    path = tmp_path / data_nyu.FILE_NAME
    with pytest.raises(UserError) as e:
        NYUDepthV2(path)
    assert f"put it at {path}" in str(e.value) and "HTTP 404" in str(e.value) and not path.exists()


# -----------------------------------------------------------------------------
# splits.mat from the cache or the network


def test_splits_download(tmp_path, monkeypatch, http_server, frames):
    pytest.importorskip("clip_vit")
    write_splits(tmp_path / "served.mat", [2, 4], [1, 3])
    blob = (tmp_path / "served.mat").read_bytes()
    http_server.routes["/splits.mat"] = {"data": blob}
    monkeypatch.setattr(data_nyu, "SPLITS_URL", http_server.url + "/splits.mat")
    monkeypatch.setattr(data_nyu, "SPLITS_SHA256", hashlib.sha256(blob).hexdigest())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    mat = tmp_path / "data" / "labeled.mat"  # no splits.mat next to it
    write_v73(mat, *frames)
    with pytest.raises(UserError, match="--no-download") as e:
        NYUDepthV2(mat, split="test", download=False)
    assert data_nyu.SPLITS_SHA256 in str(e.value) and "next to" in str(e.value)  # where a copy goes
    assert http_server.requests == []
    ds = NYUDepthV2(mat, split="test")
    assert ds.indices.tolist() == [0, 2]
    cached = tmp_path / "cache" / "nyu_depth_v2" / "splits.mat"
    assert cached.read_bytes() == blob
    assert NYUDepthV2(mat, split="train").indices.tolist() == [1, 3]  # from the cache, no second request
    assert len(http_server.requests) == 1


def test_splits_download_wrong_checksum(tmp_path, monkeypatch, http_server, frames):
    pytest.importorskip("clip_vit")
    write_splits(tmp_path / "served.mat", [2, 4], [1, 3])
    http_server.routes["/splits.mat"] = {"data": (tmp_path / "served.mat").read_bytes()}
    monkeypatch.setattr(data_nyu, "SPLITS_URL", http_server.url + "/splits.mat")
    monkeypatch.setattr(data_nyu, "SPLITS_SHA256", "0" * 64)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    mat = tmp_path / "data" / "labeled.mat"
    write_v73(mat, *frames)
    cached = tmp_path / "cache" / "nyu_depth_v2" / "splits.mat"
    with pytest.raises(UserError) as e:
        NYUDepthV2(mat, split="test")
    assert str(e.value).startswith(f"{cached}: ") and "\n" not in str(e.value)
    assert f"put it at {cached} (SHA-256 {'0' * 64})" in str(e.value)
    assert len(http_server.requests) >= 1 and not cached.exists()


# -----------------------------------------------------------------------------
# frames -> tensors


@pytest.mark.parametrize("size", [224, (120, 160), (240, 320), (97, 131)])
def test_frames_to_tensors_alignment(size):
    h, w = (size, size) if isinstance(size, int) else size
    for edge_col, edge_row in ((320, 240), (333, 101), (77, 400)):
        rgb = np.zeros((480, 640, 3), np.uint8)
        depth = np.full((480, 640), 1.0, np.float32)
        rgb[:, edge_col:] = 255  # one vertical edge in image and depth at the same column...
        depth[:, edge_col:] = 5.0
        rgb[edge_row:, :, 2] = 0  # ...and a horizontal one (blue channel) at the same row
        depth[edge_row:] += 2.0
        img, d = frames_to_tensors(rgb, depth, size)
        assert img.shape == (3, h, w) and img.dtype == torch.float32 and d.shape == (1, h, w)
        assert d.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
        # the depth step must sit where the image crosses half brightness (an edge through an output pixel
        # centre gives exactly 0.5 there, and nearest may pick either side; a crop or shift moves it by pixels)
        c = int(np.argmax(d[0, 0].numpy() > 3.0))  # first output column on the far side of the depth step
        row = img[0, 0].numpy()
        assert c > 0 and row[c - 1] <= 0.52 and row[c] >= 0.48, (edge_col, c, row[c - 2 : c + 2])
        r = int(np.argmax(d[0, :, w - 1].numpy() > 6.5))  # first row below the horizontal depth step
        col = 1 - img[2, :, w - 1].numpy()  # blue switches off below the row edge
        assert r > 0 and col[r - 1] <= 0.52 and col[r] >= 0.48, (edge_row, r, col[r - 2 : r + 2])


def test_frames_to_tensors_keeps_holes():
    depth = np.random.default_rng(0).uniform(1, 9, (480, 640)).astype(np.float32)
    depth[::3, ::2] = 0.0  # many holes
    _, d = frames_to_tensors(np.zeros((480, 640, 3), np.uint8), depth, (120, 160))
    d = d.numpy().ravel()
    assert (d == 0).any()
    assert np.isin(d, depth.ravel()).all()  # every value is a source pixel: no mixing of holes and neighbours


# -----------------------------------------------------------------------------
# PreloadedBatches


class Frames:
    """A tiny in-memory dataset: (rgb, depth) pairs with the NYUDepthV2 interface."""

    def __init__(self, rgbs, depths):
        self.rgbs, self.depths = rgbs, depths

    def __len__(self):
        return len(self.rgbs)

    def __getitem__(self, i):
        return self.rgbs[i], self.depths[i]


def _numbered(n, h=24, w=32):
    # frame i has constant depth 1 + 0.5 i, so a batch's depth tells which frame it came from
    rgbs = [np.full((h, w, 3), 10 * i % 256, np.uint8) for i in range(n)]
    depths = [np.full((h, w), 1 + 0.5 * i, np.float32) for i in range(n)]
    return Frames(rgbs, depths)


def _order(pb):
    """The frames pb served, batch by batch (frame i has constant depth 1 + 0.5 i)."""
    return [((b["depth"][:, 0, 0, 0] - 1) / 0.5).round().long().tolist() for b in pb]


def test_preloaded_shapes_and_mask():
    rng = np.random.default_rng(0)
    depths = [rng.uniform(0.5, 12, (48, 64)).astype(np.float32) for _ in range(6)]
    for d in depths:
        d[::4, ::4] = 0  # holes, and values beyond 10 m, are both invalid
    ds = Frames([rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(6)], depths)
    pb = PreloadedBatches(ds, size=(48, 64), batch_size=4, shuffle=False)
    assert pb.images.dtype == torch.uint8 and pb.images.shape == (6, 3, 48, 64)
    assert len(pb) == 2
    b, last = list(pb)
    assert last["depth"].shape == (2, 1, 48, 64)  # in order, the last batch may be short
    assert b["image"].shape == (4, 3, 48, 64) and b["image"].dtype == torch.float32
    assert b["depth"].shape == (4, 1, 48, 64) and b["depth"].dtype == torch.float32
    assert b["mask"].shape == (4, 1, 48, 64) and b["mask"].dtype == torch.bool
    want = torch.from_numpy(np.stack(depths[:4]))[:, None]  # same size, so depth passes through unchanged
    assert torch.equal(b["depth"], want)
    assert torch.equal(b["mask"], (want > 1e-3) & (want < 10))
    assert b["mask"].any() and not b["mask"].all()
    img = b["image"] * torch.tensor(clip_vit.STD).view(1, 3, 1, 1) + torch.tensor(clip_vit.MEAN).view(
        1, 3, 1, 1
    )
    raw = torch.from_numpy(np.stack(ds.rgbs[:4])).permute(0, 3, 1, 2).float() / 255
    assert (img - raw).abs().max() < 1e-5  # CLIP-normalised, undone exactly


def test_preloaded_matches_per_sample_dataset():
    ds = data_nyu.SyntheticDepth(n=5, height=60, width=80)
    pb = PreloadedBatches(ds, size=(30, 40), batch_size=5, shuffle=False)
    (b,) = list(pb)
    ref = NYUTorchDataset(ds, (30, 40))
    for k in range(5):
        for key in ("image", "depth", "mask"):
            assert torch.allclose(b[key][k].float(), ref[k][key].float(), atol=1.01 / 255 / 0.26), key


def test_preloaded_in_order_serves_every_frame_once():
    ds = _numbered(37)  # more frames than one decoding chunk (32)
    pb = PreloadedBatches(ds, size=(24, 32), batch_size=8, shuffle=False)
    assert len(pb) == 5
    for epoch in (0, 5):  # the epoch changes nothing without shuffling
        pb.set_epoch(epoch)
        batches = _order(pb)
        assert [len(b) for b in batches] == [8, 8, 8, 8, 5] and sum(batches, []) == list(range(37))
    items = PreloadedBatches(ds, size=(24, 32), batch_size=2, shuffle=False, items=[5, 1, 3])
    assert _order(items) == [[5, 1], [3]]  # the chosen frames, in the order given


def test_preloaded_shuffle_full_batches_new_order_each_epoch():
    ds = _numbered(10)
    pb = PreloadedBatches(ds, size=(24, 32), batch_size=4, seed=0)
    assert len(pb) == 2  # 10 frames: two full batches, the 2 frames left over wait for another epoch
    orders = []
    for epoch in range(3):
        pb.set_epoch(epoch)
        batches = _order(pb)
        assert [len(b) for b in batches] == [4, 4]
        flat = sum(batches, [])
        assert len(set(flat)) == 8 and set(flat) <= set(range(10))  # no frame twice in an epoch
        orders.append(flat)
    assert len({tuple(o) for o in orders}) == 3  # a new order each epoch
    again = PreloadedBatches(ds, size=(24, 32), batch_size=4, seed=0)
    again.set_epoch(1)
    assert sum(_order(again), []) == orders[1]  # the same (seed, epoch), the same order: resumable
    other = PreloadedBatches(ds, size=(24, 32), batch_size=4, seed=1)
    other.set_epoch(1)
    assert sum(_order(other), []) != orders[1]
    chosen = PreloadedBatches(ds, size=(24, 32), batch_size=2, seed=0, items=[9, 7, 5, 3, 1])
    for epoch in range(4):
        chosen.set_epoch(epoch)
        flat = sum(_order(chosen), [])
        assert len(flat) == 4 and len(set(flat)) == 4 and set(flat) <= {9, 7, 5, 3, 1}


def test_preloaded_augment_flips_together():
    h, w = 24, 32
    col = np.arange(w, dtype=np.float32)
    rgbs = [np.broadcast_to((col * 8)[None, :, None], (h, w, 3)).astype(np.uint8) for _ in range(8)]
    depths = [np.broadcast_to(1 + col / 8 + 0.01 * i, (h, w)).astype(np.float32) for i in range(8)]
    pb = PreloadedBatches(Frames(rgbs, depths), size=(h, w), batch_size=8, augment=True, seed=0)
    flips = []
    for epoch in range(4):
        pb.set_epoch(epoch)
        (b,) = list(pb)
        img_rising = b["image"][:, 0, 0, -1] > b["image"][:, 0, 0, 0]
        dep_rising = b["depth"][:, 0, 0, -1] > b["depth"][:, 0, 0, 0]
        assert torch.equal(img_rising, dep_rising)  # image and depth flipped together
        flips += (~img_rising).tolist()
        red = b["image"][:, 0] * clip_vit.STD[0] + clip_vit.MEAN[0]  # back to [0, 1]
        spread = red.mean((1, 2)).max() - red.mean((1, 2)).min()
        assert 0.02 < spread < 0.2  # brightness x[0.9, 1.1] of equal images (contrast alone keeps the mean)
    assert any(flips) and not all(flips)
    # without augment nothing is flipped
    (b,) = list(PreloadedBatches(Frames(rgbs, depths), size=(h, w), batch_size=8, augment=False))
    assert (b["depth"][:, 0, 0, -1] > b["depth"][:, 0, 0, 0]).all()


# -----------------------------------------------------------------------------
# the synthetic rooms


def test_synthetic_depth():
    ds = data_nyu.SyntheticDepth(n=3, seed=7, height=48, width=64)
    rgb, depth = ds[1]
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert depth.shape == (48, 64) and depth.dtype == np.float32
    assert 0.5 <= depth.min() and depth.max() <= 9.5 and depth.std() > 0.3
    assert not np.array_equal(ds[2][1], depth)  # every frame its own room
    with pytest.raises(IndexError):
        ds[3]
    assert np.array_equal(ds[1][0], rgb) and np.array_equal(ds[1][1], depth)  # deterministic
    assert not np.array_equal(data_nyu.SyntheticDepth(n=3, seed=8, height=48, width=64)[1][1], depth)
    assert ds.scene(1) in data_nyu.SyntheticDepth.SCENES and len(ds) == 3
    # colour carries a depth cue, so the smoke runs have something to learn: darker where farther
    rooms = data_nyu.SyntheticDepth(n=10, seed=3, height=48, width=64)
    corr = []
    for i in range(len(rooms)):
        rgb, depth = rooms[i]
        corr.append(np.corrcoef(rgb.astype(np.float32).mean(-1).ravel(), depth.ravel())[0, 1])
    assert np.mean(corr) < -0.4, corr


# -----------------------------------------------------------------------------
# the one metrics function


def test_depth_metrics_hand_checkable():
    gt = np.full((480, 640), 2.0)
    m = depth_metrics(gt.copy(), gt)
    assert m["d1"] == 1 and m["abs_rel"] == 0 and m["rmse"] == 0 and m["silog"] == 0
    pred = np.full((480, 640), 2.6)  # ratio 1.3: fails delta_1, passes delta_2
    m = depth_metrics(pred, gt)
    assert (
        m["d1"] == 0
        and m["d2"] == 1
        and m["abs_rel"] == pytest.approx(0.3)
        and m["rmse"] == pytest.approx(0.6)
    )
    assert m["sq_rel"] == pytest.approx(0.36 / 2) and m["log10"] == pytest.approx(np.log10(1.3))
    assert m["rmse_log"] == pytest.approx(np.log(1.3)) and m["silog"] == pytest.approx(0, abs=1e-6)
    # only the Eigen crop counts: a wrong prediction outside it changes nothing, inside it does
    pred = gt.copy()
    pred[:45] = pred[471:] = pred[:, :41] = pred[:, 601:] = 9.0
    assert depth_metrics(pred, gt)["d1"] == 1 and depth_metrics(pred, gt, crop="none")["d1"] < 1
    pred[45:471, 41:46] = 9.0  # the columns DepthCLIP's crop drops
    assert depth_metrics(pred, gt)["d1"] < 1 and depth_metrics(pred, gt, crop="depthclip")["d1"] == 1
    # holes and out-of-range ground truth are ignored; predictions are clamped to [1e-3, 10]
    gt2 = gt.copy()
    gt2[100:200] = 0
    gt2[200:210] = 12
    pred = np.full_like(gt, 2.0)
    pred[100:210] = 50
    pred[300, 300] = np.inf
    m = depth_metrics(torch.tensor(pred), torch.tensor(gt2))
    assert m["d1"] == pytest.approx(1 - 1 / ((471 - 45 - 110) * 560)) and torch.isfinite(m["rmse"])
    assert m["rmse"] == pytest.approx(np.sqrt(8**2 / ((471 - 45 - 110) * 560)))  # inf clamped to 10
    assert all(np.isnan(float(v)) for v in depth_metrics(pred, np.zeros_like(gt)).values())
    with pytest.raises(ValueError, match="480x640"):
        depth_metrics(np.ones((10, 10)), np.ones((10, 10)))


def bts_metrics(pred, gt, box=None, clamp=True):
    """The oracle: BTS/AdaBins' metrics in numpy float64 on one image, as data_nyu computed them
    before they moved to torch; box (r0, r1, c0, c1) or None; clamp=False for the authors' script.
    -> {KEYS: float}, or None without a valid pixel."""
    pred = np.asarray(pred, np.float64)
    gt = np.asarray(gt, np.float64)
    if box is not None:
        r0, r1, c0, c1 = box
        pred = pred[r0:r1, c0:c1]
        gt = gt[r0:r1, c0:c1]
    valid = (gt > 1e-3) & (gt < 10)
    if not valid.any():
        return None
    p = np.nan_to_num(pred[valid], nan=1e-3)
    if clamp:
        p = np.clip(p, 1e-3, 10)
    g = gt[valid]
    ratio = np.maximum(g / p, p / g)
    e = np.log(p) - np.log(g)
    return {
        "d1": (ratio < 1.25).mean(),
        "d2": (ratio < 1.25**2).mean(),
        "d3": (ratio < 1.25**3).mean(),
        "abs_rel": (np.abs(g - p) / g).mean(),
        "sq_rel": ((g - p) ** 2 / g).mean(),
        "rmse": np.sqrt(((g - p) ** 2).mean()),
        "rmse_log": np.sqrt((e**2).mean()),
        "log10": np.abs(np.log10(p) - np.log10(g)).mean(),
        "silog": 100 * np.sqrt(max((e**2).mean() - e.mean() ** 2, 0)),
    }


def rough_frames(n, seed=0, h=480, w=640):
    """Predictions and ground truth with everything a metric must survive: holes (0), ground truth
    out of range (negative, 10 and above, NaN), predictions out of range (negative, 0, above 10,
    inf, NaN), and one frame with no valid pixel at all."""
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0.2, 9.9, (n, h, w))
    pred = gt * rng.uniform(0.5, 1.6, (n, h, w))
    where = rng.random((n, h, w))
    gt[where < 0.1] = 0
    gt[(where > 0.1) & (where < 0.12)] = 10.5
    gt[(where > 0.12) & (where < 0.13)] = -1
    gt[(where > 0.13) & (where < 0.135)] = np.nan
    gt[-1] = 0  # the last frame: all holes
    odd = rng.random((n, h, w))
    pred[odd < 0.02] = 30
    pred[(odd > 0.02) & (odd < 0.03)] = -2
    pred[(odd > 0.03) & (odd < 0.04)] = 0
    pred[(odd > 0.04) & (odd < 0.045)] = np.inf
    pred[(odd > 0.045) & (odd < 0.05)] = np.nan
    return pred.astype(np.float32), gt.astype(np.float32)


def assert_metrics_equal(got, expected, tol=1e-9):
    """got {KEYS: 0-d tensor} against the oracle's dict (or None: every metric NaN)."""
    for k in data_nyu.KEYS:
        value = float(got[k])
        if expected is None:
            assert np.isnan(value), k
        else:
            assert abs(value - expected[k]) <= tol * max(1, abs(expected[k])), (k, value, expected[k])


def test_delta_thresholds_are_powers_of_1_25():
    """Ratios 1.0, 1.3, 1.6, 2.0 and 3.0: below 1.25 one pixel, below 1.25^2 = 1.5625 two, below
    1.25^3 = 1.953 three (1.25 * 2 = 2.5 and 1.25 * 3 = 3.75 would let in four and five)."""
    gt = np.full((1, 5), 2.0)
    pred = gt * np.array([1.0, 1.3, 1.6, 2.0, 3.0])
    m = depth_metrics(pred, gt, crop="none")
    assert (float(m["d1"]), float(m["d2"]), float(m["d3"])) == (0.2, 0.4, 0.6)
    m = depth_metrics(gt, pred, crop="none")  # the other way round: the same ratios
    assert (float(m["d1"]), float(m["d2"]), float(m["d3"])) == (0.2, 0.4, 0.6)


@pytest.mark.parametrize("crop", ["eigen", "depthclip", "garg", "none"])
@pytest.mark.parametrize("clamp", [True, False])
def test_batched_metrics_equal_the_numpy_oracle(crop, clamp):
    """A batch of frames at once, in float64 torch, against the numpy formulation one frame at a
    time, to 1e-9: holes, ground truth and predictions out of range, a frame without a valid pixel
    (NaN there, None for the oracle). Without the clamp the predictions stay positive, as the
    authors' script clamps before it scales."""
    pred, gt = rough_frames(3, seed=len(crop) + clamp)
    if not clamp:
        pred = np.abs(np.nan_to_num(pred, nan=1.0, posinf=20.0)) + 0.5
    got = depth_metrics(torch.from_numpy(pred), torch.from_numpy(gt), crop=crop, clamp=clamp)
    assert got["d1"].shape == (3,) and got["d1"].dtype == torch.float64
    for i in range(3):
        expected = bts_metrics(pred[i], gt[i], data_nyu.CROPS[crop], clamp=clamp)
        assert_metrics_equal({k: v[i] for k, v in got.items()}, expected)
    stacked = depth_metrics(np.stack([pred, pred[::-1]]), gt, crop=crop, clamp=clamp)  # broadcast
    assert stacked["rmse"].shape == (2, 3)
    torch.testing.assert_close(stacked["rmse"][0], got["rmse"], rtol=1e-12, atol=0, equal_nan=True)


def test_mean_metrics_leaves_out_frames_without_a_valid_pixel():
    pred, gt = rough_frames(3, seed=5)
    rows = [depth_metrics(pred[:2], gt[:2]), depth_metrics(pred[2], gt[2])]  # (2,) and () scores
    means = data_nyu.mean_metrics(rows)
    for k in data_nyu.KEYS:
        per_frame = [bts_metrics(pred[i], gt[i], data_nyu.CROPS["eigen"])[k] for i in range(2)]
        assert means[k] == pytest.approx(np.mean(per_frame), rel=1e-12)
    assert all(np.isnan(v) for v in data_nyu.mean_metrics([]).values())


def test_resize_of_a_batch_equals_each_frame_alone():
    """data_nyu.resize of a batch of 5 comes out bit for bit as each frame resized alone, image and
    depth, and in order."""
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (5, 3, 48, 64), dtype=torch.uint8, generator=g)
    depth = torch.rand(5, 1, 48, 64, generator=g) * 10
    batch_img, batch_depth = data_nyu.resize(img, depth, (24, 40))
    for i in range(5):
        one_img, one_depth = data_nyu.resize(img[i : i + 1], depth[i : i + 1], (24, 40))
        assert torch.equal(batch_img[i : i + 1], one_img)
        assert torch.equal(batch_depth[i : i + 1], one_depth)
    assert batch_img.shape == (5, 3, 24, 40) and 0 <= batch_img.min() and batch_img.max() <= 1
