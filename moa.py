"""
MoA-DepthCLIP (arXiv 2604.01118): monocular depth from a frozen CLIP ViT-B/32 with Mixture-of-Adapters.

Read top to bottom, this file follows the paper's Figure 1:
  image -> CLIP ViT-B/32 (blocks 0-7 frozen, 8-11 fine-tuned) with a MoA module after blocks 2, 5, 8, 11
        -> mean of the four MoA outputs' patch tokens                   (B, 768, H/32, W/32)
        ++ global scene-context vector from text prompts, broadcast     (B, 512, H/32, W/32)
        -> dual head: 128-bin classification (softmax-weighted bin centres) and positive regression
        -> final depth = fusion of the two maps, upsampled to the output size
and the loss L = 1.0 CE(bins) + 1.0 L1(regression) + 0.5 SILog(regression).
Every choice the paper leaves open is a DepthConfig field, marked GUESS, and listed in the README.

    import clip_vit, moa
    model = moa.MoADepthCLIP(clip_vit.load("ViT-B/32"), moa.DepthConfig())
    out = model(images)                      # images (B, 3, 224, 224) CLIP-normalised
    out["depth"]                             # (B, 1, 224, 224) metres
"""
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_vit

try:  # the fused Triton kernel (kernels/), used on CUDA
    from kernels.fused_moa import fused_moa
except ImportError:  # no triton installed: PyTorch only
    fused_moa = None
MOA_IMPL = "auto"  # "auto": the Triton kernel on CUDA, PyTorch elsewhere; "triton" / "torch" force one (--moa-impl)

# the 27 scene types of NYU's official 795-image train split (paper.md §3; GUESS: the paper names only two)
SCENES = ("bedroom", "kitchen", "living room", "bathroom", "dining room", "office", "furniture store",
          "home office", "classroom", "bookstore", "playroom", "study", "reception room", "basement",
          "office kitchen", "study room", "student lounge", "home storage", "conference room", "cafe", "dinette",
          "printer room", "laundry room", "exercise room", "computer lab", "indoor balcony", "foyer")


def runtime(device="auto"):
    """The one place that decides device and compute dtype: bf16 autocast on CUDA, plain fp32 on CPU."""
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    return device, (torch.bfloat16 if device.type == "cuda" else None)

# -----------------------------------------------------------------------------
# the Mixture-of-Adapters layer (paper §3.1, Fig. 2)


def moa_reference(x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b, top_k, temperature):
    """The MoA layer in plain PyTorch; the readable definition and the Triton kernel's oracle.
    x (..., D); gate_w1 (H, D); gate_w2 (E, H); down_w (E, R, D); up_w (E, D, R). Returns (y, gates)."""
    E = down_w.shape[0]
    h = F.relu(F.linear(x, gate_w1, gate_b1))                       # (..., H)
    logits = F.linear(h, gate_w2, gate_b2) / temperature             # (..., E)   G(x) / tau
    if top_k < E:  # keep the top_k logits, ties to the lower expert index (a stable sort), mask the rest
        idx = logits.sort(dim=-1, descending=True, stable=True).indices[..., :top_k]
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    gates = logits.softmax(dim=-1)                                   # (..., E)   g, zeros off the top_k
    z = F.gelu(torch.einsum("...d,erd->...er", x, down_w) + down_b)  # (..., E, R) exact erf GELU
    experts = torch.einsum("...er,edr->...ed", z, up_w) + up_b       # (..., E, D) Expert_k(x)
    y = x + torch.einsum("...e,...ed->...d", gates, experts)         # (..., D)   x + sum_k g_k Expert_k(x)
    return y, gates


