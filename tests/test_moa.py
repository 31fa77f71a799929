"""
moa.py: the MoA layer against a per-token loop, parameter counts, gradient flow, the fp32
residual stream, shapes, the similarity head and the zero-shot model, both losses on hand-computed
values, the scene context, runtime(), checkpoints, and a learning test on a small random CLIP; then
time to first depth: text features in checkpoints, building without random init, the mapped CLIP
reader, lazy imports.
Run: python -m pytest -q tests/test_moa.py
"""

import math
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_vit
import moa
from kernels import fused_moa as fused_moa_module


def rand_weights(D=16, H=8, E=4, R=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(H, D), (H,), (E, H), (E,), (E, R, D), (E, R), (E, D, R), (E, D)]
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


def paper_moa(**kw):
    """A MoA layer with the paper's sizes (DepthConfig's defaults), kw overriding them."""
    cfg = moa.DepthConfig()
    sizes = dict(
        dim=768,
        num_experts=cfg.num_experts,
        bottleneck=cfg.bottleneck,
        gate_hidden=cfg.gate_hidden,
        top_k=cfg.top_k,
        temperature=cfg.temperature,
    )
    return moa.MoA(**{**sizes, **kw})


def per_token_loop(x, w1, b1, w2, b2, dw, db, uw, ub, top_k, temperature):
    """An independent, deliberately naive MoA: one token at a time, one expert at a time."""
    flat = x.reshape(-1, x.shape[-1])
    ys, gs = [], []
    for t in flat:
        hidden = [max(0.0, float(w1[j] @ t + b1[j])) for j in range(w1.shape[0])]
        logits = [
            (sum(w2[e, j] * hidden[j] for j in range(len(hidden))) + b2[e]) / temperature
            for e in range(w2.shape[0])
        ]
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
    assert ((gates > 0).sum(-1) == top_k).all()
    assert torch.allclose(gates.sum(-1), torch.ones(2, 3, dtype=x.dtype))


def test_top_k_ties_go_to_lower_index():
    w1, b1, w2, b2, *rest = rand_weights()
    w2 = torch.zeros_like(w2)
    b2 = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # experts 1-3 tie
    x = torch.randn(5, 16, dtype=torch.float64)
    _, gates = moa.moa_reference(x, w1, b1, w2, b2, *rest, 2, 1.0)
    assert (gates[:, 1:3] == 0.5).all() and (gates[:, [0, 3]] == 0).all()


def test_moa_parameter_counts_identity_init_and_top_k_zero_means_all():
    assert sum(p.numel() for p in paper_moa().parameters()) == 495_492  # paper notes §1
    for k, total in [(1, 790_788), (2, 1_187_848), (4, 1_981_968), (8, 3_570_208), (16, 6_746_688)]:
        assert 4 * sum(p.numel() for p in paper_moa(num_experts=k).parameters()) == total
    layer = paper_moa(dim=32, bottleneck=8, gate_hidden=16, top_k=0)
    x = torch.randn(2, 5, 32)
    assert torch.equal(layer(x), x)  # zero-initialised up-projection: identity at insertion
    entropy = torch.special.entr(layer.last_gates).sum(-1).mean()  # the gates of this forward, kept
    assert layer.last_gates.shape == (2, 5, 4) and 0 < entropy <= math.log(4) + 1e-6
    with torch.no_grad():
        layer.up_w.normal_()
    ws = [
        layer.gate_w1,
        layer.gate_b1,
        layer.gate_w2,
        layer.gate_b2,
        layer.down_w,
        layer.down_b,
        layer.up_w,
        layer.up_b,
    ]
    dense = moa.moa_reference(x, *ws, 4, 2.0)[0]
    torch.testing.assert_close(layer(x), dense)  # top_k=0: all 4 experts
    layer.top_k = 1
    assert not torch.allclose(layer(x), dense)


