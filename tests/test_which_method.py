"""benchmarks/which_method.py's reading of the convergence runs and its front: the README's "which method
when" names the methods this front returns."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def which_method():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import which_method as module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def test_each_variant_keeps_its_best_lr_and_its_grid(which_method, tmp_path: Path) -> None:
    runs = [("a", 3e-3, [(50, 5.0), (100, 4.3)]), ("a", 6e-3, [(50, 4.9), (100, 4.2)]),
            ("a", 1e-2, [(50, 4.8), (100, 4.25)]), ("b", 1e-2, [(100, 4.1)])]
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"runs": [{"method": m, "lr": lr, "evals": e} for m, lr, e in runs]}))
    losses = which_method.losses(path)
    assert losses == {"a": (6e-3, 4.2, [3e-3, 6e-3, 1e-2]), "b": (1e-2, 4.1, [1e-2])}
    assert which_method.lr_cell(*losses["a"][::2]) == "0.006 (of 0.003, 0.006, 0.01)"
    assert which_method.lr_cell(1e-2, [3e-3, 6e-3, 1e-2]) == "0.01 (of 0.003, 0.006, 0.01) (edge)"
    assert which_method.lr_cell(*losses["b"][::2]) == "0.01 (of 0.01) (edge)"


def test_the_front_holds_the_methods_nothing_beats_on_both(which_method) -> None:
    points = {"big-best": (20.0, 1.00), "mid": (15.0, 1.05), "mid-worse": (16.0, 1.06), "small": (10.0, 1.08),
              "tie": (15.0, 1.05), "dominated": (21.0, 1.00)}
    # mid-worse: mid has less memory and a lower loss; dominated: big-best, same loss and less memory;
    # mid and tie are equal on both, so neither beats the other.
    assert which_method.front(points) == ["big-best", "mid", "small", "tie"]


def test_the_convergence_labels_are_those_of_the_runs(which_method) -> None:
    """METHODS names each method's variant as the committed llama-mini runs label it (it once looked for
    apollo-r48 and apollo-mini-r1, which no run is called, and left APOLLO out of the table): every
    method of the table has its run."""
    labels = set(which_method.losses(ROOT / "benchmarks" / "results" / "convergence_llama-mini.json"))
    missing = [variant for variant, _ in which_method.METHODS.values() if variant not in labels]
    assert missing == []
