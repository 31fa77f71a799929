"""
Zero-shot DepthCLIP on a CLIP ResNet (moa.DepthCLIPZeroShot, evaluate.py --zero-shot --clip RN50): the project's
depth maps and scores against DepthCLIP's own procedure, written out here from its code (Adonis-galaxy/DepthCLIP:
monoclip.py, clip/model.py, eval.py, datasets/datasets_list.py, calculate_error.py) on OpenAI's model.py, on
real NYU test frames with random RN50 weights; the command end to end; ResNets refused where they cannot work.
Run: python -m pytest -q tests/test_depthclip.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip_vit
import evaluate
import moa
from clip_fixtures import (
    official_dtypes,
    openai_reference,
    resnet_state_dict,
    small_resnet_state_dict,
    write_torchscript_archive,
)

ROOT = Path(__file__).resolve().parents[1]
DEPTHCLIP_BOX = (42 + 14, 474 - 2, 40 + 20, 616 - 12)  # rows, cols: where calculate_error.py pastes the map

# -----------------------------------------------------------------------------
# DepthCLIP's procedure as its code has it, line for line where it can be (CPU instead of .cuda(), our
# tokenizer instead of its copy of OpenAI's, OpenAI's model.py modules for its CLIP)

# monoclip.py's hyperparameters
depth_templates = ["This {} is {}"]
obj_classes = ["object"]
depth_classes = ["giant", "extremely close", "close", "not in distance", "a little remote", "far", "unseen"]
bin_list = [1.00, 1.50, 2.00, 2.25, 2.50, 2.75, 3.00]
temperature = 0.1


def zeroshot_classifier(depth_classes, obj_classes, templates, model):  # monoclip.py
    with torch.no_grad():
        zeroshot_weights = []
        for depth in depth_classes:
            for obj in obj_classes:
                texts = [template.format(obj, depth) for template in templates]  # format with class
                texts = clip_vit.tokenize(texts)  # tokenize
                class_embeddings = model.encode_text(texts)  # embed with text encoder
                class_embeddings /= class_embeddings.norm(dim=-1, keepdim=True)
                class_embedding = class_embeddings.mean(dim=0)
                class_embedding /= class_embedding.norm()
                zeroshot_weights.append(class_embedding)
        zeroshot_weights = torch.stack(zeroshot_weights, dim=1)
    return zeroshot_weights


def depthclip_encode_image(visual, x):
    """clip/model.py: DepthCLIP's ModifiedResNet.forward, which stops after layer4, run on the modules of
    OpenAI's model.py (its self.relu, a plain ReLU, written F.relu here)."""

    def stem(x):
        for conv, bn in [(visual.conv1, visual.bn1), (visual.conv2, visual.bn2), (visual.conv3, visual.bn3)]:
            x = F.relu(bn(conv(x)))
        x = visual.avgpool(x)
        return x

    x = x.type(visual.conv1.weight.dtype)
    x = stem(x)
    x = visual.layer1(x)
    x = visual.layer2(x)
    x = visual.layer3(x)
    x = visual.layer4(x)

    x = x.reshape(-1, 2048, 221)
    x = x.permute(2, 0, 1)
    return x


class MonoCLIP(torch.nn.Module):  # monoclip.py, with the CLIP model given instead of clip.load(clip_vis)
    def __init__(self, clip_model):
        super().__init__()
        self.bins = len(depth_classes)
        self.clip = clip_model
        self.text_f = zeroshot_classifier(depth_classes, obj_classes, depth_templates, self.clip)

    def forward(self, x):
        img_f = depthclip_encode_image(self.clip.visual, x).permute(1, 0, 2)  # B, HW, C
        img_f = img_f / img_f.norm(dim=-1, keepdim=True)  # normalize img_f
        img_f = torch.nn.functional.interpolate(img_f, scale_factor=0.5)  # to match size
        depth_logits = 100.0 * img_f @ self.text_f  # B, HW, K
        depth_logits = depth_logits.permute(0, 2, 1).reshape(-1, self.bins, 13, 17)  # B, K, H, W
        depth_logits /= temperature
        depth = F.softmax(depth_logits, dim=1)
        bin_tensor = torch.tensor(bin_list).to(depth.device)
        depth = depth * bin_tensor.reshape(1, self.bins).unsqueeze(-1).unsqueeze(-1)
        depth = depth.sum(1, keepdim=True)
        return depth


def depthclip_input(rgb):
    """datasets_list.py for the NYU test set: PIL crop (60, 56, 604, 472), /255, HWC -> CHW, ImageNet's
    Normalize. rgb: uint8 (480, 640, 3) -> (3, 416, 544)."""
    from PIL import Image

    rgb = Image.fromarray(rgb).crop((40 + 20, 42 + 14, 616 - 12, 474 - 2))
    rgb = np.asarray(rgb, dtype=np.float32) / 255.0
    rgb = torch.from_numpy(rgb.transpose((2, 0, 1)))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (rgb - mean) / std


