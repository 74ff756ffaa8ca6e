"""Local-window geometry of scale fusion (reference §4), relative to the training latent size T."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from freescale_core.attention import StageGeometry
from freescale_core.windows import AxisWindows, plan_windows, window_shape

# Regression guard: AxisWindows.jitter_bounds once swapped the edge ranges (inward [0, r] at the start edge),
# which left border tokens covered by no window. The reference jitters edge windows outward into the padding.


def geometry(size_px, train_latent, vae_scale=8, jitter=True):
    return StageGeometry(
        size_px=size_px, vae_scale=vae_scale, train_latent=train_latent, scale=(1, 1), step_index=0, seed=0,
        fusion_blur="hw", window_jitter=jitter, fast_mode=False,
    )


def reference_count(grid: int, window: int, stride: int) -> int:
    """The reference's get_views: ⌊(G − w)/stride − 1e-6⌋ + 2, or 1 if G ≤ w."""
    if grid <= window:
        return 1
    return math.floor((grid - window) / stride - 1e-6) + 2


def reference_starts(grid: int, window: int, stride: int) -> list[int]:
    """Start i·stride, shifted back inside when it overflows."""
    return [min(i * stride, grid - window) for i in range(reference_count(grid, window, stride))]


# Reference §4 geometry table for SDXL (T = 128, train px 1024), written out literally, and the same table
# scaled to the tiny model (T = 32, train px 256). Sizes are (H, W) in pixels.
# rows: size -> {downsample: (grid, window, stride, views per dim, jitter r)}
TABLE_T128 = {
    (2048, 2048): {2: ((128, 128), (64, 64), (32, 32), (3, 3), (8, 8)), 4: ((64, 64), (32, 32), (16, 16), (3, 3), (4, 4))},
    (4096, 4096): {2: ((256, 256), (64, 64), (32, 32), (7, 7), (8, 8)), 4: ((128, 128), (32, 32), (16, 16), (7, 7), (4, 4))},
    (8192, 8192): {2: ((512, 512), (64, 64), (32, 32), (15, 15), (8, 8)), 4: ((256, 256), (32, 32), (16, 16), (15, 15), (4, 4))},
    (1024, 2048): {2: ((64, 128), (32, 64), (16, 32), (3, 3), (4, 8)), 4: ((32, 64), (16, 32), (8, 16), (3, 3), (2, 4))},
}
TABLE_T32 = {
    (512, 512): {2: ((32, 32), (16, 16), (8, 8), (3, 3), (2, 2)), 4: ((16, 16), (8, 8), (4, 4), (3, 3), (1, 1))},
    (1024, 1024): {2: ((64, 64), (16, 16), (8, 8), (7, 7), (2, 2)), 4: ((32, 32), (8, 8), (4, 4), (7, 7), (1, 1))},
    (2048, 2048): {2: ((128, 128), (16, 16), (8, 8), (15, 15), (2, 2)), 4: ((64, 64), (8, 8), (4, 4), (15, 15), (1, 1))},
    (256, 512): {2: ((16, 32), (8, 16), (4, 8), (3, 3), (1, 2)), 4: ((8, 16), (4, 8), (2, 4), (3, 3), (0, 1))},
}
CASES = [(128, size, ds, row) for size, rows in TABLE_T128.items() for ds, row in rows.items()] + [
    (32, size, ds, row) for size, rows in TABLE_T32.items() for ds, row in rows.items()
]


@pytest.mark.parametrize("train_latent,size,downsample,row", CASES)
def test_geometry_table(train_latent, size, downsample, row):
    grid, window, stride, views, jitter = row
    geo = geometry(size, train_latent)
    tokens = grid[0] * grid[1]
    assert geo.grid_for(tokens) == (grid, downsample)
    assert window_shape(grid, size, train_latent, downsample) == window
    plan = plan_windows(grid, window, True, seed=0, key=("table",))
    for axis, windows in enumerate((plan.rows, plan.cols)):
        assert isinstance(windows, AxisWindows)
        assert windows.grid == grid[axis]
        assert windows.size == window[axis]
        assert windows.stride == stride[axis] == window[axis] // 2
        assert windows.count == views[axis] == reference_count(grid[axis], window[axis], stride[axis])
        assert windows.jitter == jitter[axis] == window[axis] // 8
        assert windows.starts().tolist() == reference_starts(grid[axis], window[axis], stride[axis])
    assert plan.padded_shape == (grid[0] + 2 * jitter[0], grid[1] + 2 * jitter[1])
    assert len(plan.starts_h) == len(plan.starts_w) == views[0] * views[1]
    # views per dim = 2s − 1 for square targets
    if size[0] == size[1]:
        s = size[0] // (train_latent * 8)
        assert views == (2 * s - 1, 2 * s - 1)