def test_a_failing_triton_kernel_names_the_way_out(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel image is available\nfor this device")

    monkeypatch.setattr(fused_moa_module, "fused_moa", broken)
    expected = (
        r"^--moa-impl triton: .*RuntimeError: no kernel image is available for this device"
        r".*--moa-impl torch$"
    )
    with pytest.raises(clip_vit.UserError, match=expected):
        paper_moa(dim=16, bottleneck=4, gate_hidden=8, impl="triton")(torch.randn(1, 3, 16))


# -----------------------------------------------------------------------------
# the depth model on small random CLIPs


def tiny_clip(layers=12, width=64, res=64, seed=0):
    sd = clip_vit.random_state_dict(
        embed_dim=32,
        image_resolution=res,
        vision_layers=layers,
        vision_width=width,
        patch=32,
        width=64,
        heads=1,
        layers=1,
        seed=seed,
    )
    return clip_vit.build_model(sd)


def small_cfg(**kw):
    return moa.DepthConfig(bottleneck=8, gate_hidden=16, **kw)


def fake_tokenize(texts):
    """Stands in for the BPE tokenizer where a test needs only distinct, well-formed ids: SOT,
    one id per text, EOT (the largest id, where the text tower reads its features)."""
    ids = torch.zeros(len(texts), 77, dtype=torch.long)
    ids[:, 0], ids[:, 2] = 49406, 49407
    ids[:, 1] = torch.arange(len(texts)) + 1000
    return ids


def test_gradients_reach_exactly_the_trainable_parts():
    clip = tiny_clip()
    model = moa.MoADepthCLIP(clip, small_cfg(num_bins=16))
    clip.encode_text = None  # the text tower must never run in a training step
    with torch.no_grad():
        for m in model.moa:  # move off the identity init so every adapter weight gets a gradient
            m.up_w.normal_(0, 0.1)
    depth = torch.rand(2, 1, 64, 64) * 9 + 0.5
    out = model(torch.randn(2, 3, 64, 64))
    loss, _ = moa.depth_loss(out, depth, torch.ones_like(depth, dtype=torch.bool), model.cfg)
    loss.backward()
    blocks = [f"visual.transformer.resblocks.{i}." for i in (8, 9, 10, 11)]
    trained = ("moa.", "cls_head", "reg_head", *blocks)
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(trained), name
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not hasattr(model, "transformer") and not hasattr(model, "token_embedding")


def test_residual_stream_stays_fp32_under_bf16_autocast():
    """Every block and MoA sees and returns an fp32 stream, while the matmuls inside run in bf16."""
    model = moa.MoADepthCLIP(tiny_clip(), small_cfg(num_bins=16))
    seen = []
    blocks = model.visual.transformer.resblocks

    def record(module, args, out):
        seen.append((type(module).__name__, args[0].dtype, out.dtype))

    for module in [*blocks, *model.moa, blocks[3].mlp]:
        module.register_forward_hook(record)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = model.features(torch.randn(1, 3, 64, 64))
    stream = [s for s in seen if s[0] != "Sequential"]
    assert len(stream) == 12 + 4, stream
    assert all(s[1:] == (torch.float32, torch.float32) for s in stream), stream
    mlp = [s for s in seen if s[0] == "Sequential"]
    assert mlp[0][2] == torch.bfloat16  # the MLP's matmuls run in bf16
    assert f.dtype == torch.float32


def test_default_model_parameters_and_large_input(monkeypatch):
    monkeypatch.setattr(moa, "scene_context", lambda clip: torch.randn(512))  # skip the text tower
    clip = clip_vit.build_model(clip_vit.random_state_dict())
    model = moa.MoADepthCLIP(clip, moa.DepthConfig())
    got, table = moa.parameter_counts(model), moa.parameter_table(model)
    assert got["visual"] == [4 * 7_087_872, 87_849_216 - 4 * 7_087_872]  # paper notes §1
    assert got["moa"] == [1_981_968, 0]
    assert got["cls_head"] == [1280 * 128 + 128, 0] and got["reg_head"] == [1280 + 1, 0]
    assert got["total"] == [28_351_488 + 1_981_968 + 165_249, 87_849_216 - 4 * 7_087_872]
    assert "30,498,705" in table and len(table.splitlines()) == 5
    with torch.no_grad():
        out = model(torch.randn(1, 3, 448, 576))  # a 14x18 grid: positional embedding interpolated
    assert out["depth"].shape == (1, 1, 448, 576) and out["logits"].shape == (1, 128, 448, 576)
    assert ((out["depth"] > 0) & (out["depth"] <= 10)).all()


def test_scene_context_normalises_each_prompt_then_the_mean(monkeypatch):
    """With a stub text tower giving [10, 0] and [0, 1], the context is the renormalised mean of the
    unit vectors, [1, 1] / sqrt 2; averaging the raw features first would give [0.995, 0.0995]."""
    monkeypatch.setattr(clip_vit, "tokenize", fake_tokenize)
    stub = types.SimpleNamespace(
        token_embedding=nn.Embedding(1, 1), encode_text=lambda ids: torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    )
    c = moa.scene_context(stub, ["kitchen", "classroom"])
    torch.testing.assert_close(c, torch.tensor([1.0, 1.0]) / math.sqrt(2))


def test_scene_context_on_a_random_clip():
    clip = tiny_clip(layers=1)
    c = moa.scene_context(clip)
    assert c.shape == (32,) and torch.allclose(c.norm(), torch.tensor(1.0))
    assert not torch.allclose(c, moa.scene_context(clip, ["kitchen"]))


def test_distance_prompts_are_tokenised_as_the_text_tower_expects():
    """The similarity head feeds the text tower SOT, the BPE ids of "This object is {word}", EOT,
    then zeros; the reference ids come from OpenAI's tokenizer."""
    fed = []
    clip = tiny_clip(layers=1)
    encode = clip.encode_text
    clip.encode_text = lambda ids: fed.append(ids) or encode(ids)
    model = moa.MoADepthCLIP(clip, small_cfg(head="similarity", use_context=False))
    words = {
        "giant": [4687],
        "extremely close": [6519, 2660],
        "close": [2660],
        "not in distance": [783, 530, 7964],
        "a little remote": [320, 1274, 9687],
        "far": [2384],
        "unseen": [19069],
    }
    (ids,) = fed
    for row, word_ids in zip(ids.tolist(), words.values()):
        expected = [49406, 589, 14115, 533, *word_ids, 49407]
        assert row == expected + [0] * (77 - len(expected))
    torch.testing.assert_close(model.text.norm(dim=-1), torch.ones(7))
    assert model.bins.tolist() == [1.0, 1.5, 2.0, 2.25, 2.5, 2.75, 3.0]


def zero_shot_model(monkeypatch, sim_bins=7):
    """The zero-shot model evaluate.py builds: frozen CLIP, an identity adapter after block 11."""
    monkeypatch.setattr(clip_vit, "tokenize", fake_tokenize)
    clip = tiny_clip(seed=3)
    cfg = small_cfg(
        head="similarity",
        use_context=False,
        use_moa=False,
        moa_layers=(11,),
        trainable_blocks=0,
        sim_bins=sim_bins,
    )
    return clip, moa.MoADepthCLIP(clip, cfg).eval()


def test_similarity_head_is_depthclip_on_clips_own_tokens(monkeypatch):
    """Shapes, probabilities that sum to 1, and the depth against an independent computation: CLIP's
    last-layer patch tokens through ln_post and proj, cosine with the prompt embeddings,
    x 100 / 0.1, softmax, bins."""
    clip, model = zero_shot_model(monkeypatch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith("moa.")}
    image = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(image)
        tokens = clip.visual.transformer(clip.visual.embed(image))[:, 1:]  # (2, 2*3, 64)
        emb = F.normalize(clip.visual.ln_post(tokens) @ clip.visual.proj, dim=-1)
        text = F.normalize(clip.encode_text(fake_tokenize(["x"] * 7)), dim=-1)
        probs = (100 * emb @ text.T / 0.1).softmax(-1)  # (2, 6, 7)
        grid = (probs @ torch.tensor([1.0, 1.5, 2.0, 2.25, 2.5, 2.75, 3.0])).view(2, 1, 2, 3)
    assert set(out) == {"depth"} and out["depth"].shape == (2, 1, 64, 96)
    ref = F.interpolate(grid, size=(64, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["depth"], ref, rtol=1e-4, atol=1e-4)
    assert (out["depth"] > 1.0 - 1e-5).all() and (out["depth"] < 3.0 + 1e-5).all()  # bins: 1-3 m
    _, model10 = zero_shot_model(monkeypatch, sim_bins=10)
    assert model10.text.shape == (10, 32) and model10.bins.max() > 3.0


def test_similarity_head_trains_its_adapters_with_either_loss(monkeypatch):
    monkeypatch.setattr(clip_vit, "tokenize", fake_tokenize)
    depth = torch.rand(2, 1, 64, 64) * 2 + 1
    mask = torch.ones_like(depth, dtype=torch.bool)
    for loss in ("paper", "composite"):
        cfg = small_cfg(head="similarity", use_context=False, use_moa=False, loss=loss)
        model = moa.MoADepthCLIP(tiny_clip(), cfg)
        total, terms = moa.depth_loss(model(torch.randn(2, 3, 64, 64)), depth, mask, model.cfg)
        expected = {"l1", "silog"} if loss == "paper" else {"silog", "grad", "ssim", "l1"}
        assert set(terms) == expected
        total.backward()
        assert model.moa[0].up_w.grad.abs().sum() > 0
        assert model.visual.transformer.resblocks[11].mlp.c_fc.weight.grad.abs().sum() > 0
        assert not hasattr(model, "cls_head") and moa.parameter_counts(model)["total"][0] > 0
    with pytest.raises(clip_vit.UserError, match="--head similarity: .*--use-context 0"):
        moa.DepthConfig(head="similarity")


def test_ablation_switches_change_the_model():
    clip = tiny_clip()
    base = moa.MoADepthCLIP(clip, small_cfg(use_moa=False, use_context=False, num_bins=10))
    assert all(not m.gated and m.down_w.shape[0] == 1 for m in base.moa)
    assert base.cls_head.in_channels == 64
    assert base(torch.randn(1, 3, 64, 64))["logits"].shape == (1, 10, 64, 64)
    k8 = moa.MoADepthCLIP(tiny_clip(), small_cfg(num_experts=8, top_k=2))
    assert k8.moa[0].down_w.shape[0] == 8 and k8.moa[0].top_k == 2 and k8.cls_head.in_channels == 96


def test_the_authors_similarity_head_setup(tmp_path, monkeypatch):
    """sim_proj="random" and adapter_init="default" (G23, G20), as --recipe adadepthclip sets them: the
    head maps the tokens with a fresh nn.Linear(768 -> 512) that is frozen, drawn from the seed, the one
    the head uses instead of ln_post and proj, and saved with the checkpoint so that from_checkpoint
    (which draws nothing) restores it; each adapter's up-projection starts from nn.Linear's init, so a
    fresh adapter is no longer the identity."""
    monkeypatch.setattr(clip_vit, "tokenize", fake_tokenize)
    clip_file = str(tmp_path / "clip.pt")
    torch.save(tiny_clip().state_dict(), clip_file)
    cfg = small_cfg(
        head="similarity", use_context=False, use_moa=False, sim_proj="random", adapter_init="default"
    )

    def build(seed):
        torch.manual_seed(seed)
        return moa.MoADepthCLIP(clip_vit.load(clip_file), cfg).eval()

    model = build(0)
    weight = model.project.weight
    assert weight.shape == (32, 64) and not weight.requires_grad and not model.project.bias.requires_grad
    assert (
        weight.abs().max() <= 64**-0.5 and weight.std() > 0.5 * 64**-0.5 / 3**0.5
    )  # nn.Linear's U(+-1/sqrt(768))
    assert torch.equal(build(0).project.weight, weight) and not torch.equal(build(1).project.weight, weight)
    up = model.moa[0].up_w
    assert up.abs().max() <= 8**-0.5 and (up != 0).float().mean() > 0.99  # U(+-1/sqrt(bottleneck))
    x = torch.randn(1, 5, 64)
    assert not torch.allclose(model.moa[0](x), x)  # no identity at insertion
    assert moa.MoADepthCLIP(tiny_clip(), small_cfg()).moa[0].up_w.abs().max() == 0  # the default: zero
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(image)["depth"]
        model.visual.proj.mul_(3)  # CLIP's own projection plays no part
        torch.testing.assert_close(model(image)["depth"], want, rtol=0, atol=0)
        tokens = model.features(image).flatten(2).transpose(1, 2)
        emb = F.normalize(tokens @ weight.T + model.project.bias, dim=-1)
        probs = (100 * emb @ model.text.T / 0.1).softmax(-1)
        grid = (probs @ model.bins).view(2, 1, 2, 2)
        torch.testing.assert_close(
            want, F.interpolate(grid, size=(64, 64), mode="bilinear"), rtol=1e-5, atol=1e-5
        )
        model.visual.proj.div_(3)
    moa.save_checkpoint(
        tmp_path / "ckpt.pt", model, clip={"name": clip_file, "sha256": clip_vit.weights_sha256(clip_file)}
    )
    ckpt = moa.load_checkpoint(tmp_path / "ckpt.pt")
    assert {"project.weight", "project.bias"} <= set(ckpt["model"])
    restored = moa.from_checkpoint(ckpt)
    assert torch.equal(restored.project.weight, weight) and not restored.project.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(restored(image)["depth"], want)


# -----------------------------------------------------------------------------
# the losses


def test_silog_forms_hand_computed():
    pred, gt = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0])  # g = [ln 2, 0]
    # 10 (Var + 0.85 Mean^2), and 10 sqrt(E g^2 - 0.85 Mean^2)
    assert moa.silog(pred, gt, "paper").item() == pytest.approx(2.222096, rel=1e-5)
    assert moa.silog(pred, gt, "bts").item() == pytest.approx(3.716590, rel=1e-5)
    assert moa.silog(gt * 3, gt).item() == pytest.approx(10 * 0.85 * math.log(3) ** 2, rel=1e-5)


