"""Procedural Sudoku and maze data for the Tiny Recursive Model example (no downloads).

Everything is deterministic from a seed (a ``numpy.random.Generator`` drives every choice) and
pure numpy / Python, so a few thousand 4x4 or 6x6 puzzles take seconds.

Encodings follow the TRM reference:

- Sudoku (N = box_rows * box_cols): pad 0, blank 1, digit d in 1..N -> token d + 1; ``inputs`` are
  the puzzle, ``labels`` the full solution (every cell supervised). Internally a grid holds
  digits 0..N with 0 = blank, so ``token = digit + 1``.
- Maze on an N x N grid: charset ``"# SGo"`` -> 1..5 (wall 1, open 2, start 3, goal 4, path 5),
  pad 0. ``inputs`` carry no path marks; ``labels`` mark the shortest S->G path with 5 (S and G
  keep their tokens). Generated mazes always have a *unique* shortest path, so labels are
  well-defined (a perfect DFS maze plus a few extra openings; goals whose shortest path is not
  unique are never chosen).

Example::

    inputs, labels = make_dataset("sudoku", 6, n=1000, seed=0, difficulty=16)
    inputs.shape  # torch.Size([1000, 36]), vocab_size("sudoku", 6) == 8
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch

from laser_fx.errors import ConfigError

__all__ = [
    "DEFAULT_DIFFICULTY",
    "MAZE_CHARSET",
    "SUDOKU_BOXES",
    "augment_dataset",
    "augment_maze",
    "augment_sudoku",
    "count_solutions",
    "dihedral",
    "generate_maze",
    "generate_sudoku",
    "is_shortest_path",
    "is_valid_sudoku_solution",
    "iterate_batches",
    "make_dataset",
    "seq_len",
    "vocab_size",
]

SUDOKU_BOXES: dict[int, tuple[int, int]] = {4: (2, 2), 6: (2, 3), 9: (3, 3)}
"""Grid side -> (box rows, box cols)."""
MAZE_CHARSET = "# SGo"
"""Maze characters; character i has token i + 1 (pad is 0)."""
WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5
_MAZE_START_TRIES = 16  # start cells tried before settling for a shorter path than `min_path`
DEFAULT_DIFFICULTY: dict[str, dict[int, int]] = {
    # sudoku: number of blanks to reach (fewer if no further cell can be removed uniquely)
    "sudoku": {4: 10, 6: 16, 9: 50},
    # maze: minimum shortest-path length in cells (sizes not listed use the side length)
    "maze": {},
}


# ----------------------------------------------------------------------------------- sudoku
def _box_of(size: int) -> tuple[int, int]:
    if size not in SUDOKU_BOXES:
        raise ConfigError(f"Sudoku `size` must be one of {sorted(SUDOKU_BOXES)}, got {size}.")
    return SUDOKU_BOXES[size]


class _Units:
    """Row / column / box index of every cell of one grid shape (cached per shape)."""

    _cache: dict[tuple[int, int], _Units] = {}

    def __init__(self, box: tuple[int, int]):
        br, bc = box
        self.n = n = br * bc
        self.full = (1 << (n + 1)) - 2  # bits 1..n
        self.row = [i // n for i in range(n * n)]
        self.col = [i % n for i in range(n * n)]
        self.box = [(i // n // br) * br + (i % n) // bc for i in range(n * n)]

    @classmethod
    def get(cls, box: tuple[int, int]) -> _Units:
        if box not in cls._cache:
            cls._cache[box] = _Units(box)
        return cls._cache[box]


def _masks(grid: list[int], u: _Units) -> tuple[list[int], list[int], list[int]] | None:
    """Digit bitmasks per row/col/box, or None when two clues clash."""
    rows, cols, boxes = [0] * u.n, [0] * u.n, [0] * u.n
    for i, d in enumerate(grid):
        if d:
            bit = 1 << d
            r, c, b = u.row[i], u.col[i], u.box[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return None
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    return rows, cols, boxes


def _search(grid: list[int], u: _Units, limit: int, rnd: random.Random | None) -> int:
    """Count solutions up to `limit` (fills `grid` with the first one found when limit == 1)."""
    masks = _masks(grid, u)
    if masks is None:
        return 0
    rows, cols, boxes = masks
    empties = [i for i, d in enumerate(grid) if d == 0]
    found = 0

    def rec() -> bool:  # returns True to stop the search
        nonlocal found
        best, best_mask, best_cnt = -1, 0, 99
        for i in empties:  # most-constrained cell first keeps the tree tiny
            if grid[i] == 0:
                m = u.full & ~(rows[u.row[i]] | cols[u.col[i]] | boxes[u.box[i]])
                cnt = m.bit_count()
                if cnt < best_cnt:
                    best, best_mask, best_cnt = i, m, cnt
                    if cnt <= 1:
                        break
        if best < 0:
            found += 1
            return found >= limit
        digits = [d for d in range(1, u.n + 1) if best_mask >> d & 1]
        if rnd is not None:
            rnd.shuffle(digits)
        r, c, b = u.row[best], u.col[best], u.box[best]
        for d in digits:
            bit = 1 << d
            grid[best] = d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            if rec():
                return True  # keep the filled grid (first solution) in place
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
        grid[best] = 0
        return False

    rec()
    return found


def count_solutions(puzzle: np.ndarray, box: tuple[int, int], limit: int = 2) -> int:
    """Number of completions of a Sudoku puzzle, counted up to `limit`.

    Args:
        puzzle: digits 0..N (0 = blank), shape (N, N) or (N*N,).
        box: (box rows, box cols), N = product.
        limit: stop counting here (2 is enough to decide uniqueness).

    Returns:
        min(number of solutions, limit); 0 if clues clash.
    """
    u = _Units.get(tuple(box))
    grid = [int(v) for v in np.asarray(puzzle).reshape(-1)]
    if len(grid) != u.n * u.n:
        raise ConfigError(f"puzzle has {len(grid)} cells, box {box} needs {u.n * u.n}.")
    return _search(grid, u, limit, None)


def is_valid_sudoku_solution(
    solution: np.ndarray, box: tuple[int, int], puzzle: np.ndarray | None = None
) -> bool:
    """True when every row, column and box holds 1..N once (and the clues of `puzzle` agree).

    Args:
        solution: digits 1..N, shape (N, N) or (N*N,).
        box: (box rows, box cols).
        puzzle: optional digits 0..N (0 = blank) whose clues the solution must keep.

    Returns:
        Whether `solution` is a valid completed grid.
    """
    br, bc = box
    n = br * bc
    g = np.asarray(solution).reshape(n, n)
    want = np.arange(1, n + 1)
    units = [g[r] for r in range(n)] + [g[:, c] for c in range(n)]
    units += [
        g[r : r + br, c : c + bc].reshape(-1) for r in range(0, n, br) for c in range(0, n, bc)
    ]
    if not all(np.array_equal(np.sort(unit), want) for unit in units):
        return False
    if puzzle is not None:
        p = np.asarray(puzzle).reshape(n, n)
        return bool(np.all((p == 0) | (p == g)))
    return True


def generate_sudoku(
    box: tuple[int, int], blanks: int, rng: np.random.Generator, tries: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """One Sudoku with a unique solution.

    A random full grid comes from randomized backtracking; cells are then removed in random
    order while the solution stays unique, until `blanks` cells are blank or no cell can be
    removed (then the best of `tries` removal orders is kept, so the result may have fewer
    blanks than asked for).

    Args:
        box: (box rows, box cols).
        blanks: number of blank cells wanted (the difficulty knob).
        rng: source of all randomness.
        tries: removal orders to try when `blanks` is not reached.

    Returns:
        (puzzle, solution): int64 arrays (N, N) of digits, 0 = blank in the puzzle.
    """
    u = _Units.get(tuple(box))
    rnd = random.Random(int(rng.integers(2**62)))
    solution = [0] * (u.n * u.n)
    _search(solution, u, 1, rnd)
    best: list[int] = solution
    for _ in range(max(1, tries)):
        puzzle = list(solution)
        order = list(range(len(puzzle)))
        rnd.shuffle(order)
        removed = 0
        for i in order:
            if removed >= blanks:
                break
            d, puzzle[i] = puzzle[i], 0
            # A cell whose only candidate (given the other clues) is its digit keeps the
            # solution unique for free; only the others need the solver.
            r, c, b = u.row[i], u.col[i], u.box[i]
            seen = 0
            for j, v in enumerate(puzzle):
                if v and (u.row[j] == r or u.col[j] == c or u.box[j] == b):
                    seen |= 1 << v
            if (u.full & ~seen).bit_count() == 1 or _search(list(puzzle), u, 2, None) == 1:
                removed += 1
            else:
                puzzle[i] = d
        if puzzle.count(0) > best.count(0):
            best = puzzle
        if removed >= blanks:
            break
    shape = (u.n, u.n)
    return np.array(best, dtype=np.int64).reshape(shape), np.array(
        solution, dtype=np.int64
    ).reshape(shape)


def augment_sudoku(
    puzzle: np.ndarray, solution: np.ndarray, box: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one random validity-preserving transform to a puzzle and its solution.

    Digit permutation, band and row-within-band permutation, stack and column-within-stack
    permutation, and transpose when the box is square (a 2x3 box would become 3x2).

    Args:
        puzzle: digits (N, N), 0 = blank.
        solution: digits (N, N).
        box: (box rows, box cols).
        rng: source of randomness.

    Returns:
        (puzzle, solution) transformed identically.
    """
    br, bc = box
    n = br * bc
    digit_map = np.concatenate([[0], rng.permutation(n) + 1])  # blank stays blank
    rows = np.concatenate([b * br + rng.permutation(br) for b in rng.permutation(n // br)])
    cols = np.concatenate([s * bc + rng.permutation(bc) for s in rng.permutation(n // bc)])
    transpose = br == bc and bool(rng.integers(2))
    out = []
    for g in (np.asarray(puzzle).reshape(n, n), np.asarray(solution).reshape(n, n)):
        g = digit_map[g][rows][:, cols]
        out.append(g.T.copy() if transpose else g)
    return out[0], out[1]


# ------------------------------------------------------------------------------------- maze
def _neighbors(i: int, n: int) -> Iterator[int]:
    r, c = divmod(i, n)
    if r > 0:
        yield i - n
    if r < n - 1:
        yield i + n
    if c > 0:
        yield i - 1
    if c < n - 1:
        yield i + 1


def _bfs(open_cells: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Distances from `start` over open cells (-1 unreachable) and shortest-path counts (cap 2)."""
    n = open_cells.shape[0]
    flat = open_cells.reshape(-1)
    dist = np.full(flat.size, -1, dtype=np.int64)
    count = np.zeros(flat.size, dtype=np.int64)
    dist[start], count[start] = 0, 1
    queue = deque([start])
    while queue:
        i = queue.popleft()
        for j in _neighbors(i, n):
            if not flat[j]:
                continue
            if dist[j] < 0:
                dist[j] = dist[i] + 1
                queue.append(j)
            if dist[j] == dist[i] + 1:
                count[j] = min(2, count[j] + count[i])
    return dist, count


def generate_maze(
    size: int, rng: np.random.Generator, min_path: int | None = None, loop_prob: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """One maze with a unique shortest path from S to G.

    Cells sit at odd coordinates; a randomized depth-first search carves a perfect maze,
    then each remaining inner wall between two cells opens with probability `loop_prob` so
    that shortest paths are not simply the only path. S is a random cell; G is drawn among
    cells at distance >= `min_path` whose shortest path is unique (up to 16 starts are tried;
    failing that, the farthest such goal seen is kept, so a path can be shorter than asked).

    Args:
        size: grid side N >= 5 (for even N the last row and column stay wall).
        rng: source of all randomness.
        min_path: wanted shortest-path length in steps (default: N).
        loop_prob: probability of opening each extra inner wall.

    Returns:
        (inputs, labels): int64 token grids (N, N).
    """
    if size < 5:
        raise ConfigError(f"Maze `size` must be >= 5, got {size}.")
    m = (size - 1) // 2
    min_path = size if min_path is None else min_path
    open_cells = np.zeros((size, size), dtype=bool)
    visited = np.zeros((m, m), dtype=bool)
    stack = [(int(rng.integers(m)), int(rng.integers(m)))]
    visited[stack[0]] = True
    open_cells[2 * stack[0][0] + 1, 2 * stack[0][1] + 1] = True
    while stack:
        r, c = stack[-1]
        nxt = [
            (r + dr, c + dc)
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
            if 0 <= r + dr < m and 0 <= c + dc < m and not visited[r + dr, c + dc]
        ]
        if not nxt:
            stack.pop()
            continue
        nr, nc = nxt[int(rng.integers(len(nxt)))]
        visited[nr, nc] = True
        open_cells[2 * nr + 1, 2 * nc + 1] = True
        open_cells[r + nr + 1, c + nc + 1] = True  # the wall between the two cells
        stack.append((nr, nc))
    # inner walls between two horizontally or vertically adjacent cells
    inner = np.zeros_like(open_cells)
    inner[1 : 2 * m : 2, 2 : 2 * m - 1 : 2] = True
    inner[2 : 2 * m - 1 : 2, 1 : 2 * m : 2] = True
    open_cells |= inner & (rng.random(open_cells.shape) < loop_prob)
    cells = [(2 * r + 1) * size + 2 * c + 1 for r in range(m) for c in range(m)]
    best: tuple[int, int, int, np.ndarray, np.ndarray] | None = None
    for _ in range(_MAZE_START_TRIES):
        start = cells[int(rng.integers(len(cells)))]
        dist, count = _bfs(open_cells, start)
        # a cell next to the start (2 steps away) always has a unique shortest path
        unique = [i for i in cells if i != start and count[i] == 1]
        far = [i for i in unique if dist[i] >= min_path]
        goal = far[int(rng.integers(len(far)))] if far else max(unique, key=lambda i: dist[i])
        if best is None or dist[goal] > best[2]:
            best = (start, goal, int(dist[goal]), dist, count)
        if far:
            break
    start, goal, _, dist, count = best
    inputs = np.where(open_cells, OPEN, WALL).astype(np.int64).reshape(-1)
    labels = inputs.copy()
    node = goal
    while node != start:  # walk back along the unique predecessor chain
        labels[node] = PATH
        node = next(
            j for j in _neighbors(node, size) if dist[j] == dist[node] - 1 and count[j] >= 1
        )
    inputs[start] = labels[start] = START
    inputs[goal] = labels[goal] = GOAL
    return inputs.reshape(size, size), labels.reshape(size, size)


def is_shortest_path(inputs: np.ndarray, labels: np.ndarray) -> bool:
    """True when `labels` marks exactly one shortest S->G path of the maze `inputs`.

    Args:
        inputs: maze tokens (N, N) or (N*N,) without path marks.
        labels: the same maze with path cells set to 5.

    Returns:
        Whether labels equal inputs except on path cells, which are open in `inputs`, and
        path + S + G is a connected chain whose length is the BFS distance from S to G.
    """
    inp = np.asarray(inputs).reshape(-1)
    lab = np.asarray(labels).reshape(-1)
    n = int(round(inp.size**0.5))
    if n * n != inp.size or lab.size != inp.size:
        return False
    if (inp == PATH).any() or (inp == START).sum() != 1 or (inp == GOAL).sum() != 1:
        return False
    diff = inp != lab
    if not np.all((inp[diff] == OPEN) & (lab[diff] == PATH)):
        return False
    start, goal = int(np.argmax(inp == START)), int(np.argmax(inp == GOAL))
    dist, _ = _bfs((inp != WALL).reshape(n, n), start)
    if dist[goal] < 0:
        return False
    on_path = (lab == PATH) | (inp == START) | (inp == GOAL)
    path_dist, _ = _bfs(on_path.reshape(n, n), start)
    return bool(on_path.sum() == dist[goal] + 1 and path_dist[goal] == dist[goal])


def dihedral(grid: np.ndarray, k: int) -> np.ndarray:
    """Element k (0..7) of the dihedral group of the square: rotate k % 4 times, transpose if k >= 4."""
    g = np.rot90(np.asarray(grid), k % 4)
    return np.ascontiguousarray(g.T if k >= 4 else g)


def augment_maze(
    inputs: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one random dihedral transform identically to a maze and its labels."""
    k = int(rng.integers(8))
    return dihedral(inputs, k), dihedral(labels, k)


# ---------------------------------------------------------------------------------- dataset
def vocab_size(task: str, size: int) -> int:
    """Number of token ids (pad included) for `task` at grid side `size`."""
    if task == "sudoku":
        return _box_of(size)[0] * _box_of(size)[1] + 2
    if task == "maze":
        return len(MAZE_CHARSET) + 1
    raise ConfigError(f"`task` must be 'sudoku' or 'maze', got {task!r}.")


def seq_len(task: str, size: int) -> int:
    """Tokens per example: one per grid cell."""
    vocab_size(task, size)  # validates task and size
    return size * size


def make_dataset(
    task: str,
    size: int,
    n: int,
    seed: int,
    *,
    difficulty: int | None = None,
    augment: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate `n` examples of `task`, deterministic from `seed`.

    Args:
        task: "sudoku" (size 4, 6 or 9) or "maze" (size >= 5).
        size: grid side.
        n: number of examples.
        seed: seed of the numpy Generator that drives everything.
        difficulty: Sudoku: blanks wanted; maze: minimum shortest-path length. Defaults in
            `DEFAULT_DIFFICULTY` (maze: the side length).
        augment: apply one random validity-preserving transform to each example.

    Returns:
        (inputs, labels): LongTensors (n, size * size).

    Example::

        x, y = make_dataset("maze", 11, n=100, seed=0)
    """
    vocab_size(task, size)
    rng = np.random.default_rng(seed)
    if difficulty is None:
        difficulty = DEFAULT_DIFFICULTY[task].get(size, size)
    xs, ys = [], []
    for _ in range(n):
        if task == "sudoku":
            box = _box_of(size)
            p, s = generate_sudoku(box, difficulty, rng)
            if augment:
                p, s = augment_sudoku(p, s, box, rng)
            x, y = p + 1, s + 1
        else:
            x, y = generate_maze(size, rng, min_path=difficulty)
            if augment:
                x, y = augment_maze(x, y, rng)
        xs.append(x.reshape(-1))
        ys.append(y.reshape(-1))
    shape = (n, size * size)
    return (
        torch.from_numpy(np.array(xs, dtype=np.int64).reshape(shape)),
        torch.from_numpy(np.array(ys, dtype=np.int64).reshape(shape)),
    )


def augment_dataset(
    task: str, size: int, inputs: torch.Tensor, labels: torch.Tensor, seed: int, copies: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly transformed copies of a token dataset (TRM trains on a small base set x copies).

    Args:
        task: "sudoku" or "maze".
        size: grid side.
        inputs: LongTensor (n, size * size) of tokens.
        labels: LongTensor (n, size * size) of tokens.
        seed: seed of the transforms.
        copies: transformed copies per example.

    Returns:
        (inputs, labels): LongTensors (n * copies, size * size), copy-major.
    """
    vocab_size(task, size)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(copies):
        for x, y in zip(inputs.numpy(), labels.numpy(), strict=True):
            x, y = x.reshape(size, size), y.reshape(size, size)
            if task == "sudoku":
                x, y = augment_sudoku(x - 1, y - 1, _box_of(size), rng)
                x, y = x + 1, y + 1
            else:
                x, y = augment_maze(x, y, rng)
            xs.append(x.reshape(-1))
            ys.append(y.reshape(-1))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def iterate_batches(
    inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled batches (a new permutation each epoch), deterministic from `seed`."""
    if batch_size > inputs.shape[0]:
        raise ConfigError(f"`batch_size` {batch_size} exceeds the {inputs.shape[0]} examples.")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(inputs.shape[0], generator=g)
        for i in range(0, inputs.shape[0] - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield inputs[idx], labels[idx]
