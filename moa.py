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
import sys
import zipfile
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_vit
from clip_vit import UserError

# auto: Triton on CUDA where it can run, else PyTorch
MOA_IMPLS = ("auto", "triton", "torch")
# the 27 scene types of NYU's official 795-frame train split (GUESS G10: the paper names two)
SCENES = (
    "bedroom",
    "kitchen",
    "living room",
    "bathroom",
    "dining room",
    "office",
    "furniture store",
    "home office",
    "classroom",
    "bookstore",
    "playroom",
    "study",
    "reception room",
    "basement",
    "office kitchen",
    "study room",
    "student lounge",
    "home storage",
    "conference room",
    "cafe",
    "dinette",
    "printer room",
    "laundry room",
    "exercise room",
    "computer lab",
    "indoor balcony",
    "foyer",
)
# DepthCLIP's words and bin depths (metres) for "This object is {word}"; the 10-bin set adds 3 (G24)
DISTANCES = (
    ("giant", 1.00),
    ("extremely close", 1.50),
    ("close", 2.00),
    ("not in distance", 2.25),
    ("a little remote", 2.50),
    ("far", 2.75),
    ("unseen", 3.00),
    ("very far", 4.00),
    ("extremely far", 5.00),
    ("far away", 6.00),
)
# SSIM's stabilising constants
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
OUTPUTS = {"depth": "depth", "depth_cls": "binned", "depth_reg": "regressed"}  # forward's maps


# -----------------------------------------------------------------------------
# the Mixture-of-Adapters layer (paper §3.1, Fig. 2)
def moa_reference(x, gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b, top_k, temperature):
    """The MoA layer in plain PyTorch, the Triton kernel's oracle; top_k in 1..E. -> (y, gates).
    x (..., D); gate_w1 (H, D); gate_w2 (E, H); down_w (E, R, D); up_w (E, D, R)."""
    h = F.relu(F.linear(x, gate_w1, gate_b1))  # (..., H)
    logits = F.linear(h, gate_w2, gate_b2) / temperature  # (..., E)    G(x) / tau
    # keep the top_k logits; ties: the lower expert (stable sort)
    if top_k < down_w.shape[0]:
        idx = logits.sort(dim=-1, descending=True, stable=True).indices[..., :top_k]
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    gates = logits.softmax(dim=-1)  # (..., E)    g, 0 off top_k
    z = F.gelu(torch.einsum("...d,erd->...er", x, down_w) + down_b)  # (..., E, R) exact erf GELU
    experts = torch.einsum("...er,edr->...ed", z, up_w) + up_b  # (..., E, D) Expert_k(x)
    y = x + torch.einsum("...e,...ed->...d", gates, experts)  # (..., D)    x + sum g_k E_k
    return y, gates


# a parameter drawn like nn.Linear's: uniform in +-1/sqrt(fan_in)
def linear_init(*shape, fan_in):
    return nn.Parameter(torch.empty(shape).uniform_(-(fan_in**-0.5), fan_in**-0.5))


