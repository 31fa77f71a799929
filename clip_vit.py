"""
CLIP ViT-B/32 written from scratch; it loads OpenAI's official weights without running TorchScript.

Read top to bottom: the model (attention, blocks, both towers), files and downloads, the weight
reader, image preprocessing, and the BPE tokenizer. Numerics follow openai/CLIP's clip/model.py:
QuickGELU, LayerNorm in fp32, q/k/v split from the packed in_proj_weight, a causal text mask, text
features at the EOT token (the argmax id), image features at CLS after ln_post, then proj.

    model = clip_vit.load("ViT-B/32")                  # downloads 354 MB to ~/.cache/clip once
    image = clip_vit.preprocess(PIL.Image.open("CLIP.png")).unsqueeze(0)
    logits_per_image, _ = model(image, clip_vit.tokenize(["a diagram", "a dog", "a cat"]))

Zero-shot from the shell: python clip_vit.py CLIP.png "a diagram" "a dog" "a cat" [--clip random]
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
# the tokenizer's vocabulary ships beside this file (MIT, (c) 2021 OpenAI: LICENSE-vocab); the URL
# is the fallback when that copy is missing or fails its SHA-256 check
VOCAB_PATH = Path(__file__).resolve().with_name("bpe_simple_vocab_16e6.txt.gz")
VOCAB_URL = "https://github.com/openai/CLIP/raw/main/clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
BUFFERS = ("input_resolution", "context_length", "vocab_size")  # ints in the JIT file only

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
        self.in_proj_weight = nn.Parameter(torch.randn(3 * d_model, d_model) * d_model ** -0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x, mask=None):
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3D): W_q, W_k, W_v rows
        q, k, v = (t.view(B, L, self.n_head, -1).transpose(1, 2) for t in qkv.split(D, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # softmax(qkᵀ/√d + mask) v
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))

class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head):
        super().__init__()
        self.attn = Attention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        mlp = {"c_fc": nn.Linear(d_model, 4 * d_model), "gelu": QuickGELU(),
               "c_proj": nn.Linear(4 * d_model, d_model)}  # OpenAI's names, in the state dict
        self.mlp = nn.Sequential(OrderedDict(mlp))
        self.ln_2 = LayerNorm(d_model)

    def forward(self, x, mask=None):  # x (B, L, D), batch-first (OpenAI's is sequence-first)
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))

class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

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
        n_tokens = (input_resolution // patch_size) ** 2 + 1  # the patches and the class token
        self.positional_embedding = nn.Parameter(scale * torch.randn(n_tokens, width))
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
        grid = pe[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()           # (1, width, g, g)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(pe.dtype)])

    def embed(self, x):
        """Pixels (B, 3, H, W) -> token sequence (B, 1 + H/p * W/p, width) entering block 0."""
        x = self.conv1(x.type(self.conv1.weight.dtype))                      # (B, width, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                                     # (B, gh*gw, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed(gh, gw).to(x.dtype)  # (B, 1+gh*gw, width)
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
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        scale = transformer_width ** -0.5
        self.text_projection = nn.Parameter(scale * torch.randn(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # the additive causal mask, -inf above the diagonal: a plain attribute, not in the state dict
        self.attn_mask = torch.full((context_length, context_length), float("-inf")).triu_(1)

    def encode_image(self, image):  # (B, 3, 224, 224) normalised pixels -> (B, embed_dim)
        return self.visual(image)

    def encode_text(self, text):  # (B, context_length) ids -> (B, embed_dim)
        x = self.token_embedding(text) + self.positional_embedding   # (B, L, width)
        x = self.transformer(x, self.attn_mask.to(x.device, x.dtype))
        x = self.ln_final(x)
        eot = text.argmax(dim=-1)  # the EOT token has the largest id
        return x[torch.arange(x.shape[0]), eot] @ self.text_projection

    def forward(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

def build_model(state_dict):
    """The architecture read off a state dict (as openai's build_model does), loaded strictly."""
    sd = {k: v for k, v in state_dict.items() if k not in BUFFERS}
    if "visual.proj" not in sd:
        raise ValueError("not a CLIP ViT state dict (no 'visual.proj'; ResNet CLIPs are not read)")
    vision_width, _, _, patch = sd["visual.conv1.weight"].shape
    vision_layers = sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight") for k in sd)
    grid = round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1))
    width = sd["ln_final.weight"].shape[0]
    text_layers = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks")})
    model = CLIP(sd["text_projection"].shape[1], patch * grid, vision_layers, vision_width, patch,
                 sd["positional_embedding"].shape[0], sd["token_embedding.weight"].shape[0],
                 width, width // 64, text_layers)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)  # names bad keys
    return model.eval()

@torch.no_grad()
def random_state_dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                      patch=32, context_length=77, vocab_size=49408, width=512, heads=8, layers=12,
                      seed=0):
    """Random weights in the official layout (ViT-B/32's sizes by default): tests, smoke runs."""
    with torch.random.fork_rng():  # leave the caller's random stream untouched
        torch.manual_seed(seed)
        return CLIP(embed_dim, image_resolution, vision_layers, vision_width, patch, context_length,
                    vocab_size, width, heads, layers).state_dict()

