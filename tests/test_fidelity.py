"""
Ten bugs that once passed the whole suite (a mutation test planted them one at a time, issue 29), one test
each. Each docstring names the bug it guards. They use what the other tests missed: maps that are not
constant, the edge values themselves (ground truth of exactly 10 m, a grid cell with no valid pixel, a
1-pixel checkerboard against PIL), the loss total against its weighted terms, the paper recipe's own
defaults, a second lock in the same process, and the precision launch_params picks per architecture.
Run: python -m pytest -q tests/test_fidelity.py
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data_nyu
import evaluate
import moa
import train
from test_data_nyu import bts_metrics
from test_evaluate import FakeModel, bilinear, ceiling_by_hand, oracle_scores, pixels, scored_gt


def uint8_frames(n, seed=0, h=480, w=640):
    """(n, 3, h, w) uint8 noise: no two neighbours alike, so every resize shows."""
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, h, w), dtype=np.uint8))


def recording_model(seen, input_size=(224, 224)):
    """A FakeModel that keeps the 0-255 pixels it is shown and answers a non-constant map (1-9 m)."""

    def forward(x):
        seen.append(pixels(x))
        ramp = torch.linspace(1, 9, x.shape[-1])
        return {"depth": ramp.expand(x.shape[0], 1, *x.shape[-2:]) + 0.5 * torch.sin(x[:, :1])}

    return FakeModel(forward, input_size)


def test_main_scores_the_authors_protocol_in_their_list_order(tmp_path, monkeypatch, capsys):
    """Bug: evaluate.py's main scored the authors' protocol in file order, not in their list's order (scene
    type, then frame). 10 frames of two interleaved scene types through main (--ceiling: no model needed):
    the authors' scores are the oracle's on their list's groups of 8 (frames 1, 3, 4, 6, 9, 0, 2, 5 | 7, 8),
    which differ from the file order's groups."""
    from nyu_fixtures import write_splits, write_v73

    rooms = data_nyu.SyntheticDepth(n=10, seed=4)
    depths = np.stack([rooms[i][1] * (1 + 0.1 * i) for i in range(10)]).clip(0.5, 9.5).astype(np.float32)
    scenes = ["b", "a", "b", "a", "a", "b", "a", "b", "b", "a"]
    write_v73(tmp_path / "nyu.mat", np.zeros((10, 480, 640, 3), np.uint8), depths, scene_types=scenes)
    write_splits(tmp_path / "splits.mat", [11], list(range(1, 11)))  # frames 1-10 are the test split
    argv = ["--ceiling", "--protocol", "authors", "--gt", "dense", "--batch-size", "3"]
    argv += ["--data", str(tmp_path / "nyu.mat"), "--splits", str(tmp_path / "splits.mat")]
    evaluate.main(evaluate.parse_args(argv), [])
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["protocols"]["authors"]["ceiling"]
    maps = ceiling_by_hand(scored_gt(depths.astype(np.float64), "authors"))["ceiling"][
        None
    ]  # (1, 10, 480, 640)
    by_list = oracle_scores("authors", maps, depths, [1, 3, 4, 6, 9, 0, 2, 5, 7, 8])[0]
    by_file = oracle_scores("authors", maps, depths)[0]
    for k in data_nyu.KEYS:
        assert got[k] == pytest.approx(np.mean([g[k] for g in by_list]), rel=1e-6), k
    assert abs(np.mean([g["rmse"] for g in by_list]) - np.mean([g["rmse"] for g in by_file])) > 1e-3


def test_authors_input_is_rounded_to_8_bit_levels():
    """Bug: the authors' bicubic input was not rounded to 8-bit levels. PIL's resize returns uint8, so the
    model is shown whole levels, PIL's own resize to within its rounding (noise frames)."""
    seen = []
    img = uint8_frames(2)
    evaluate.predict_maps(recording_model(seen), img, None, (480, 640), resize="pil-bicubic")
    shown = seen[0]  # (2, 3, 224, 224), 0-255
    assert (shown - shown.round()).abs().max() < 1e-3  # whole levels (float32 normalisation: ~1e-5)
    for frame, fed in zip(img, shown):
        pil = Image.fromarray(frame.permute(1, 2, 0).numpy()).resize((224, 224), Image.Resampling.BICUBIC)
        diff = (fed.permute(1, 2, 0) - torch.from_numpy(np.array(pil)).float()).abs()
        assert diff.max() <= 3 + 1e-3 and diff.mean() < 0.3  # PIL rounds between its two passes