class MoA(nn.Module):
    """K bottleneck experts (D -> R -> D, GELU) mixed per token by a gate MLP (D -> H -> K, ReLU),
    plus the residual. top_k = 0: all experts (the paper). gated=False: one plain adapter.
    zero_init=False: the up-projections start from nn.Linear's init, not at zero (G20). notes: a list the
    layers of one model share, so that --moa-impl auto says once why it runs PyTorch."""

    def __init__(
        self,
        dim,
        num_experts,
        bottleneck,
        gate_hidden,
        top_k,
        temperature,
        gated=True,
        impl="auto",
        zero_init=True,
        notes=None,
    ):
        super().__init__()
        if impl not in MOA_IMPLS:
            raise ValueError(f"impl must be one of {MOA_IMPLS}, got {impl!r}")
        # auto: the Triton kernel on CUDA where it can run; triton or torch: that one
        self.impl = impl
        # auto: why the kernel cannot run here, once it has said so
        self.kernel_off = None
        self.notes = [] if notes is None else notes
        self.top_k = top_k
        self.temperature = temperature
        self.gated = gated
        # the gate MLP dim -> gate_hidden -> num_experts
        if gated:
            self.gate_w1 = linear_init(gate_hidden, dim, fan_in=dim)
            self.gate_b1 = linear_init(gate_hidden, fan_in=dim)
            self.gate_w2 = linear_init(num_experts, gate_hidden, fan_in=gate_hidden)
            self.gate_b2 = linear_init(num_experts, fan_in=gate_hidden)
        self.down_w = linear_init(num_experts, bottleneck, dim, fan_in=dim)
        self.down_b = linear_init(num_experts, bottleneck, fan_in=dim)
        # up_w and up_b start at zero, so a fresh MoA is exactly the identity: the pretrained
        # features flow through unchanged at step 0 and the adapters grow from there (Houlsby)
        if zero_init:
            self.up_w = nn.Parameter(torch.zeros(num_experts, dim, bottleneck))
            self.up_b = nn.Parameter(torch.zeros(num_experts, dim))
        # the authors' adapters: nn.Linear's init, so a fresh adapter already moves the features
        else:
            self.up_w = linear_init(num_experts, dim, bottleneck, fan_in=bottleneck)
            self.up_b = linear_init(num_experts, dim, fan_in=bottleneck)
        # (B, L, E) of the last forward
        self.last_gates = None

    # x (B, L, D), fp32 also under autocast: the residual sum stays fp32
    def forward(self, x):
        if not self.gated:
            z = F.gelu(F.linear(x, self.down_w[0], self.down_b[0]))  # (B, L, R)
            return x + F.linear(z, self.up_w[0], self.up_b[0])  # (B, L, D)
        # gate_w1, gate_b1, gate_w2, gate_b2, down_w, down_b, up_w, up_b: moa_reference's order
        weights = tuple(self.parameters())
        # 0 = all experts; reference and kernel: a count
        top_k = self.top_k or self.down_w.shape[0]
        if self.impl == "triton" or (self.impl == "auto" and x.is_cuda and not self.kernel_off):
            y, gates = self.fused(x, weights, top_k)
        else:
            y, gates = moa_reference(x, *weights, top_k, self.temperature)
        # kept for the log's gate entropy and evaluate.py's expert maps, not a loss
        self.last_gates = gates.detach().float()
        return y

    def fused(self, x, weights, top_k):
        """The Triton kernel. Where it cannot run here (GPU, shape, shared memory), auto runs the PyTorch MoA
        from then on and says why in one line per model (notes); triton stops with one error line."""
        # imported on first use: importing triton takes seconds
        from kernels import fused_moa as fm

        # the fp32 stream and fp32 weights as they are: the kernel casts for its matmuls
        try:
            if self.impl == "auto":
                fm.check_auto(x)
            return fm.fused_moa(x, *weights, top_k, self.temperature)
        except Exception as e:
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            # a bad argument or a failure of the kernel itself: the way out
            if not isinstance(e, fm.CANNOT_RUN):
                raise UserError(
                    f"--moa-impl {self.impl}: the Triton MoA kernel failed here ({reason}); "
                    "rerun with --moa-impl torch"
                ) from e
            if self.impl == "triton":
                raise UserError(
                    f"--moa-impl triton: the Triton MoA kernel cannot run here ({reason}); "
                    "use --moa-impl auto or torch"
                ) from e
            self.kernel_off = reason
            if not self.notes:
                print(
                    f"note: --moa-impl auto: the PyTorch MoA runs instead of the Triton kernel ({reason})",
                    file=sys.stderr,
                )
            self.notes.append(reason)
            return moa_reference(x, *weights, top_k, self.temperature)


# -----------------------------------------------------------------------------
# the depth model
def option(default, help, choices=None, low=None, metavar=None):
    """A config field: its default, what it means and the values it may take. train.py makes a flag of
    each field (cli.add_options), so this is the one place a setting is written."""
    return field(default=default, metadata={"help": help, "choices": choices, "low": low, "metavar": metavar})


