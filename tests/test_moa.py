"""
moa.py: the MoA layer against a per-token loop, parameter counts, gradient flow, shapes, the loss, and a
learning test on a small random CLIP. Run: python -m pytest -q tests/test_moa.py
"""
import math

import pytest
import torch
import torch.nn.functional as F

import clip_vit
import moa


def rand_weights(D=16, H=8, E=4, R=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(H, D), (H,), (E, H), (E,), (E, R, D), (E, R), (E, D, R), (E, D)]
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def per_token_loop(x, w1, b1, w2, b2, dw, db, uw, ub, top_k, temperature):
    """An independent, deliberately naive MoA: one token at a time, one expert at a time."""
    flat = x.reshape(-1, x.shape[-1])
    ys, gs = [], []
    for t in flat:
        logits = [(sum(w2[e, j] * max(0.0, float(w1[j] @ t + b1[j])) for j in range(w1.shape[0])) + b2[e]) / temperature
                  for e in range(w2.shape[0])]
        kept = sorted(range(len(logits)), key=lambda e: (-float(logits[e]), e))[:top_k]
        z = sum(math.exp(float(logits[e])) for e in kept)
        gates = torch.zeros(len(logits), dtype=x.dtype)
        y = t.clone()
        for e in kept:
            gates[e] = math.exp(float(logits[e])) / z
            hidden = F.gelu(dw[e] @ t + db[e])
            y = y + gates[e] * (uw[e] @ hidden + ub[e])
        ys.append(y)
        gs.append(gates)
    return torch.stack(ys).reshape(x.shape), torch.stack(gs).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("top_k,temperature", [(1, 2.0), (2, 0.7), (4, 2.0), (4, 1.0)])
def test_moa_reference_matches_per_token_loop(top_k, temperature):
    ws = rand_weights()
    x = torch.randn(2, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y, gates = moa.moa_reference(x, *ws, top_k, temperature)
    y_ref, g_ref = per_token_loop(x, *ws, top_k, temperature)
    assert y.shape == x.shape and gates.shape == (2, 3, 4)
    torch.testing.assert_close(gates, g_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    assert ((gates > 0).sum(-1) == top_k).all() and torch.allclose(gates.sum(-1), torch.ones(2, 3, dtype=x.dtype))


def test_top_k_ties_go_to_lower_index():
    w1, b1, w2, b2, *rest = rand_weights()
    w2, b2 = torch.zeros_like(w2), torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # experts 1-3 tie
    _, gates = moa.moa_reference(torch.randn(5, 16, dtype=torch.float64), w1, b1, w2, b2, *rest, 2, 1.0)
    assert (gates[:, 1:3] == 0.5).all() and (gates[:, [0, 3]] == 0).all()


def test_moa_parameter_counts_and_identity_init():
    assert sum(p.numel() for p in moa.MoA().parameters()) == 495_492  # paper.md §9
    for k, total in [(1, 790_788), (2, 1_187_848), (4, 1_981_968), (8, 3_570_208), (16, 6_746_688)]:
        assert 4 * sum(p.numel() for p in moa.MoA(num_experts=k).parameters()) == total
    layer = moa.MoA(dim=32, bottleneck=8, gate_hidden=16)
    x = torch.randn(2, 5, 32)
    assert torch.equal(layer(x), x)  # zero-initialised up-projection: identity at insertion
    assert 0 < layer.last_entropy <= math.log(4) + 1e-6


# ----------------------------------------------------------------------------------------------------
# the depth model on small random CLIPs

def small_clip(layers=12, width=64, res=64, seed=0):
    sd = clip_vit.random_state_dict(embed_dim=32, image_resolution=res, vision_layers=layers, vision_width=width,
                                    patch=32, width=64, heads=1, layers=1, seed=seed)
    return clip_vit.build_model(sd)


def small_cfg(**kw):
    return moa.DepthConfig(bottleneck=8, gate_hidden=16, **kw)


def test_gradients_reach_exactly_the_trainable_parts():
    clip = small_clip()
    clip.encode_text = None  # the text tower must never run in a training step
    model = moa.MoADepthCLIP(clip, small_cfg(num_bins=16), context=torch.randn(32))
    with torch.no_grad():
        for m in model.moa:  # move off the identity init so every adapter weight gets a gradient
            m.up_w.normal_(0, 0.1)
    depth = torch.rand(2, 1, 64, 64) * 9 + 0.5
    out = model(torch.randn(2, 3, 64, 64))
    loss, _ = moa.depth_loss(out, depth, torch.ones_like(depth, dtype=torch.bool), model.cfg)
    loss.backward()
    for name, p in model.named_parameters():
        trainable = name.startswith(("moa.", "cls_head", "reg_head", *[f"visual.transformer.resblocks.{i}." for i in (8, 9, 10, 11)]))
        assert p.requires_grad == trainable, name
        if trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not hasattr(model, "transformer") and not hasattr(model, "token_embedding")


def test_default_model_parameters_and_large_input():
    clip = clip_vit.build_model(clip_vit.random_state_dict())
    model = moa.MoADepthCLIP(clip, moa.DepthConfig(), context=torch.randn(512))
    rows, table = moa.parameter_report(model)
    got = {name: (t, f) for name, t, f in rows}
    assert got["CLIP image blocks 8-11"] == (4 * 7_087_872, 0)
    assert got["MoA modules (4)"] == (1_981_968, 0)
    assert got["depth heads"] == (165_249, 0)  # 1x1 heads 1280 -> 128 and 1280 -> 1
    assert got["total"][0] == 28_351_488 + 1_981_968 + 165_249 and "30,498,705" in table
    assert got["total"][0] + got["total"][1] == 87_849_216 + 1_981_968 + 165_249  # the whole image tower
    with torch.no_grad():
        out = model(torch.randn(1, 3, 448, 576))  # a 14x18 grid: positional embedding interpolated
    assert out["depth"].shape == (1, 1, 448, 576) and out["logits"].shape == (1, 128, 448, 576)
    assert ((out["depth"] > 0) & (out["depth"] <= 10)).all()


def test_scene_context_is_a_unit_vector(shared_file):
    shared_file("clip", "bpe_simple_vocab_16e6.txt.gz")
    clip = small_clip(layers=1)
    c = moa.scene_context(clip)
    assert c.shape == (32,) and torch.allclose(c.norm(), torch.tensor(1.0))
    one = moa.scene_context(clip, ["kitchen"])
    assert not torch.allclose(c, one)


def test_ablation_switches_change_the_model():
    clip = small_clip()
    base = moa.MoADepthCLIP(clip, small_cfg(use_moa=False, use_context=False, num_bins=10))
    assert all(not m.gated and m.down_w.shape[0] == 1 for m in base.moa) and base.cls_head.in_channels == 64
    assert base(torch.randn(1, 3, 64, 64))["logits"].shape == (1, 10, 64, 64)
    k8 = moa.MoADepthCLIP(small_clip(), small_cfg(num_experts=8, top_k=2), context=torch.randn(32))
    assert k8.moa[0].down_w.shape[0] == 8 and k8.moa[0].top_k == 2 and k8.cls_head.in_channels == 96

# ----------------------------------------------------------------------------------------------------
# the loss


def test_silog_forms_hand_computed():
    pred, gt = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])  # g = [ln 2, 0]
    assert moa.silog(pred, gt, "paper").item() == pytest.approx(2.222096, rel=1e-5)  # 10 (Var + 0.85 Mean^2)
    assert moa.silog(pred, gt, "bts").item() == pytest.approx(3.716590, rel=1e-5)    # 10 sqrt(E g^2 - 0.85 Mean^2)
    assert moa.silog(gt * 3, gt).item() == pytest.approx(10 * 0.85 * math.log(3) ** 2, rel=1e-5)


