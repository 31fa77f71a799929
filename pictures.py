"""
What evaluation draws and writes for NYU frames and your photos, with PIL and numpy only: labelled
pictures (turbo colours, a colour bar in metres under each map), the gate panel (which expert wins each
patch), and a photo's files: depth in metres (.npy), in millimetres (16-bit PNG), a point cloud (.ply)
and a JSON sidecar that says how they were made. Photos are read with a one-line note for anything odd.
No state of its own: make_folder returns the folders it made, and the caller keeps them.
"""

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFile, ImageFont, ImageOps

import clip_vit
import data_nyu

# a map's long side in a picture (px): an NYU frame keeps its pixels, a photo of any size is resized to it
MAP_SIDE = 640
# font size / height of a picture's maps: letters >= 2 % of the picture
TEXT = 0.04
# pixels: the font of a picture of small maps
MIN_FONT = 14
TURBO = np.array(
    [
        [0.13572138, 4.6153926, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
        [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
        [0.1066733, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
    ]
)
# one colour per expert, up to 18: matplotlib's tab20 without its greys, the 9 strong hues first
EXPERT_COLOURS = np.array(
    [
        ImageColor.getrgb(c)
        for c in "#1f77b4 #ff7f0e #2ca02c #d62728 #9467bd #8c564b #e377c2 #bcbd22 #17becf "
        "#aec7e8 #ffbb78 #98df8a #ff9896 #c5b0d5 #c49c94 #f7b6d2 #dbdb8d #9edae5".split()
    ],
    np.uint8,
)
# NYU Depth V2's Kinect colour camera at 640x480: fx, fy, cx, cy in pixels
NYU_CAMERA = (518.8579, 519.4696, 325.5824, 253.7362)
# what a folder of photos is expanded into, and the endings of the pictures written for a photo
PHOTO_TYPES = tuple(".jpg .jpeg .png .webp .tif .tiff .bmp .gif".split())
OUTPUTS = ("_depth", "_depth_mm", "_depth_gates")
# warn when more than this share of a photo's pixels sits at the depth cap
CAP_SHARE = 0.3


# -----------------------------------------------------------------------------
# pictures: a header line over a grid of cells, each a title, a map and a colour bar with its labels


def colorize(x, lo, hi):
    """(H, W) -> (H, W, 3) uint8 in turbo, Google's smoothed rainbow: lo dark blue, hi dark red."""
    # 0 to 1 across the scale
    t = np.clip((x - lo) / max(hi - lo, 1e-9), 0, 1)[..., None]
    # (H, W, 6): 1, t, ..., t^5; TURBO's rows: R, G, B coefficients
    return (np.clip(t ** np.arange(6) @ TURBO.T, 0, 1) * 255).astype(np.uint8)


# (256, 3): the depth maps' colour bar, low to high
RAMP = colorize(np.linspace(0, 1, 256), 0, 1)


def map_size(shape, side=MAP_SIDE):
    """(h, w) of a map of shape (H, W, ...) in a picture: its long side `side` px, its aspect kept."""
    return tuple(max(1, round(side * n / max(shape[:2]))) for n in shape[:2])


def resized(a, h, w):
    """A map (nearest pixel: depths stay depths, holes stay holes) or an RGB photo (box filter when
    smaller, nearest when larger: a 1x1 photo shows as one block) at h x w. A float32 map: PIL's mode F."""
    shrink = a.ndim == 3 and h * w < a.shape[0] * a.shape[1]
    return np.asarray(Image.fromarray(a).resize((w, h), Image.BOX if shrink else Image.NEAREST))


def draw_picture(header, rgb, cells, cols):
    """A header line, then a grid of cells: the RGB at the maps' size, then each cell (title, map
    (h, w, 3) uint8, bar colours (n, 3), labels): a title line, the map and the bar half a font size
    high over a line with its first label at the left and its last at the right. Cells are a font
    size apart, each as wide as its texts need, so no two labels touch. The font is TEXT of the maps'
    height. -> PIL image."""
    h, w = cells[0][1].shape[:2]
    cells = [("RGB", resized(rgb, h, w), None, ()), *cells]
    rows = math.ceil(len(cells) / cols)
    size = max(MIN_FONT, round(TEXT * rows * h))
    font = ImageFont.load_default(size)  # Pillow >= 10.1: scalable, no font file needed
    line = round(1.4 * size)
    # each cell as wide as its map, its title and its bar's labels side by side, a font size apart
    texts = [
        max(font.getlength(title), sum(font.getlength(s) + size for s in labels))
        for title, _, _, labels in cells
    ]
    cell_w = max(w, math.ceil(max(texts)))
    cell_h = 2 * line + h + size // 2
    width = max(cols * (cell_w + size) + size, math.ceil(font.getlength(header)) + 2 * size)
    canvas = Image.new("RGB", (width, line + rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.font = font
    draw.text((size, 0), header, "black")
    for i, (title, image, bar, labels) in enumerate(cells):
        x = size + i % cols * (cell_w + size)  # the cell's top left corner
        y = line + i // cols * cell_h
        draw.text((x, y), title, "black")
        canvas.paste(Image.fromarray(image), (x + (cell_w - w) // 2, y + line))
        if bar is not None:
            canvas.paste(
                Image.fromarray(bar[None]).resize((cell_w, size // 2), Image.NEAREST), (x, y + line + h)
            )
            for label, left in zip(labels, (x, x + cell_w - font.getlength(labels[-1]))):
                draw.text((left, y + line + h + size // 2), label, "black")
    return canvas


def depth_picture(header, rgb, panels):
    """RGB, then each panel (title, map in metres, lo, hi) in turbo over a colour bar from lo to hi,
    two a row. Maps are resized to MAP_SIDE before colouring: a 6000x4000 photo costs little memory."""
    h, w = map_size(rgb.shape)
    cells = [
        (title, colorize(resized(depth, h, w), lo, hi), RAMP, (f"{lo:.2f} m", f"{hi:.2f} m"))
        for title, depth, lo, hi in panels
    ]
    return draw_picture(header, rgb, cells, 2)


def png(picture):
    """A PIL image -> a writer for clip_vit.atomic_write, which keeps an old file whole."""
    return lambda f: picture.save(f, format="PNG")


def save_frame_picture(path, rgb, pred, gt, *, title="", scene=None, crop="eigen", metrics=None):
    """RGB | prediction over ground truth | |error|, a header with title, scene and the frame's d1
    and RMSE within `crop` (metrics: this frame's, if already scored; else scored here). Prediction
    and ground truth share one scale fitted to both: a 3.5-6.4 m room uses every colour."""
    valid = data_nyu.valid_depth(gt)  # no holes
    both = np.r_[pred.ravel(), gt[valid]]
    lo, hi = both.min(), both.max()
    error = (np.abs(pred - gt) * valid).astype(np.float32)  # 0 at GT holes
    m = metrics or data_nyu.depth_metrics(pred, gt, crop)  # as the standard protocol does
    within = "" if crop == "none" else f" ({crop} crop)"
    # d1 NaN: not one valid pixel
    score = (
        "no valid ground truth"
        if math.isnan(m["d1"])
        else f"d1 {m['d1']:.3f}, RMSE {m['rmse']:.3f} m{within}"
    )
    names = ", ".join(filter(None, (title, scene)))
    panels = [("prediction", pred, lo, hi), ("ground truth", gt, lo, hi), ("|error|", error, 0, error.max())]
    clip_vit.atomic_write(path, png(depth_picture(f"{names}: {score}" if names else score, rgb, panels)))


# -----------------------------------------------------------------------------
# the gates: which of the E experts each MoA layer weighs most on each patch


def gate_tokens(gates):
    """Gates per MoA layer, (gh*gw, E) or (gh, gw, E) each -> (layers, tokens, E) float64."""
    g = np.array(gates, np.float64)
    return g.reshape(len(g), -1, g.shape[-1])


def winning_experts(gates):
    """-> (layers, gh, gw) int: the expert with the largest gate on each patch; flat (gh*gw, E)
    gates are a square grid."""
    grid = np.shape(gates[0])[:-1]
    if len(grid) == 1:
        grid = (math.isqrt(grid[0]),) * 2
    return gate_tokens(gates).argmax(-1).reshape(len(gates), *grid)


def gate_entropy(gates):
    """-> (layers,): each layer's mean over patches of -sum g log g, in nats (0 log 0 = 0)."""
    g = gate_tokens(gates)
    return -(g * np.log(np.where(g > 0, g, 1))).sum(-1).mean(-1)


def expert_shares(gates):
    """-> (layers, E): each expert's share of the gate weight, its mean gate over the patches."""
    return gate_tokens(gates).mean(1)


def save_gate_panel(path, rgb, gates, layer_names):
    """The RGB beside a map per MoA layer of the expert that wins each patch, one colour per expert
    (a legend bar under each map: expert 0 at its left to expert E-1 at its right), the layer's
    mean gate entropy in its title."""
    experts = np.shape(gates[0])[-1]
    h, w = map_size(rgb.shape, MAP_SIDE // 2)
    legend = EXPERT_COLOURS[:experts], ("expert 0", f"expert {experts - 1}")
    cells = [
        (f"{name}: H {entropy:.2f} nats", resized(EXPERT_COLOURS[winners], h, w), *legend)
        for name, winners, entropy in zip(layer_names, winning_experts(gates), gate_entropy(gates))
    ]
    header = f"the expert that wins each patch (bars: experts 0 to {experts - 1}, left to right)"
    clip_vit.atomic_write(path, png(draw_picture(header, rgb, cells, len(cells) + 1)))


# -----------------------------------------------------------------------------
# your photos: finding and reading them, and their files


def make_folder(folder):
    """mkdir -p -> the folders it created, outermost first: remove_empty_folders(them) undoes it."""
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def remove_empty_folders(folders):
    """Remove each of make_folder's folders that is still empty, innermost first (a run stopped early)."""
    for folder in reversed(folders):
        try:
            folder.rmdir()  # only an empty folder goes
        except OSError:
            pass


def photo_paths(args):
    """The photo arguments -> photo paths: a folder stands for its image files (PHOTO_TYPES, sorted).
    A URL, a missing file or a folder without photos: a UserError."""
    paths = []
    for arg in map(str, args):
        if arg.startswith(("http://", "https://")):
            raise clip_vit.UserError(f"{arg}: a URL: download the photo first")
        path = Path(arg)
        if not path.exists():
            raise clip_vit.UserError(f"{arg}: no such file")
        # a folder's photos, not the pictures an earlier run wrote beside them
        found = (
            [
                p
                for p in sorted(path.glob("*"))
                if p.suffix.lower() in PHOTO_TYPES and not p.stem.endswith(OUTPUTS)
            ]
            if path.is_dir()
            else [path]
        )
        if not found:
            raise clip_vit.UserError(f"{arg}: a folder without photos ({' '.join(PHOTO_TYPES)})")
        paths += found
    return paths


def decoded(path, truncated):
    """path, decoded and upright (EXIF) -> (PIL image, frames in the file, EXIF's 35 mm-equivalent
    focal length in mm or None). truncated: a cut file decodes, its missing part grey."""
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = truncated
    try:
        with Image.open(path) as im:
            frames = getattr(im, "n_frames", 1)
            im.load()
            # Exif IFD: FocalLengthIn35mmFilm
            return ImageOps.exif_transpose(im), frames, im.getexif().get_ifd(0x8769).get(0xA405) or None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def read_photo(path):
    """Any photo -> (uint8 (H, W, 3) RGB, notes, focal35). notes: one-line warnings for the caller
    to print after the path (truncated data, an alpha channel, several frames); focal35: EXIF's
    35 mm-equivalent focal length in mm, or None. Greyscale, palette and 16-bit (stretched to 8
    bits) become RGB; transparent pixels lie on white, as a viewer shows them."""
    notes = []
    try:
        try:
            im, frames, focal35 = decoded(path, truncated=False)
        except OSError:  # a cut file; anything else fails again here
            im, frames, focal35 = decoded(path, truncated=True)
            notes.append("truncated or corrupt data: the lower part may be grey/smeared")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise clip_vit.UserError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    if frames > 1:
        notes.append(f"{frames} frames; the first is used")
    if im.mode.startswith(("I", "F")):  # 16-bit, 32-bit: stretched to 8 bits
        a = np.asarray(im, np.float64)
        a -= a.min()
        im = Image.fromarray((255 * a / max(a.max(), 1)).astype(np.uint8))
    if im.has_transparency_data:
        notes.append("an alpha channel: transparent pixels composited on white")
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    # a writable copy: torch warns on read-only arrays
    return np.array(im.convert("RGB")), notes, focal35


def photo_intrinsics(shape, focal=None, focal35=None):
    """(fx, fy, cx, cy, source), pixels, for a photo of shape (H, W, ...): focal (--focal, pixels),
    else EXIF's 35 mm-equivalent focal length over full frame's 36 mm width times the photo's long
    side, either about the photo's centre; else NYU's Kinect scaled to the photo, x by W / 640 and
    y by H / 480. The model squashes every photo to its input as it squashed NYU's 4:3 frames, so
    its depths fit a photo that spans the Kinect's field of view both ways; for another aspect
    ratio that makes fx != fy (pixels not square): give --focal for the true camera."""
    H, W = shape[:2]
    if focal or focal35:
        f = focal or focal35 / 36 * max(H, W)
        return f, f, (W - 1) / 2, (H - 1) / 2, "--focal" if focal else "EXIF FocalLengthIn35mmFilm"
    fx, fy, cx, cy = NYU_CAMERA
    return fx * W / 640, fy * H / 480, cx * W / 640, cy * H / 480, "NYU Kinect scaled to the photo"


def cap_share(depth, max_depth):
    """The share of pixels at the depth cap: within 1 % of max_depth."""
    return float((depth >= 0.99 * max_depth).mean())


def cap_warning(depth, max_depth):
    """A one-line warning, to print after the path, if more than CAP_SHARE of the pixels sit at the cap;
    else None."""
    share = cap_share(depth, max_depth)
    if share > CAP_SHARE:
        return (
            f"{100 * share:.0f} % of pixels at the {max_depth:g} m cap: likely not an indoor NYU-like scene"
        )


def write_ply(f, rgb, depth, intrinsics):
    """A point cloud, one vertex per pixel, row by row, binary little-endian: float x, y, z and
    uchar red, green, blue."""
    fx, fy, cx, cy, source = intrinsics
    header = f"""ply
format binary_little_endian 1.0
comment camera frame, metres: x right, y down, z forward = the depth at pixel column u, row v
comment x = (u - cx) * z / fx, y = (v - cy) * z / fy
comment fx {fx:.4f} fy {fy:.4f} cx {cx:.4f} cy {cy:.4f}: {source}
element vertex {depth.size}
property float x
property float y
property float z
property uchar red
property uchar green
property uchar blue
end_header
"""
    vertices = np.empty(depth.shape, [("xyz", "<f4", 3), ("rgb", "u1", 3)])  # 15 bytes, no padding
    v, u = np.indices(depth.shape, sparse=True)  # rows (H, 1), columns (1, W)
    xyz = vertices["xyz"]
    xyz[..., 0] = (u - cx) / fx * depth
    xyz[..., 1] = (v - cy) / fy * depth
    xyz[..., 2] = depth
    vertices["rgb"] = rgb
    f.write(header.encode())
    f.write(vertices.data)  # no copy: 15 bytes a pixel, 360 MB for 24 MP


def write_photo_outputs(stem, rgb, depth, intrinsics, sidecar, depth_range):
    """A photo's files, each written whole (atomic_write), beside each other: <stem>.npy (float32
    metres at the photo's resolution), .png (the picture, under sidecar's "photo"), _mm.png (uint16
    millimetres, 1 to 65535), .ply (the point cloud) and .json: sidecar (what the caller knows: the
    photo, checkpoint, CLIP, output grid) with the units, depths, intrinsics and files. intrinsics:
    photo_intrinsics'; depth_range: the model's [min, max] in metres. -> the paths written."""
    depth = depth.astype(np.float32)
    lo, hi = float(depth.min()), float(depth.max())
    writers = {
        ".npy": lambda f: np.save(f, depth),
        ".png": png(depth_picture(sidecar["photo"], rgb, [("prediction", depth, lo, hi)])),
        "_mm.png": png(Image.fromarray(np.clip(np.round(depth * 1000), 1, 65535).astype(np.uint16))),
        ".ply": lambda f: write_ply(f, rgb, depth, intrinsics),
        ".json": lambda f: f.write(json.dumps(about, indent=1).encode()),  # about: below
    }
    about = {
        **sidecar,
        "units": {".npy": "metres", ".ply": "metres", "_mm.png": "millimetres"},
        "depth": {"min": lo, "max": hi, "model_range": depth_range},
        "share_at_cap": cap_share(depth, depth_range[1]),
        "intrinsics": dict(zip("fx fy cx cy source".split(), intrinsics)),
        "files": [f"{Path(stem).name}{suffix}" for suffix in writers],
    }
    for suffix, write in writers.items():
        clip_vit.atomic_write(f"{stem}{suffix}", write)
    return [Path(f"{stem}{suffix}") for suffix in writers]