@dataclass
class DepthConfig:
    """The model and its loss. Defaults are the paper's; GUESS Gn marks a choice the paper leaves open
    (docs/paper-notes.md §2)."""

    num_experts: int = option(4, "experts K per MoA layer (Table 2 ablates 1, 2, 4, 8, 16)", low=1)
    top_k: int = option(0, "experts each token mixes; 0 = all experts (the paper)", low=0)
    bottleneck: int = option(64, "expert width d_b, channels", low=1)
    gate_hidden: int = option(128, "hidden width of the gate MLP (768 -> H -> K), channels", low=1)
    temperature: float = option(2.0, "gate softmax temperature tau")
    moa_layers: tuple = option((2, 5, 8, 11), "0-based image blocks followed by a MoA, 0..11 (G9)")
    trainable_blocks: int = option(4, "last image blocks fine-tuned, 0..12", low=0)
    use_moa: bool = option(True, "MoA modules; 0 = one plain adapter each (Table 1's baseline)")
    use_context: bool = option(True, "append the text scene-context vector (dual head only)")
    head: str = option(
        "dual", "the paper's dual head, or DepthCLIP's similarity head", ("dual", "similarity")
    )
    sim_bins: int = option(7, "similarity-head bins: DepthCLIP's 7 or the paper's 10 (G24)", (7, 10))
    sim_proj: str = option(
        "clip",
        "the similarity head's 768 -> 512 map: CLIP's ln_post + proj, or the authors' random frozen "
        "nn.Linear (G23)",
        ("clip", "random"),
    )
    adapter_init: str = option(
        "zero",
        "the adapters' up-projections: zero (identity at start) or nn.Linear's init, the authors' (G20)",
        ("zero", "default"),
    )
    num_bins: int = option(128, "bins N of the dual head (Table 3 ablates 40 ... 200)", low=2)
    bin_spacing: str = option("uniform", "the bin centres over the depth range (G3)", ("uniform", "log"))
    min_depth: float = option(1e-3, "smallest depth predicted", metavar="METRES")
    max_depth: float = option(10.0, "largest depth predicted", metavar="METRES")
    fusion: str = option(
        "mean", "the final depth: the mean of binned and regressed, or one (G2)", ("mean", "cls", "reg")
    )
    input_size: tuple = option(
        (224, 224), "network input in pixels, multiples of 32; one side = square (G16)", metavar="H,W"
    )
    loss: str = option(
        "paper", "§3.4's CE + L1 + SILog, or Table 1's composite loss (G25)", ("paper", "composite")
    )
    silog: str = option(
        "paper", "the SILog form: 10 (Var + 0.85 Mean^2), or BTS's sqrt (G6)", ("paper", "bts")
    )
    w_cls: float = option(1.0, "weight of the bins' cross-entropy in the paper's loss")
    w_reg: float = option(1.0, "weight of the L1 term in the paper's loss")
    w_silog: float = option(0.5, "weight of the SILog term in the paper's loss")
    composite: str = option(
        "ours",
        "composite loss: ours (reflection padding, valid pixels) or the authors' (G25)",
        ("ours", "authors"),
    )

    def __post_init__(self):
        """Each value in its range, and the values consistent with each other; else a UserError naming the flag."""
        if len(self.input_size) == 1:
            self.input_size = tuple(self.input_size) * 2
        check_options(self)
        require(
            all(v > 0 for v in (self.temperature, self.min_depth, self.max_depth)),
            "--temperature, --min-depth and --max-depth must be > 0",
        )
        require(self.min_depth < self.max_depth, f"--min-depth {self.min_depth}: not below --max-depth")
        require(self.top_k <= self.num_experts, f"--top-k {self.top_k}: more than --num-experts (0 = all)")
        require(self.trainable_blocks <= 12, f"--trainable-blocks {self.trainable_blocks}: ViT-B/32 has 12")
        layers = self.moa_layers
        require(
            list(layers) == sorted(set(layers)) and all(0 <= i <= 11 for i in layers),
            f"--moa-layers {typed(layers)}: not increasing block numbers in 0..11",
        )
        require(
            len(self.input_size) == 2 and all(side > 0 and side % 32 == 0 for side in self.input_size),
            f"--input-size {typed(self.input_size)}: not one or two multiples of 32",
        )
        # the similarity head has no input that the context could join
        require(
            self.head == "dual" or not self.use_context,
            "--head similarity: it has no context input; add --use-context 0",
        )


def check_options(config):
    """Each field of a config dataclass among its choices and not below its low; else a UserError."""
    for f in fields(config):
        value, choices, low = getattr(config, f.name), f.metadata["choices"], f.metadata["low"]
        given = f"{flag(f.name)} {typed(value)}"
        require(not choices or value in choices, f"{given}: not one of {', '.join(map(str, choices or ()))}")
        # "not >=": NaN fails too
        require(low is None or value >= low, f"{given}: not >= {low}")


# a config's rule: a broken one stops the run in one line
def require(holds, message):
    if not holds:
        raise UserError(message)


# a field's flag: num_experts -> --num-experts
def flag(name):
    return "--" + name.replace("_", "-")


# a value as a user types it: (2, 5, 8, 11) -> "2,5,8,11", True -> 1
def typed(value):
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return int(value) if isinstance(value, bool) else value


@torch.no_grad()
def prompt_embeddings(clip, texts):
    """Texts -> (len(texts), embed_dim) unit vectors from the frozen text tower."""
    ids = clip_vit.tokenize(texts).to(clip.token_embedding.weight.device)  # (n, 77) SOT .. EOT 0 ..
    return F.normalize(clip.encode_text(ids).float(), dim=-1)


def scene_context(clip, scenes=SCENES):
    """Paper §3.2: the mean of the unit "a photo of a {scene}." embeddings, renormalised (G11)."""
    return F.normalize(prompt_embeddings(clip, [f"a photo of a {s}." for s in scenes]).mean(0), dim=0)


