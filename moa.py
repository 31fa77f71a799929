"""
MoA-DepthCLIP (arXiv 2604.01118), monocular depth from CLIP with Mixture-of-Adapters, as in Fig. 1:
  image -> CLIP ViT-B/32 (blocks 8-11 fine-tuned), a MoA module after blocks 2, 5, 8 and 11
        -> mean of the four MoA outputs' patch tokens                  (B, 768, H/32, W/32)
        ++ scene-context vector from text prompts, broadcast           (B, 512, H/32, W/32)
        -> dual head: 128-bin classification and regression, fused, upsampled: depth (B, 1, H, W)
with the loss 1.0 CE(bins) + 1.0 L1 + 0.5 SILog (regression). Table 1's baselines use DepthCLIP's
similarity head and the authors' composite loss. Each choice left open is a DepthConfig field
marked GUESS (docs/paper-notes.md §2). Use: MoADepthCLIP(clip, DepthConfig())(images)["depth"]
"""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_vit
from clip_vit import UserError
from kernels.fused_moa import fused_moa  # the fused Triton MoA kernel, used on CUDA

MOA_IMPL = "auto"  # "auto": Triton on CUDA, PyTorch elsewhere; "triton" or "torch" force one
EPS = 1e-12  # keeps the BTS SILog's sqrt differentiable at 0
# the 27 scene types of NYU's official 795-frame train split (GUESS G10: the paper names two)
SCENES = ("bedroom", "kitchen", "living room", "bathroom", "dining room", "office",
          "furniture store", "home office", "classroom", "bookstore", "playroom", "study",
          "reception room", "basement", "office kitchen", "study room", "student lounge",
          "home storage", "conference room", "cafe", "dinette", "printer room", "laundry room",
          "exercise room", "computer lab", "indoor balcony", "foyer")
# DepthCLIP's words and bin depths (metres) for "This object is {word}"; the 10-bin set adds 3 (G24)
DISTANCES = (("giant", 1.00), ("extremely close", 1.50), ("close", 2.00), ("not in distance", 2.25),
             ("a little remote", 2.50), ("far", 2.75), ("unseen", 3.00), ("very far", 4.00),
             ("extremely far", 5.00), ("far away", 6.00))
CLIP_SCALE, SIM_TEMPERATURE = 100.0, 0.1  # DepthCLIP's logits: 100 * cosine / 0.1
COMPOSITE_MIN_GT, SSIM_C1, SSIM_C2 = 1e-8, 0.01 ** 2, 0.03 ** 2  # composite loss: valid gt, SSIM
W_COMPOSITE = {"silog": 1.0, "grad": 0.5, "ssim": 0.2, "l1": 0.1}  # and the weights of its terms
CHOICES = {"fusion": ("mean", "cls", "reg"), "loss": ("paper", "composite"), "sim_bins": (7, 10),
           "head": ("dual", "similarity"), "bin_spacing": ("uniform", "log"),
           "silog": ("paper", "bts")}  # what these DepthConfig fields accept: train.py's choices
OUTPUTS = {"depth": "fused", "depth_cls": "binned", "depth_reg": "regressed"}  # forward's maps


def runtime(device="auto"):
    """The one place that decides device and dtype: bf16 autocast on CUDA, fp32 on the CPU."""
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    here = ["cpu", "cuda", *gpus] if gpus else ["cpu"]  # "cuda": the current GPU
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device not in here:
        raise UserError(f"--device {device}: not on this machine (torch {torch.__version__} sees "
                        f"{len(gpus)} CUDA GPUs); use one of auto, {', '.join(here)}")
    return torch.device(device), (None if device == "cpu" else torch.bfloat16)  # autocast dtype


# -----------------------------------------------------------------------------
# the Mixture-of-Adapters layer (paper §3.1, Fig. 2)
def moa_reference(x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b,
                  top_k, temperature):
    """The MoA layer in plain PyTorch, the Triton kernel's oracle; top_k in 1..E. -> (y, gates).
    x (..., D); gate_w1 (H, D); gate_w2 (E, H); down_w (E, R, D); up_w (E, D, R)."""
    h = F.relu(F.linear(x, gate_w1, gate_b1))                        # (..., H)
    logits = F.linear(h, gate_w2, gate_b2) / temperature              # (..., E)    G(x) / tau
    if top_k < down_w.shape[0]:  # keep the top_k logits; ties: the lower expert (stable sort)
        idx = logits.sort(dim=-1, descending=True, stable=True).indices[..., :top_k]
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    gates = logits.softmax(dim=-1)                                    # (..., E)    g, 0 off top_k
    z = F.gelu(torch.einsum("...d,erd->...er", x, down_w) + down_b)   # (..., E, R) exact erf GELU
    experts = torch.einsum("...er,edr->...ed", z, up_w) + up_b        # (..., E, D) Expert_k(x)
    y = x + torch.einsum("...e,...ed->...d", gates, experts)          # (..., D)    x + sum g_k E_k
    return y, gates