def test_window_shape_other_aspects_and_small_grids():
    # tall image: long side (height) is the training size
    assert window_shape((128, 64), (2048, 1024), 128, 2) == (64, 32)
    # a grid smaller than the training window: the window is the whole grid
    assert window_shape((16, 16), (256, 256), 128, 2) == (16, 16)
    # 3:2 landscape
    assert window_shape((96, 144), (1536, 2304), 128, 2) == (128 * 1536 // 2304 // 2, 64)


def test_axis_counts_against_reference_formula():
    for grid, window in itertools.product(range(1, 70), (1, 2, 4, 8, 16, 32)):
        if window > grid:
            continue
        axis = AxisWindows(grid, window, max(1, window // 2), window // 8)
        assert axis.count == reference_count(grid, window, max(1, window // 2)), (grid, window)
        starts = axis.starts().tolist()
        assert starts == reference_starts(grid, window, max(1, window // 2))
        assert starts[0] == 0 and starts[-1] + window == grid


def jitters(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed jitter per view and axis: padded start − r − unjittered start (reference formula)."""
    rows, cols = plan.rows, plan.cols
    base_h = torch.tensor(reference_starts(rows.grid, rows.size, rows.stride)).repeat_interleave(cols.count)
    base_w = torch.tensor(reference_starts(cols.grid, cols.size, cols.stride)).repeat(rows.count)
    return plan.starts_h - rows.jitter - base_h, plan.starts_w - cols.jitter - base_w


JITTER_CASES = [((32, 32), (16, 16)), ((64, 64), (16, 16)), ((16, 32), (8, 16)), ((128, 128), (64, 64))]


def observed_jitters(grid, window, seeds=150):
    """{(axis, index along the axis): set of jitters seen over many seeds}, with the expected [low, high]."""
    counts = [reference_count(grid[0], window[0], window[0] // 2), reference_count(grid[1], window[1], window[1] // 2)]
    seen = {}
    for seed in range(seeds):
        plan = plan_windows(grid, window, True, seed=seed, key=((grid[0] * 8, grid[1] * 8), 3, 1))
        jh, jw = jitters(plan)
        for view in range(len(jh)):
            i, j = divmod(view, counts[1])
            seen.setdefault((0, i), set()).add(int(jh[view]))
            seen.setdefault((1, j), set()).add(int(jw[view]))
    result = {}
    for (axis, index), values in seen.items():
        r = window[axis] // 8
        last = counts[axis] - 1
        if index == 0:
            bounds = (-r, 0)  # start edge: outward into the padding
        elif index == last:
            bounds = (0, r)  # end edge: outward into the padding
        else:
            bounds = (-r, r)
        result[(axis, index, index in (0, last))] = (values, bounds)
    return result


@pytest.mark.parametrize("grid,window", JITTER_CASES)
def test_interior_jitter_bounds_over_many_seeds(grid, window):
    checked = 0
    for (axis, index, edge), (values, (low, high)) in observed_jitters(grid, window).items():
        if edge:
            continue
        checked += 1
        assert min(values) >= low and max(values) <= high, (axis, index, values)
        # over many seeds the whole range is used, both ends included
        assert values == set(range(low, high + 1)), (axis, index, values)
    assert checked > 0


@pytest.mark.parametrize("grid,window", JITTER_CASES)
def test_edge_jitter_bounds_over_many_seeds(grid, window):
    for (axis, index, edge), (values, (low, high)) in observed_jitters(grid, window).items():
        if not edge:
            continue
        assert min(values) >= low and max(values) <= high, (axis, index, values, (low, high))
        assert values == set(range(low, high + 1)), (axis, index, values)


def test_edge_windows_stay_inside_padded_grid():
    # whatever the direction, an edge window never leaves the padded grid and never moves by more than r
    for grid, window in JITTER_CASES:
        for (axis, index, edge), (values, _) in observed_jitters(grid, window, seeds=40).items():
            r = window[axis] // 8
            assert all(-r <= v <= r for v in values)


def test_no_jitter_and_reproducibility():
    grid, window = (64, 64), (16, 16)
    plain = plan_windows(grid, window, False, seed=5, key=((512, 512), 3, 1))
    assert plain.rows.jitter == plain.cols.jitter == 0
    assert plain.padded_shape == grid
    jh, jw = jitters(plain)
    assert torch.all(jh == 0) and torch.all(jw == 0)
    a = plan_windows(grid, window, True, seed=5, key=((512, 512), 3, 1))
    b = plan_windows(grid, window, True, seed=5, key=((512, 512), 3, 1))
    assert torch.equal(a.starts_h, b.starts_h) and torch.equal(a.starts_w, b.starts_w)
    for other in (
        plan_windows(grid, window, True, seed=5, key=((512, 512), 3, 2)),  # other block
        plan_windows(grid, window, True, seed=5, key=((512, 512), 4, 1)),  # other step
        plan_windows(grid, window, True, seed=6, key=((512, 512), 3, 1)),  # other seed
    ):
        assert not (torch.equal(a.starts_h, other.starts_h) and torch.equal(a.starts_w, other.starts_w))
    # jitter is drawn per view (not one shift per row of windows)
    jh, _ = jitters(a)
    assert len(set(jh.view(a.rows.count, a.cols.count)[1].tolist())) > 1


def covered(plan) -> torch.Tensor:
    hits = torch.zeros(plan.padded_shape, dtype=torch.int64)
    for top, left in zip(plan.starts_h.tolist(), plan.starts_w.tolist()):
        assert top >= 0 and left >= 0
        assert top + plan.rows.size <= plan.padded_shape[0] and left + plan.cols.size <= plan.padded_shape[1]
        hits[top : top + plan.rows.size, left : left + plan.cols.size] += 1
    return hits


@pytest.mark.parametrize(
    "grid,window",
    [((32, 32), (16, 16)), ((64, 64), (16, 16)), ((128, 128), (16, 16)), ((16, 32), (8, 16)), ((8, 16), (4, 8)), ((40, 56), (16, 16)), ((256, 256), (32, 32))],
)
@pytest.mark.parametrize("jitter", [True, False])
def test_every_token_is_covered(grid, window, jitter):
    for seed in range(20 if jitter else 1):
        plan = plan_windows(grid, window, jitter, seed=seed, key=("cover",))
        hits = covered(plan)
        r_h, r_w = plan.rows.jitter, plan.cols.jitter
        interior = hits[r_h : r_h + grid[0], r_w : r_w + grid[1]]
        assert interior.min() >= 1, (seed, grid, window)


def overlap(a, b, size) -> bool:
    (top_a, left_a), (top_b, left_b) = a, b
    rows = top_a < top_b + size[0] and top_b < top_a + size[0]
    cols = left_a < left_b + size[1] and left_b < left_a + size[1]
    return rows and cols


@pytest.mark.parametrize(
    "grid,window",
    [((32, 32), (16, 16)), ((128, 128), (16, 16)), ((64, 128), (32, 64)), ((512, 512), (64, 64)), ((8, 16), (4, 8)), ((40, 56), (16, 16))],
)
def test_groups_never_overlap_and_partition_views(grid, window):
    for seed in range(5):
        plan = plan_windows(grid, window, True, seed=seed, key=("groups",))
        groups = plan.groups()
        everything = torch.cat(groups).tolist()
        assert sorted(everything) == list(range(len(plan.starts_h)))  # each view exactly once
        size = (plan.rows.size, plan.cols.size)
        for group in groups:
            boxes = [(int(plan.starts_h[v]), int(plan.starts_w[v])) for v in group.tolist()]
            for a, b in itertools.combinations(boxes, 2):
                assert not overlap(a, b, size), (seed, a, b)
        # and the grouping is not trivial: some group has several windows when there are many views
        if len(everything) > 16:
            assert max(len(g) for g in groups) > 1