class MoA(nn.Module):
    """K bottleneck experts (D -> R -> D, GELU) mixed per token by a gate MLP (D -> H -> K, ReLU), plus the
    residual. top_k=None routes densely over all experts, as in the paper. gated=False is one plain adapter
    (the "Our Baseline" row of Table 1)."""

    def __init__(self, dim=768, num_experts=4, bottleneck=64, gate_hidden=128, top_k=None, temperature=2.0,
                 gated=True):
        super().__init__()
        E, R, H, D = num_experts, bottleneck, gate_hidden, dim
        self.top_k, self.temperature, self.gated = top_k or E, temperature, gated
        if gated:
            self.gate_w1, self.gate_b1 = nn.Parameter(torch.empty(H, D)), nn.Parameter(torch.empty(H))
            self.gate_w2, self.gate_b2 = nn.Parameter(torch.empty(E, H)), nn.Parameter(torch.empty(E))
        self.down_w, self.down_b = nn.Parameter(torch.empty(E, R, D)), nn.Parameter(torch.empty(E, R))
        self.up_w, self.up_b = nn.Parameter(torch.zeros(E, D, R)), nn.Parameter(torch.zeros(E, D))
        gate = [(self.gate_w1, self.gate_b1), (self.gate_w2, self.gate_b2)] if gated else []
        for w, b in gate + [(self.down_w, self.down_b)]:  # nn.Linear's default init, one expert at a time
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        # up_w and up_b start at zero, so a freshly inserted MoA is exactly the identity: the pretrained CLIP
        # features flow through unchanged at step 0 and the adapters grow from there (Houlsby et al.).
        self.last_entropy = torch.zeros(())

    def forward(self, x):  # x (B, L, D)
        if not self.gated:
            return x + F.linear(F.gelu(F.linear(x, self.down_w[0], self.down_b[0])), self.up_w[0], self.up_b[0])
        use_triton = MOA_IMPL == "triton" or (MOA_IMPL == "auto" and x.is_cuda and fused_moa is not None)
        weights = (self.gate_w1, self.gate_b1, self.gate_w2, self.gate_b2,
                   self.down_w, self.down_b, self.up_w, self.up_b)
        if use_triton:
            try:  # the kernel takes one dtype: under autocast, cast the fp32 weights to the activations'
                y, gates = fused_moa(x, *(w.to(x.dtype) for w in weights), self.top_k, self.temperature)
            except Exception as e:  # a compile or launch failure on this GPU / triton: name the way out
                msg = " ".join(str(e).split())[:200]
                raise clip_vit.UserError(f"--moa-impl {MOA_IMPL}: the Triton MoA kernel failed here "
                                         f"({type(e).__name__}: {msg}); rerun with --moa-impl torch") from e
        else:
            y, gates = moa_reference(x, *weights, self.top_k, self.temperature)
        g = gates.detach().float()
        self.last_entropy = -(g * g.clamp_min(1e-12).log()).sum(-1).mean()  # monitored only, never a loss
        return y

# -----------------------------------------------------------------------------
# the depth model


@dataclass
class DepthConfig:
    num_experts: int = 4             # K, Table 2 ablates 1, 2, 4, 8, 16
    top_k: int = 0                   # 0 = all experts (the paper's dense routing); our generalisation otherwise
    bottleneck: int = 64             # expert width d_b
    gate_hidden: int = 128           # gate MLP 768 -> 128 -> K
    temperature: float = 2.0         # gate softmax temperature tau
    moa_layers: tuple = (2, 5, 8, 11)  # 0-based, as in the authors' code (GUESS vs Fig. 2's 1-based drawing)
    trainable_blocks: int = 4        # the last 4 image blocks are fine-tuned
    use_moa: bool = True             # False: single adapters, the "Our Baseline" row
    use_context: bool = True         # the global scene-context vector
    num_bins: int = 128              # N, Table 3 ablates 40 ... 200
    bin_spacing: str = "uniform"     # GUESS: "uniform" or "log" centres over [min_depth, max_depth]
    min_depth: float = 1e-3
    max_depth: float = 10.0
    fusion: str = "mean"             # GUESS: "mean" of binned and regressed depth, or "cls" / "reg" alone
    input_size: tuple = (224, 224)   # 224 as in the paper; larger multiples of 32 interpolate the pos-embed
    silog: str = "paper"             # "paper": 10 (Var g + 0.85 Mean g^2); "bts": 10 sqrt(mean g^2 - 0.85 mean(g)^2)
    w_cls: float = 1.0
    w_reg: float = 1.0
    w_silog: float = 0.5


@torch.no_grad()
def scene_context(clip, scenes=SCENES):
    """Paper §3.2: encode "a photo of a {scene}." with the frozen text tower, l2-normalise each, average,
    then renormalise (GUESS: the paper does not say). Returns (embed_dim,)."""
    device = clip.token_embedding.weight.device
    feats = F.normalize(clip.encode_text(clip_vit.tokenize([f"a photo of a {s}." for s in scenes]).to(device)), dim=-1)
    return F.normalize(feats.mean(0), dim=0)


def bin_centres(cfg):
    lo, hi, n = cfg.min_depth, cfg.max_depth, cfg.num_bins
    if cfg.bin_spacing == "log":
        return torch.logspace(math.log10(lo), math.log10(hi), n)
    return torch.linspace(lo, hi, n)


