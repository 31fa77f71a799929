"""
pictures.py in-process, on small hand-checkable arrays: the pictures (colours, scales, colour bars, text
sizes, labels apart, sizes for a 1x1 and a 6000x4000 photo), the gate panel and its numbers against numpy,
reading photos (truncated, transparent, animated, EXIF, bad paths), and a photo's files read back: the
point cloud, the 16-bit millimetres, the sidecar.
Run: python -m pytest -q tests/test_pictures.py
"""

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import clip_vit
import data_nyu
import pictures
from pictures import colorize

RANGE = (data_nyu.MIN_DEPTH, data_nyu.MAX_DEPTH)  # the model's depth range, metres
LUT = colorize(np.linspace(0, 1, 256)[None, :], 0, 1)[0].astype(int)  # (256, 3): level -> colour


def levels(pixels):
    """Colours (N, 3) -> the colormap level 0..255 each is nearest to."""
    return np.argmin(((pixels[:, None, :].astype(int) - LUT[None]) ** 2).sum(-1), axis=1)


def runs(mask):
    """The runs of True in a 1-D mask: [(start, end)]."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
    return list(zip(edges[::2], edges[1::2]))


def read_rgb(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def text_bands(picture):
    """A picture's rows of text, top to bottom: [(first row, end row)], and the text's pixels (H, W).
    PIL draws black text on white in neutral greys, which turbo and the expert colours never produce
    (and the test photos here have no neutral pixel)."""
    r, g, b = picture[..., 0], picture[..., 1], picture[..., 2]
    ink = (r == g) & (g == b) & (r < 128)  # (H, W)
    return runs(ink.any(axis=1)), ink


def texts_in_band(ink, band):
    """How many separate texts a band of rows holds: ink columns more than the band's height apart
    start a new one. The band's height is the digits' (0.72 of the font size); the space inside
    "5.31 m" leaves at most 0.7 of it, while the pictures keep labels a font size apart."""
    top, bottom = band
    columns = np.flatnonzero(ink[top:bottom].any(axis=0))
    return 1 + int((np.diff(columns) > bottom - top).sum())


def map_boxes(picture, coloured):
    """The maps of a picture: [(top, bottom, left, right)] of each block of rows coloured across a
    whole run of coloured columns (a map and, right under it, its colour bar), column by column."""
    boxes = []
    for left, right in runs(coloured.sum(axis=0) > 40):
        for top, bottom in runs(coloured[:, left:right].all(axis=1)):
            boxes.append((top, bottom, left, right))
    return boxes


# -----------------------------------------------------------------------------
# frame pictures


def test_colormap_runs_blue_green_red():
    c = LUT
    assert c.shape == (256, 3) and colorize(np.ones((2, 2)), 0, 1).dtype == np.uint8
    # turbo runs blue, green, red
    assert c[38, 2] > c[38, 0] and c[128, 1] == c[128].max() and c[230, 0] > c[230, 2]


def test_frame_picture_panels_scales_and_colour_bars(tmp_path):
    """A 3.5-6.4 m room: four panels of the frame's own pixels in 2x2, each depth map over a colour
    bar running low to high; prediction and ground truth on one scale fitted to both (3.5-6.7 m
    here), so the room spans the whole colormap and one depth has one colour in both panels."""
    H, W = 480, 640
    gt = np.tile(np.linspace(3.5, 6.4, W, dtype=np.float32), (H, 1))  # depth grows left to right
    gt[:4] = 0  # a hole: not part of the scale
    pred = gt[:, ::-1] + 0.3  # right to left, 3.8-6.7 m
    pred[:4] = 5.0
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 2] = 200  # blue
    pictures.save_frame_picture(tmp_path / "p.png", rgb, pred, gt, title="frame 3")
    picture = read_rgb(tmp_path / "p.png")
    r, g, b = picture[..., 0], picture[..., 1], picture[..., 2]
    boxes = map_boxes(picture, ~((r == g) & (g == b)))
    # column by column: RGB, ground truth | prediction, |error|; the RGB has no bar
    assert [(bottom - top, right - left) for top, bottom, left, right in boxes][0] == (H, W), boxes
    assert len(boxes) == 4 and all(
        right - left == W and bottom - top > H for top, bottom, left, right in boxes[1:]
    )
    rgb_box, gt_box, pred_box, error_box = boxes
    assert (picture[rgb_box[0] : rgb_box[1], rgb_box[2] : rgb_box[3]] == [0, 0, 200]).all()
    assert pred_box[0] == rgb_box[0] and gt_box[0] == error_box[0] > rgb_box[1] and pred_box[2] > gt_box[3]
    for top, bottom, left, right in boxes[1:]:  # a bar from the lowest to the highest colour
        run = levels(picture[bottom - 1, left:right])
        assert (np.diff(run) >= 0).all() and run[0] <= 3 and run[-1] >= 252
    shown_pred = levels(picture[pred_box[0] + H // 2, pred_box[2] : pred_box[3]])
    shown_gt = levels(picture[gt_box[0] + H // 2, gt_box[2] : gt_box[3]])
    shown = np.concatenate([shown_pred, shown_gt])
    assert shown.min() <= 3 and shown.max() >= 252  # fitted to both, not a fixed 0-10 m
    # the scale runs from the ground truth's lowest (3.5 m) to the prediction's highest (6.7 m)
    assert shown_gt[np.argmin(np.abs(gt[H // 2] - 3.8))] > 15 and shown_gt.max() < 240
    j = int(np.argmin(np.abs(pred[H // 2] - 5.0)))
    k = int(np.argmin(np.abs(gt[H // 2] - pred[H // 2, j])))
    assert abs(gt[H // 2, k] - pred[H // 2, j]) < 0.03  # the same depth ...
    assert abs(int(shown_pred[j]) - int(shown_gt[k])) <= 3  # ... the same colour


def test_frame_picture_reads_whole_and_names_its_frame(tmp_path):
    """A frame in 2x2: texts at least 2 % of the picture's height, neighbouring colour bars'
    labels apart (they once ran together as "5.34 m 2.71 m"), and a header that is exactly the
    frame, its scene and its d1 and RMSE as the standard protocol scores them."""
    H, W = 480, 640
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 2] = 200  # blue: no neutral grey
    gt = np.tile(np.linspace(2.71, 5.34, W, dtype=np.float32), (H, 1))
    pred = gt[:, ::-1].copy()
    pictures.save_frame_picture(tmp_path / "p.png", rgb, pred, gt, title="frame 7", scene="kitchen")
    picture = read_rgb(tmp_path / "p.png")
    bands, ink = text_bands(picture)
    height = ink.shape[0]
    assert len(bands) == 5, bands  # header; RGB, prediction; its bar; ground truth, |error|; bars
    for top, bottom in bands:
        assert bottom - top >= 0.02 * height, (top, bottom, height)
    assert texts_in_band(ink, bands[2]) == 2 and texts_in_band(ink, bands[4]) == 4

    m = data_nyu.depth_metrics(pred, gt, crop="eigen")
    header = f"frame 7, kitchen: d1 {m['d1']:.3f}, RMSE {m['rmse']:.3f} m (eigen crop)"
    assert shows_header(picture, header, round(0.04 * 2 * H))  # the font: 4 % of the maps' height


def inked(a):
    """The part of an RGB array that is not white."""
    rows, cols = np.flatnonzero((a < 255).any(axis=(1, 2))), np.flatnonzero((a < 255).any(axis=(0, 2)))
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def shows_header(picture, header, size):
    """Whether the rows above the panels' titles show exactly `header` in PIL's font of `size`."""
    font = ImageFont.load_default(size=size)
    expected = Image.new("RGB", (math.ceil(font.getlength(header)) + 2 * size, 2 * size), "white")
    ImageDraw.Draw(expected).text((size, 0), header, fill="black", font=font)
    shown = inked(picture[: text_bands(picture)[0][1][0]])
    expected = inked(np.asarray(expected).astype(int))
    return shown.shape == expected.shape and (shown == expected).all()


def test_frame_without_valid_ground_truth_says_so(tmp_path):
    gt = np.zeros((480, 640), np.float32)  # all holes
    pred = np.full((480, 640), 3.0, np.float32)
    rgb = np.zeros((480, 640, 3), np.uint8)
    rgb[..., 2] = 200
    pictures.save_frame_picture(tmp_path / "p.png", rgb, pred, gt, title="frame 1", crop="none")
    assert shows_header(read_rgb(tmp_path / "p.png"), "frame 1: no valid ground truth", 38)
    metrics = {"d1": torch.tensor(0.5), "rmse": torch.tensor(1.25)}  # already scored: shown as given
    pictures.save_frame_picture(
        tmp_path / "p.png", rgb, pred, gt, scene="office", crop="none", metrics=metrics
    )
    assert shows_header(read_rgb(tmp_path / "p.png"), "office: d1 0.500, RMSE 1.250 m", 38)


# -----------------------------------------------------------------------------
# photo pictures at any size


def photo_picture(rgb, depth):
    """The picture write_photo_outputs writes, without its other files."""
    return pictures.depth_picture("photo.jpg", rgb, [("prediction", depth, depth.min(), depth.max())])


def check_reads_whole(picture):
    """Three text bands (the photo's name; RGB, prediction; the bar's two labels), each at least 2 %
    of the picture's height, the labels apart."""
    bands, ink = text_bands(picture)
    assert len(bands) == 3, bands
    for top, bottom in bands:
        assert bottom - top >= 0.02 * picture.shape[0], (top, bottom, picture.shape)
    assert texts_in_band(ink, bands[1]) == 2 and texts_in_band(ink, bands[2]) == 2


