"""
CLIP ViT-B/32 written from scratch, loading OpenAI's official weights without running TorchScript.

One file, read top to bottom: the model (attention, blocks, both towers), the downloader and the weight
loader, image preprocessing, and the BPE tokenizer. Numerics follow openai/CLIP's clip/model.py
exactly: QuickGELU, LayerNorm in fp32, q/k/v split from the packed in_proj_weight, a causal text mask,
text features at the EOT token (the argmax id), image features at CLS after ln_post, then proj.

    import clip_vit
    model = clip_vit.load("ViT-B/32")                      # downloads ~354 MB to ~/.cache/clip once
    image = clip_vit.preprocess(PIL.Image.open("CLIP.png")).unsqueeze(0)
    text = clip_vit.tokenize(["a diagram", "a dog", "a cat"])
    logits_per_image, _ = model(image, text)

Run `python clip_vit.py IMAGE "label one" "label two" ...` to classify an image zero-shot.
"""
import gzip
import hashlib
import html
import http.client
import io
import math
import os
import pickle
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
}
VOCAB_URL = "https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
BUFFERS = ("input_resolution", "context_length", "vocab_size")  # integer buffers in the JIT file only

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
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, mask=None):
        B, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(D, dim=-1)  # rows: W_q, W_k, W_v
        q, k, v = (t.view(B, L, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # softmax(q kᵀ / sqrt(hd) + mask) v
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.attn = Attention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(d_model, 4 * d_model), gelu=QuickGELU(), c_proj=nn.Linear(4 * d_model, d_model)))
        self.ln_2 = LayerNorm(d_model)

    def forward(self, x, mask=None):  # x (B, L, D), batch-first (OpenAI's is sequence-first; same maths)
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution, self.patch_size = input_resolution, patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def pos_embed(self, gh, gw):
        """The (1 + gh*gw, width) positional embedding for a gh x gw patch grid. The trained 7x7 grid is
        resized bicubically for other grids (our extension for inputs larger than 224); identity at 7x7."""
        pe = self.positional_embedding
        g = round(math.sqrt(pe.shape[0] - 1))
        if (gh, gw) == (g, g):
            return pe
        grid = pe[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()           # (1, width, g, g)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pe.dtype)])

    def embed(self, x):
        """Pixels (B, 3, H, W) -> token sequence (B, 1 + H/p * W/p, width) entering block 0."""
        x = self.conv1(x.type(self.conv1.weight.dtype))                           # (B, width, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                                          # (B, gh*gw, width), row-major
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed(gh, gw).to(x.dtype)     # (B, 1 + gh*gw, width)
        return self.ln_pre(x)

    def head(self, x):
        """Token sequence after the last block -> projected image features (B, output_dim)."""
        return self.ln_post(x[:, 0, :]) @ self.proj

    def forward(self, x):
        # callers that need the tokens between blocks (moa.py) run embed, each of
        # self.transformer.resblocks, and head themselves: no hooks needed
        return self.head(self.transformer(self.embed(x)))


class CLIP(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers):
        super().__init__()  # same constructor signature as openai/CLIP's ViT branch
        self.context_length = context_length
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        vision_width // 64, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # additive causal mask, -inf strictly above the diagonal; a plain attribute, not in the state dict
        self.attn_mask = torch.full((context_length, context_length), float("-inf")).triu_(1)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, image):  # (B, 3, 224, 224) normalised pixels -> (B, embed_dim)
        return self.visual(image.type(self.dtype))

    def encode_text(self, text):  # (B, context_length) ids -> (B, embed_dim)
        x = self.token_embedding(text).type(self.dtype) + self.positional_embedding.type(self.dtype)
        x = self.transformer(x, self.attn_mask.to(x.device, x.dtype))
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection  # features at EOT

    def forward(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def build_model(state_dict):
    """Infer the architecture from a state dict (as openai's build_model does) and load it strictly, fp32."""
    sd = {k: v for k, v in state_dict.items() if k not in BUFFERS}
    if "visual.proj" not in sd:
        raise ValueError("not a CLIP ViT state dict (no 'visual.proj'; ResNet CLIPs are not supported)")
    vision_width, _, _, patch = sd["visual.conv1.weight"].shape
    vision_layers = sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight") for k in sd)
    grid = round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1))
    width = sd["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks")})
    model = CLIP(sd["text_projection"].shape[1], patch * grid, vision_layers, vision_width, patch,
                 sd["positional_embedding"].shape[0], sd["token_embedding.weight"].shape[0],
                 width, width // 64, text_layers)
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:  # missing/unexpected keys or a wrong shape: keep torch's precise list
        raise ValueError(" ".join(str(e).split())) from None
    return model.eval()


@torch.no_grad()
def random_state_dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, patch=32,
                      context_length=77, vocab_size=49408, width=512, heads=8, layers=12, seed=0):
    """A randomly initialised state dict in the official layout (OpenAI's init), for tests and smoke runs."""
    with torch.random.fork_rng():  # leave the caller's random stream untouched
        torch.manual_seed(seed)
        m = CLIP(embed_dim, image_resolution, vision_layers, vision_width, patch, context_length, vocab_size,
                 width, heads, layers)
        _openai_init(m, width, layers, vision_width, vision_layers)
    return m.state_dict()