class MoADepthCLIP(nn.Module):
    def __init__(self, clip, cfg=DepthConfig(), context=None):
        super().__init__()
        self.cfg = cfg
        self.visual = clip.visual  # the text tower is used once, below, and not kept
        width = self.visual.conv1.out_channels
        self.moa = nn.ModuleList([
            MoA(width, cfg.num_experts if cfg.use_moa else 1, cfg.bottleneck, cfg.gate_hidden, cfg.top_k or None,
                cfg.temperature, gated=cfg.use_moa) for _ in cfg.moa_layers])
        if cfg.use_context and context is None:
            context = scene_context(clip)
        ctx_dim = context.numel() if cfg.use_context else 0
        self.register_buffer("context", context.float().clone() if cfg.use_context else torch.zeros(0))
        # GUESS (paper gives no head sizes): 1x1 convolutions on the fused (768 + 512)-channel grid
        self.cls_head = nn.Conv2d(width + ctx_dim, cfg.num_bins, kernel_size=1)
        self.reg_head = nn.Conv2d(width + ctx_dim, 1, kernel_size=1)
        self.register_buffer("bins", bin_centres(cfg))
        # freeze all of CLIP, then unfreeze the last blocks of the image tower (0-based 8-11 by default)
        self.visual.requires_grad_(False)
        blocks = self.visual.transformer.resblocks
        blocks[len(blocks) - cfg.trainable_blocks:].requires_grad_(True)

    def features(self, image):
        """(B, 3, H, W) -> mean of the MoA outputs' patch tokens, as a grid (B, width, H/32, W/32)."""
        v, (H, W) = self.visual, image.shape[-2:]
        if H % v.patch_size or W % v.patch_size:
            raise ValueError(f"input {H}x{W}: both sides must be multiples of the patch size {v.patch_size}")
        gh, gw = H // v.patch_size, W // v.patch_size
        first = self.cfg.moa_layers[0]
        with torch.no_grad():  # nothing before the first MoA is trained: skip building its graph
            x = v.embed(image)                                            # (B, 1 + gh*gw, width)
            for block in v.transformer.resblocks[:first]:
                x = block(x)
        levels = []
        for i, block in enumerate(v.transformer.resblocks[first:], start=first):
            x = block(x)
            if i in self.cfg.moa_layers:
                x = self.moa[self.cfg.moa_layers.index(i)](x)            # MoA on every token, CLS included
                levels.append(x[:, 1:])                                   # patch tokens (B, gh*gw, width)
        feat = torch.stack(levels).mean(0)                                # (B, gh*gw, width)
        return feat.transpose(1, 2).reshape(image.shape[0], -1, gh, gw)

    def forward(self, image, out_size=None):
        out_size = out_size or image.shape[-2:]
        f = self.features(image)                                          # (B, 768, gh, gw)
        if self.cfg.use_context:
            c = self.context.to(f.dtype).view(1, -1, 1, 1).expand(f.shape[0], -1, *f.shape[-2:])
            f = torch.cat([f, c], dim=1)                                  # (B, 768 + 512, gh, gw)
        logits = F.interpolate(self.cls_head(f), size=out_size, mode="bilinear", align_corners=False)  # (B, N, H, W)
        depth_cls = (logits.float().softmax(1) * self.bins.view(1, -1, 1, 1)).sum(1, keepdim=True)       # (B, 1, H, W)
        reg = torch.sigmoid(self.reg_head(f).float()) * self.cfg.max_depth  # GUESS: positive, capped at 10 m
        depth_reg = F.interpolate(reg, size=out_size, mode="bilinear", align_corners=False)
        depth_reg = depth_reg.clamp_min(self.cfg.min_depth)
        depth = {"mean": 0.5 * (depth_cls + depth_reg), "cls": depth_cls, "reg": depth_reg}[self.cfg.fusion]
        return {"depth": depth, "depth_cls": depth_cls, "depth_reg": depth_reg, "logits": logits}

    def gate_entropy(self):
        return torch.stack([m.last_entropy for m in self.moa]).mean().item() if self.cfg.use_moa else 0.0

# -----------------------------------------------------------------------------
# the loss (paper §3.4)


def silog(pred, gt, form="paper"):
    g = torch.log(pred) - torch.log(gt)  # over valid pixels, both >= min_depth so no log(0)
    if form == "bts":
        return 10 * torch.sqrt((g.pow(2).mean() - 0.85 * g.mean().pow(2)).clamp_min(1e-12))
    return 10 * (g.var(unbiased=False) + 0.85 * g.mean().pow(2))


