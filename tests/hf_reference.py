"""
Hugging Face's CLIP on random ViT-B/32 weights, run as a separate process: the independent side of
tests/test_clip_vit.py's parity test.

    python -I tests/hf_reference.py inputs.pt outputs.pt

Why a separate process: transformers >= 5 imports Hugging Face's own package named `kernels`, and this
repository's `kernels/` folder (the Triton MoA kernel) shadows it whenever the repository root is on
sys.path, as it is under pytest. Run with `python -I` from another folder, this script sees only
site-packages, so the two packages named `kernels` never meet. It imports nothing from the project.

inputs.pt: {"images": (B, 3, 224, 224), "wide": (B, 3, H, W) of another grid, "text": (B, 77) token ids}. outputs.pt: {"state_dict": HF's
weights, fp16-rounded where OpenAI's file is fp16, "image": (B, 512), "text": (B, 512), "logits": (B, B)}.
"""

import sys

import torch
import transformers

# kept in fp32 in OpenAI's file; every other tensor is rounded through fp16, as the file stores it
FP32_NAMES = ("norm", "layrnorm", "class_embedding", "position_embedding", "token_embedding", "logit_scale")


def features(out):
    # transformers 4 returns a tensor, transformers 5 an output object holding it
    return out if torch.is_tensor(out) else out.pooler_output


def main(inputs_path, outputs_path):
    inputs = torch.load(inputs_path, weights_only=True)
    text_config = dict(
        hidden_size=512,
        intermediate_size=2048,
        num_attention_heads=8,
        num_hidden_layers=12,
        max_position_embeddings=77,
        vocab_size=49408,
        hidden_act="quick_gelu",
        eos_token_id=49407,
    )
    vision_config = dict(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
    )
    config = transformers.CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=512)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in hf.state_dict().items():
            # give every tensor a visible scale, then round it like the official file
            p.add_(0.02 * torch.randn_like(p))
            if not any(s in name for s in FP32_NAMES):
                p.copy_(p.half().float())
        image = features(hf.get_image_features(pixel_values=inputs["images"]))
        # another grid: HF resizes the positional embedding bicubically (align_corners=False), as we do
        wide = features(hf.get_image_features(pixel_values=inputs["wide"], interpolate_pos_encoding=True))
        text = features(hf.get_text_features(input_ids=inputs["text"]))
        logits = hf(input_ids=inputs["text"], pixel_values=inputs["images"]).logits_per_image
    outputs = {
        "state_dict": hf.state_dict(),
        "image": image,
        "wide": wide,
        "text": text,
        "logits": logits,
        "versions": f"transformers {transformers.__version__}",
    }
    torch.save(outputs, outputs_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