def linear_init(*shape, fan_in):  # a parameter drawn like nn.Linear's: uniform in +-1/sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-fan_in ** -0.5, fan_in ** -0.5))


class MoA(nn.Module):
    """K bottleneck experts (D -> R -> D, GELU) mixed per token by a gate MLP (D -> H -> K, ReLU),
    plus the residual. top_k = 0: all experts (the paper). gated=False: one plain adapter."""

    def __init__(self, dim, num_experts, bottleneck, gate_hidden, top_k, temperature, gated=True):
        super().__init__()
        E, R, H, D = num_experts, bottleneck, gate_hidden, dim
        self.top_k, self.temperature, self.gated = top_k, temperature, gated
        if gated:  # the gate MLP D -> H -> E
            self.gate_w1, self.gate_b1 = linear_init(H, D, fan_in=D), linear_init(H, fan_in=D)
            self.gate_w2, self.gate_b2 = linear_init(E, H, fan_in=H), linear_init(E, fan_in=H)
        self.down_w, self.down_b = linear_init(E, R, D, fan_in=D), linear_init(E, R, fan_in=D)
        # up_w and up_b start at zero, so a fresh MoA is exactly the identity: the pretrained
        # features flow through unchanged at step 0 and the adapters grow from there (Houlsby)
        self.up_w, self.up_b = nn.Parameter(torch.zeros(E, D, R)), nn.Parameter(torch.zeros(E, D))
        self.last_entropy = torch.zeros(())

    def forward(self, x):  # x (B, L, D), fp32 also under autocast: the residual sum stays fp32
        if not self.gated:
            z = F.gelu(F.linear(x, self.down_w[0], self.down_b[0]))  # (B, L, R)
            return x + F.linear(z, self.up_w[0], self.up_b[0])       # (B, L, D)
        top_k = self.top_k or self.down_w.shape[0]  # 0 = all experts; reference and kernel: a count
        weights = (self.gate_w1, self.gate_b1, self.gate_w2, self.gate_b2,
                   self.down_w, self.down_b, self.up_w, self.up_b)
        if MOA_IMPL == "triton" or (MOA_IMPL == "auto" and x.is_cuda):
            try:  # the fp32 stream and fp32 weights as they are: the kernel casts for its matmuls
                y, gates = fused_moa(x, *weights, top_k, self.temperature)
            except Exception as e:  # a compile or launch failure on this GPU / triton: the way out
                msg = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
                raise UserError(f"--moa-impl {MOA_IMPL}: the Triton MoA kernel failed here "
                                f"({msg}); rerun with --moa-impl torch") from e
        else:
            y, gates = moa_reference(x, *weights, top_k, self.temperature)
        g = gates.detach().float()  # monitored, not a loss: -sum g log g, one op per step (entr)
        self.last_entropy = torch.special.entr(g).sum(-1).mean()
        return y


# -----------------------------------------------------------------------------
# the depth model
@dataclass
class DepthConfig:
    num_experts: int = 4             # K, Table 2 ablates 1, 2, 4, 8, 16
    top_k: int = 0                   # 0 = all experts (the paper); k < K: our generalisation
    bottleneck: int = 64             # expert width d_b
    gate_hidden: int = 128           # gate MLP 768 -> 128 -> K
    temperature: float = 2.0         # gate softmax temperature tau
    moa_layers: tuple = (2, 5, 8, 11)  # 0-based, as in the authors' code (GUESS G9)
    trainable_blocks: int = 4        # the last 4 image blocks are fine-tuned
    use_moa: bool = True             # False: single adapters, the "Our Baseline" row
    use_context: bool = True         # the global scene-context vector (dual head only)
    head: str = "dual"               # "dual": bins + regression; "similarity": DepthCLIP's head
    sim_bins: int = 7                # GUESS G24: similarity bins, 7 (DepthCLIP's) or 10 (paper)
    num_bins: int = 128              # N of the dual head, Table 3 ablates 40 ... 200
    bin_spacing: str = "uniform"     # GUESS G3: "uniform" or "log" over [min_depth, max_depth]
    min_depth: float = 1e-3
    max_depth: float = 10.0
    fusion: str = "mean"             # GUESS G2: "mean" of binned and regressed, or "cls"/"reg"
    input_size: tuple = (224, 224)   # as in the paper; other multiples of 32 resize the pos-embed
    loss: str = "paper"              # "paper": §3.4's CE + L1 + SILog; "composite": Table 1's
    silog: str = "paper"             # GUESS G6: "paper" 10 (Var + 0.85 Mean^2); "bts" 10 sqrt(..)
    w_cls: float = 1.0
    w_reg: float = 1.0
    w_silog: float = 0.5

    def __post_init__(self):  # the similarity head has no input that the context could join
        if self.head == "similarity" and self.use_context:
            raise UserError("--head similarity: it has no context input; add --use-context 0")


