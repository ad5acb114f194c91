"""Tests for examples/trm/data.py: puzzle validity, uniqueness, augmentations, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from examples.trm.data import (
    DEFAULT_DIFFICULTY,
    SUDOKU_BOXES,
    augment_dataset,
    augment_maze,
    augment_sudoku,
    count_solutions,
    dihedral,
    generate_maze,
    generate_sudoku,
    is_shortest_path,
    is_valid_sudoku_solution,
    iterate_batches,
    make_dataset,
    seq_len,
    vocab_size,
)
from laser_fx.errors import ConfigError

SUDOKU_CASES = [
    pytest.param(4, 20, id="4x4"),
    pytest.param(6, 10, id="6x6"),
    pytest.param(9, 2, id="9x9"),
]


def _check_sudoku(puzzle: np.ndarray, solution: np.ndarray, box: tuple[int, int]) -> None:
    assert is_valid_sudoku_solution(solution, box, puzzle)
    assert count_solutions(puzzle, box) == 1


@pytest.mark.parametrize(("size", "n"), SUDOKU_CASES)
def test_sudoku_dataset_is_valid_and_unique(size: int, n: int) -> None:
    box = SUDOKU_BOXES[size]
    inputs, labels = make_dataset("sudoku", size, n, seed=3)
    assert inputs.shape == labels.shape == (n, seq_len("sudoku", size))
    assert inputs.dtype == labels.dtype == torch.long
    assert int(labels.min()) == 2 and int(labels.max()) == vocab_size("sudoku", size) - 1
    clues = inputs != 1
    assert torch.equal(inputs[clues], labels[clues]), "clues must equal the solution"
    assert ((~clues).sum(1) == DEFAULT_DIFFICULTY["sudoku"][size]).all()
    for x, y in zip(inputs.numpy(), labels.numpy(), strict=True):
        _check_sudoku(x - 1, y - 1, box)


@given(seed=st.integers(0, 2**31 - 1), size=st.sampled_from([4, 6]))
def test_sudoku_augmentation_preserves_validity(seed: int, size: int) -> None:
    box = SUDOKU_BOXES[size]
    rng = np.random.default_rng(seed)
    puzzle, solution = generate_sudoku(box, blanks=size * 2, rng=rng)
    aug_p, aug_s = augment_sudoku(puzzle, solution, box, rng)
    _check_sudoku(aug_p, aug_s, box)
    assert (aug_p == 0).sum() == (puzzle == 0).sum(), "blanks stay blanks"


def test_transposing_a_2x3_sudoku_breaks_it() -> None:
    # pins why augment_sudoku never transposes non-square boxes
    _, solution = generate_sudoku((2, 3), blanks=0, rng=np.random.default_rng(0))
    assert is_valid_sudoku_solution(solution, (2, 3))
    assert not is_valid_sudoku_solution(solution.T, (2, 3))


def test_9x9_augmentation_preserves_validity() -> None:
    rng = np.random.default_rng(5)
    puzzle, solution = generate_sudoku((3, 3), blanks=40, rng=rng)
    for _ in range(3):
        puzzle, solution = augment_sudoku(puzzle, solution, (3, 3), rng)
        _check_sudoku(puzzle, solution, (3, 3))


@pytest.mark.parametrize(
    ("grid", "expected"),
    [
        pytest.param(np.zeros(16, dtype=int), 2, id="empty-grid-capped"),
        pytest.param(np.array([1, 1] + [0] * 14), 0, id="clash-in-row"),
        pytest.param(np.array([1, 2, 3, 4, 3, 4, 1, 2, 2, 1, 4, 3, 4, 3, 2, 1]), 1, id="solved"),
    ],
)
def test_count_solutions_table(grid: np.ndarray, expected: int) -> None:
    assert count_solutions(grid, (2, 2)) == expected


def test_count_solutions_respects_limit() -> None:
    assert count_solutions(np.zeros(16, dtype=int), (2, 2), limit=10) == 10


def test_invalid_solution_is_rejected() -> None:
    _, solution = generate_sudoku((2, 2), blanks=0, rng=np.random.default_rng(1))
    bad = solution.copy()
    bad[0, 0], bad[0, 1] = bad[0, 1], bad[0, 0]  # row stays a permutation, columns break
    assert not is_valid_sudoku_solution(bad, (2, 2))
    puzzle = np.zeros_like(solution)
    puzzle[3, 3] = solution[3, 3] % 4 + 1
    assert not is_valid_sudoku_solution(solution, (2, 2), puzzle)


@pytest.mark.parametrize("task", ["sudoku", "maze"])
def test_make_dataset_is_deterministic(task: str) -> None:
    size = 6 if task == "sudoku" else 9
    a = make_dataset(task, size, 8, seed=11, augment=True)
    b = make_dataset(task, size, 8, seed=11, augment=True)
    c = make_dataset(task, size, 8, seed=12, augment=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def _distance(inputs: np.ndarray) -> int:
    """BFS steps from S to G over non-wall cells (-1: unreachable), written independently."""
    n = inputs.shape[0]
    start = tuple(np.argwhere(inputs == 3)[0])
    goal = tuple(np.argwhere(inputs == 4)[0])
    dist = {start: 0}
    frontier = [start]
    while frontier:
        nxt = []
        for r, c in frontier:
            for cell in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= cell[0] < n and 0 <= cell[1] < n and inputs[cell] != 1 and cell not in dist:
                    dist[cell] = dist[(r, c)] + 1
                    nxt.append(cell)
        frontier = nxt
    return dist.get(goal, -1)


def _every_path_cell_is_needed(inputs: np.ndarray, labels: np.ndarray) -> bool:
    """Unique shortest path <=> walling off any path cell lengthens (or cuts) the path."""
    length = _distance(inputs)
    for cell in zip(*np.nonzero(labels == 5), strict=True):
        blocked = inputs.copy()
        blocked[cell] = 1
        if 0 <= _distance(blocked) <= length:
            return False
    return True


@given(seed=st.integers(0, 2**31 - 1), size=st.sampled_from([7, 10, 13]))
def test_maze_label_is_the_unique_shortest_path(seed: int, size: int) -> None:
    inputs, labels = generate_maze(size, np.random.default_rng(seed))
    assert set(np.unique(inputs)) <= {1, 2, 3, 4}
    assert is_shortest_path(inputs, labels)
    assert (labels == 5).sum() + 1 == _distance(inputs)
    assert _every_path_cell_is_needed(inputs, labels)
    for k in range(8):
        assert is_shortest_path(dihedral(inputs, k), dihedral(labels, k)), f"dihedral {k}"


def test_maze_path_reaches_min_length() -> None:
    _, labels = make_dataset("maze", 15, 20, seed=0, difficulty=15)
    assert ((labels == 5).sum(1) + 1 >= 15).all()


def test_is_shortest_path_rejects_broken_labels() -> None:
    inputs, labels = generate_maze(11, np.random.default_rng(4))
    path = np.argwhere(labels == 5)
    missing = labels.copy()
    missing[tuple(path[len(path) // 2])] = 2
    assert not is_shortest_path(inputs, missing)
    extra = labels.copy()
    free = np.argwhere(labels == 2)
    extra[tuple(free[0])] = 5
    assert not is_shortest_path(inputs, extra)
    assert not is_shortest_path(labels, labels), "inputs with path marks are rejected"


def test_dihedral_gives_eight_distinct_transforms() -> None:
    grid = np.arange(9).reshape(3, 3)
    images = {dihedral(grid, k).tobytes() for k in range(8)}
    assert len(images) == 8


def test_augment_maze_and_dataset_keep_validity() -> None:
    inputs, labels = make_dataset("maze", 9, 4, seed=1)
    ax, ay = augment_dataset("maze", 9, inputs, labels, seed=0, copies=3)
    assert ax.shape == (12, 81)
    assert all(is_shortest_path(x, y) for x, y in zip(ax.numpy(), ay.numpy(), strict=True))
    sx, sy = augment_dataset("sudoku", 4, *make_dataset("sudoku", 4, 4, seed=1), seed=0, copies=2)
    for x, y in zip(sx.numpy(), sy.numpy(), strict=True):
        _check_sudoku(x - 1, y - 1, (2, 2))
    x, y = augment_maze(
        inputs[0].view(9, 9).numpy(), labels[0].view(9, 9).numpy(), np.random.default_rng(0)
    )
    assert is_shortest_path(x, y)


def test_iterate_batches_is_deterministic_and_covers_epoch() -> None:
    x = torch.arange(10)[:, None]
    it_a, it_b = iterate_batches(x, x, 5, seed=0), iterate_batches(x, x, 5, seed=0)
    a = [next(it_a)[0] for _ in range(2)]
    b = [next(it_b)[0] for _ in range(2)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert sorted(torch.cat(a).flatten().tolist()) == list(range(10))


@pytest.mark.parametrize(
    ("task", "size"),
    [
        pytest.param("sudoku", 5, id="sudoku-size"),
        pytest.param("chess", 8, id="task"),
        pytest.param("maze", 3, id="maze-too-small"),
    ],
)
def test_bad_arguments_raise(task: str, size: int) -> None:
    with pytest.raises(ConfigError, match="must"):
        make_dataset(task, size, 1, seed=0)


def test_vocab_sizes() -> None:
    assert [vocab_size("sudoku", s) for s in (4, 6, 9)] == [6, 8, 11]
    assert vocab_size("maze", 30) == 6 and seq_len("maze", 30) == 900
