"""Work units: the grain at which scoring is committed, skipped on resume, and retried after a crash.

A unit is a row range `[start, stop)` of one input file. Units follow the file's row groups (consecutive row
groups are gathered up to `rows` rows, a larger row group is cut into row ranges), so reading a unit decodes
only its own row groups, and a single 1M-row file is many units, not one. Units partition every file's rows, so
"every unit committed exactly once" is "every row exactly once".
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import pyarrow as pa

from sentiment_ray.io.inputs import open_parquet

DERIVED_ID_SEPARATOR = ":"


@dataclass(frozen=True)
class WorkUnit:
    file_index: int  # position in the sorted input list: part of the unit's committed file name
    file: str  # absolute path (or URI) of the input file
    file_key: str  # the file's path relative to the common folder of all inputs: the derived-id prefix
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def name(self) -> str:
        """Stable across reruns of the same plan; sorts in input order."""
        return f"unit-{self.file_index:05d}-{self.start:012d}"

    def describe(self) -> str:
        return f"{self.file} rows {self.start}-{self.stop - 1}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WorkUnit:
        return cls(**data)


def file_keys(files: list[str]) -> list[str]:
    """Each file's path relative to the common folder of all inputs (its name alone for a single file)."""
    if len(files) == 1 or any("://" in f for f in files):
        return [f.rstrip("/").rsplit("/", 1)[-1] if len(files) == 1 else f for f in files]
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    return [os.path.relpath(f, root) for f in files]


def _row_group_ranges(path: str) -> list[tuple[int, int]]:
    metadata = open_parquet(path).metadata
    ranges, start = [], 0
    for index in range(metadata.num_row_groups):
        rows = metadata.row_group(index).num_rows
        ranges.append((start, start + rows))
        start += rows
    return ranges


def plan_units(files: list[str], rows_per_unit: int) -> list[WorkUnit]:
    """Cut every file into units of at most `rows_per_unit` rows along its row groups."""
    units = []
    for index, (path, key) in enumerate(zip(files, file_keys(files))):
        bounds: list[tuple[int, int]] = []
        for start, stop in _row_group_ranges(path):
            if stop - start > rows_per_unit:  # a big row group: row ranges inside it
                bounds += [(s, min(s + rows_per_unit, stop)) for s in range(start, stop, rows_per_unit)]
            elif bounds and bounds[-1][1] == start and stop - bounds[-1][0] <= rows_per_unit:
                bounds[-1] = (bounds[-1][0], stop)  # gather small row groups into one unit
            else:
                bounds.append((start, stop))
        units += [WorkUnit(index, path, key, start, stop) for start, stop in bounds if stop > start]
    return units


def read_unit(unit: WorkUnit, columns: list[str]) -> pa.Table:
    """The unit's rows (those of `columns` that the file has, each once: the text column may also be a kept
    one), decoding only the row groups that hold them. Values are not validated: a string cell with invalid
    UTF-8 bytes is read as it is, and copied as it is."""
    parquet = open_parquet(unit.file)
    present = [c for c in dict.fromkeys(columns) if c in parquet.schema_arrow.names]
    groups, first_row = [], None
    for index, (start, stop) in enumerate(_row_group_ranges(unit.file)):
        if start < unit.stop and stop > unit.start:
            groups.append(index)
            first_row = start if first_row is None else first_row
    pieces, position = [], first_row or 0
    for batch in parquet.iter_batches(batch_size=8192, row_groups=groups, columns=present):
        lo, hi = max(unit.start - position, 0), min(unit.stop - position, batch.num_rows)
        if hi > lo:
            pieces.append(batch.slice(lo, hi - lo))
        position += batch.num_rows
        if position >= unit.stop:
            break
    table = pa.Table.from_batches(pieces, schema=pa.schema([parquet.schema_arrow.field(c) for c in present]))
    if table.num_rows != unit.rows:
        raise OSError(f"read {table.num_rows} rows where the footer promises {unit.rows}")
    return table


def derived_ids(unit: WorkUnit) -> pa.Array:
    """`<file key>:<row index in the file>` for inputs without an id column: stable while the inputs are."""
    return pa.array([f"{unit.file_key}{DERIVED_ID_SEPARATOR}{row}" for row in range(unit.start, unit.stop)],
                    pa.string())
