import random

import pytest

from sentiment_ray.model.forwards.shapes import ShapeBuckets


def test_every_row_in_exactly_one_forward_within_its_shape():
    lengths = [random.Random(i).randint(1, 500) for i in range(1000)]
    buckets = ShapeBuckets(max_batch_tokens=16384, width_step=64, row_step=32)
    forwards = buckets.plan(lengths)
    rows = sorted(r for f in forwards for r in f.rows)
    assert rows == list(range(1000))
    for f in forwards:
        assert f.width % 64 == 0 and f.padded_rows % 32 == 0
        assert max(lengths[r] for r in f.rows) <= f.width < min(lengths[r] for r in f.rows) + 64
        assert len(f.rows) <= f.padded_rows < len(f.rows) + 32
        assert f.padded_rows * f.width <= 16384 or f.padded_rows == 32


def test_shapes_are_few_and_fixed_per_width():
    buckets = ShapeBuckets(max_batch_tokens=65536)
    assert buckets.rows_per_forward(64) == 1024 and buckets.rows_per_forward(448) == 128
    assert buckets.rows_per_forward(4096) == 32  # wider than the budget allows: one row step still
    shapes = set()
    for seed in range(20):  # twenty batches of 512 rows: the shapes repeat across batches
        rng = random.Random(seed)
        shapes |= {f.shape for f in buckets.plan([rng.randint(20, 400) for _ in range(512)])}
    widths = {w for _, w in shapes}
    assert widths == {64 * k for k in range(1, 8)}
    assert len(shapes) <= 7 * (1024 // 32)


def test_full_forwards_use_the_fixed_row_count():
    buckets = ShapeBuckets(max_batch_tokens=4096, width_step=64, row_step=8)
    forwards = buckets.plan([100] * 70)  # width 128: 32 rows per forward
    assert [(len(f.rows), f.padded_rows, f.width) for f in forwards] == [(32, 32, 128), (32, 32, 128), (6, 8, 128)]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="width_step"):
        ShapeBuckets(max_batch_tokens=100, width_step=0)
