"""
CLIP ViT-B/32, and the ResNet-50 (RN50) that DepthCLIP used, written from scratch; it loads OpenAI's
official weights without running TorchScript, and its numerics follow openai/CLIP's clip/model.py.
Top to bottom: the model (the ViT, then the ResNet), files and downloads, the weight reader, image
preprocessing, the BPE tokenizer, a zero-shot demo.

    model = clip_vit.load("ViT-B/32")                  # downloads 354 MB to ~/.cache/clip once
    image = clip_vit.preprocess(PIL.Image.open("CLIP.png")).unsqueeze(0)
    logits_per_image, _ = model(image, clip_vit.tokenize(["a diagram", "a dog", "a cat"]))

Zero-shot from the shell: python clip_vit.py CLIP.png "a diagram" "a dog" "a cat" [--clip random]
"""

import contextlib
import gzip
import hashlib
import html
import math
import mmap
import os
import pickle
import struct
import sys
import time
import types
import zipfile
from collections import OrderedDict
from functools import lru_cache
from http.client import HTTPException
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "RN50": "https://openaipublic.azureedge.net/clip/models/"
    "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
}
# random_state_dict's arguments for RN50's sizes (DepthCLIP's backbone; the text tower is ViT-B/32's)
RN50_SIZES = {"embed_dim": 1024, "vision_layers": (3, 4, 6, 3), "vision_width": 64, "patch": None}
# the tokenizer's vocabulary ships beside this file (MIT, (c) 2021 OpenAI: LICENSE-vocab)
VOCAB_PATH = Path(__file__).resolve().with_name("bpe_simple_vocab_16e6.txt.gz")
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


# -----------------------------------------------------------------------------
# the model
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype, as in OpenAI's code."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with OpenAI's parameter names (packed q/k/v in in_proj_weight)."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head = n_head
        self.in_proj_weight = nn.Parameter(torch.randn(3 * d_model, d_model) * d_model**-0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    # causal: token i sees tokens 0..i only (the text tower)
    def forward(self, x, causal=False):
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3D): W_q, W_k, W_v rows
        q, k, v = (
            t.unflatten(-1, (self.n_head, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1)
        )  # (B, heads, L, d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # softmax(qkᵀ/√d) v
        return self.out_proj(y.transpose(1, 2).flatten(2))  # (B, L, D)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.attn = Attention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(d_model, 4 * d_model), gelu=QuickGELU(), c_proj=nn.Linear(4 * d_model, d_model)
            )
        )
        self.ln_2 = LayerNorm(d_model)

    # x (B, L, D), batch-first (OpenAI's is sequence-first)
    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.patch_size = patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        # the patches and the class token
        self.positional_embedding = nn.Parameter(
            scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width)
        )
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def pos_embed(self, gh, gw):
        """The (1 + gh*gw, width) positional embedding of a gh x gw patch grid: the trained 7x7
        grid, resized bicubically for other grids (our extension, for inputs other than 224)."""
        pe = self.positional_embedding
        g = round(math.sqrt(pe.shape[0] - 1))
        if (gh, gw) == (g, g):
            return pe
        grid = F.interpolate(
            pe[1:].T.reshape(1, -1, g, g).float(), (gh, gw), mode="bicubic"
        )  # (1, width, gh, gw)
        return torch.cat([pe[:1], grid.flatten(2)[0].T.to(pe.dtype)])

    def embed(self, x):
        """Pixels (B, 3, H, W) -> token sequence (B, 1 + H/p * W/p, width) entering block 0."""
        x = self.conv1(x.type(self.conv1.weight.dtype))  # (B, width, gh, gw)
        pe = self.pos_embed(*x.shape[-2:]).to(x.dtype)  # (1+gh*gw, width)
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, x], dim=1) + pe)  # (B, 1+gh*gw, width)

    # moa.py calls embed and each block itself, to read the tokens in between
    def forward(self, x):
        x = self.transformer(self.embed(x))  # (B, 1+gh*gw, width)
        return self.ln_post(x[:, 0]) @ self.proj  # CLS: (B, output_dim)


