"""
CPU timing of clip_vit's encode_image against Hugging Face transformers' CLIPVisionModelWithProjection, both with
random ViT-B/32 weights, batch 32, measured in the same run (a benchmark, not a test: pytest does not collect it).

    python bench/bench_clip.py [--batch 32] [--reps 5]
"""

import argparse
import sys
from pathlib import Path

import torch

# appended, not put first: transformers >= 5 imports Hugging Face's package `kernels`, which the
# repository's own kernels/ folder would otherwise shadow (clip_vit is found either way)
sys.path.append(str(Path(__file__).resolve().parents[1]))
import clip_vit  # noqa: E402


def median_times(fns, reps):
    """Median seconds of each fn, the fns interleaved run by run so that machine drift hits them alike."""
    from torch.utils.benchmark import Timer

    timers = [Timer("fn()", globals={"fn": fn}) for fn in fns]
    for fn in fns:
        fn()  # warm-up
    runs = [[t.timeit(1).median for t in timers] for _ in range(reps)]
    return [sorted(col)[len(col) // 2] for col in zip(*runs)]


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    import transformers

    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    ours = clip_vit.build_model(clip_vit.random_state_dict())
    cfg = transformers.CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        projection_dim=512,
    )
    hf = transformers.CLIPVisionModelWithProjection(cfg).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.inference_mode():
        t_ours, t_hf = median_times([lambda: ours.encode_image(x), lambda: hf(pixel_values=x)], args.reps)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"median of {args.reps} interleaved runs"
    )
    print(f"clip_vit encode_image : {t_ours * 1e3:8.1f} ms  ({args.batch / t_ours:6.1f} img/s)")
    print(f"HF CLIP vision + proj : {t_hf * 1e3:8.1f} ms  ({args.batch / t_hf:6.1f} img/s)")
    print(f"ratio HF / ours       : {t_hf / t_ours:8.2f}x")