def test_predict_maps_upsamples_with_half_pixel_centres():
    """Bug: predict_maps upsampled with align_corners=True. A non-constant map (a ramp plus a pattern) is
    upsampled to 480x640 as bilinear with half-pixel centres (align_corners False) computes it in numpy."""
    seen = []
    model = recording_model(seen)
    img = uint8_frames(2, seed=1)
    got = evaluate.predict_maps(model, img, None, (480, 640))["depth"].double().numpy()
    small = (
        model(data_nyu.normalize(data_nyu.resize(img, None, (224, 224))[0]))["depth"][:, 0].double().numpy()
    )
    np.testing.assert_allclose(got, np.clip(bilinear(small, (480, 640)), 1e-3, 10), atol=1e-5)


def test_ceiling_keeps_a_cell_mean_where_no_pixel_is_valid():
    """Bug: --ceiling lost its fallback for a grid cell with no valid pixel. Rows 0:150 are holes, so no
    pixel of the top row of cells is valid: those cells take the frame's valid mean (within the crop),
    in both maps, instead of 0 m; the rest of the ceiling is still the least-squares fit."""
    gt = torch.from_numpy(np.stack([data_nyu.SyntheticDepth(n=2, seed=7)[i][1] for i in range(2)]))
    gt[:, :150] = 0
    maps = evaluate.protocol_maps(None, gt, evaluate.PROTOCOLS["standard"], ceiling_input=(224, 224))
    r0, r1, c0, c1 = data_nyu.CROPS["eigen"]
    for b in range(2):
        scored = gt[b, r0:r1, c0:c1].double()
        frame_mean = float(scored[scored > 0].mean())
        for key in ("ceiling", "cell_mean"):
            top = maps[key][b, :30]  # upsampled from the top row of cells alone
            assert float((top - frame_mean).abs().max()) < 1e-9, (key, frame_mean, float(top.min()))
    # where pixels are valid, the least-squares fit, as numpy's lstsq finds it
    kept = np.zeros(gt.shape)
    kept[:, r0:r1, c0:c1] = gt[:, r0:r1, c0:c1]
    oracle = ceiling_by_hand(kept)["ceiling"]
    valid = kept > 0
    np.testing.assert_allclose(maps["ceiling"].numpy()[valid], oracle[valid], atol=1e-6)


def test_bicubic_is_antialiased_as_pil():
    """Bug: the bicubic resize ran without antialiasing. A 1-pixel checkerboard squashed to 224x224 is
    mid-grey to PIL (each output pixel averages ~6 source pixels); without antialiasing it aliases into
    stripes. data_nyu.bicubic, which both resizes use, equals PIL within one level."""
    rows, cols = np.mgrid[0:480, 0:640]
    board = np.repeat(((rows + cols) % 2 * 255).astype(np.uint8)[..., None], 3, axis=-1)  # (480, 640, 3)
    pil = np.asarray(Image.fromarray(board).resize((224, 224), Image.Resampling.BICUBIC)).astype(np.float64)
    ours = data_nyu.bicubic(torch.from_numpy(board).permute(2, 0, 1)[None].float(), (224, 224))[0]
    ours = ours.round().clamp(0, 255).permute(1, 2, 0).double().numpy()
    assert np.abs(ours - pil).max() <= 1
    assert np.abs(pil - 127.5).max() < 20  # the checkerboard's mean, as an antialiased resize gives it


def test_ground_truth_of_exactly_10_m_is_not_valid():
    """Bug: the metrics counted ground truth of exactly 10 m as valid (the range is 1e-3 < gt < 10, both
    ends exclusive, as BTS and AdaBins have it). Ground truth of exactly 10 m and exactly 1e-3 m, under
    a non-constant prediction, scores as holes would, in depth_metrics and in the authors' medians."""
    rng = np.random.default_rng(2)
    gt = rng.uniform(0.5, 9.5, (2, 480, 640))
    pred = gt * rng.uniform(0.7, 1.4, gt.shape)
    edge = rng.random(gt.shape) < 0.2
    gt[edge] = np.where(rng.random(int(edge.sum())) < 0.5, 10.0, 1e-3)
    holes = np.where(edge, 0.0, gt)
    for crop in ("eigen", "none"):
        got = data_nyu.depth_metrics(pred, gt, crop=crop)
        for b in range(2):
            expected = bts_metrics(pred[b], holes[b], data_nyu.CROPS[crop])
            for k in data_nyu.KEYS:
                assert float(got[k][b]) == pytest.approx(expected[k], rel=1e-9), (crop, k)
    protocol = evaluate.PROTOCOLS["authors"]
    maps = {"depth": torch.from_numpy(pred)}
    scores = [evaluate.score(maps, torch.from_numpy(g), protocol)["depth"] for g in (gt, holes)]
    for k in data_nyu.KEYS:
        assert float(scores[0][k][0]) == pytest.approx(float(scores[1][k][0]), rel=1e-12), k