class Bottleneck(nn.Module):
    """ResNet's 1x1 -> 3x3 -> 1x1 block, anti-aliased: a stride s is an s x s average pool after the
    3x3 convolution (and before the 1x1 convolution of the shortcut), never a strided convolution."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        # the shortcut: x itself, or x pooled and projected to planes * 4 channels; OpenAI's key names,
        # downsample.0 and .1 (its average pool, downsample.-1, is self.avgpool)
        self.downsample = nn.Identity()
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.downsample(self.avgpool(x)))


class AttentionPool2d(nn.Module):
    """The ResNet's head instead of a global average pool: one multi-head attention step in which the
    mean of the grid (plus a positional embedding) is the query and the grid is keys and values."""

    def __init__(self, grid, embed_dim, num_heads, output_dim):
        super().__init__()
        # the mean and the grid x grid map (7x7 in RN50)
        self.positional_embedding = nn.Parameter(torch.randn(grid**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    # x (B, C, h, w): only the trained grid (7x7 for 224x224 inputs) fits
    def forward(self, x):
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1+h*w, C)
        x = x + self.positional_embedding.to(x.dtype)
        qkv = self.q_proj(x[:, :1]), self.k_proj(x), self.v_proj(x)  # (B, 1, C), (B, L, C), (B, L, C)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in qkv)  # (B, heads, L, d)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, d)
        return self.c_proj(y.flatten(1))  # (B, output_dim)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet (RN50 and kin): torchvision's ResNet with a 3-convolution stem and an average
    pool instead of a max pool, anti-aliased Bottlenecks, and attention pooling at the end."""

    def __init__(self, layers, output_dim, heads, input_resolution, width):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self.layer1 = self.make_layer(width, layers[0])
        self.layer2 = self.make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self.make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self.make_layer(width * 8, layers[3], stride=2)
        # layer4's output has width * 32 channels: 2048 in RN50
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    # a stage, planes * 4 channels out; in: the stem's width, or the stage before's 4 * planes / 2
    @staticmethod
    def make_layer(planes, blocks, stride=1):
        first = Bottleneck(planes * stride, planes, stride)
        return nn.Sequential(first, *[Bottleneck(planes * 4, planes) for _ in range(1, blocks)])

    def features(self, x):
        """Pixels (B, 3, H, W) -> layer4's feature map (B, 32*width, H/32, W/32), before the pool
        (DepthCLIP reads this map: 2048 x 13 x 17 for its 416x544 input)."""
        x = F.relu(self.bn1(self.conv1(x.type(self.conv1.weight.dtype))))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))  # (B, width, H/4, W/4)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.attnpool(self.features(x))  # (B, output_dim)