def depthclip_validate(model, input_img):  # eval.py's validate(), other_method == 'MonoCLIP'
    input_img_flip = torch.flip(input_img, [3])
    with torch.no_grad():
        output_depth = model(input_img)
        output_depth_flip = model(input_img_flip)
        output_depth_flip = torch.flip(output_depth_flip, [3])
        output_depth = 0.5 * (output_depth + output_depth_flip)
        output_depth = F.interpolate(output_depth, size=[416, 544], mode="bilinear", align_corners=True)
    return output_depth


def compute_errors_NYU(gt, pred, crop=True):  # calculate_error.py, per image (batch size 1 in test.sh)
    abs_diff, abs_rel, log10, a1, a2, a3, rmse_tot = 0, 0, 0, 0, 0, 0, 0
    batch_size = gt.size(0)
    if crop:
        crop_mask = gt[0] != gt[0]
        crop_mask = crop_mask[0, :, :]
        crop_mask[45:471, 46:601] = 1
    for sparse_gt, pred in zip(gt, pred):
        sparse_gt = sparse_gt[0, :, :]
        pred = pred[0, :, :]
        h, w = sparse_gt.shape
        pred_uncropped = torch.zeros((h, w), dtype=torch.float32)
        pred_uncropped[42 + 14 : 474 - 2, 40 + 20 : 616 - 12] = pred
        pred = pred_uncropped
        valid = (sparse_gt < 10) & (sparse_gt > 1e-3) & (pred > 1e-3)
        if crop:
            valid = valid & crop_mask
        valid_gt = sparse_gt[valid].clamp(1e-3, 10)
        valid_pred = pred[valid]
        valid_pred = valid_pred.clamp(1e-3, 10)
        thresh = torch.max((valid_gt / valid_pred), (valid_pred / valid_gt))
        a1 += (thresh < 1.25).float().mean()
        a2 += (thresh < 1.25**2).float().mean()
        a3 += (thresh < 1.25**3).float().mean()
        rmse = (valid_gt - valid_pred) ** 2
        rmse_tot += torch.sqrt(torch.mean(rmse))
        abs_diff += torch.mean(torch.abs(valid_gt - valid_pred))
        abs_rel += torch.mean(torch.abs(valid_gt - valid_pred) / valid_gt)
        log10 += torch.mean(torch.abs(torch.log10(valid_gt) - torch.log10(valid_pred)))
    return [metric.item() / batch_size for metric in [abs_diff, a1, a2, a3, abs_rel, log10, rmse_tot]]


# -----------------------------------------------------------------------------
# the comparison on real frames


@pytest.fixture(scope="module")
def real_frames(shared_file):
    """Two real NYU Depth V2 test frames: uint8 RGB (2, 480, 640, 3) and depth in metres (2, 480, 640),
    cut at 10 m as DepthCLIP's loader does."""
    from PIL import Image

    root = shared_file("nyu2_mini_test")
    rgb = np.stack([np.array(Image.open(root / f"image_{i}.png").convert("RGB")) for i in (0, 5)])
    depth = np.stack([np.array(Image.open(root / f"depth_{i}.png")) for i in (0, 5)]).astype(np.float32)
    return rgb, np.clip(depth / 1000.0, 0, 10)


@pytest.fixture(scope="module")
def rn50_archive(tmp_path_factory):
    """Random weights in OpenAI's RN50 layout (its image tower at full size; a one-layer text tower), fp16
    convolutions as in the real file; BatchNorm statistics random, so that the depth maps vary."""
    sd = resnet_state_dict(seed=7, width=64, heads=1, layers=1)
    return write_torchscript_archive(official_dtypes(sd), tmp_path_factory.mktemp("rn50") / "RN50.pt")