def test_a_large_photo_is_resized_before_colouring():
    """A 6000x4000 photo: a 1300x500 picture, each map 640 px on its long side, made with little
    memory beyond the photo's own arrays (colouring it at full size takes over 1 GB)."""
    rgb = np.zeros((4000, 6000, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = np.linspace(100, 255, 6000).astype(np.uint8), 40  # no neutral grey
    depth = np.tile(np.linspace(1, 9, 6000, dtype=np.float32), (4000, 1))
    tracemalloc.start()
    picture = photo_picture(rgb, depth)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6, peak  # numpy's allocations; PIL's copies are two 100 MB maps at most
    assert 1200 < picture.width < 1400 and 450 < picture.height < 600, picture.size
    picture = np.asarray(picture).astype(int)
    r, g, b = picture[..., 0], picture[..., 1], picture[..., 2]
    boxes = map_boxes(picture, ~((r == g) & (g == b)))
    assert [(right - left, bottom - top) for top, bottom, left, right in boxes][0] == (640, 427)
    check_reads_whole(picture)


def test_a_1x1_photo_is_enlarged(tmp_path):
    """A 1x1 photo: its maps 640x640, under the photo's name, through write_photo_outputs."""
    rgb = np.array([[[200, 30, 30]]], np.uint8)
    depth = np.full((1, 1), 2.5, np.float32)
    paths = pictures.write_photo_outputs(
        tmp_path / "dot", rgb, depth, pictures.photo_intrinsics((1, 1)), {"photo": "dot.png"}, RANGE
    )
    picture = read_rgb(paths[1])
    assert shows_header(picture, "dot.png", round(0.04 * 640))
    assert 1200 < picture.shape[1] < 1500 and 700 < picture.shape[0] < 900, picture.shape
    boxes = map_boxes(picture, (picture == [200, 30, 30]).all(axis=-1))
    assert [(bottom - top, right - left) for top, bottom, left, right in boxes] == [(640, 640)]
    check_reads_whole(picture)


def test_a_thin_photo_keeps_its_labels_apart():
    """A 100x1 photo: its maps 640 px high and 6 wide; each cell widens to its title and its bar's
    labels, so the titles and the labels still read apart."""
    rgb = np.zeros((100, 1, 3), np.uint8)
    rgb[..., 2] = 200
    picture = np.asarray(photo_picture(rgb, np.linspace(1, 4, 100, dtype=np.float32)[:, None])).astype(int)
    boxes = map_boxes(picture, (picture == [0, 0, 200]).all(axis=-1))
    assert [(bottom - top, right - left) for top, bottom, left, right in boxes] == [(640, 6)]
    check_reads_whole(picture)


# -----------------------------------------------------------------------------
# a photo's files read back


def read_ply(path):
    """A binary little-endian PLY -> (header lines, vertices as a numpy structured array)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode().splitlines()
    assert header[:2] == ["ply", "format binary_little_endian 1.0"]
    kinds = {"float": "<f4", "uchar": "u1"}
    properties = [line.split()[1:] for line in header if line.startswith("property ")]
    dtype = np.dtype([(name, kinds[kind]) for kind, name in properties])
    count = next(int(line.split()[2]) for line in header if line.startswith("element vertex "))
    assert len(data) - end == count * dtype.itemsize  # nothing more, nothing less
    return header, np.frombuffer(data[end:], dtype)


def test_photo_outputs_read_back(tmp_path):
    """Every file of a 6x8 photo: the .npy as predicted; the 16-bit PNG within 1 mm of it; a point
    per pixel at z = depth, x and y through the intrinsics, in the pixel's colour; the sidecar; and
    nothing else in the folder (no temporary file)."""
    rng = np.random.default_rng(0)
    H, W = 6, 8
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    depth = rng.uniform(0.2, 9.5, (H, W)).astype(np.float32)
    depth[0, 0], depth[0, 1] = 1e-3, 10.0  # the model's extremes
    intrinsics = (50.0, 60.0, 3.5, 2.5, "--focal")
    about = {"photo": "room.jpg", "checkpoint": {"file": "model.pt"}, "output_grid": "7x7"}
    paths = pictures.write_photo_outputs(tmp_path / "room_depth", rgb, depth, intrinsics, about, RANGE)
    names = ["room_depth.npy", "room_depth.png", "room_depth_mm.png", "room_depth.ply", "room_depth.json"]
    assert [p.name for p in paths] == names and sorted(p.name for p in tmp_path.iterdir()) == sorted(names)

    assert (np.load(paths[0]) == depth).all() and np.load(paths[0]).dtype == np.float32
    assert Image.open(paths[1]).size[0] > 2 * 640
    png16 = Image.open(paths[2])
    assert png16.mode in ("I;16", "I") and png16.size == (W, H)
    mm = np.asarray(png16).astype(np.int64)
    assert np.abs(mm / 1000 - depth).max() <= 0.0005 + 1e-6 and mm.min() >= 1 and mm[0, 1] == 10000

    header, vertices = read_ply(paths[3])
    assert len(vertices) == H * W
    assert "comment x = (u - cx) * z / fx, y = (v - cy) * z / fy" in header
    v, u = np.divmod(np.arange(H * W), W)  # row by row
    z = depth.ravel()
    assert (vertices["z"] == z).all()
    np.testing.assert_allclose(vertices["x"], (u - 3.5) * z / 50.0, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(vertices["y"], (v - 2.5) * z / 60.0, rtol=1e-6, atol=1e-7)
    for i, colour in enumerate(("red", "green", "blue")):
        assert (vertices[colour] == rgb[..., i].ravel()).all()

    sidecar = json.loads(paths[4].read_text())
    assert sidecar["photo"] == "room.jpg" and sidecar["checkpoint"] == {"file": "model.pt"}
    assert sidecar["output_grid"] == "7x7" and sidecar["files"] == names
    assert sidecar["intrinsics"] == {"fx": 50.0, "fy": 60.0, "cx": 3.5, "cy": 2.5, "source": "--focal"}
    assert sidecar["depth"] == {"min": float(np.float32(1e-3)), "max": 10.0, "model_range": [1e-3, 10.0]}
    assert sidecar["share_at_cap"] == 1 / 48  # depth[0, 1]
    assert sidecar["units"] == {".npy": "metres", ".ply": "metres", "_mm.png": "millimetres"}


def test_cap_warning():
    depth = np.full((10, 10), 3.0, np.float32)
    depth[:4] = 10.0  # 40 % at the cap
    assert pictures.cap_warning(depth, 10.0) == (
        "40 % of pixels at the 10 m cap: likely not an indoor NYU-like scene"
    )
    depth[:4] = 9.95  # within 1 % of it: still the cap
    assert pictures.cap_share(depth, 10.0) == 0.4
    depth[:4] = 9.8
    assert pictures.cap_share(depth, 10.0) == 0 and pictures.cap_warning(depth, 10.0) is None
    depth[:2] = 10.0  # 20 %: no warning
    assert pictures.cap_share(depth, 10.0) == 0.2 and pictures.cap_warning(depth, 10.0) is None


def test_intrinsics_nyu_focal_and_exif(tmp_path):
    """NYU's Kinect at 640x480 as it is, scaled with the photo (x by width, y by height, so a
    portrait photo gets fx != fy); --focal and EXIF's 35 mm-equivalent about the photo's centre."""
    fx, fy, cx, cy = pictures.NYU_CAMERA
    assert pictures.photo_intrinsics((480, 640, 3)) == (fx, fy, cx, cy, "NYU Kinect scaled to the photo")
    assert pictures.photo_intrinsics((960, 1280))[:4] == pytest.approx((2 * fx, 2 * fy, 2 * cx, 2 * cy))
    portrait = pictures.photo_intrinsics((640, 480))
    assert portrait[:4] == pytest.approx((fx * 0.75, fy * 4 / 3, cx * 0.75, cy * 4 / 3))
    assert pictures.photo_intrinsics((30, 40), focal=100) == (100, 100, 19.5, 14.5, "--focal")

    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 28  # FocalLengthIn35mmFilm, in the Exif IFD
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(tmp_path / "p.jpg", exif=exif)
    rgb, notes, focal35 = pictures.read_photo(tmp_path / "p.jpg")
    assert focal35 == 28 and notes == [] and rgb.shape == (30, 40, 3)
    f = 28 / 36 * 40  # a 28 mm lens on full frame (36 mm wide): 0.78 of the long side
    assert pictures.photo_intrinsics(rgb.shape, focal35=focal35) == (
        f,
        f,
        19.5,
        14.5,
        "EXIF FocalLengthIn35mmFilm",
    )
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(tmp_path / "plain.jpg")
    assert pictures.read_photo(tmp_path / "plain.jpg")[2] is None


# -----------------------------------------------------------------------------
# reading photos


def test_odd_photos_read_with_one_line_notes(tmp_path):
    """A cut JPEG decodes (its lost part grey) with a note; transparent pixels on white with a note;
    an animated GIF's first frame with a note; 16-bit greyscale stretched; a plain photo: no note."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    rgb, notes, _ = pictures.read_photo(tmp_path / "cut.jpg")
    assert rgb.shape == (64, 64, 3) and (rgb[-1] == 128).all()  # the lower part grey
    assert notes == ["truncated or corrupt data: the lower part may be grey/smeared"]

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[:2, :, 3] = 200, 255  # red; the lower half transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    rgb, notes, _ = pictures.read_photo(tmp_path / "rgba.png")
    assert (rgb[0, 0] == [200, 0, 0]).all() and (rgb[3, 0] == 255).all()
    assert notes == ["an alpha channel: transparent pixels composited on white"]

    frames = [Image.fromarray(np.full((8, 8, 3), c, np.uint8)) for c in ((200, 0, 0), (0, 0, 200))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    rgb, notes, _ = pictures.read_photo(tmp_path / "anim.gif")
    assert notes == ["2 frames; the first is used"]
    assert rgb[0, 0, 0] > 150 and rgb[0, 0, 2] < 50  # the first frame: red

    Image.fromarray(np.array([[1000, 3000], [5000, 2000]], np.uint16)).save(tmp_path / "deep.png")
    rgb, notes, _ = pictures.read_photo(tmp_path / "deep.png")
    assert notes == [] and (rgb[..., 0] == [[0, 127], [255, 63]]).all() and rgb.flags.writeable


def test_unreadable_photos_are_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a photo")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "p.jpg")
    (tmp_path / "stub.jpg").write_bytes((tmp_path / "p.jpg").read_bytes()[:20])  # not even a header
    for name in ("notes.txt", "stub.jpg"):
        with pytest.raises(clip_vit.UserError) as e:
            pictures.read_photo(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: not a readable image (") and "\n" not in str(
            e.value
        )


def test_photo_paths_expand_folders_and_refuse_urls_and_typos(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("b.png", "a.JPG", "c.webp", "notes.txt"):
        (photos / name).write_bytes(b"")
    (tmp_path / "one.jpg").write_bytes(b"")
    found = pictures.photo_paths([tmp_path / "one.jpg", str(photos)])
    assert found == [tmp_path / "one.jpg", photos / "a.JPG", photos / "b.png", photos / "c.webp"]
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "empty"): "a folder without photos (.jpg .jpeg .png .webp .tif .tiff .bmp .gif)",
        str(tmp_path / "typo.jpg"): "no such file",
        "https://example.com/room.jpg": "a URL: download the photo first",
        "http://example.com/room.jpg": "a URL: download the photo first",
    }
    for arg, problem in cases.items():
        with pytest.raises(clip_vit.UserError) as e:
            pictures.photo_paths([tmp_path / "one.jpg", arg])
        assert str(e.value) == f"{arg}: {problem}"


def test_folders_made_are_returned_and_removed_if_empty(tmp_path):
    """make_folder returns what it created, outermost first; remove_empty_folders removes those
    still empty, and nothing that existed before. The module keeps no list, dict or set to fill."""
    (tmp_path / "old").mkdir()
    made = pictures.make_folder(tmp_path / "old" / "a" / "b")
    assert made == [tmp_path / "old" / "a", tmp_path / "old" / "a" / "b"]
    kept = pictures.make_folder(tmp_path / "kept")
    assert pictures.make_folder(tmp_path / "kept") == []  # already there
    (tmp_path / "kept" / "0000.png").write_bytes(b"a picture")
    pictures.remove_empty_folders(made + kept)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [
        Path("kept"),
        Path("kept/0000.png"),
        Path("old"),
    ]
    assert not [
        name
        for name, v in vars(pictures).items()
        if not name.startswith("__") and isinstance(v, (list, dict, set))
    ]


# -----------------------------------------------------------------------------
# the gates


def test_gate_numbers_against_numpy():
    """Winners, entropies and shares of random gates against numpy, for (gh*gw, E) and (gh, gw, E)
    arrays and tensors alike; then a hand-made case."""
    rng = np.random.default_rng(0)
    gates = [rng.dirichlet(np.ones(4), size=49) for _ in range(3)]  # 3 layers, 7x7 patches, 4 experts
    winners = pictures.winning_experts(gates)
    assert winners.shape == (3, 7, 7) and (winners == np.argmax(gates, -1).reshape(3, 7, 7)).all()
    grids = [torch.from_numpy(g.reshape(7, 7, 4)) for g in gates]
    assert (pictures.winning_experts(grids) == winners).all()
    entropy = [np.mean([-sum(p * math.log(p) for p in token) for token in g]) for g in gates]
    np.testing.assert_allclose(pictures.gate_entropy(gates), entropy, rtol=1e-12)
    np.testing.assert_allclose(pictures.gate_entropy(grids), entropy, rtol=1e-12)
    np.testing.assert_allclose(pictures.expert_shares(gates), [g.mean(0) for g in gates], rtol=1e-12)
    assert pictures.winning_experts([rng.dirichlet(np.ones(3), size=(2, 5))]).shape == (1, 2, 5)

    # 2x2 patches, 3 experts: layer 0 certain (one-hot), layer 1 undecided (uniform) but for one patch
    one_hot = np.eye(3)[[0, 2, 1, 2]]
    uniform = np.full((4, 3), 1 / 3)
    uniform[3] = [0.1, 0.8, 0.1]
    assert pictures.winning_experts([one_hot, uniform]).tolist() == [[[0, 2], [1, 2]], [[0, 0], [0, 1]]]
    h_last = -(0.2 * math.log(0.1) + 0.8 * math.log(0.8))
    np.testing.assert_allclose(pictures.gate_entropy([one_hot, uniform]), [0, (3 * math.log(3) + h_last) / 4])
    np.testing.assert_allclose(
        pictures.expert_shares([one_hot, uniform]), [[0.25, 0.25, 0.5], [0.275, 0.45, 0.275]]
    )


def test_gate_panel_shows_each_patch_winner(tmp_path):
    """Each layer's map shows, on each patch, the colour of the expert argmax picks; under it a
    legend bar of the experts' colours, 0 to E-1 left to right; the entropy in the layer's title."""
    rng = np.random.default_rng(1)
    gates = [rng.dirichlet(np.full(5, 0.3), size=(3, 4)) for _ in range(2)]  # 3x4 patches, 5 experts
    rgb = np.zeros((60, 80, 3), np.uint8)
    rgb[..., 2] = 200
    pictures.save_gate_panel(tmp_path / "g.png", rgb, gates, ["layer 5", "layer 11"])
    picture = read_rgb(tmp_path / "g.png")
    palette = pictures.EXPERT_COLOURS.astype(int)
    expert = np.full(picture.shape[:2], -1)  # the expert each pixel's colour is, -1 for none
    for e, colour in enumerate(palette):
        expert[(picture == colour).all(-1)] = e
    boxes = map_boxes(picture, expert >= 0)
    assert len(boxes) == 2, boxes
    h, w = pictures.map_size(rgb.shape, 320)
    for g, (top, bottom, left, right) in zip(gates, boxes):
        assert right - left == w and bottom - top > h  # the map, then its legend bar
        centres = expert[top + (np.arange(3) * 2 + 1) * h // 6][:, left + (np.arange(4) * 2 + 1) * w // 8]
        assert (centres == g.argmax(-1)).all()
        legend = expert[bottom - 1, left:right]
        assert [e for e, _ in runs_of(legend)] == [0, 1, 2, 3, 4]
    bands, ink = text_bands(picture)
    assert len(bands) == 3 and all(
        b - t >= 0.02 * picture.shape[0] for t, b in bands
    )  # header; titles; legends
    assert texts_in_band(ink, bands[2]) == 4  # "expert 0", "expert 4" under each map
    entropy = pictures.gate_entropy(gates)
    font = ImageFont.load_default(size=pictures.MIN_FONT)
    for name, value, (_, _, left, _) in zip(["layer 5", "layer 11"], entropy, boxes):
        title = Image.new("RGB", (400, 40), "white")
        ImageDraw.Draw(title).text((0, 0), f"{name}: H {value:.2f} nats", fill="black", font=font)
        wanted = np.asarray(title).astype(int)
        cols = np.flatnonzero((wanted < 255).any(axis=(0, 2)))
        rows = np.flatnonzero((wanted < 255).any(axis=(1, 2)))
        top = bands[1][0]
        shown = picture[top : top + len(rows), left : left + cols[-1] + 1]
        # the title at the cell's left edge, the map centred under it in a cell as wide as the map here
        assert (shown == wanted[rows[0] : rows[-1] + 1, : cols[-1] + 1]).all()


def runs_of(values):
    """Consecutive equal values: [(value, length)]."""
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    return [(values[s], n) for s, n in zip(starts, np.diff(np.r_[starts, len(values)]))]