@torch.no_grad()
def prompt_embeddings(clip, texts):
    """Texts -> (len(texts), embed_dim) unit vectors from the frozen text tower."""
    ids = clip_vit.tokenize(texts).to(clip.token_embedding.weight.device)  # (n, 77) SOT .. EOT 0 ..
    return F.normalize(clip.encode_text(ids).float(), dim=-1)


def scene_context(clip, scenes=SCENES):
    """Paper §3.2: the mean of the unit "a photo of a {scene}." embeddings, renormalised (G11)."""
    feats = prompt_embeddings(clip, [f"a photo of a {s}." for s in scenes])  # (n_scenes, embed_dim)
    return F.normalize(feats.mean(0), dim=0)


def bin_centres(cfg):  # GUESS G3: uniform or log-spaced over [min_depth, max_depth]
    if cfg.bin_spacing == "log":
        return torch.logspace(math.log10(cfg.min_depth), math.log10(cfg.max_depth), cfg.num_bins)
    return torch.linspace(cfg.min_depth, cfg.max_depth, cfg.num_bins)


class MoADepthCLIP(nn.Module):
    def __init__(self, clip, cfg):
        super().__init__()
        self.cfg, self.visual = cfg, clip.visual  # the text tower is used once, below, and not kept
        width, experts = self.visual.conv1.out_channels, cfg.num_experts if cfg.use_moa else 1
        self.moa = nn.ModuleList([MoA(width, experts, cfg.bottleneck, cfg.gate_hidden, cfg.top_k,
                                      cfg.temperature, gated=cfg.use_moa) for _ in cfg.moa_layers])
        if cfg.head == "similarity":  # DepthCLIP's head: fixed prompts and bin depths, no weights
            words, depths = zip(*DISTANCES[:cfg.sim_bins])
            text = prompt_embeddings(clip, [f"This object is {w}" for w in words])  # (n_bins, 512)
            self.register_buffer("text", text)
            self.register_buffer("bins", torch.tensor(depths))
        else:
            context = scene_context(clip) if cfg.use_context else torch.zeros(0)
            self.register_buffer("context", context)                    # (512,), or (0,) without
            # GUESS G1 (the paper gives no sizes): 1x1 convolutions on the fused 768 + 512 channels
            self.cls_head = nn.Conv2d(width + len(context), cfg.num_bins, kernel_size=1)
            self.reg_head = nn.Conv2d(width + len(context), 1, kernel_size=1)
            self.register_buffer("bins", bin_centres(cfg))
        self.visual.requires_grad_(False)  # freeze CLIP, then unfreeze its last blocks (8-11)
        blocks = self.visual.transformer.resblocks
        blocks[len(blocks) - cfg.trainable_blocks:].requires_grad_(True)

    def features(self, image):
        """(B, 3, H, W) -> mean of the MoA outputs' patch tokens, a grid (B, width, H/32, W/32)."""
        v, (H, W) = self.visual, image.shape[-2:]                       # H, W: multiples of 32
        gh, gw = H // v.patch_size, W // v.patch_size
        x = v.embed(image).float()  # (B, 1 + gh*gw, width), fp32 also under autocast (G22)
        levels = []
        for i, block in enumerate(v.transformer.resblocks):
            x = block(x)
            if i in self.cfg.moa_layers:
                x = self.moa[self.cfg.moa_layers.index(i)](x)           # every token, CLS included
                levels.append(x[:, 1:])                                  # (B, gh*gw, width) patches
        feat = torch.stack(levels).mean(0)                               # (B, gh*gw, width)
        return feat.transpose(1, 2).reshape(image.shape[0], -1, gh, gw)

    def forward(self, image):
        f = self.features(image)                                         # (B, 768, gh, gw)
        if self.cfg.head == "similarity":
            return self.similarity(f, image.shape[-2:])
        c = self.context.to(f.dtype)[None, :, None, None].expand(f.shape[0], -1, *f.shape[-2:])
        f = torch.cat([f, c], dim=1)  # (B, 768 + 512, gh, gw); without the context: f unchanged
        up = dict(size=image.shape[-2:], mode="bilinear", align_corners=False)
        logits = F.interpolate(self.cls_head(f).float(), **up)          # (B, N, H, W)
        depth_cls = (logits.softmax(1) * self.bins.view(1, -1, 1, 1)).sum(1, keepdim=True)
        reg = torch.sigmoid(self.reg_head(f).float()) * self.cfg.max_depth  # GUESS G4: (0, 10) m
        depth_reg = F.interpolate(reg, **up).clamp_min(self.cfg.min_depth)  # (B, 1, H, W)
        fused = {"mean": 0.5 * (depth_cls + depth_reg), "cls": depth_cls, "reg": depth_reg}
        return {"depth": fused[self.cfg.fusion], "depth_cls": depth_cls, "depth_reg": depth_reg,
                "logits": logits}

    def similarity(self, f, out_size):
        """DepthCLIP's head: tokens f (B, 768, gh, gw) -> ln_post, proj (G23) -> cosines -> bins."""
        B, _, gh, gw = f.shape
        tokens = self.visual.ln_post(f.flatten(2).transpose(1, 2))      # (B, gh*gw, 768)
        with torch.autocast(f.device.type, enabled=False):  # cosines x 1000: too coarse in bf16
            emb = F.normalize(tokens.float() @ self.visual.proj.float(), dim=-1)  # (B, gh*gw, 512)
            probs = (CLIP_SCALE * emb @ self.text.T / SIM_TEMPERATURE).softmax(-1)  # (B, gh*gw, n)
        depth = (probs @ self.bins).view(B, 1, gh, gw)                   # metres on the patch grid
        return {"depth": F.interpolate(depth, size=out_size, mode="bilinear", align_corners=False)}

    def gate_entropy(self):  # mean per-token gate entropy of the last forward (0: plain adapters)
        return torch.stack([m.last_entropy for m in self.moa]).mean().item()