class CLIP(nn.Module):
    def __init__(
        self,
        embed_dim,
        image_resolution,
        vision_layers,
        vision_width,
        vision_patch_size,
        context_length,
        vocab_size,
        transformer_width,
        transformer_heads,
        transformer_layers,
    ):
        # openai/CLIP's constructor signature: a tuple of layers means a ResNet
        super().__init__()
        # the blocks of layer1..4: (3, 4, 6, 3) in RN50
        if isinstance(vision_layers, (tuple, list)):
            self.visual = ModifiedResNet(
                vision_layers, embed_dim, vision_width * 32 // 64, image_resolution, vision_width
            )
        else:
            self.visual = VisionTransformer(
                image_resolution,
                vision_patch_size,
                vision_width,
                vision_layers,
                vision_width // 64,
                embed_dim,
            )
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(
            transformer_width**-0.5 * torch.randn(transformer_width, embed_dim)
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, image):  # (B, 3, 224, 224) normalised pixels -> (B, embed_dim)
        return self.visual(image)

    def encode_text(self, text):  # (B, context_length) ids -> (B, embed_dim)
        x = self.token_embedding(text) + self.positional_embedding  # (B, L, width)
        x = self.ln_final(self.transformer(x, causal=True))  # (B, L, width)
        # the features at the EOT token, which has the largest id
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def build_model(state_dict):
    """The architecture read off a state dict, as openai's build_model does ("visual.proj" means a
    ViT, else a ResNet whose layer counts the keys give), loaded strictly."""
    # a key that only a ViT, only a ResNet has
    towers = {"visual.proj", "visual.attnpool.c_proj.weight"}
    if not isinstance(state_dict, dict) or not towers & set(state_dict):
        raise ValueError("not a CLIP state dict (no ViT 'visual.proj', no ResNet 'visual.attnpool')")
    # the weights in fp32; other ints (BatchNorm's num_batches_tracked) kept: strict loading wants them;
    # the int buffers of the JIT file alone dropped
    jit_only = {"input_resolution", "context_length", "vocab_size"}
    sd = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items() if k not in jit_only}

    # the blocks under prefix, e.g. "transformer.resblocks.": the distinct numbers that follow it
    def blocks(prefix):
        return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})

    if "visual.proj" in sd:  # a ViT
        vision_width, _, _, patch = sd["visual.conv1.weight"].shape
        vision_layers = blocks("visual.transformer.resblocks.")
        resolution = patch * round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1))
    # a ResNet: blocks per stage from the keys "visual.layer{1..4}.{block}.", stride 32 in all
    else:
        vision_layers = tuple(blocks(f"visual.layer{i}.") for i in range(1, 5))
        vision_width = sd["visual.layer1.0.conv1.weight"].shape[0]
        patch = None  # no patches: a ResNet
        resolution = 32 * round(math.sqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1))
    width = sd["ln_final.weight"].shape[0]
    text_layers = blocks("transformer.resblocks.")
    # sd holds every weight: drawing random ones first would be wasted
    with no_random_init():
        model = CLIP(
            sd["text_projection"].shape[1],
            resolution,
            vision_layers,
            vision_width,
            patch,
            sd["positional_embedding"].shape[0],
            sd["token_embedding.weight"].shape[0],
            width,
            width // 64,
            text_layers,
        )
    # sd's tensors become the weights, uncopied; an error names each missing, extra or misshapen key
    model.load_state_dict(sd, assign=True)
    return model.eval()


def random_state_dict(
    embed_dim=512,
    image_resolution=224,
    vision_layers=12,
    vision_width=768,
    patch=32,
    width=512,
    heads=8,
    layers=12,
    seed=0,
):
    """Seeded random weights in the official layout, ViT-B/32's sizes by default (smoke runs).
    vision_layers a tuple: a ResNet's, e.g. random_state_dict(**RN50_SIZES) for RN50's."""
    # leave the caller's random stream untouched
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return CLIP(
            embed_dim,
            image_resolution,
            vision_layers,
            vision_width,
            patch,
            77,  # context length
            49408,  # vocabulary size
            width,
            heads,
            layers,
        ).state_dict()


# -----------------------------------------------------------------------------
# files: the one user-facing error, atomic writes, downloads, the cache (data_nyu.py uses them too)
class UserError(Exception):
    """A problem the user can fix (a bad file, a failed download, a flag that cannot work here).
    The message reads "<file or flag>: <problem>"; the scripts print it as one `error:` line."""


def atomic_write(path, write):
    """Call write(f) on a new file beside path, then rename it over path: never half a file at path. A write
    that fails (no permission, a full disk) is a UserError naming path, and what was at path stays."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # a new file like any other: the umask applies
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    # torch.save reports a full disk as its zip writer's RuntimeError
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "write" not in str(e):
            raise
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UserError(f"{path}: cannot write it ({reason})") from None
    finally:
        # the cleanup never hides the error above
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def official_sha256(name):
    """openai puts each file's SHA-256 in its URL, as the second-to-last path segment."""
    return MODELS[name].split("/")[-2]


def weights_sha256(name_or_path):
    """The identity of CLIP weights: the official SHA-256 of a model name, a file's own, or "random"."""
    if name_or_path in MODELS:
        return official_sha256(name_or_path)
    return "random" if name_or_path == "random" else sha256sum(name_or_path)


def cache_dir(sub="clip"):
    """$XDG_CACHE_HOME/<sub>, default ~/.cache/<sub>; openai's package caches in ~/.cache/clip."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / sub


def sha256sum(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download(url, dest, sha256=None):
    """Fetch url to dest, with progress on stderr. The bytes land in dest.part, which a later call
    resumes (HTTP Range); dest appears only complete and, given sha256, checked. Raises
    UserError("dest: problem"), which also says where a copy fetched by hand goes. A download
    that fails before its first byte leaves nothing behind: no empty .part, no new empty folder."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    made = [p for p in (dest.parent, *dest.parent.parents) if not p.exists()]  # innermost first
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _download(url, dest, part, sha256)
    except BaseException:  # a failure, or Ctrl-C
        if part.exists() and part.stat().st_size == 0:
            part.unlink()
        for folder in made:
            if not any(folder.iterdir()):
                folder.rmdir()
        raise


