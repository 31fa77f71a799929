"""
CPU tests of tests/gpu_check.py's machinery (the GPU sections themselves run only on a GPU): flag parsing, the
incrementally written report (and its copy into $OUT), the section guard, the time budget and its sections,
subprocess timeouts, the loss-curve comparison, and the tokenizer without ftfy (the lent GPU machine has none).
Run: python -m pytest -q tests/test_gpu_check.py
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check  # noqa: E402


def test_flags():
    args = gpu_check.parse_args([])
    assert args.report == "gpu_check.md" and args.budget == 330
    assert gpu_check.parse_args(["--report", "x/r.md", "--budget", "10"]).report == "x/r.md"
    for bad in (["--budget", "0"], ["--budget", "soon"], ["--nope"]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.parse_args(bad)
        assert exc.value.code == 2


def test_report_is_rewritten_after_every_section_and_copied_to_out(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    report = gpu_check.Report(tmp_path / "sub" / "r.md", "# GPU check\n\nH100, torch x\n")
    report.add("1. first", True, "fine")
    text = (tmp_path / "sub" / "r.md").read_text()
    assert "| 1. first | pass |" in text and "## 1. first\n\nfine" in text and "H100" in text
    assert (out / "r.md").read_text() == text
    report.add("2. second", False, "broken")
    assert "| 2. second | **FAIL** |" in (out / "r.md").read_text() and not report.ok


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    report = gpu_check.Report(tmp_path / "r.md", "# h\n")

    def boom():
        raise RuntimeError("no such GPU")

    assert gpu_check.guarded(report, "a", boom) is False
    assert gpu_check.guarded(report, "b", lambda: (True, "ok")) is True
    text = (tmp_path / "r.md").read_text()
    assert "section raised RuntimeError: no such GPU" in text and "| b | pass |" in text and not report.ok


def test_loss_comparison():
    assert gpu_check.losses_agree([2.0, 1.5, 1.2], [2.0, 1.5, 1.2]) == (True, 0.0, 3)
    ok, worst, n = gpu_check.losses_agree([2.0, 1.51], [2.0, 1.5], rtol=0.01)
    assert ok and worst == pytest.approx(0.01 / 1.5) and n == 2
    assert not gpu_check.losses_agree([2.0, 1.6], [2.0, 1.5], rtol=0.02)[0]  # 6.7 % at step 2
    assert not gpu_check.losses_agree([2.0], [2.0, 1.5])[0]  # a run stopped early
    assert not gpu_check.losses_agree([], [])[0]
    assert not gpu_check.losses_agree([float("nan")], [1.0])[0]


def test_read_log_keeps_step_records(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"step": 1, "loss": 2.0, "img_s": 30.0},
                {"epoch": 0},
                {"step": 2, "loss": 1.9, "img_s": 31.0},
            ]
        )
        + "\n"
    )
    assert [r["loss"] for r in gpu_check.read_log(log)] == [2.0, 1.9]


def test_commands_time_out_and_the_budget_cuts_timeouts():
    rc, out, secs = gpu_check.run_cmd(
        [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"], timeout=1.5
    )
    assert rc is None and "started" in out and "timed out" in out and secs < 20
    assert gpu_check.run_cmd([sys.executable, "-c", "print('hi')"], timeout=30)[:2] == (0, "hi\n")
    deadline = gpu_check.Deadline(5)
    assert 4 < deadline.cut(100) <= 5 and deadline.cut(1) == 1
    deadline.end = time.perf_counter() - 1
    assert deadline.cut(100) == 0


def test_the_sections_fit_the_budget_in_order():
    """The sections' shares add up to the default budget (one 10-minute command holds the check with room for
    start-up), the benchmark runs before training, and a section gets its share or what is left."""
    assert sum(gpu_check.SECTIONS.values()) <= gpu_check.parse_args([]).budget <= 400
    assert list(gpu_check.SECTIONS) == ["tests", "bench", "train", "eval"]
    assert gpu_check.SECTIONS["eval"] >= 80  # one evaluation took 59 s on an H200, start-up included
    source = Path(gpu_check.__file__).read_text()
    assert source.index("check_bench(deadline") < source.index("check_training(deadline")
    deadline = gpu_check.Deadline(150)
    assert 89 < deadline.section("tests").cut(1000) <= 90
    deadline.end = time.perf_counter() + 30
    assert deadline.section("eval").cut(1000) <= 30


def test_the_tokenizer_runs_without_ftfy(monkeypatch):
    """Without ftfy (as on the lent GPU machine) plain ASCII prompts, this project's, get the same ids as with it
    (OpenAI's); other text stops with one line naming ftfy."""
    import clip_vit
    import moa

    pytest.importorskip("ftfy")  # the comparison needs both
    # the prompts moa.py builds (scene context, the similarity head, DepthCLIP), and harder ASCII
    texts = [f"a photo of a {s}." for s in moa.SCENES] + [f"This object is {w}" for w, _ in moa.DISTANCES]
    texts += ["it's  2 m\taway\r\n", "<a> b's (c) x-y, 3.5!? ~`#$%^*_+=[]{}|\\;:\"/@", "a diagram"]
    tok = clip_vit._tokenizer()
    with_ftfy = [tok.encode(t) for t in texts]
    monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy now raises ModuleNotFoundError
    assert [tok.encode(t) for t in texts] == with_ftfy
    for text in ("caf\u00e9", "fish &amp; chips", "a\x0bb"):
        with pytest.raises(clip_vit.UserError, match="text beyond plain ASCII needs ftfy"):
            tok.encode(text)


def test_without_cuda_it_stops_with_one_error_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "tests/gpu_check.py", "--report", str(tmp_path / "r.md")],
        cwd=gpu_check.ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    assert proc.returncode == 2 and proc.stderr.strip() == "error: tests/gpu_check.py needs a CUDA device"
    assert not (tmp_path / "r.md").exists()