# -----------------------------------------------------------------------------
# the losses: the paper's (§3.4), and the authors' earlier composite loss (Table 1 "Comp. Loss")
def silog(pred, gt, form="paper"):
    g = torch.log(pred) - torch.log(gt)  # over valid pixels, both > 0
    if form == "bts":
        return 10 * torch.sqrt((g.pow(2).mean() - 0.85 * g.mean().pow(2)).clamp_min(EPS))
    return 10 * (g.var(unbiased=False) + 0.85 * g.mean().pow(2))


def composite_loss(pred, gt):
    """The authors' earlier loss on the final map pred, gt (B, 1, H, W): SILog (BTS), smoothness of
    pred, (1 - SSIM) / 2 from 3x3 means of reflection-padded maps, clamped to [0, 1], and L1."""
    valid = gt > COMPOSITE_MIN_GT  # depth_loss has made sure that there is such a pixel

    def pool(t):
        return F.avg_pool2d(F.pad(t, (1, 1, 1, 1), mode="reflect"), 3, stride=1)  # (B, 1, H, W)
    mu_p, mu_g = pool(pred), pool(gt)
    var_p, var_g = pool(pred ** 2) - mu_p ** 2, pool(gt ** 2) - mu_g ** 2
    cov = pool(pred * gt) - mu_p * mu_g
    ssim = ((2 * mu_p * mu_g + SSIM_C1) * (2 * cov + SSIM_C2)
            / ((mu_p ** 2 + mu_g ** 2 + SSIM_C1) * (var_p + var_g + SSIM_C2)))
    terms = {"silog": silog(pred[valid], gt[valid], "bts"),
             "grad": pred.diff(dim=-1).abs().mean() + pred.diff(dim=-2).abs().mean(),  # x and y
             "ssim": ((1 - ssim) / 2).clamp(0, 1)[valid].mean(),
             "l1": (pred - gt)[valid].abs().mean()}
    loss = sum(W_COMPOSITE[k] * t for k, t in terms.items())
    return loss, {k: t.item() for k, t in terms.items()}