def _openai_init(m, width, layers, vision_width, vision_layers):
    nn.init.normal_(m.token_embedding.weight, std=0.02)
    nn.init.normal_(m.positional_embedding, std=0.01)
    for tower, w, n in ((m.transformer, width, layers), (m.visual.transformer, vision_width, vision_layers)):
        proj_std, attn_std, fc_std = (w ** -0.5) * ((2 * n) ** -0.5), w ** -0.5, (2 * w) ** -0.5
        for b in tower.resblocks:
            nn.init.normal_(b.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(b.attn.in_proj_bias)
            nn.init.normal_(b.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(b.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(b.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(m.text_projection, std=width ** -0.5)

# -----------------------------------------------------------------------------
# files: the one user-facing error, atomic writes, downloads and the cache (data_nyu.py uses them too)


class UserError(Exception):
    """A problem the user can fix (a bad file, a failed download, a flag that cannot work here). The message
    reads "<file or flag>: <problem>"; train.py and evaluate.py print it as one `error:` line."""


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path over path: a crash never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def official_sha256(name):
    """openai puts each file's SHA-256 in its URL, as the second-to-last path segment."""
    return MODELS[name].split("/")[-2]


def cache_dir(sub="clip"):
    """$XDG_CACHE_HOME/<sub>, default ~/.cache/<sub>; ~/.cache/clip is where openai's package caches too."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / sub


def sha256sum(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url, dest, sha256=None, retries=3):
    """Fetch url to dest: resumes dest.part with HTTP Range, shows progress on stderr, checks sha256 when
    given, and renames into place only when complete. Raises UserError("dest: problem")."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                if have and r.status != 206:  # the server ignored Range: start over
                    have = 0
                total = have + int(r.headers.get("Content-Length") or 0)
                with open(part, "ab" if have else "wb") as f:
                    t0, done, last = time.time(), have, 0.0
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                        done += len(chunk)
                        if time.time() - last > 0.5 or done == total:
                            last = time.time()
                            rate = (done - have) / max(last - t0, 1e-6) / 1e6
                            size = f"/{total / 1e6:.1f}" if total else ""
                            print(f"\r{dest.name}: {done / 1e6:.1f}{size} MB at {rate:.1f} MB/s",
                                  end="", file=sys.stderr, flush=True)
                print(file=sys.stderr)
                if total and done < total:
                    raise urllib.error.URLError(f"connection closed at {done} of {total} bytes")
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the .part already holds the whole file
                break
            if e.code < 500 or attempt == retries:
                raise UserError(f"{dest}: download from {url} failed: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # timeouts, cuts: retry, resuming
            if attempt == retries:
                raise UserError(f"{dest}: download from {url} failed: {getattr(e, 'reason', e)}") from None
        print(f"{dest.name}: retrying ({attempt + 1}/{retries})", file=sys.stderr)
        time.sleep(0.5 * (attempt + 1))
    if sha256 and (got := sha256sum(part)) != sha256:
        part.unlink()
        raise UserError(f"{dest}: download from {url} failed: SHA-256 mismatch (expected {sha256}, got {got}); "
                        "removed the download")
    os.replace(part, dest)
    return dest

# -----------------------------------------------------------------------------
# reading the official TorchScript archive without TorchScript


class _Module:
    """Stands in for every __torch__.* class in the archive: it just keeps the attributes it is given."""

    def __setstate__(self, state):
        self.__dict__.update(state)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, *_):
    return storage.as_strided(size, stride, offset)


class _ArchiveUnpickler(pickle.Unpickler):
    """Rebuilds tensors from the data/ storages and refuses every global it does not know."""
    dtypes = {f"{n}Storage": getattr(torch, d) for n, d in (
        ("Half", "float16"), ("Float", "float32"), ("Double", "float64"), ("BFloat16", "bfloat16"),
        ("Long", "int64"), ("Int", "int32"), ("Short", "int16"), ("Char", "int8"), ("Byte", "uint8"),
        ("Bool", "bool"))}

    def __init__(self, file, zf, prefix):
        super().__init__(file)
        self.zf, self.prefix = zf, prefix

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return type(name, (_Module,), {})
        if module == "torch" and name in self.dtypes:
            return self.dtypes[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")

    def persistent_load(self, pid):  # ('storage', dtype, key, device, numel)
        _, dtype, key, _, numel = pid
        raw = self.zf.read(f"{self.prefix}data/{key}")
        return torch.frombuffer(bytearray(raw), dtype=dtype)[:numel]


def read_torchscript_state_dict(path):
    """The tensors of a TorchScript archive, as torch.jit.load(path).state_dict() would return them."""
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise UserError(f"{path}: no data.pkl in the archive")
        prefix = pkl[0][: -len("data.pkl")]
        root = _ArchiveUnpickler(io.BytesIO(zf.read(pkl[0])), zf, prefix).load()
    sd = OrderedDict()

    def walk(obj, name):
        for k, v in vars(obj).items():
            if isinstance(v, torch.Tensor):
                sd[name + k] = v
            elif isinstance(v, _Module):
                walk(v, name + k + ".")
    walk(root, "")
    return sd


def load_state_dict(path):
    """A state dict from a TorchScript archive (read safely) or from a plain torch.save file."""
    if zipfile.is_zipfile(path):  # torch.save files are zips too; TorchScript archives also hold constants.pkl
        with zipfile.ZipFile(path) as zf:
            if any(n.endswith("constants.pkl") for n in zf.namelist()):
                return read_torchscript_state_dict(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return sd


def load(name_or_path="ViT-B/32", device="cpu"):
    """CLIP in eval mode, fp32: a model name (downloaded to the cache), a path to the official
    TorchScript archive or to a torch.save'd state dict, or "random" (random weights, offline)."""
    if name_or_path == "random":
        return build_model(random_state_dict()).to(device)
    if name_or_path in MODELS:
        url = MODELS[name_or_path]
        path = cache_dir() / url.split("/")[-1]
        sha = official_sha256(name_or_path)
        if path.exists() and sha256sum(path) != sha:
            print(f"{path} exists but its SHA-256 does not match; downloading again", file=sys.stderr)
            path.unlink()
        if not path.exists():
            download(url, path, sha256=sha)
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"{path}: no such file (and not a model name: {', '.join(MODELS)})")
    try:
        return build_model(load_state_dict(path)).to(device)
    except UserError:
        raise
    except Exception as e:  # zip, pickle, torch.load and shape errors all become one clear line
        raise UserError(f"{path}: {' '.join(str(e).split())[:500]}") from None

# -----------------------------------------------------------------------------
# image preprocessing (PIL + numpy; byte-identical to torchvision on PIL images)


def preprocess(image, size=224):
    """PIL image -> (3, size, size) float tensor: bicubic resize of the short side, centre crop, RGB, normalise."""
    w, h = image.size
    if w < h:
        image = image.resize((size, int(size * h / w)), resample=3)  # 3 = BICUBIC; long side truncated
    else:
        image = image.resize((int(size * w / h), size), resample=3)
    w, h = image.size
    top, left = round((h - size) / 2), round((w - size) / 2)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, size, size)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)

# -----------------------------------------------------------------------------
# the BPE tokenizer (openai/CLIP's simple_tokenizer.py)


@lru_cache()
def bytes_to_unicode():
    """Byte -> printable unicode character, so that BPE never sees whitespace or control characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:  # the other 68 bytes map to U+0100, U+0101, ... in byte order
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs)))


def vocab_path():
    """bpe_simple_vocab_16e6.txt.gz from the cache, downloaded from openai/CLIP (SHA-256 checked) if absent."""
    path = cache_dir() / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        download(VOCAB_URL, path, sha256=VOCAB_SHA256)
    return path


class SimpleTokenizer:
    def __init__(self, bpe_path=None):
        import ftfy  # imported here so that the model alone needs neither ftfy nor regex
        import regex
        self.ftfy, self.byte_encoder = ftfy, bytes_to_unicode()
        merges = gzip.open(bpe_path or vocab_path()).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {v: i for i, v in enumerate(vocab)}
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                                 r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            first, second = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if (first, second) not in self.bpe_ranks:
                break
            new, i = [], 0
            while i < len(word):  # merge every non-overlapping occurrence, left to right
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def clean(self, text):
        text = html.unescape(html.unescape(self.ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def encode(self, text):
        ids = []
        for piece in self.pat.findall(self.clean(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids


@lru_cache()
def _tokenizer():
    return SimpleTokenizer()


def tokenize(texts, context_length=77, truncate=False):
    """Texts -> (B, context_length) int64 ids: SOT, BPE ids, EOT, zero padding."""
    tok = _tokenizer()
    texts = [texts] if isinstance(texts, str) else texts
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot] + tok.encode(text) + [tok.eot]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(f"text {i} is {len(ids)} tokens, longer than context_length={context_length}: "
                                 f"{text[:40]!r}... (pass truncate=True to cut it)")
            ids = ids[:context_length]
            ids[-1] = tok.eot
        out[i, :len(ids)] = torch.tensor(ids)
    return out

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    from PIL import Image
    if len(sys.argv) < 3:
        sys.exit("usage: python clip_vit.py IMAGE LABEL [LABEL ...]")
    try:
        model = load("ViT-B/32")
        image = preprocess(Image.open(sys.argv[1])).unsqueeze(0)
    except (UserError, OSError) as e:
        sys.exit(f"error: {e}")
    with torch.no_grad():
        probs = model(image, tokenize(sys.argv[2:]))[0].softmax(dim=-1)[0]
    for label, p in zip(sys.argv[2:], probs.tolist()):
        print(f"{p:8.4f}  {label}")