def test_paper_loss_total_is_its_weighted_terms():
    """Bug: the L1 and SILog weights were swapped. The total is w_cls CE + w_reg L1 + w_silog SILog,
    term by term, at the paper's weights (1, 1, 0.5) and at three distinct ones."""
    torch.manual_seed(0)
    gt = torch.rand(2, 1, 8, 8) * 9 + 0.5
    out = {"logits": torch.randn(2, 16, 8, 8), "depth_reg": gt * torch.rand(2, 1, 8, 8).add(0.5)}
    out["depth"] = out["depth_reg"]
    for weights in ({}, {"w_cls": 0.7, "w_reg": 0.3, "w_silog": 2.0}):
        cfg = moa.DepthConfig(num_bins=16, **weights)
        loss, terms = moa.depth_loss(out, gt, gt > 0, cfg)
        assert terms["l1"] != pytest.approx(terms["silog"], rel=0.1)  # a swap shows
        expected = cfg.w_cls * terms["cls"] + cfg.w_reg * terms["l1"] + cfg.w_silog * terms["silog"]
        assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert (moa.DepthConfig().w_cls, moa.DepthConfig().w_reg, moa.DepthConfig().w_silog) == (1.0, 1.0, 0.5)


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    """Bug: the run lock was taken shared instead of exclusive, so two runs starting at once could both
    hold one --out. A second take_lock on the same folder, even from this process (flock locks belong
    to the open file), is refused with the holder's PID; once the first is closed, it succeeds."""
    first = train.take_lock(tmp_path)
    try:
        with pytest.raises(train.clip_vit.UserError, match=f"PID {train.os.getpid()}"):
            train.take_lock(tmp_path).close()
        with pytest.raises(train.clip_vit.UserError, match=f"PID {train.os.getpid()}"):
            train.check_lock(tmp_path)
    finally:
        first.close()
    train.take_lock(tmp_path).close()
    train.check_lock(tmp_path)  # free again: no error
    train.check_lock(tmp_path / "nowhere")  # no folder: nobody holds it


def test_paper_recipe_defaults_are_the_papers():
    """Bug: --train-gt defaulted to dense, hidden because --recipe adadepthclip sets raw. With no flag, the
    paper recipe: raw training depth (G12), §4.2's optimiser and schedule, and a DepthConfig equal to
    DepthConfig() (every model flag's default is the field's)."""
    args = train.parse_args([])
    assert args.recipe == "paper" and args.train_gt == "raw" and args.val_frac == 0
    assert (args.epochs, args.batch_size, args.lr, args.weight_decay) == (30, 8, 1e-5, 1e-4)
    assert (args.adapter_lr, args.head_lr, args.lr_schedule, args.augment) == (0, 0, "constant", 0)
    assert cli.config_of(moa.DepthConfig, args) == moa.DepthConfig()


def test_tf32_from_sm_80_on():
    """Bug: TF32 was enabled only above sm_80, so an A100 ran its fp32 matmuls in full precision.
    launch_params (a pure function, no GPU needed) picks IEEE fp32 on a T4 (sm_75, no TF32) and TF32
    from the A100 (sm_80) on, in every kernel; 16-bit matmuls take their own dtype's precision."""
    from kernels import fused_moa as fm

    gpus = {
        75: fm.SMEM_T4,
        80: fm.SMEM_A100,
        86: fm.SMEM_RTX,
        90: fm.SMEM_H100,
    }  # arch: shared memory per block
    for arch, smem in gpus.items():
        params = fm.launch_params(arch, smem, torch.float32, 768, 128, 4, 64)
        want = "tf32" if arch >= 80 else "ieee"
        assert {meta["PREC"] for meta, _, _ in params.values()} == {want}, arch
        half = fm.launch_params(arch, smem, torch.float16, 768, 128, 4, 64)
        assert {meta["PREC"] for meta, _, _ in half.values()} == {"ieee"}, arch