def _download(url, dest, part, sha256):
    failed = f"{dest}: download from {url} failed"
    by_hand = f"fetch it by hand from that URL and put it at {dest}"  # the way out, offline
    by_hand += f" (SHA-256 {sha256})" if sha256 else ""
    have = done = part.stat().st_size if part.exists() else 0
    try:
        with urlopen(Request(url, headers={"Range": f"bytes={have}-"} if have else {}), timeout=60) as r:
            # a fresh start, or the server ignored Range: start over
            if r.status != 206:
                have = done = 0
            total = have + int(r.headers.get("Content-Length") or 0)
            t0, last = time.time(), 0.0
            with open(part, "ab" if have else "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if time.time() - last > 0.5 or done == total:  # progress, twice a second
                        last = time.time()
                        rate = (done - have) / max(last - t0, 1e-6) / 1e6
                        size = f"/{total / 1e6:.1f}" if total else ""
                        print(
                            f"\r{dest.name}: {done / 1e6:.1f}{size} MB at {rate:.1f} MB/s",
                            end="",
                            file=sys.stderr,
                            flush=True,
                        )
            print(file=sys.stderr)
        if done < total:
            raise ConnectionError(f"connection closed at {done} of {total} bytes")
    except HTTPError as e:
        # 416 to a resume: the .part already holds the whole file
        if e.code != 416 or not have:
            raise UserError(f"{failed}: HTTP {e.code} {e.reason}; {by_hand}") from None
    except (URLError, HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"{failed}: {reason}; run again to resume, or {by_hand}") from None
    got = sha256sum(part) if sha256 else None
    if got != sha256:
        part.unlink()
        raise UserError(
            f"{failed}: SHA-256 mismatch (expected {sha256}, got {got}); removed the download; {by_hand}"
        )
    os.replace(part, dest)
    return dest


# -----------------------------------------------------------------------------
# reading the official TorchScript archive without TorchScript
class _ArchiveUnpickler(pickle.Unpickler):
    """Rebuilds tensors from the data/ storages and refuses every global it does not know. The
    storages are read in place from `memory`, the whole file mapped (see persistent_load)."""

    dtypes = {"HalfStorage": torch.half, "FloatStorage": torch.float, "LongStorage": torch.long}

    def __init__(self, zf, pkl, memory):  # pkl: "<root>/data.pkl"; storages: "<root>/data/<key>"
        super().__init__(zf.open(pkl))
        self.zf, self.prefix, self.memory = zf, pkl.removesuffix("data.pkl"), memory

    def find_class(self, module, name):
        # a module: pickle sets its attributes
        if module.startswith("__torch__"):
            return types.SimpleNamespace
        if module == "torch" and name in self.dtypes:
            return self.dtypes[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):  # a view of a storage
            return lambda data, offset, size, stride, *_: data.as_strided(size, stride, offset)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")

    def persistent_load(self, pid):  # ('storage', dtype, key, device, numel)
        _, dtype, key, _, numel = pid
        info = self.zf.getinfo(f"{self.prefix}data/{key}")
        if numel * dtype.itemsize > info.file_size:
            raise ValueError(f"storage {key}: {numel} elements in {info.file_size} bytes")
        # the file offset of the member's bytes: after its local header
        header = self.memory[info.header_offset : info.header_offset + 30]
        if header[:4] != b"PK\x03\x04":
            raise ValueError(f"{info.filename}: no zip local header at {info.header_offset}")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        start = info.header_offset + 30 + name_length + extra_length
        if info.compress_type != zipfile.ZIP_STORED or start % dtype.itemsize:  # not as torch writes
            return torch.frombuffer(bytearray(self.zf.read(info)), dtype=dtype, count=numel)
        # torch stores each storage uncompressed and aligned: the tensor is the mapped bytes
        return torch.frombuffer(self.memory, dtype=dtype, count=numel, offset=start)


def read_torchscript_state_dict(path):
    """The tensors of a TorchScript archive, as torch.jit.load(path).state_dict() gives them. They
    are views of a private (copy-on-write) map of the file: reading costs nothing up front, pages
    are read as the tensors are used, and writing to a tensor never changes the file."""
    with open(path, "rb") as f:
        # lives as long as its tensors
        memory = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise ValueError("no data.pkl in the archive")
        root = _ArchiveUnpickler(zf, pkl[0], memory).load()

    # the module tree -> (dotted name, tensor), in attribute order
    def tensors(obj, prefix):
        for k, v in vars(obj).items():
            if isinstance(v, torch.Tensor):
                yield prefix + k, v
            elif isinstance(v, types.SimpleNamespace):
                yield from tensors(v, prefix + k + ".")

    return OrderedDict(tensors(root, ""))


def load_state_dict(path):
    """A state dict from OpenAI's TorchScript archive (read, never run) or a torch.save file."""
    # torch.save files too; only TorchScript has constants.pkl
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any(n.endswith("constants.pkl") for n in zf.namelist()):
                return read_torchscript_state_dict(path)
    return torch.load(path, map_location="cpu", weights_only=True)


class no_random_init(torch.overrides.TorchFunctionMode):
    """`with no_random_init(): model = Model(...)` builds modules without drawing the random initial
    weights that load_state_dict(sd, assign=True) then replaces: torch.randn and torch.rand give
    uninitialised memory, and the random initialisers (nn.init's, Tensor.uniform_ and .normal_) do
    nothing. Every other tensor op runs as usual, so what no state dict holds (a non-persistent
    buffer, say a mask) comes out right. The meta device would skip the memory as well, but its first
    randn or scalar multiply imports sympy: seconds, more than the initialisation it saves."""

    INITIALISERS = (
        nn.init.uniform_,
        nn.init.normal_,
        nn.init.trunc_normal_,
        nn.init.kaiming_uniform_,
        torch.Tensor.uniform_,
        torch.Tensor.normal_,
    )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.randn, torch.rand):
            kwargs.pop("generator", None)
            return torch.empty(*args, **kwargs)
        # in place: the tensor itself, left as it is
        if func in self.INITIALISERS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def load(name_or_path="ViT-B/32"):
    """CLIP in eval mode, fp32, on the CPU: a model name (downloaded to the cache), a path to the official
    TorchScript archive or to a torch.save'd state dict, or "random" (random weights, offline)."""
    if name_or_path == "random":
        return build_model(random_state_dict())
    path = Path(name_or_path)
    if name_or_path in MODELS:
        path = cache_dir() / MODELS[name_or_path].split("/")[-1]
        sha = official_sha256(name_or_path)
        # not there yet, or damaged: fetch
        if not path.is_file() or sha256sum(path) != sha:
            download(MODELS[name_or_path], path, sha256=sha)
    elif not path.is_file():
        raise UserError(f"{path}: no such file (and not a model name: {', '.join(MODELS)}, random)")
    try:
        return build_model(load_state_dict(path))
    # zip, pickle, torch.load and shape errors all become one clear line
    except Exception as e:
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        raise UserError(
            f"{path}: not a CLIP weights file, i.e. OpenAI's TorchScript archive "
            f"or a torch.save'd state dict ({detail})"
        ) from None