def depth_loss(out, depth, mask, cfg):
    """(loss, terms) for out of forward, depth (B, 1, H, W) metres, mask (B, 1, H, W). The paper:
    CE on the bin logits, L1 + SILog on the regressed map (the similarity head: on its map)."""
    valid = mask & (depth > cfg.min_depth) & (depth < cfg.max_depth)
    if not valid.any():  # an all-hole batch: a zero that still backpropagates, never NaN, no terms
        return out["depth"].sum() * 0, {}
    if cfg.loss == "composite":  # on the final map, with the authors' own valid mask
        return composite_loss(out["depth"], depth)
    loss, terms = 0.0, {}
    if cfg.head == "dual":
        bins = bin_centres(cfg).to(depth.device)
        log = cfg.bin_spacing == "log"  # edges halfway between centres, geometrically for log bins
        edges = (bins[1:] * bins[:-1]).sqrt() if log else (bins[1:] + bins[:-1]) / 2
        target = torch.bucketize(depth[valid], edges)                   # the bin holding the GT
        logits = out["logits"].float().permute(0, 2, 3, 1)[valid[:, 0]]  # (n_valid, N)
        l_cls = F.cross_entropy(logits, target)
        loss, terms["cls"] = cfg.w_cls * l_cls, l_cls.item()
    pred, gt = out["depth_reg" if cfg.head == "dual" else "depth"][valid], depth[valid]
    l_l1, l_silog = (pred - gt).abs().mean(), silog(pred, gt, cfg.silog)
    loss = loss + cfg.w_reg * l_l1 + cfg.w_silog * l_silog
    return loss, {**terms, "l1": l_l1.item(), "silog": l_silog.item()}


# -----------------------------------------------------------------------------
# parameters and checkpoints: the trainable parameters, the config, the CLIP weights' identity
def parameter_report(model):
    """({module or "total": [trainable, frozen]}, a printable table of them): parameter counts."""
    counts = {}
    for name, p in model.named_parameters():
        row = counts.setdefault(name.split(".")[0], [0, 0])
        row[0 if p.requires_grad else 1] += p.numel()
    counts["total"] = [sum(t for t, _ in counts.values()), sum(f for _, f in counts.values())]
    table = [f"{part:<8} {t:>11,} trainable {f:>11,} frozen" for part, (t, f) in counts.items()]
    return counts, "\n".join(table)


def load_trainable_state_dict(model, sd, where="checkpoint"):
    """Load exactly the trainable tensors, the frozen rest comes from CLIP; a misfit: UserError."""
    own = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    misfits = sorted(n for n in own.keys() | sd.keys() if n not in sd or sd[n].shape != own.get(n))
    if misfits:  # missing, unexpected or of another shape: made with other flags or code
        raise UserError(f"{where}: tensors {misfits[:3]} do not fit this model")
    model.load_state_dict(sd, strict=False)


def clip_sha256(name_or_path):
    """The identity of the CLIP weights of a run: the official SHA-256, the file's, or "random"."""
    if name_or_path in clip_vit.MODELS:
        return clip_vit.official_sha256(name_or_path)
    return "random" if name_or_path == "random" else clip_vit.sha256sum(name_or_path)


def save_checkpoint(path, model, **extra):
    """Atomically write the trainable parameters, the DepthConfig and `extra` (clip id, ...)."""
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ckpt = {"model": trainable, "model_config": asdict(model.cfg), **extra}
    clip_vit.atomic_write(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint file") from None
    except Exception as e:  # a directory, a truncated file, a pickle with code: torch's message
        problem = " ".join(str(e).split())[:200]
        raise UserError(f"{path}: not a readable checkpoint ({problem})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "clip"} <= set(ckpt):
        raise UserError(f"{path}: not a MoA-DepthCLIP checkpoint (no model, model_config, clip)")
    return ckpt


def check_clip(ckpt, clip_arg, sha, where):  # was it trained on the CLIP weights `sha`?
    if sha != ckpt["clip"]["sha256"]:
        raise UserError(f"{where}: trained on CLIP weights {ckpt['clip']['sha256'][:12]}..., "
                        f"but {clip_arg} has {sha[:12]}...")


def from_checkpoint(ckpt, clip_arg=None, device="cpu", where="checkpoint"):
    """Rebuild a trained model: the CLIP weights (SHA-256 checked) plus its trainable part."""
    clip_arg = clip_arg or ckpt["clip"]["name"]
    clip = clip_vit.load(clip_arg)  # a missing or broken file is a UserError here
    check_clip(ckpt, clip_arg, clip_sha256(clip_arg), where)
    unknown = sorted(ckpt["model_config"].keys() - asdict(DepthConfig()).keys())
    if unknown:  # written by a newer version of this code
        raise UserError(f"{where}: model_config fields this version does not know: {unknown}")
    model = MoADepthCLIP(clip, DepthConfig(**ckpt["model_config"]))
    load_trainable_state_dict(model, ckpt["model"], where)
    return model.to(device).eval()