def test_composite_loss_hand_computed():
    # identical maps: SILog, SSIM and L1 vanish; only the prediction's own smoothness remains
    gt = torch.rand(2, 1, 6, 7) * 5 + 1
    _, terms = moa.composite_loss(gt.clone(), gt)
    assert terms["ssim"] == pytest.approx(0, abs=1e-6)
    assert terms["l1"] == 0 and terms["silog"] < 1e-3
    # smoothness: mean |x difference| + mean |y difference| of the prediction; offsets: no change
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 5.0]]]])
    assert moa.composite_loss(pred, torch.ones_like(pred))[1]["grad"] == pytest.approx(1.5 + 2.5)
    assert moa.composite_loss(pred + 3, torch.ones_like(pred))[1]["grad"] == pytest.approx(4.0)
    assert moa.composite_loss(torch.full_like(pred, 7.0), pred)[1]["grad"] == 0
    # a flat 2 m prediction of a flat 1 m scene, by hand: g = ln 2 everywhere, SSIM of two constants
    loss, terms = moa.composite_loss(torch.full((1, 1, 3, 3), 2.0), torch.ones(1, 1, 3, 3))
    silog_bts = 10 * math.sqrt(0.15) * math.log(2)
    c1 = 0.01**2
    # the sigma terms are 0: SSIM = (2 mu_p mu_g + C1) / (mu_p^2 + mu_g^2 + C1)
    ssim_term = (1 - (2 * 2 * 1 + c1) / (4 + 1 + c1)) / 2
    expected = {"silog": silog_bts, "grad": 0.0, "ssim": ssim_term, "l1": 1.0}
    assert terms == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(1.0 * silog_bts + 0.2 * ssim_term + 0.1 * 1.0, rel=1e-5)
    # holes (gt <= 1e-8) are left out of every term that needs the ground truth
    gt_holes = torch.ones(1, 1, 3, 3)
    gt_holes[..., 0, :] = 0
    _, terms = moa.composite_loss(torch.ones(1, 1, 3, 3), gt_holes)
    assert terms["l1"] == 0 and terms["silog"] < 1e-3
    # an all-hole batch: a zero that backpropagates, no terms (depth_loss checks before either loss)
    pred = torch.ones(1, 1, 3, 3, requires_grad=True)
    holes = torch.zeros(1, 1, 3, 3)
    zero, terms = moa.depth_loss({"depth": pred}, holes, holes > 0, small_cfg(loss="composite"))
    assert zero.item() == 0 and zero.requires_grad and terms == {}