# -----------------------------------------------------------------------------
# image preprocessing (PIL + numpy; byte-identical to torchvision on PIL images)
def preprocess(image, size=224):
    """PIL image -> (3, size, size) float tensor: bicubic resize of the short side to size, centre
    crop, RGB, CLIP's normalisation."""
    w, h = image.size
    w, h = (size, int(size * h / w)) if w < h else (int(size * w / h), size)  # long side floored
    top, left = round((h - size) / 2), round((w - size) / 2)
    image = (
        image.resize((w, h), resample=3).crop((left, top, left + size, top + size)).convert("RGB")
    )  # bicubic
    return normalize(torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1))


def normalize(x):
    """CLIP's per-channel normalisation of (..., 3, H, W) floats in [0, 1]."""
    return (x - x.new_tensor(MEAN).view(3, 1, 1)) / x.new_tensor(STD).view(3, 1, 1)


# -----------------------------------------------------------------------------
# the BPE tokenizer (openai/CLIP's simple_tokenizer.py)
class SimpleTokenizer:
    def __init__(self):
        # imported here (ftfy too) so that the model alone needs neither
        import regex

        data = VOCAB_PATH.read_bytes() if VOCAB_PATH.is_file() else b""
        if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:  # say, a damaged clone
            raise UserError(
                f"{VOCAB_PATH}: missing or not the official vocabulary (SHA-256 "
                f"{VOCAB_SHA256}); restore it from the repository"
            )
        # byte -> printable character, so that BPE never sees whitespace or control codes: bytes
        # "!".."~", "¡".."¬", "®".."ÿ" stand for themselves, the other 68 for U+0100, U+0101, ...
        printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
        others = [b for b in range(256) if b not in printable]
        self.byte_encoder = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
        merges = gzip.decompress(data).decode().split("\n")
        merges = [tuple(m.split()) for m in merges[1 : 49152 - 256 - 2 + 1]]
        # ids: bytes, bytes ending a word, merges
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        self.encoder = {v: i for i, v in enumerate(vocab + ["<|startoftext|>", "<|endoftext|>"])}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
            r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]

    def bpe(self, token):
        """Merge the adjacent pair learned first until none is in the merge list. One merge at a
        time, leftmost first, gives openai's result: a pair using a merged symbol came after it."""
        if token not in self.cache:
            word = list(token[:-1]) + [token[-1] + "</w>"]
            while len(word) > 1:
                ranks = [self.bpe_ranks.get(pair, math.inf) for pair in zip(word, word[1:])]
                # the leftmost of the best pairs
                i = ranks.index(min(ranks))
                if ranks[i] == math.inf:
                    break
                word[i : i + 2] = [word[i] + word[i + 1]]
            self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text):
        try:
            import ftfy

            text = ftfy.fix_text(text)
        except ModuleNotFoundError:
            # no ftfy (a GPU image may lack it): only text ftfy leaves as it is, printable ASCII with tabs or
            # line breaks and no "&" (this project's prompts), whose ids are then OpenAI's
            if "&" in text or not all(" " <= c <= "~" or c in "\t\n\r" for c in text):
                raise UserError(
                    f"{text[:40]!r}: text beyond plain ASCII needs ftfy (pip install ftfy)"
                ) from None
        text = html.unescape(html.unescape(text))
        # runs of whitespace -> one space, none at either end
        text = " ".join(text.split()).lower()
        ids = []
        for piece in self.pat.findall(text):
            piece = "".join(self.byte_encoder[b] for b in piece.encode())
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids


@lru_cache
def _tokenizer():
    return SimpleTokenizer()


def tokenize(texts, context_length=77):
    """Texts -> (B, context_length) int64 ids: SOT, BPE ids, EOT, zero padding."""
    tok = _tokenizer()
    texts = [texts] if isinstance(texts, str) else texts
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot, *tok.encode(text), tok.eot]
        if len(ids) > context_length:
            raise UserError(f"{text[:40]!r}: {len(ids)} tokens, more than CLIP's {context_length}")
        out[i, : len(ids)] = torch.tensor(ids)
    return out


# -----------------------------------------------------------------------------
# zero-shot: how well does each label describe the image?
if __name__ == "__main__":
    import argparse
    from PIL import Image

    p = argparse.ArgumentParser(description="Zero-shot classification of one image by CLIP.")
    p.add_argument("image")
    p.add_argument("labels", nargs="+")
    p.add_argument("--clip", default="ViT-B/32", help="ViT-B/32, RN50, a weights file, or random")
    args = p.parse_args()
    try:
        image = preprocess(Image.open(args.image)).unsqueeze(0)  # (1, 3, 224, 224)
        text = tokenize(args.labels)  # (n_labels, 77)
        model = load(args.clip)
    except (UserError, OSError) as e:
        sys.exit(f"error: {e}")
    with torch.no_grad():
        probs = model(image, text)[0].softmax(dim=-1)[0]  # (n_labels,)
    for label, prob in zip(args.labels, probs.tolist()):
        print(f"{prob:8.4f}  {label}")
