"""
The repository as a reader meets it: the README's file table is generated from the files (so it cannot go
stale), the code is formatted by the formatter CI runs, the import graph is the architecture (no script
imports a script, no circles), and nothing points outside the repository. Sizes are described, not tested:
`python tests/measure.py` prints code tokens and densities per file.

    python -m pytest -q tests/test_repo.py
    python tests/measure.py --readme   # rewrites the README's file table
"""

import ast
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402  (tests/measure.py, the size and density report)

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train", "evaluate"}


def readme():
    return (ROOT / "README.md").read_text()


def test_readme_file_table_is_current():
    current = measure.readme_span(readme())
    assert current is not None, "README has no generated file table"
    assert current.group(0) == measure.readme_table(), "stale: run `python tests/measure.py --readme`"


def test_measure_counts_code_tokens_not_layout(tmp_path):
    # the same statements on one line or wrapped over four, with or without docstrings and comments
    layouts = {
        "packed": "total = f(a, b) + g(c)  # the sum of two calls\npair = (1, 2)\n",
        "spread": '"""Docstring."""\n# the sum\ntotal = (\n    f(a, b)\n    + g(c)\n)\npair = (1, 2)\n',
    }
    measured = {}
    for name, text in layouts.items():
        (tmp_path / f"{name}.py").write_text(text)
        measured[name] = measure.measure(tmp_path / f"{name}.py")
    assert measured["packed"]["tokens"] == 20, measured  # total = f ( a , b ) + g ( c ) | pair = ( 1 , 2 )
    assert measured["spread"]["tokens"] == measured["packed"]["tokens"] + 2  # only the added ( )
    (tmp_path / "parallel.py").write_text("a, b = 1, 2\nB, C = x.shape\n")
    assert measure.measure(tmp_path / "parallel.py")["par_per_100"] == 50.0  # a shape unpack is not one


def test_code_is_formatted():
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed (pip install -r requirements-dev.txt)")
    run = subprocess.run([ruff, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, "run `ruff format .`:\n" + run.stdout + run.stderr


def test_readme_is_an_entrance():
    """The README is an entrance of about 14 KB, status and measurements live in docs/: well above that size
    this warns (no test fails on a sentence), and the docs it sends readers to exist."""
    if len(readme().encode()) > 20 * 1024:
        warnings.warn(f"README is {len(readme().encode()):,} bytes: move status and measurements to docs/")
    for doc in ("status.md", "paper-notes.md", "files.md", "kernel.md", "kernel-log.md", "bad-input.md"):
        assert (ROOT / "docs" / doc).is_file() and f"`{doc}`" in readme(), doc


def project_imports(path):
    """The project modules a file imports ("kernels" for anything under kernels/)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & {"clip_vit", "moa", "data_nyu", "cli", "pictures", "train", "evaluate", "kernels"}


def test_import_graph_is_the_architecture():
    graph = {p.stem: project_imports(p) for p in ROOT.glob("*.py")}
    graph["kernels"] = set().union(*(project_imports(p) for p in ROOT.glob("kernels/*.py"))) - {"kernels"}
    assert graph["kernels"] == set(), "kernels/ must import nothing from the project"
    assert graph["clip_vit"] == set()
    for name, deps in graph.items():
        assert not deps & SCRIPTS, f"{name} imports a script: {deps & SCRIPTS}"
    # layers: bottom (clip_vit, kernels) < middle (data_nyu, moa) < the scripts' helpers (cli, pictures) < scripts;
    # an edge never points up or sideways
    layer = {
        "clip_vit": 0,
        "kernels": 0,
        "data_nyu": 1,
        "moa": 1,
        "cli": 2,
        "pictures": 2,
        "train": 3,
        "evaluate": 3,
    }
    for name, deps in graph.items():
        for dep in deps:
            assert layer[dep] < layer[name], f"{name} -> {dep} breaks the layering"


# third-party distributions allowed to install a top-level module named like one of ours, and why that is safe
SHADOWED_ON_PURPOSE = {
    # Hugging Face's `kernels`, pulled in by transformers >= 5 (test-only): the Hugging Face parity test runs
    # transformers in its own process (`python -I`, outside the repository), where ours is not on sys.path;
    # bench/bench_clip.py appends the repository to sys.path, so site-packages' `kernels` comes first
    "kernels": {"kernels"},
}


def test_no_installed_package_is_shadowed_unknowingly():
    """A package installed under one of our module names is shadowed by the repository's copy in every process
    started from the repository root, so its importers break (transformers 5 did, through `kernels`). Each
    such collision must be known and handled (SHADOWED_ON_PURPOSE); a new one fails here, by name."""
    import importlib.metadata

    ours = {p.stem for p in ROOT.glob("*.py")} | {"kernels", "tests"}
    installed = importlib.metadata.packages_distributions()
    for module in sorted(ours & set(installed)):
        dists = set(installed[module])
        assert dists <= SHADOWED_ON_PURPOSE.get(module, set()), (
            f"installed {sorted(dists)} provide a top-level `{module}`, which the repository's {module} shadows"
        )


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.md", "*.txt", ".ci/*"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    for rel in tracked:
        if rel.startswith("tests/"):  # tests may read ../shared/data, and skip cleanly without it
            continue
        text = (ROOT / rel).read_text(errors="replace")
        assert "../shared" not in text and "shared/docs" not in text, f"{rel} points outside the repository"