def ssim_by_loops(x, y, padding):
    """Per-pixel SSIM of 2-D lists x, y over 3x3 windows, written out with loops: this test's own oracle.
    padding "zeros" (the zeros count in each 3x3 mean) or "reflect" (mirrored, the edge not repeated)."""
    H, W = len(x), len(x[0])

    def at(m, i, j):  # m[i][j], with the padding outside the map
        inside = 0 <= i < H and 0 <= j < W
        if padding == "zeros" and not inside:
            return 0.0
        i = abs(i) if i < H else 2 * (H - 1) - i  # reflect: row -1 is row 1, row H is row H - 2
        j = abs(j) if j < W else 2 * (W - 1) - j
        return m[i][j]

    c1, c2 = 0.01**2, 0.03**2
    out = []
    for i in range(H):
        row = []
        for j in range(W):
            window = [
                (at(x, i + di, j + dj), at(y, i + di, j + dj)) for di in (-1, 0, 1) for dj in (-1, 0, 1)
            ]
            mx = sum(a for a, _ in window) / 9
            my = sum(b for _, b in window) / 9
            vx = sum(a * a for a, _ in window) / 9 - mx**2
            vy = sum(b * b for _, b in window) / 9 - my**2
            cov = sum(a * b for a, b in window) / 9 - mx * my
            row.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        out.append(row)
    return out


