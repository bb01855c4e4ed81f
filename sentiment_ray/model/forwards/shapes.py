"""Forward passes of a few fixed shapes, so that a GPU can replay one captured CUDA graph per shape.

An eager forward of a small model is bound by kernel launches (hundreds per forward, docs/BENCHMARKS.md §8),
and a captured graph removes them, but a graph only replays the exact shape it was captured with. So the rows of
a batch are sorted by length, each row's width is rounded up to a multiple of `width_step` tokens, each width
gets a fixed number of rows per forward (the token budget over the width, a multiple of `row_step`), and the
last, partial forward of a width is padded with dummy rows up to a multiple of `row_step`. The shapes that can
occur are then bounded by (max width / width_step) x (rows per forward / row_step), and in practice a few dozen
appear; the padding they add is at most width_step - 1 tokens per row and row_step - 1 rows per width and batch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardShape:
    """One forward pass: which rows of the batch it scores, at what padded width and row count."""

    rows: list[int]  # indices into the batch, len(rows) <= padded_rows
    width: int  # tokens per row after padding; a multiple of width_step
    padded_rows: int  # rows of the forward, dummy rows included; a multiple of row_step

    @property
    def shape(self) -> tuple[int, int]:
        return self.padded_rows, self.width


@dataclass(frozen=True)
class ShapeBuckets:
    max_batch_tokens: int  # padded tokens per forward at most (except a single row wider than the budget)
    width_step: int = 64
    row_step: int = 32

    def __post_init__(self):
        for name in ("max_batch_tokens", "width_step", "row_step"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def width_of(self, length: int) -> int:
        return -(-max(length, 1) // self.width_step) * self.width_step

    def rows_per_forward(self, width: int) -> int:
        """The fixed row count of a full forward at this width: the budget's rows, rounded down to a multiple of
        row_step (never below one step, so a width beyond the budget still gets forwards of row_step rows)."""
        return max(self.row_step, self.max_batch_tokens // width // self.row_step * self.row_step)

    def plan(self, lengths: list[int]) -> list[ForwardShape]:
        """The forwards that score rows of these token lengths; every row in exactly one forward."""
        by_width: dict[int, list[int]] = {}
        for row in sorted(range(len(lengths)), key=lengths.__getitem__):
            by_width.setdefault(self.width_of(lengths[row]), []).append(row)
        forwards = []
        for width, rows in by_width.items():
            full = self.rows_per_forward(width)
            for start in range(0, len(rows), full):
                chunk = rows[start:start + full]
                padded = full if len(chunk) == full else -(-len(chunk) // self.row_step) * self.row_step
                forwards.append(ForwardShape(chunk, width, padded))
        return forwards
