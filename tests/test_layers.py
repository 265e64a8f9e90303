"""The package's layers hold: no module imports a layer above its own, and no imports form a cycle
(tests/layers.py). The checker itself is shown to catch both on a copy of the tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from layers import LAYERS, layer_of, modules, problems

REPO = Path(__file__).resolve().parents[1]


def test_every_import_goes_down_or_sideways_and_nothing_forms_a_cycle():
    assert problems(REPO) == []


def test_every_module_has_a_layer_and_a_new_one_must_be_placed():
    for module in modules(REPO):
        layer_of(module)  # a KeyError names a module the table misses
    assert layer_of("distseq") == (len(LAYERS) - 1, "entry")
    with pytest.raises(KeyError, match="distseq.brand_new is in no layer"):
        layer_of("distseq.brand_new")


def test_the_layers_order_the_architecture():
    order = [name for name, _ in LAYERS]
    assert order.index("tasks") < order.index("models") < order.index("data") < order.index("config") \
        < order.index("distributed") < order.index("checkpoint") < order.index("training") < order.index("use") \
        < order.index("entry")


def copy_of_tree(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "distseq", tmp_path / "distseq", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_an_upward_import_is_caught_even_inside_a_function(tmp_path):
    root = copy_of_tree(tmp_path)
    heads = root / "distseq" / "tasks" / "heads.py"
    heads.write_text(heads.read_text() + "\n\ndef _upward():\n    from distseq.training.loop import train\n")
    found = problems(root)
    assert len(found) == 2, found  # the upward edge, and the cycle it closes (training imports tasks)
    line = len(heads.read_text().splitlines())
    assert found[0] == (f"distseq/tasks/heads.py:{line}: distseq.tasks.heads (tasks) imports distseq.training.loop "
                        f"(training), a layer above it")
    assert found[1].startswith("import cycle: distseq.")


def test_a_cycle_within_one_layer_is_caught(tmp_path):
    root = copy_of_tree(tmp_path)
    heads = root / "distseq" / "tasks" / "heads.py"
    heads.write_text(heads.read_text() + "\n\ndef _sideways():\n    from distseq.tasks.base import Task\n")
    found = problems(root)
    assert found == ["import cycle: distseq.tasks.base -> distseq.tasks.heads -> distseq.tasks.base"], found


def test_the_checker_runs_as_a_script_and_fails_on_a_problem(tmp_path):
    ok = subprocess.run([sys.executable, str(REPO / "tests" / "layers.py"), str(REPO)], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("layers: every import goes down"), ok.stdout + ok.stderr
    root = copy_of_tree(tmp_path)
    (root / "distseq" / "ops" / "__init__.py").write_text("from distseq.ops import launch\n")
    bad = subprocess.run([sys.executable, str(REPO / "tests" / "layers.py"), str(root)], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "the package distseq.ops spans several layers" in bad.stdout, bad.stdout