# -----------------------------------------------------------------------------
# files: the one user-facing error, atomic writes, downloads, the cache (data_nyu.py uses them too)

class UserError(Exception):
    """A problem the user can fix (a bad file, a failed download, a flag that cannot work here).
    The message reads "<file or flag>: <problem>"; the scripts print it as one `error:` line."""

def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path over path: a crash never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes it 0600; give it what a plain open() would: 0666 - umask
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
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
    """$XDG_CACHE_HOME/<sub>, default ~/.cache/<sub>; openai's package caches in ~/.cache/clip."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / sub

def sha256sum(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

def download(url, dest, sha256=None, retries=3):
    """Fetch url to dest: resumes dest.part with HTTP Range, shows progress on stderr, checks sha256
    when given, and renames into place only when complete. Raises UserError("dest: problem"), which
    also says where a copy fetched by hand goes."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    by_hand = f"; fetch it by hand from that URL and put it at {dest}"  # the way out, offline
    by_hand += f" (SHA-256 {sha256})" if sha256 else ""
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
                        if time.time() - last > 0.5 or done == total:  # progress, twice a second
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
                problem = f"HTTP {e.code} {e.reason}"
                raise UserError(f"{dest}: download from {url} failed: {problem}{by_hand}")
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # cut: resume
            if attempt == retries:
                reason = getattr(e, "reason", e)
                raise UserError(f"{dest}: download from {url} failed: {reason}{by_hand}") from None
        print(f"{dest.name}: retrying ({attempt + 1}/{retries})", file=sys.stderr)
        time.sleep(0.5 * (attempt + 1))
    got = sha256sum(part) if sha256 else None
    if got != sha256:
        part.unlink()
        raise UserError(f"{dest}: download from {url} failed: SHA-256 mismatch (expected {sha256}, "
                        f"got {got}); removed the download{by_hand}")
    os.replace(part, dest)
    return dest

# -----------------------------------------------------------------------------
# reading the official TorchScript archive without TorchScript

class _Module:
    """Stands in for every __torch__.* class in the archive: it keeps the attributes it gets."""
    def __setstate__(self, state):
        self.__dict__.update(state)

def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, *_):
    return storage.as_strided(size, stride, offset)

class _ArchiveUnpickler(pickle.Unpickler):
    """Rebuilds tensors from the data/ storages and refuses every global it does not know."""
    dtypes = {"HalfStorage": torch.float16, "FloatStorage": torch.float32, "BoolStorage": torch.bool,
              "DoubleStorage": torch.float64, "BFloat16Storage": torch.bfloat16,
              "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
              "CharStorage": torch.int8, "ByteStorage": torch.uint8}

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
    """The tensors of a TorchScript archive, as torch.jit.load(path).state_dict() gives them."""
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if not pkl:
            raise ValueError("no data.pkl in the archive")
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
    """A state dict from OpenAI's TorchScript archive (read, never run) or a torch.save file."""
    if zipfile.is_zipfile(path):  # so are torch.save files; only TorchScript ones hold constants.pkl
        with zipfile.ZipFile(path) as zf:
            if any(n.endswith("constants.pkl") for n in zf.namelist()):
                return read_torchscript_state_dict(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("a torch.save file, but not a state dict of tensors")
    return sd

def load(name_or_path="ViT-B/32", device="cpu"):
    """CLIP in eval mode, fp32: a model name (downloaded to the cache), a path to the official
    TorchScript archive or to a torch.save'd state dict, or "random" (random weights, offline)."""
    if name_or_path == "random":
        return build_model(random_state_dict()).to(device)
    if name_or_path in MODELS:
        path = cache_dir() / MODELS[name_or_path].split("/")[-1]
        sha = official_sha256(name_or_path)
        if path.exists() and sha256sum(path) != sha:
            print(f"{path}: SHA-256 does not match {sha}; downloading it again", file=sys.stderr)
            path.unlink()
        if not path.exists():
            download(MODELS[name_or_path], path, sha256=sha)
    else:
        path = Path(name_or_path)
        if not path.is_file():
            names = ", ".join([*MODELS, "random"])
            raise UserError(f"{path}: no such file (and not a model name: {names})")
    try:
        return build_model(load_state_dict(path)).to(device)
    except Exception as e:  # zip, pickle, torch.load and shape errors all become one clear line
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        raise UserError(f"{path}: not a CLIP ViT weights file, i.e. OpenAI's TorchScript archive "
                        f"or a torch.save'd state dict ({detail})") from None

# -----------------------------------------------------------------------------
# image preprocessing (PIL + numpy; byte-identical to torchvision on PIL images)

def preprocess(image, size=224):
    """PIL image -> (3, size, size) float tensor: bicubic resize of the short side to size, centre
    crop, RGB, CLIP's normalisation."""
    w, h = image.size
    if w < h:
        image = image.resize((size, int(size * h / w)), resample=3)  # bicubic; long side floored
    else:
        image = image.resize((int(size * w / h), size), resample=3)
    w, h = image.size
    top, left = round((h - size) / 2), round((w - size) / 2)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, s, s)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)