def test_loss_holes_empty_mask_and_perfect_prediction():
    cfg = small_cfg(num_bins=16)
    gt = torch.rand(2, 1, 8, 8) * 9 + 0.5
    gt[0, 0, :4] = 0  # holes
    mask = gt > 0
    logits = torch.randn(2, 16, 8, 8, requires_grad=True)
    out = {"logits": logits, "depth_reg": gt.clamp_min(1e-3), "depth": gt}
    loss, terms = moa.depth_loss(out, gt, mask, cfg)
    assert torch.isfinite(loss) and terms["l1"] == 0 and terms["silog"] == pytest.approx(0, abs=1e-6)
    assert loss.item() == pytest.approx(terms["cls"])
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, :, :4].abs().sum() == 0  # holes give nothing
    empty, _ = moa.depth_loss(out, gt, torch.zeros_like(mask), cfg)
    assert empty.item() == 0 and not torch.isnan(empty)
    # the bin target is the bin whose centre is nearest the ground truth
    centres = moa.bin_centres(cfg)
    gt2 = centres[[3, 7]].view(2, 1, 1, 1).expand(2, 1, 2, 2).clone()
    peaked = torch.full((2, 16, 2, 2), -30.0)
    peaked[0, 3], peaked[1, 7] = 30.0, 30.0
    loss, terms = moa.depth_loss({"logits": peaked, "depth_reg": gt2, "depth": gt2}, gt2, gt2 > 0, cfg)
    assert terms["cls"] < 1e-6


def test_model_learns_a_tiny_batch():
    torch.manual_seed(0)
    cfg = small_cfg(num_bins=16, moa_layers=(0, 1, 2, 3), trainable_blocks=2)
    model = moa.MoADepthCLIP(small_clip(layers=4), cfg, context=torch.randn(32))
    centres = moa.bin_centres(model.cfg)
    images = torch.randn(4, 3, 64, 64)
    depth = centres[[2, 5, 9, 13]].view(4, 1, 1, 1).expand(4, 1, 16, 16).clone()  # one depth per image
    mask = torch.ones_like(depth, dtype=torch.bool)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(100):
        loss, _ = moa.depth_loss(model(images, out_size=(16, 16)), depth, mask, model.cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.4f}")


def test_runtime_decides_device_and_dtype():
    assert moa.runtime("cpu") == (torch.device("cpu"), None)
    assert moa.runtime("auto")[0].type == ("cuda" if torch.cuda.is_available() else "cpu")