def depth_loss(out, depth, mask, cfg):
    """out from MoADepthCLIP.forward; depth (B, 1, H, W) metres; mask (B, 1, H, W) bool. Returns (loss, terms)."""
    valid = mask & (depth > cfg.min_depth) & (depth < cfg.max_depth)
    if not valid.any():  # an all-hole batch: a zero that still backpropagates, never NaN
        zero = out["depth"].sum() * 0
        return zero, {"cls": 0.0, "l1": 0.0, "silog": 0.0}
    bins = bin_centres(cfg).to(out["logits"].device)
    if cfg.bin_spacing == "log":
        edges = (bins[1:] * bins[:-1]).sqrt()
    else:
        edges = (bins[1:] + bins[:-1]) / 2
    target = torch.bucketize(depth[valid], edges)                         # the bin that holds the ground truth
    logits = out["logits"].float().permute(0, 2, 3, 1)[valid[:, 0]]      # (n_valid, N)
    l_cls = F.cross_entropy(logits, target)
    pred, gt = out["depth_reg"][valid], depth[valid]
    l_l1 = (pred - gt).abs().mean()
    l_silog = silog(pred, gt, cfg.silog)
    loss = cfg.w_cls * l_cls + cfg.w_reg * l_l1 + cfg.w_silog * l_silog
    return loss, {"cls": l_cls.item(), "l1": l_l1.item(), "silog": l_silog.item()}

# -----------------------------------------------------------------------------
# parameters: the report, and the trainable-only state dict that checkpoints hold


def parameter_report(model):
    """Rows of (part, trainable, frozen) and a printable table."""
    n_blocks = len(model.visual.transformer.resblocks)
    k = model.cfg.trainable_blocks
    parts = {f"CLIP image blocks {n_blocks - k}-{n_blocks - 1}": [], "CLIP image tower, other": [],
             f"MoA modules ({len(model.moa)})": [], "depth heads": []}
    names = list(parts)
    for name, p in model.named_parameters():
        if name.startswith("moa."):
            parts[names[2]].append(p)
        elif "_head." in name:
            parts[names[3]].append(p)
        elif name.startswith("visual.transformer.resblocks.") and int(name.split(".")[3]) >= n_blocks - k:
            parts[names[0]].append(p)
        else:
            parts[names[1]].append(p)
    rows = [(n, sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps if not p.requires_grad))
            for n, ps in parts.items()]
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    table = "\n".join(f"| {n:<28} | {t:>12,} | {f:>12,} |" for n, t, f in rows)
    return rows, f"| {'part':<28} | {'trainable':>12} | {'frozen':>12} |\n|{'-' * 30}|{'-' * 14}|{'-' * 14}|\n{table}"


def trainable_state_dict(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model, sd):
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [n for n in own if n in sd and sd[n].shape != own[n].shape]
    if missing or extra or shapes:
        raise ValueError(f"checkpoint does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"wrong shape {shapes[:3]}")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(sd[n])

# -----------------------------------------------------------------------------
# checkpoints: the trainable parameters, the config, and the identity of the frozen CLIP weights


def clip_sha256(name_or_path):
    """The identity of the CLIP weights a run used: the official SHA-256, or the file's, or "random"."""
    if name_or_path == "random":
        return "random"
    if name_or_path in clip_vit.MODELS:
        return clip_vit.official_sha256(name_or_path)
    return clip_vit.sha256sum(name_or_path)


def save_checkpoint(path, model, **extra):
    """Atomically write the trainable parameters, the DepthConfig and `extra` (clip id, optimizer, ...)."""
    ckpt = {"model": trainable_state_dict(model), "model_config": asdict(model.cfg), **extra}
    clip_vit.atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise clip_vit.UserError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise clip_vit.UserError(f"{path}: not a readable checkpoint ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "clip"} <= set(ckpt):
        raise clip_vit.UserError(f"{path}: not a MoA-DepthCLIP checkpoint (expected keys model, model_config, clip)")
    return ckpt


def check_clip(ckpt, clip_arg, sha, where):
    """The checkpoint must have been trained on the CLIP weights whose SHA-256 is `sha`."""
    if sha != ckpt["clip"]["sha256"]:
        raise clip_vit.UserError(f"{where}: trained on CLIP weights {ckpt['clip']['sha256'][:12]}..., "
                                 f"but {clip_arg} has {sha[:12]}...")


def from_checkpoint(ckpt, clip_arg=None, device="cpu", where="checkpoint"):
    """Rebuild a trained model: the CLIP weights (SHA-256 checked against the checkpoint) + its trainable part."""
    clip_arg = clip_arg or ckpt["clip"]["name"]
    clip = clip_vit.load(clip_arg)
    check_clip(ckpt, clip_arg, clip_sha256(clip_arg), where)
    cfg = DepthConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["model_config"].items()})
    try:
        model = MoADepthCLIP(clip, cfg)
        load_trainable_state_dict(model, ckpt["model"])
    except (ValueError, TypeError, RuntimeError) as e:
        raise clip_vit.UserError(f"{where}: {e}") from None
    return model.to(device).eval()
