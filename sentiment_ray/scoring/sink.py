"""Writing the scored rows: fragments with deterministic names, then the check that every unit is there once.

`FragmentDatasink` is a Ray Data Datasink. Each write task splits the rows it is given by work unit into
contiguous runs and writes each run as one object named by the rows it holds (`part-<file>-<first>-<end>`), whole
or not at all (storage.Location.write_with: a rename locally, one upload on an object store). A retried write
task writes the same names again, so it never adds a second copy. Each fragment carries its counts (rows by
status, truncated, adapter) in its Parquet footer, so the commit needs no row of it.

`check_committed` is the commit's check, run on the driver once the writes are done (and on a resume that
finds nothing left to score): every unit of the plan is tiled exactly once by fragments (or recorded as
skipped, with --skip-unreadable-files); fragments that a retried write left overlapping are deleted; the totals
come from the footers. Only then does the job write the manifest, last.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sentiment_ray.scoring.output import MANIFEST_FILE, PLAN_FILE, Fragment, ScoreOutput, fragments_by_unit, tile
from sentiment_ray.scoring.stages import ROW_COLUMN, UNIT_COLUMN
from sentiment_ray.scoring.work_units import WorkUnit

COUNTS_KEY = b"sentiment_ray"
OK_STATUS = "ok"
FOOTER_READERS = 16
LEDGER_TIMEOUT_S = 30.0

logger = logging.getLogger(__name__)


def fragment_counts(table: pa.Table) -> dict:
    statuses = {e["values"].as_py(): e["counts"].as_py() for e in pc.value_counts(table.column("status"))}
    return {"rows": table.num_rows, "status_counts": statuses,
            "truncated": pc.sum(table.column("truncated")).as_py() or 0,
            "adapter": table.column("adapter")[0].as_py() if table.num_rows else None}


def fragment_datasink(output_uri: str, schema: pa.Schema, units: dict[int, WorkUnit], rows_per_write: int,
                      ledger: str | None = None, faults: dict | None = None):
    """`ledger`: the name of the run's RunLedger, told which fragments each write task wrote (for the
    units-committed metric); None: told nothing. `faults`: a FaultPlan's dict (sentiment_ray/ops/faults.py)."""
    from sentiment_ray.ops.faults import FaultPlan

    fault_plan = FaultPlan(**(faults or {}))
    from ray.data.block import BlockAccessor
    from ray.data.datasource import Datasink

    class FragmentDatasink(Datasink):
        def __init__(self):
            self.written: list[dict] = []

        @property
        def min_rows_per_write(self) -> int:
            return rows_per_write  # about one work unit per write task: fragments of about a unit each

        def write(self, blocks, ctx) -> list[dict]:
            from sentiment_ray.io.storage import location, refused_mid_run

            folder = location(output_uri)
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            tables = [t for t in tables if t.num_rows]
            if not tables:
                return []
            table = pa.concat_tables(tables)
            written, reported = [], []
            for unit_index in pc.unique(table.column(UNIT_COLUMN)).to_pylist():
                part = table.filter(pc.equal(table.column(UNIT_COLUMN), unit_index))
                part = part.sort_by(ROW_COLUMN)
                rows = part.column(ROW_COLUMN).to_numpy()
                breaks = [0, *(np.flatnonzero(np.diff(rows) != 1) + 1).tolist(), len(rows)]
                for lo, hi in zip(breaks, breaks[1:]):
                    run = part.slice(lo, hi - lo)
                    fragment = Fragment(units[unit_index].file_index, int(rows[lo]), int(rows[hi - 1]) + 1)
                    data = run.select(schema.names).cast(schema)
                    counts = fragment_counts(data)
                    data = data.replace_schema_metadata({COUNTS_KEY: json.dumps(counts).encode()})
                    def write_fragment(stream, d=data):
                        fault_plan.maybe_disk_full(lambda: sum(c.name.startswith("part-") for c in folder.children()))
                        pq.write_table(d, stream)

                    # A store refusing it now (the output was writable at the start): exit 1, not a user error
                    with refused_mid_run():
                        folder.join(fragment.name).write_with(write_fragment)
                    written.append({"fragment": fragment.name, **counts})
                    reported.append((unit_index, fragment.file_index, fragment.start, fragment.stop))
            _tell_ledger(ledger, reported)
            return written

        def on_write_complete(self, write_result) -> None:
            self.written = [w for task in write_result.write_returns for w in task]

        def get_name(self) -> str:
            return "ScoredFragments"

    return FragmentDatasink()