# the bins' depths: the similarity head's DepthCLIP's (metres); else (GUESS G3) uniform or log-spaced over
# [min_depth, max_depth]
def bin_centres(cfg):
    if cfg.head == "similarity":
        return torch.tensor([depth for _, depth in DISTANCES[: cfg.sim_bins]])
    if cfg.bin_spacing == "log":
        return torch.logspace(math.log10(cfg.min_depth), math.log10(cfg.max_depth), cfg.num_bins)
    return torch.linspace(cfg.min_depth, cfg.max_depth, cfg.num_bins)


def text_features(clip, cfg):
    """What the model takes from the frozen text tower, a function of the CLIP weights and cfg alone:
    {"text": the similarity head's prompt embeddings} or {"context": the scene context, (0,) without
    it}. Checkpoints store it (keyed by the CLIP SHA-256), so loading one runs no text tower."""
    if cfg.head == "similarity":
        prompts = [f"This object is {word}" for word, _ in DISTANCES[: cfg.sim_bins]]
        return {"text": prompt_embeddings(clip, prompts)}  # (n, 512)
    return {"context": scene_context(clip) if cfg.use_context else torch.zeros(0)}  # (512,)


class MoADepthCLIP(nn.Module):
    def __init__(self, clip, cfg, moa_impl="auto", stored_text=None):
        """moa_impl: MoA's impl, auto, triton or torch. stored_text: text_features(clip, cfg) as a
        checkpoint stored it for these CLIP weights; None: the text tower runs here."""
        super().__init__()
        self.cfg = cfg
        # the text tower: used at most once, below; not kept
        self.visual = clip.visual
        width = self.visual.conv1.out_channels
        # why auto runs PyTorch, said once for all the layers
        notes = []
        self.moa = nn.ModuleList(
            [
                MoA(
                    width,
                    cfg.num_experts if cfg.use_moa else 1,
                    cfg.bottleneck,
                    cfg.gate_hidden,
                    cfg.top_k,
                    cfg.temperature,
                    gated=cfg.use_moa,
                    impl=moa_impl,
                    zero_init=cfg.adapter_init == "zero",
                    notes=notes,
                )
                for _ in cfg.moa_layers
            ]
        )
        # the text tower's part, or its copy: "text" (n_bins, 512), or "context" (512,), (0,) without
        for name, tensor in (stored_text or text_features(clip, cfg)).items():
            self.register_buffer(name, tensor)
        # GUESS G1 (the paper gives no sizes): 1x1 convolutions on the fused 768 + 512 channels
        if cfg.head == "dual":
            self.cls_head = nn.Conv2d(width + len(self.context), cfg.num_bins, 1)
            self.reg_head = nn.Conv2d(width + len(self.context), 1, 1)
        # DepthCLIP's head has fixed prompts and bin depths, no weights; the authors' has a fresh nn.Linear,
        # in no optimizer group: frozen as drawn, saved with the checkpoints
        elif cfg.sim_proj == "random":
            self.project = nn.Linear(width, self.text.shape[1]).requires_grad_(False)
        self.register_buffer("bins", bin_centres(cfg))
        # freeze CLIP, then unfreeze its last blocks (8-11)
        self.visual.requires_grad_(False)
        blocks = self.visual.transformer.resblocks
        blocks[len(blocks) - cfg.trainable_blocks :].requires_grad_(True)

    def features(self, image):
        """(B, 3, H, W) -> the mean of the MoA outputs' patch tokens (without MoA layers: the last block's),
        a grid (B, width, H/32, W/32)."""
        v = self.visual
        gh, gw = [side // v.patch_size for side in image.shape[-2:]]  # H/32, W/32
        x = v.embed(image).float()  # (B, 1 + gh*gw, width), fp32 also under autocast (G22)
        moas = dict(zip(self.cfg.moa_layers, self.moa))  # block number -> its MoA
        levels = []
        for i, block in enumerate(v.transformer.resblocks):
            x = block(x)
            if i in moas:
                x = moas[i](x)  # every token, CLS included
                levels.append(x[:, 1:])  # (B, gh*gw, width) patches
        feat = torch.stack(levels).mean(0) if levels else x[:, 1:]  # (B, gh*gw, width)
        return feat.transpose(1, 2).reshape(image.shape[0], -1, gh, gw)

    def forward(self, image):
        f = self.features(image)  # (B, 768, gh, gw)
        if self.cfg.head == "similarity":
            return self.similarity(f, image.shape[-2:])
        c = self.context.to(f.dtype)[None, :, None, None].expand(f.shape[0], -1, *f.shape[-2:])
        f = torch.cat([f, c], 1)  # (B, 768 + 512, gh, gw); without the context: f unchanged
        up = dict(size=image.shape[-2:], mode="bilinear")
        logits = F.interpolate(self.cls_head(f).float(), **up)  # (B, N, H, W)
        depth_cls = (logits.softmax(1) * self.bins[:, None, None]).sum(1, keepdim=True)
        reg = torch.sigmoid(self.reg_head(f).float()) * self.cfg.max_depth  # GUESS G4: (0, 10) m
        depth_reg = F.interpolate(reg, **up).clamp_min(self.cfg.min_depth)  # (B, 1, H, W)
        fused = {"mean": 0.5 * (depth_cls + depth_reg), "cls": depth_cls, "reg": depth_reg}
        return {
            "depth": fused[self.cfg.fusion],
            "depth_cls": depth_cls,
            "depth_reg": depth_reg,
            "logits": logits,
        }

    def similarity(self, f, out_size):
        """DepthCLIP's head: tokens f (B, 768, gh, gw) -> ln_post, proj or a random linear layer (G23)
        -> cosines -> bins."""
        B, _, gh, gw = f.shape
        tokens = f.flatten(2).transpose(1, 2).float()  # (B, gh*gw, 768)
        # cosines x 1000: too coarse in bf16
        with torch.autocast(f.device.type, enabled=False):
            emb = (
                self.project(tokens)
                if self.cfg.sim_proj == "random"
                else self.visual.ln_post(tokens) @ self.visual.proj.float()
            )
            # unit (B, gh*gw, 512); the expected depth in fp32 too: a bf16 matmul here is off by up to 1 cm
            depth = expected_depth(F.normalize(emb, dim=-1), self.text, self.bins.float()).view(B, 1, gh, gw)
            return {"depth": F.interpolate(depth, size=out_size, mode="bilinear")}

    # the mean per-token gate entropy -sum g log g of the last forward (0: plain adapters)
    def gate_entropy(self):
        if not self.cfg.use_moa:
            return 0.0
        return torch.stack([torch.special.entr(m.last_gates).sum(-1).mean() for m in self.moa]).mean().item()


# DepthCLIP's depth from unit features emb (..., 512): 100 x their cosine with each prompt's
# embedding (text, (n, 512)) / 0.1, a softmax over the prompts, the mean of the bins under it
def expected_depth(emb, text, bins):
    return (100.0 * emb @ text.T / 0.1).softmax(-1) @ bins


# zero-shot DepthCLIP on a CLIP ResNet (RN50), as DepthCLIP's own code computes it
# DepthCLIP normalises its input with these, not CLIP's
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DepthCLIPZeroShot(nn.Module):
    """Zero-shot DepthCLIP on a CLIP ResNet exactly as its code (monoclip.py, clip/model.py, eval.py)
    computes it, which is not what its paper's figure suggests:
      pixels normalised with ImageNet's mean and std -> layer4's map, not the attention pool
      -> each position's 2048-d vector made unit length -> every other channel, 0, 2, ..., 2046:
         its F.interpolate(scale_factor=0.5) on a (B, HW, 2048) tensor is nearest over channels
      -> 100 x dot product with the unit text features of "This object is {word}", / 0.1, softmax
         over the 7 words, weighted sum of their depths 1.00 ... 3.00 m      (B, 1, H/32, W/32)
      -> bilinear, align_corners=True, to the input's size (eval.py: to 416x544).
    In: MoADepthCLIP's input, CLIP-normalised pixels (B, 3, H, W); out: {"depth": (B, 1, H, W)}, fp32
    also under autocast. evaluate.py averages the flipped prediction after this upsampling, DepthCLIP
    before it: the same numbers, since both steps are linear and the upsampling commutes with a flip."""

    def __init__(self, clip):
        super().__init__()
        # what evaluate.predict reads; its input: the RGB crop rows 56:472, cols 60:604, not resized
        self.cfg = DepthConfig(head="similarity", use_context=False, use_moa=False, input_size=(416, 544))
        self.visual = clip.visual.requires_grad_(False)
        channels = self.visual.attnpool.positional_embedding.shape[1]  # layer4's: 2048 in RN50
        if channels != 2 * clip.text_projection.shape[1]:  # RN101, RN50x4, ...: no DepthCLIP
            raise UserError(
                f"--clip: DepthCLIP halves layer4's {channels} channels to meet the "
                f"{clip.text_projection.shape[1]}-d text features; it needs RN50's 2:1"
            )
        # its template 'This {} is {}' with its one object class, 'object', and its 7 words and depths
        self.register_buffer("text", text_features(clip, self.cfg)["text"])  # (7, embed_dim)
        self.register_buffer("bins", bin_centres(self.cfg))

    def forward(self, image):
        # fp32: cosines x 1000 need it
        with torch.autocast(image.device.type, enabled=False):
            image = image.float()
            pixels = image * per_channel(clip_vit.STD, image) + per_channel(clip_vit.MEAN, image)
            x = (pixels - per_channel(IMAGENET_MEAN, image)) / per_channel(IMAGENET_STD, image)
            f = self.visual.features(x)  # (B, 2048, h, w)
            B, _, h, w = f.shape
            # each position's unit vector, every other channel: (B, h*w, 2048) -> (B, h*w, 1024)
            f = F.normalize(f.flatten(2).transpose(1, 2), dim=-1)[..., ::2]
            depth = expected_depth(f, self.text, self.bins).view(B, 1, h, w)  # metres on the grid
            return {"depth": F.interpolate(depth, size=image.shape[-2:], mode="bilinear", align_corners=True)}


# RGB constants (3,) -> a (3, 1, 1) tensor on like's device, for (B, 3, H, W) images
def per_channel(values, like):
    return like.new_tensor(values)[:, None, None]


# -----------------------------------------------------------------------------
# the losses: the paper's (§3.4), and the authors' earlier composite loss (Table 1 "Comp. Loss")
def silog(pred, gt, form="paper"):
    # over valid pixels, both > 0
    g = torch.log(pred) - torch.log(gt)
    if form == "bts":
        # clamped: the sqrt stays differentiable at 0
        return 10 * torch.sqrt((g.pow(2).mean() - 0.85 * g.mean().pow(2)).clamp_min(1e-12))
    return 10 * (g.var(unbiased=False) + 0.85 * g.mean().pow(2))


def ssim_map(x, y, padding):
    """Per-pixel SSIM of x and y (B, 1, H, W) from 3x3 local means, variances and covariance. The maps
    are padded by one pixel so that they keep their size: "reflect", or "constant" (zeros, which then
    count in the 3x3 means, as avg_pool2d(padding=1) does in the authors' code)."""

    def local_mean(t):
        return F.avg_pool2d(F.pad(t, (1, 1, 1, 1), mode=padding), 3, stride=1)  # (B, 1, H, W)

    mu_x = local_mean(x)
    mu_y = local_mean(y)
    var_x = local_mean(x**2) - mu_x**2
    var_y = local_mean(y**2) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
    denominator = (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return numerator / denominator


# (sum of weights[k] * term, {k: term as a float}) of the loss terms {k: tensor}
def weighted_sum(terms, weights):
    return sum(weights[k] * t for k, t in terms.items()), {k: t.item() for k, t in terms.items()}


def composite_loss(pred, gt, form="ours"):
    """The authors' earlier loss on the final map pred, gt (B, 1, H, W): SILog (BTS form) over the
    valid pixels (gt > 1e-8), the smoothness of pred, (1 - SSIM) / 2 clamped to [0, 1], and L1.
    form "ours": SSIM from reflection-padded maps, SSIM and L1 averaged over the valid pixels.
    form "authors": as their code computes it, SSIM from zero-padded maps, and SSIM and L1 averaged
    over every pixel, holes included (a hole's L1 is then the predicted depth itself). GUESS G25."""
    # depth_loss has made sure that there is such a pixel
    valid = gt > 1e-8
    ssim = ssim_map(pred, gt, "constant" if form == "authors" else "reflect")
    averaged = torch.ones_like(valid) if form == "authors" else valid  # the authors': every pixel
    terms = {
        "silog": silog(pred[valid], gt[valid], "bts"),
        # the prediction alone: no ground truth, holes included
        "grad": pred.diff(dim=-1).abs().mean() + pred.diff(dim=-2).abs().mean(),
        "ssim": ((1 - ssim) / 2).clamp(0, 1)[averaged].mean(),
        "l1": (pred - gt)[averaged].abs().mean(),
    }
    return weighted_sum(terms, {"silog": 1.0, "grad": 0.5, "ssim": 0.2, "l1": 0.1})


def depth_loss(out, depth, mask, cfg):
    """(loss, terms) for out of forward, depth (B, 1, H, W) metres, mask (B, 1, H, W). The paper:
    CE on the bin logits, L1 + SILog on the regressed map (the similarity head: on its map)."""
    valid = mask & (depth > cfg.min_depth) & (depth < cfg.max_depth)
    # an all-hole batch: a zero that still backpropagates, never NaN, no terms
    if not valid.any():
        return out["depth"].sum() * 0, {}
    # on the final map, with the authors' own valid mask
    if cfg.loss == "composite":
        return composite_loss(out["depth"], depth, cfg.composite)
    gt = depth[valid]
    terms = {}
    if cfg.head == "dual":
        bins = bin_centres(cfg).to(depth.device)
        # edges halfway between centres, geometrically for log bins
        edges = (bins[1:] * bins[:-1]).sqrt() if cfg.bin_spacing == "log" else (bins[1:] + bins[:-1]) / 2
        logits = out["logits"].float().movedim(1, -1)[valid[:, 0]]  # channels last: (n_valid, N)
        terms["cls"] = F.cross_entropy(logits, torch.bucketize(gt, edges))  # target: the bin holding the GT
    pred = out["depth_reg" if cfg.head == "dual" else "depth"][valid]
    terms["l1"] = (pred - gt).abs().mean()
    terms["silog"] = silog(pred, gt, cfg.silog)
    return weighted_sum(terms, {"cls": cfg.w_cls, "l1": cfg.w_reg, "silog": cfg.w_silog})


# =============================================================================
# machinery: the one way to build a model, the device policy, parameters and checkpoints


def build_model(clip, cfg=None, moa_impl="auto", stored_text=None):
    """A depth model on the CLIP weights `clip`: MoA-DepthCLIP for the DepthConfig cfg (a ViT only); or,
    with cfg None, zero-shot DepthCLIP: on a ResNet exactly as DepthCLIP's code computes it, on a ViT
    DepthCLIP's prompts and bins on the last block's tokens (G23). moa_impl, stored_text: MoADepthCLIP's."""
    if cfg is None:
        if isinstance(clip.visual, clip_vit.ModifiedResNet):
            return DepthCLIPZeroShot(clip)
        cfg = DepthConfig(
            head="similarity", use_context=False, use_moa=False, moa_layers=(), trainable_blocks=0
        )
    if not isinstance(clip.visual, clip_vit.VisionTransformer):
        raise UserError(
            "--clip: a ResNet CLIP; MoA-DepthCLIP needs a ViT (a ResNet runs only as zero-shot DepthCLIP: "
            "evaluate.py --zero-shot)"
        )
    return MoADepthCLIP(clip, cfg, moa_impl, stored_text)


class Runtime(NamedTuple):
    device: torch.device
    # the autocast dtype; None: fp32, no autocast
    dtype: torch.dtype | None
    # fp16 autocast: the loss needs a torch.amp.GradScaler
    grad_scaler: bool
    # the choice in words, for the log
    precision: str


def runtime(device="auto"):
    """The one place that decides device and dtype. On a GPU with bf16 tensor cores (compute capability
    8.0 and newer) bf16 autocast; on an older one (a T4, sm_75) fp16 autocast with a GradScaler, since fp16's
    range is too small for unscaled gradients; on the CPU fp32."""
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    here = ["cpu", "cuda", *gpus] if gpus else ["cpu"]  # "cuda": the current GPU
    if device == "auto":
        device = "cuda" if gpus else "cpu"
    if device not in here:
        raise UserError(
            f"--device {device}: not on this machine (torch {torch.__version__} sees "
            f"{len(gpus)} CUDA GPUs); use one of auto, {', '.join(here)}"
        )
    device = torch.device(device)
    if device.type == "cpu":
        return Runtime(device, None, False, "fp32")
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return Runtime(device, torch.bfloat16, False, f"bf16 autocast (sm_{major}{minor})")
    # kernels/ decides where --moa-impl auto runs the kernel
    from kernels import fused_moa as fm

    moa_impl = "" if 10 * major + minor >= fm.AUTO_MIN_ARCH else "; --moa-impl auto: the MoA in PyTorch"
    return Runtime(
        device,
        torch.float16,
        True,
        f"fp16 autocast with a GradScaler (sm_{major}{minor} has no bf16 tensor cores){moa_impl}",
    )


# -----------------------------------------------------------------------------
# parameters and checkpoints: the trainable parameters, the config, the CLIP weights' identity
def parameter_counts(model):
    """{module or "total": [trainable, frozen]}: the parameters of each top-level module."""
    counts = {}
    for name, p in model.named_parameters():
        counts.setdefault(name.split(".")[0], [0, 0])[0 if p.requires_grad else 1] += p.numel()
    counts["total"] = [sum(column) for column in zip(*counts.values())]
    return counts


def parameter_table(model):
    return "\n".join(
        f"{part:<8} {t:>11,} trainable {f:>11,} frozen" for part, (t, f) in parameter_counts(model).items()
    )


def saved_parameters(model):
    """{name: parameter} that a checkpoint holds: the trainable ones, and the similarity head's random
    frozen projection (G23), which nothing else could restore."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad or n.startswith("project.")}


def load_trainable_state_dict(model, sd, where):
    """Load exactly the saved tensors (saved_parameters), the frozen rest comes from CLIP; a misfit:
    UserError."""
    own = {n: p.shape for n, p in saved_parameters(model).items()}
    misfits = sorted(n for n in own.keys() | sd.keys() if n not in sd or sd[n].shape != own.get(n))
    # missing, unexpected or of another shape: made with other flags or code
    if misfits:
        raise UserError(f"{where}: tensors {misfits[:3]} do not fit this model")
    model.load_state_dict(sd, strict=False)


def save_checkpoint(path, model, **extra):
    """Atomically write the trainable parameters, the DepthConfig and `extra` (clip id, ...). Given
    the clip id, also what the text tower gave (text_features), keyed by the CLIP weights' SHA-256."""
    ckpt = {
        "model": {n: p.detach().clone() for n, p in saved_parameters(model).items()},
        "model_config": asdict(model.cfg),
        **extra,
    }
    if "clip" in extra:
        text = {n: b.detach().clone() for n, b in model.named_buffers() if n in ("context", "text")}
        ckpt["text_features"] = {"clip_sha256": extra["clip"]["sha256"], **text}
    clip_vit.atomic_write(path, lambda f: torch.save(ckpt, f))


def checkpoint_problem(path, e):
    """Why torch.load could not read path, in a few words (its own messages run to paragraphs)."""
    if isinstance(e, IsADirectoryError):
        return "a directory, not a checkpoint file"
    if isinstance(e, OSError) and e.strerror:  # e.g. no permission
        return f"cannot be read ({e.strerror.lower()})"
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "an empty file, not a checkpoint"
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return "not a checkpoint (train.py writes a zip archive with torch.save; this is none)"
    # a zip's index is at its end
    if not zipfile.is_zipfile(path):
        return "a zip archive cut short: a truncated checkpoint"
    return "a zip archive that torch.load cannot read as weights only (damaged, or it holds code)"


def load_checkpoint(path):
    """train.py's checkpoint, read as weights only: no code in the file runs. Memory-mapped (and
    copy-on-write): what is never used, such as AdamW's state in an evaluation, is never read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint file") from None
    # a directory, a text file, a truncated file, a pickle with code
    except Exception as e:
        raise UserError(f"{path}: {checkpoint_problem(path, e)}") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "clip"} <= set(ckpt):
        raise UserError(f"{path}: not a MoA-DepthCLIP checkpoint (no model, model_config, clip)")
    # before 2026-12-07 a checkpoint kept train.py's flags under "config"
    for key in ("data", "seed"):
        ckpt.setdefault(key, ckpt.get("config", {}).get(key))
    return ckpt


# was it trained on the CLIP weights `sha`?
def check_clip(ckpt, clip_arg, sha, where):
    if sha != ckpt["clip"]["sha256"]:
        raise UserError(
            f"{where}: trained on CLIP weights {ckpt['clip']['sha256'][:12]}..., "
            f"but {clip_arg} has {sha[:12]}..."
        )


def from_checkpoint(ckpt, clip_arg=None, device="cpu", where="checkpoint", moa_impl="auto"):
    """Rebuild a trained model: the CLIP weights (SHA-256 checked) plus its trainable part."""
    clip_arg = clip_arg or ckpt["clip"]["name"]
    # a model name's SHA-256 is in its URL: a mismatch is known before any download
    if clip_arg in (*clip_vit.MODELS, "random"):
        check_clip(ckpt, clip_arg, clip_vit.weights_sha256(clip_arg), where)
    # a missing or broken file is a UserError here
    clip = clip_vit.load(clip_arg)
    sha = clip_vit.weights_sha256(clip_arg)
    check_clip(ckpt, clip_arg, sha, where)
    unknown = sorted(ckpt["model_config"].keys() - asdict(DepthConfig()).keys())
    # written by a newer version of this code
    if unknown:
        raise UserError(f"{where}: model_config fields this version does not know: {unknown}")
    cfg = DepthConfig(**ckpt["model_config"])
    # what the text tower gave, as stored for these CLIP weights; else (a checkpoint from before it was
    # stored, or one whose entry does not fit) the text tower runs
    stored = ckpt.get("text_features", {})
    needed = "text" if cfg.head == "similarity" else "context"
    stored_text = {needed: stored[needed]} if stored.get("clip_sha256") == sha and needed in stored else None
    # the checkpoint holds every trainable tensor: none drawn
    with clip_vit.no_random_init():
        model = build_model(clip, cfg, moa_impl, stored_text)
    load_trainable_state_dict(model, ckpt["model"], where)
    return model.to(device).eval()