def test_composite_loss_total_counts_the_smoothness_term():
    """A non-flat prediction (its smoothness term is not 0), every term by hand: the total is
    1.0 SILog + 0.5 grad + 0.2 SSIM + 0.1 L1, so a term weighted 0 (or left out) fails."""
    rows = [[1.0, 2.0], [3.0, 5.0]]
    pred = torch.tensor([[rows]])  # (1, 1, 2, 2)
    loss, terms = moa.composite_loss(pred, torch.ones_like(pred))
    g = [math.log(v) for v in (1.0, 2.0, 3.0, 5.0)]  # ln pred - ln 1
    silog_bts = 10 * math.sqrt(sum(v * v for v in g) / 4 - 0.85 * (sum(g) / 4) ** 2)
    grad = (1 + 2) / 2 + (2 + 3) / 2  # mean |x difference| + mean |y difference|
    l1 = (0 + 1 + 2 + 4) / 4
    ssim = ssim_by_loops(rows, [[1.0, 1.0], [1.0, 1.0]], "reflect")
    ssim_term = sum((1 - s) / 2 for row in ssim for s in row) / 4
    expected = {"silog": silog_bts, "grad": grad, "ssim": ssim_term, "l1": l1}
    assert terms == pytest.approx(expected, rel=1e-5)
    total = 1.0 * silog_bts + 0.5 * grad + 0.2 * ssim_term + 0.1 * l1
    assert loss.item() == pytest.approx(total, rel=1e-5)