def _tell_ledger(ledger: str | None, fragments: list[tuple[int, int, int, int]]) -> None:
    """Waited for (one round trip per write task), so that the ledger has counted every unit by the time the
    writes are done and the driver lets it go; a failure only costs the metric, never the write."""
    if not ledger or not fragments:
        return
    try:
        import ray

        ray.get(ray.get_actor(ledger).fragments_written.remote(fragments), timeout=LEDGER_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - the ledger gone (its driver died) or slow: the rows are written anyway
        logger.debug("could not tell the run ledger %s about %d fragment(s)", ledger, len(fragments), exc_info=True)


@dataclass
class CommittedOutput:
    rows_out: int = 0
    rows_skipped: int = 0
    truncated: int = 0
    status_counts: Counter = field(default_factory=Counter)
    units_skipped: list = field(default_factory=list)
    fragments: int = 0
    adapter: str | None = None
    files: list[str] = field(default_factory=list)  # every file of the finished output: what its manifest lists


class IncompleteOutput(RuntimeError):
    pass


def check_committed(output: ScoreOutput, units: list[WorkUnit], known: dict[str, dict]) -> CommittedOutput:
    """Every unit tiled exactly once (or skipped); leftovers deleted; totals from the fragments' footers (`known`:
    counts this run's write tasks returned, by fragment name, so only earlier runs' footers are read)."""
    fragments = output.fragments()
    skipped_files = output.skipped_files()
    skipped = {(r["file_index"], r["start"]): r for r in (json.loads(f.read_text()) for f in skipped_files)}
    chosen: list[Fragment] = []
    committed = CommittedOutput()
    for unit, own in zip(units, fragments_by_unit(units, fragments)):
        record = skipped.get((unit.file_index, unit.start))
        if record is not None:
            committed.units_skipped.append(record)
            committed.rows_skipped += unit.rows
            continue
        tiling = tile(unit, own)
        if tiling is None:
            raise IncompleteOutput(f"{unit.describe()} has no complete result in {output.folder}; rerun with --resume")
        chosen += tiling
    used = {f.name for f in chosen}
    output.delete_fragments([f for f in fragments if f.name not in used])

    def counts_of(fragment: Fragment) -> dict:
        if fragment.name in known:
            return known[fragment.name]
        with output.folder.join(fragment.name).open_input() as handle:
            metadata = pq.ParquetFile(handle).metadata
        counts = json.loads(metadata.metadata[COUNTS_KEY])
        counts["rows"] = metadata.num_rows
        return counts

    with ThreadPoolExecutor(FOOTER_READERS) as pool:
        for fragment, counts in zip(chosen, pool.map(counts_of, chosen)):
            if counts["rows"] != fragment.rows:
                raise IncompleteOutput(f"{output.folder.join(fragment.name)} holds {counts['rows']} rows for the "
                                       f"{fragment.rows} its name promises")
            committed.rows_out += counts["rows"]
            committed.truncated += counts["truncated"]
            committed.status_counts.update(counts["status_counts"])
            committed.adapter = committed.adapter or counts["adapter"]
    committed.fragments = len(chosen)
    committed.files = sorted([PLAN_FILE, MANIFEST_FILE, *used, *(f.name for f in skipped_files)])
    return committed