# -----------------------------------------------------------------------------
# the BPE tokenizer (openai/CLIP's simple_tokenizer.py)

@lru_cache()
def bytes_to_unicode():
    """Byte -> printable unicode character, so that BPE never sees whitespace or control codes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:  # the other 68 bytes map to U+0100, U+0101, ... in byte order
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs)))

def vocab_path():
    """The vocabulary shipped beside this file; if that copy is missing or fails its SHA-256 check, the
    cache's copy, downloaded from openai/CLIP (SHA-256 checked) when it is absent or wrong too."""
    if VOCAB_PATH.is_file() and sha256sum(VOCAB_PATH) == VOCAB_SHA256:
        return VOCAB_PATH
    path = cache_dir() / VOCAB_PATH.name
    print(f"{VOCAB_PATH}: missing or not the official file (SHA-256 {VOCAB_SHA256}); using {path}",
          file=sys.stderr)
    if not path.is_file() or sha256sum(path) != VOCAB_SHA256:
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
        """Merge the adjacent pair learned first, until no pair is in the merge list. One merge
        at a time, leftmost first: the same result as openai's merging of every occurrence per
        round, as a pair made from a merged symbol was always learned after that symbol's merge."""
        if token not in self.cache:
            word = list(token[:-1]) + [token[-1] + "</w>"]
            while len(word) > 1:
                ranks = [self.bpe_ranks.get(pair, math.inf) for pair in zip(word, word[1:])]
                i = ranks.index(min(ranks))  # the leftmost of the best pairs
                if ranks[i] == math.inf:
                    break
                word[i:i + 2] = [word[i] + word[i + 1]]
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
                raise ValueError(f"text {i} is {len(ids)} tokens, longer than context_length="
                                 f"{context_length}: {text[:40]!r}... (truncate=True cuts it)")
            ids = ids[:context_length]
            ids[-1] = tok.eot
        out[i, :len(ids)] = torch.tensor(ids)
    return out

# -----------------------------------------------------------------------------

if __name__ == "__main__":  # zero-shot classification of one image
    import argparse
    from PIL import Image
    p = argparse.ArgumentParser(description="Zero-shot: how well each label describes the image.")
    p.add_argument("image", help="a picture file, e.g. CLIP.png")
    p.add_argument("labels", nargs="+", help='two or more labels, e.g. "a diagram" "a dog"')
    p.add_argument("--clip", default="ViT-B/32", help="ViT-B/32 (downloaded once, 354 MB), a "
                   "weights file, or random (offline, meaningless scores) (default: %(default)s)")
    args = p.parse_args()
    try:
        model = load(args.clip)
        image = preprocess(Image.open(args.image)).unsqueeze(0)  # (1, 3, 224, 224)
    except (UserError, OSError) as e:
        sys.exit(f"error: {e}")
    with torch.no_grad():
        probs = model(image, tokenize(args.labels))[0].softmax(dim=-1)[0]
    for label, prob in zip(args.labels, probs.tolist()):
        print(f"{prob:8.4f}  {label}")