def test_composite_loss_padding_and_averaging_ours_and_the_authors():
    """Flat 2 m prediction of a flat 1 m scene, 3x3. Reflection padding keeps every window flat, so each
    pixel has the centre's SSIM (4 + C1) / (5 + C1). The authors' zero padding brings zeros into the 9-pixel
    means of the edge and corner pixels: by hand, a corner has means 8/9 and 4/9, variances 80/81 and 20/81,
    covariance 40/81; an edge pixel 4/3, 2/3, 8/9, 2/9 and 4/9 (both near 0.64 against the centre's 0.8)."""
    c1, c2 = 0.01**2, 0.03**2

    def ssim(mx, my, vx, vy, cov):
        return (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))

    centre = ssim(2, 1, 0, 0, 0)
    corner = ssim(8 / 9, 4 / 9, 80 / 81, 20 / 81, 40 / 81)
    edge = ssim(4 / 3, 2 / 3, 8 / 9, 2 / 9, 4 / 9)
    assert centre == pytest.approx((4 + c1) / (5 + c1)) and corner == pytest.approx(0.64, abs=1e-3)
    pred = torch.full((1, 1, 3, 3), 2.0)
    gt = torch.ones(1, 1, 3, 3)
    _, ours = moa.composite_loss(pred, gt, "ours")
    _, authors = moa.composite_loss(pred, gt, "authors")
    assert ours["ssim"] == pytest.approx((1 - centre) / 2, rel=1e-5)
    assert authors["ssim"] == pytest.approx((4 * (1 - corner) + 4 * (1 - edge) + (1 - centre)) / 18, rel=1e-5)
    # a hole (gt 0) at the top-left: ours averages SSIM and L1 over the 8 valid pixels, the authors' over all
    # 9, where the hole's L1 is the predicted 2 m itself; SILog and smoothness are the same in both
    gt[0, 0, 0, 0] = 0
    _, ours = moa.composite_loss(pred, gt, "ours")
    _, authors = moa.composite_loss(pred, gt, "authors")
    assert ours["l1"] == pytest.approx(1.0) and authors["l1"] == pytest.approx((8 * 1 + 2) / 9)
    rows_p = pred[0, 0].tolist()
    rows_g = gt[0, 0].tolist()
    reflect = [s for row in ssim_by_loops(rows_p, rows_g, "reflect") for s in row]
    zeros = [s for row in ssim_by_loops(rows_p, rows_g, "zeros") for s in row]
    assert ours["ssim"] == pytest.approx(sum((1 - s) / 2 for s in reflect[1:]) / 8, rel=1e-5)  # valid only
    assert authors["ssim"] == pytest.approx(sum((1 - s) / 2 for s in zeros) / 9, rel=1e-5)  # every pixel
    assert ours["silog"] == pytest.approx(authors["silog"]) and ours["grad"] == authors["grad"] == 0
    # depth_loss passes the config's form on
    out = {"depth": pred}
    mask = gt > 0
    via_cfg = moa.depth_loss(out, gt, mask, small_cfg(loss="composite", composite="authors"))[1]
    assert via_cfg == pytest.approx(authors)


def test_loss_holes_empty_mask_and_perfect_prediction():
    cfg = small_cfg(num_bins=16)
    gt = torch.rand(2, 1, 8, 8) * 9 + 0.5
    gt[0, 0, :4] = 0  # holes
    mask = gt > 0
    logits = torch.randn(2, 16, 8, 8, requires_grad=True)
    out = {"logits": logits, "depth_reg": gt.clamp_min(1e-3), "depth": gt}
    loss, terms = moa.depth_loss(out, gt, mask, cfg)
    assert torch.isfinite(loss) and terms["l1"] == 0
    assert terms["silog"] == pytest.approx(0, abs=1e-6)
    assert loss.item() == pytest.approx(terms["cls"])
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, :, :4].abs().sum() == 0  # holes give nothing
    empty, _ = moa.depth_loss(out, gt, torch.zeros_like(mask), cfg)
    assert empty.item() == 0 and not torch.isnan(empty)
    # the bin target is the bin whose centre is nearest the ground truth
    centres = moa.bin_centres(cfg)
    gt2 = centres[[3, 7]].view(2, 1, 1, 1).expand(2, 1, 2, 2).clone()
    peaked = torch.full((2, 16, 2, 2), -30.0)
    peaked[0, 3], peaked[1, 7] = 30.0, 30.0
    out = {"logits": peaked, "depth_reg": gt2, "depth": gt2}
    loss, terms = moa.depth_loss(out, gt2, gt2 > 0, cfg)
    assert terms["cls"] < 1e-6


