"""`examples/trm/compare_runs.py`: arms paired by seed across two experiment runs."""

from __future__ import annotations

import json

import pytest

from examples.trm import compare_runs


def _write(path, accs: dict[str, list[float]], task: str = "maze") -> None:
    lines = []
    for seed in range(len(next(iter(accs.values())))):
        arms = {arm: {"eval": {"raw": {"exact_acc": v[seed]}}} for arm, v in accs.items()}
        lines.append(json.dumps({"task": task, "seed": seed, "result": {"runs": [{"arms": arms}]}}))
    path.write_text("\n".join(lines) + "\n{torn")  # a killed run's last line is skipped


def test_differences_are_second_minus_first_per_arm_paired_by_seed(tmp_path, capsys):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(first, {"baseline": [0.9, 0.8, 0.7], "laser": [0.5, 0.5, 0.5]})
    _write(second, {"baseline": [0.8, 0.6, 0.7], "laser": [0.5, 0.5, 0.5]})
    rows = {r["arm"]: r for r in compare_runs.compare(first, second)}
    assert rows["baseline"]["diff"] == pytest.approx(-10.0) and rows["baseline"]["seeds"] == 3
    assert rows["baseline"]["low"] < -10.0 < rows["baseline"]["high"]
    assert (rows["laser"]["diff"], rows["laser"]["p"]) == (0.0, 1.0)
    assert compare_runs.main([str(first), str(second)]) == 0
    assert "| maze | baseline | 3 | -10.00 [" in capsys.readouterr().out


def test_tasks_or_seeds_not_in_both_runs_are_left_out(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write(first, {"baseline": [0.9, 0.8]}, task="maze")
    _write(second, {"baseline": [0.9, 0.8]}, task="sudoku")
    assert compare_runs.compare(first, second) == []
