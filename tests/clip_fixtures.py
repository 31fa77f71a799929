"""
Test helpers for CLIP: the official fp16/fp32 storage mix, a TorchScript archive in the official layout
written by the test itself, and the Hugging Face <-> OpenAI key mapping used by the parity test.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import clip_vit

# kept in fp32 in the real file (its size and its TorchScript code say so); the rest is fp16. The ResNet's
# BatchNorms ("bn", "downsample.1") too: OpenAI's convert_weights halves only convolutions, linears and
# projections
FP32_KEYS = (
    "positional_embedding",
    "class_embedding",
    "token_embedding",
    "ln_",
    "logit_scale",
    "bn",
    "downsample.1",
)


def official_dtypes(sd):
    """The mixed layout of the real ViT-B-32.pt and RN50.pt: LayerNorms, BatchNorms, embeddings and
    logit_scale fp32, the rest fp16, integers (num_batches_tracked) as they are, plus the three integer
    buffers that only the JIT file has."""

    def stored(k, v):
        if not v.is_floating_point():
            return v
        return v.float() if any(s in k for s in FP32_KEYS) else v.half()

    out = {k: stored(k, v) for k, v in sd.items()}
    if "visual.proj" in sd:  # a ViT: patch size x grid
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        res = sd["visual.conv1.weight"].shape[-1] * grid
    else:  # a ResNet: stride 32 x grid
        res = 32 * round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    out["input_resolution"] = torch.tensor(res)
    out["context_length"] = torch.tensor(sd["positional_embedding"].shape[0])
    out["vocab_size"] = torch.tensor(sd["token_embedding.weight"].shape[0])
    return out


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_torchscript_archive(sd, path):
    """Script a module tree whose state_dict() is exactly `sd` (params and the integer buffers) and save it,
    giving an archive with the same structure as OpenAI's (data.pkl, data/N storages, constants.pkl, code/)."""
    root = _Holder()
    for key, value in sd.items():
        *mods, name = key.split(".")
        m = root
        for part in mods:
            if not hasattr(m, part):
                m.add_module(part, _Holder())
            m = getattr(m, part)
        if value.is_floating_point():
            m.register_parameter(name, nn.Parameter(value.clone(), requires_grad=False))
        else:
            m.register_buffer(name, value.clone())
    torch.jit.save(torch.jit.script(root), str(path))
    return path


def hf_to_openai(hf_sd):
    """Hugging Face CLIPModel state dict -> OpenAI's key layout (q/k/v packed into in_proj)."""
    out = {}
    towers = {
        "vision_model.encoder.layers.": "visual.transformer.resblocks.",
        "text_model.encoder.layers.": "transformer.resblocks.",
    }
    names = {
        "self_attn.out_proj": "attn.out_proj",
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for hf_prefix, prefix in towers.items():
        layers = {k[len(hf_prefix) :].split(".")[0] for k in hf_sd if k.startswith(hf_prefix)}
        for i in layers:
            src = f"{hf_prefix}{i}."
            for part in ("weight", "bias"):
                out[f"{prefix}{i}.attn.in_proj_{part}"] = torch.cat(
                    [hf_sd[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv"]
                )
                for a, b in names.items():
                    out[f"{prefix}{i}.{b}.{part}"] = hf_sd[f"{src}{a}.{part}"]
    out.update(
        {
            "visual.class_embedding": hf_sd["vision_model.embeddings.class_embedding"],
            "visual.conv1.weight": hf_sd["vision_model.embeddings.patch_embedding.weight"],
            "visual.positional_embedding": hf_sd["vision_model.embeddings.position_embedding.weight"],
            "visual.ln_pre.weight": hf_sd["vision_model.pre_layrnorm.weight"],
            "visual.ln_pre.bias": hf_sd["vision_model.pre_layrnorm.bias"],
            "visual.ln_post.weight": hf_sd["vision_model.post_layernorm.weight"],
            "visual.ln_post.bias": hf_sd["vision_model.post_layernorm.bias"],
            "visual.proj": hf_sd["visual_projection.weight"].t(),
            "token_embedding.weight": hf_sd["text_model.embeddings.token_embedding.weight"],
            "positional_embedding": hf_sd["text_model.embeddings.position_embedding.weight"],
            "ln_final.weight": hf_sd["text_model.final_layer_norm.weight"],
            "ln_final.bias": hf_sd["text_model.final_layer_norm.bias"],
            "text_projection": hf_sd["text_projection.weight"].t(),
            "logit_scale": hf_sd["logit_scale"],
        }
    )
    return {k: v.contiguous() for k, v in out.items()}


def small_state_dict(seed=0):
    """A tiny random CLIP in the official layout (fast to build, save and load)."""
    return clip_vit.random_state_dict(
        embed_dim=32,
        image_resolution=64,
        vision_layers=2,
        vision_width=64,
        patch=32,
        width=64,
        heads=1,
        layers=2,
        seed=seed,
    )


def _is_batchnorm(key):
    return ".bn" in key or ".downsample.1." in key


def resnet_state_dict(seed=0, **sizes):
    """Random CLIP ResNet weights in the official layout, RN50's sizes unless `sizes` say otherwise, with
    BatchNorms that are far from the identity (random scales, shifts and running statistics), so that a
    BatchNorm left out, or one run on the batch's statistics, changes every output."""
    sd = clip_vit.random_state_dict(seed=seed, **{**clip_vit.RN50_SIZES, **sizes})
    g = torch.Generator().manual_seed(seed)
    for key, v in sd.items():
        if not (_is_batchnorm(key) and v.is_floating_point()):
            continue
        if key.endswith(("weight", "running_var")):
            sd[key] = 0.5 + 1.5 * torch.rand(v.shape, generator=g)  # in [0.5, 2)
        else:  # bias, running_mean
            sd[key] = 0.2 * torch.randn(v.shape, generator=g)
    return sd


def small_resnet_state_dict(seed=0):
    """A small CLIP ResNet (every stage, the stem and the attention pool; fewer blocks and channels)."""
    return resnet_state_dict(
        seed,
        embed_dim=32,
        image_resolution=64,
        vision_layers=(1, 2, 1, 1),
        vision_width=16,
        width=64,
        heads=1,
        layers=2,
    )


def openai_model_module():
    """OpenAI's own clip/model.py from the PyPI package openai-clip (requirements-dev.txt), imported alone:
    the package's __init__ imports torchvision, which this CPU torch lacks. Skips if it is not installed."""
    spec = importlib.util.find_spec("clip")
    folders = (spec.submodule_search_locations or []) if spec else []
    model_py = Path(folders[0]) / "model.py" if folders else None
    if model_py is None or not model_py.is_file():
        pytest.skip("OpenAI's clip package is not installed (pip install -r requirements-dev.txt)")
    mspec = importlib.util.spec_from_file_location("openai_clip_model", model_py)
    module = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(module)
    return module


def openai_reference(path):
    """OpenAI's model for the archive at `path`, loaded as its clip.load(jit=False) loads it: torch.jit.load's
    state dict through its build_model (which halves the weights), then fp32 to compare on the CPU."""
    model = openai_model_module().build_model(torch.jit.load(str(path)).state_dict())
    return model.float().eval()