def test_model_learns_a_tiny_batch():
    torch.manual_seed(0)
    cfg = small_cfg(num_bins=16, moa_layers=(0, 1, 2, 3), trainable_blocks=2)
    model = moa.MoADepthCLIP(tiny_clip(layers=4), cfg)
    centres = moa.bin_centres(model.cfg)
    images = torch.randn(4, 3, 64, 64)
    depth = centres[[2, 5, 9, 13]].view(4, 1, 1, 1).expand(4, 1, 64, 64).clone()  # one per image
    mask = torch.ones_like(depth, dtype=torch.bool)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(100):
        loss, _ = moa.depth_loss(model(images), depth, mask, model.cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


# -----------------------------------------------------------------------------
# checkpoints and the runtime


def test_checkpoint_round_trip_and_what_does_not_fit(tmp_path):
    """save -> load -> from_checkpoint rebuilds the same model from its CLIP file; a file or a
    config that cannot work is one UserError naming it."""
    clip_file = str(tmp_path / "clip.pt")
    torch.save(tiny_clip().state_dict(), clip_file)
    model = moa.MoADepthCLIP(clip_vit.load(clip_file), small_cfg(num_bins=16)).eval()
    with torch.no_grad():
        for m in model.moa:  # a trained part that differs from a fresh one
            m.up_w.normal_(0, 0.1)
    path = tmp_path / "ckpt.pt"
    clip_id = {"name": clip_file, "sha256": clip_vit.weights_sha256(clip_file)}
    moa.save_checkpoint(path, model, clip=clip_id)
    ckpt = moa.load_checkpoint(path)
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(moa.from_checkpoint(ckpt)(image)["depth"], model(image)["depth"])
    config = ckpt["model_config"]
    bad = [
        (
            {**ckpt, "model_config": {**config, "num_bins": 32}},  # another model
            r"^x\.pt: tensors \['cls_head.bias', 'cls_head.weight'\] do not fit",
        ),
        (
            {**ckpt, "model_config": {**config, "future": 1}},  # a newer version's checkpoint
            r"^x\.pt: model_config fields .* \['future'\]$",
        ),
        (
            {**ckpt, "clip": {**clip_id, "sha256": "0" * 64}},  # other CLIP weights
            r"^x\.pt: trained on CLIP weights 000000000000\.\.\., but ",
        ),
    ]
    for broken, expected in bad:
        with pytest.raises(clip_vit.UserError, match=expected):
            moa.from_checkpoint(broken, where="x.pt")
    junk, other = tmp_path / "junk.pt", tmp_path / "other.pt"
    junk.write_bytes(b"\x00junk" * 100)
    torch.save({"model": {}}, other)
    for file, problem in [
        (tmp_path / "nope.pt", "no such checkpoint file"),
        (junk, r"not a checkpoint \(train.py writes a zip archive"),
        (other, "not a MoA-DepthCLIP checkpoint"),
    ]:
        with pytest.raises(clip_vit.UserError, match=f"{file.name}: {problem}"):
            moa.load_checkpoint(file)


def test_runtime_decides_device_and_dtype():
    assert moa.runtime("cpu") == (torch.device("cpu"), None, False, "fp32")  # (GPUs: tests/test_fused_moa.py)
    assert moa.runtime("auto")[0].type == ("cuda" if torch.cuda.is_available() else "cpu")
    n = torch.cuda.device_count()
    for bad in ("tpu", f"cuda:{n}", "cuda:x") + (() if n else ("cuda",)):
        with pytest.raises(clip_vit.UserError, match=f"^--device {bad}: not on this machine"):
            moa.runtime(bad)


# -----------------------------------------------------------------------------
# time to first depth: text features stored in the checkpoint, no random initialisation, lazy imports


def text_tower_off(monkeypatch):
    """Make every way into the text tower raise: its forward and the tokenizer before it."""

    def off(*args, **kwargs):
        raise AssertionError("the text tower ran")

    monkeypatch.setattr(clip_vit.CLIP, "encode_text", off)
    monkeypatch.setattr(clip_vit, "tokenize", off)


@pytest.mark.parametrize("kw", [dict(num_bins=16), dict(head="similarity", use_context=False)])
def test_checkpoint_carries_text_features_and_loading_runs_no_text_tower(tmp_path, monkeypatch, kw):
    clip_file = str(tmp_path / "clip.pt")
    torch.save(tiny_clip().state_dict(), clip_file)
    model = moa.MoADepthCLIP(clip_vit.load(clip_file), small_cfg(**kw)).eval()
    with torch.no_grad():
        for m in model.moa:  # a trained part that differs from a fresh one
            m.up_w.normal_(0, 0.1)
    clip_id = {"name": clip_file, "sha256": clip_vit.weights_sha256(clip_file)}
    moa.save_checkpoint(tmp_path / "ckpt.pt", model, clip=clip_id)
    ckpt = moa.load_checkpoint(tmp_path / "ckpt.pt")
    stored = ckpt["text_features"]
    name = "text" if kw.get("head") == "similarity" else "context"
    assert stored["clip_sha256"] == clip_id["sha256"] and set(stored) == {"clip_sha256", name}
    assert torch.equal(stored[name], getattr(model, name))
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(image)
        with monkeypatch.context() as patch:
            text_tower_off(patch)
            got = moa.from_checkpoint(ckpt)(image)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        # a checkpoint from before (none stored) or one whose entry is for other CLIP weights: the
        # text tower runs, as it always did, and the stored tensors are not used
        calls = []
        encode = clip_vit.CLIP.encode_text
        monkeypatch.setattr(clip_vit.CLIP, "encode_text", lambda *a: calls.append(1) or encode(*a))
        old = {k: v for k, v in ckpt.items() if k != "text_features"}
        other = {**ckpt, "text_features": {"clip_sha256": "0" * 64, name: torch.zeros_like(stored[name])}}
        for made_before in (old, other):
            got = moa.from_checkpoint(made_before)(image)
            assert all(torch.equal(got[k], want[k]) for k in want)
        assert len(calls) == 2


def test_no_random_init_draws_nothing_and_builds_the_same_clip():
    """build_model constructs CLIP under no_random_init and takes the state dict's tensors: the
    weights, buffers and outputs are those of a CLIP built with random weights and then loaded,
    and no random number is drawn. What is not random (fills, aranges) still runs."""
    sd = clip_vit.random_state_dict(
        embed_dim=32,
        image_resolution=64,
        vision_layers=2,
        vision_width=64,
        patch=32,
        width=64,
        heads=1,
        layers=2,
        seed=3,
    )
    reference = clip_vit.CLIP(32, 64, 2, 64, 32, 77, 49408, 64, 1, 2)
    reference.load_state_dict(sd)
    state = torch.random.get_rng_state()
    built = clip_vit.build_model(dict(sd))
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn
    assert built.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, reference.state_dict()[k]) for k, a in built.state_dict().items())
    image = torch.randn(2, 3, 64, 64)
    ids = clip_vit.tokenize(["a dog", "a photo of a kitchen."])
    with torch.no_grad():
        assert torch.equal(built(image, ids)[0], reference.eval()(image, ids)[0])
    state = torch.random.get_rng_state()
    with clip_vit.no_random_init():
        norm = nn.LayerNorm(4)
        steps = torch.arange(3.0) * 2
        linear = nn.Linear(3, 2)
        adapter = moa.MoA(16, 4, 8, 8, 0, 2.0)  # linear_init: Tensor.uniform_
    assert torch.equal(norm.weight, torch.ones(4)) and torch.equal(norm.bias, torch.zeros(4))
    assert torch.equal(adapter.up_w, torch.zeros(4, 16, 8)) and adapter.down_w.shape == (4, 8, 16)
    assert torch.equal(steps, torch.tensor([0.0, 2.0, 4.0])) and linear.weight.shape == (2, 3)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_clip_archive_is_read_in_place_and_never_written(tmp_path):
    """The reader maps the archive: its tensors equal torch.jit.load's, writing to one leaves the
    file as it was, and a member stored compressed (not as torch writes) is read all the same."""
    import zipfile
    from clip_fixtures import official_dtypes, small_state_dict, write_torchscript_archive

    path = write_torchscript_archive(official_dtypes(small_state_dict()), tmp_path / "vit.pt")
    before = clip_vit.sha256sum(path)
    jit = torch.jit.load(str(path)).state_dict()
    sd = clip_vit.read_torchscript_state_dict(path)
    assert sd.keys() == jit.keys()
    assert all(torch.equal(sd[k], v) and sd[k].dtype == v.dtype for k, v in jit.items())
    sd["ln_final.weight"].add_(1.0)  # fp32 in the file: a view of the mapped bytes
    assert clip_vit.sha256sum(path) == before
    assert torch.equal(clip_vit.read_torchscript_state_dict(path)["ln_final.weight"], jit["ln_final.weight"])
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    sd = clip_vit.read_torchscript_state_dict(deflated)
    assert all(torch.equal(sd[k], v) for k, v in jit.items())


def test_scripts_import_no_optional_heavy_package():
    """evaluate.py and train.py start without triton (the CUDA kernel's), h5py or scipy (NYU files)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, evaluate, train; heavy = {'triton', 'h5py', 'scipy', 'sympy'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    root = Path(moa.__file__).parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