def test_zero_shot_depth_maps_and_scores_match_depthclips_code(real_frames, rn50_archive):
    rgb, gt = real_frames
    reference = MonoCLIP(openai_reference(rn50_archive)).eval()
    theirs = depthclip_validate(reference, torch.stack([depthclip_input(frame) for frame in rgb]))
    theirs = theirs[:, 0].numpy()  # (2, 416, 544)
    # the project's path: evaluate.py's depthclip protocol with the zero-shot RN50 model
    model = moa.DepthCLIPZeroShot(clip_vit.load(rn50_archive)).eval()
    protocol = evaluate.PROTOCOLS["depthclip"]
    frames, depths = torch.from_numpy(rgb).permute(0, 3, 1, 2), torch.from_numpy(gt)
    maps = evaluate.protocol_maps(frames, depths, protocol, model, None)  # pasted into 480x640 frames
    pasted = maps["depth"].numpy()
    r0, r1, c0, c1 = DEPTHCLIP_BOX
    ours = pasted[:, r0:r1, c0:c1]
    assert pasted.shape == (2, 480, 640) and ours.shape == theirs.shape == (2, 416, 544)
    assert (pasted[:, :r0] == 0).all() and (pasted[:, :, c1:] == 0).all()  # zeros around the box
    for a, b in zip(ours, theirs):
        assert b.std() > 0.01, b.std()  # the weights give maps that vary across the frame (about 0.02 m)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4, np.linalg.norm(a - b) / np.linalg.norm(b)
        # and to 1% of that variation at every pixel (measured: 0.05%; CLIP's mean and std instead of
        # ImageNet's: 6%, though only 2e-4 relative, since random weights make the maps nearly flat)
        assert np.abs(a - b).max() < 0.01 * b.std(), np.abs(a - b).max() / b.std()
    # scored: the project's depthclip protocol against calculate_error.py on DepthCLIP's own map
    scores = evaluate.score(maps, depths, protocol)["depth"]
    for i in range(len(rgb)):
        ref = compute_errors_NYU(torch.from_numpy(gt[i])[None, None], torch.from_numpy(theirs[i])[None, None])
        _, a1, a2, a3, abs_rel, log10, rmse = ref
        expected = {"d1": a1, "d2": a2, "d3": a3, "abs_rel": abs_rel, "log10": log10, "rmse": rmse}
        for key, value in expected.items():
            ours_value = float(scores[key][i])
            assert abs(ours_value - value) < 1e-4 * max(1.0, abs(value)), (i, key, ours_value, value)


def test_channel_step_is_every_other_channel():
    """DepthCLIP's F.interpolate(scale_factor=0.5) over the channel axis, as the model slices it."""
    x = torch.randn(2, 221, 2048)
    assert torch.equal(F.interpolate(x, scale_factor=0.5), x[..., ::2])


def test_depth_is_fp32_under_autocast_and_at_the_input_size():
    # layer4: 32 x 16 = 512 channels, halved to 256: the text features must have 256 (RN50: 2048, 1024)
    sd = resnet_state_dict(
        seed=1,
        embed_dim=256,
        image_resolution=64,
        vision_layers=(1, 1, 1, 1),
        vision_width=16,
        width=64,
        heads=1,
        layers=1,
    )
    model = moa.DepthCLIPZeroShot(clip_vit.build_model(sd)).eval()
    image = torch.randn(1, 3, 96, 128)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        depth = model(image)["depth"]
    with torch.no_grad():
        plain = model(image)["depth"]
    assert depth.dtype == torch.float32 and depth.shape == (1, 1, 96, 128)
    assert torch.equal(depth, plain)  # autocast changed nothing
    assert 1.0 <= depth.min() and depth.max() <= 3.0  # a mean of DepthCLIP's bin depths


def test_resnets_are_refused_where_they_cannot_work():
    with pytest.raises(clip_vit.UserError, match="RN50's 2:1"):  # RN101-like: 512 channels, 32-d text
        moa.DepthCLIPZeroShot(clip_vit.build_model(small_resnet_state_dict()))
    with pytest.raises(clip_vit.UserError, match="MoA-DepthCLIP needs a ViT"):
        moa.build_model(clip_vit.build_model(small_resnet_state_dict()), moa.DepthConfig())


def test_evaluate_zero_shot_on_an_rn50_layout_archive_end_to_end(tmp_path):
    sd = resnet_state_dict(
        seed=3, embed_dim=256, vision_layers=(1, 1, 1, 1), vision_width=16, width=64, heads=1, layers=1
    )
    path = write_torchscript_archive(official_dtypes(sd), tmp_path / "rn.pt")
    cmd = [
        sys.executable,
        str(ROOT / "evaluate.py"),
        "--zero-shot",
        "--clip",
        str(path),
        *"--protocol depthclip --data synthetic --limit 3 --batch-size 2".split(),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["n_images"] == 3 and out["protocol"]["crop"] == "depthclip"
    assert 0 <= out["metrics"]["d1"] <= 1 and out["metrics"]["rmse"] > 0


def test_train_refuses_a_resnet_clip_before_writing_anything(tmp_path):
    path = write_torchscript_archive(official_dtypes(small_resnet_state_dict()), tmp_path / "rn.pt")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--data",
        "synthetic",
        "--clip",
        str(path),
        "--out",
        str(out),
        *"--epochs 1 --synthetic-frames 8".split(),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        "error: --clip: a ResNet CLIP; MoA-DepthCLIP needs a ViT (a ResNet runs only as zero-shot DepthCLIP: "
        "evaluate.py --zero-shot)"
    ]
    assert not out.exists()  # no folder, lock or log
