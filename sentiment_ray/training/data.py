"""The training rows of a finetune: one order for any number of workers, fed to them as Ray Datasets, never held
by the driver (Parquet input).

The order (the same for 1 or N workers, and for every restart of a run):
  - Input row g is the g-th row of the input's files (sorted paths, rows in file order). Its position is its rank in
    the seeded permutation `np.random.default_rng(data.shuffle_seed).permutation(n)`.
  - Positions 0..calibration_rows-1 are held out (whole reviews; calibration.py); the next `data.limit` (all by
    default) are the training rows, training position t = position - calibration_rows.
  - Row t is replaced by an excerpt of itself where `excerpt_mask(...)[t]` (uniform draws seeded by shuffle_seed,
    vectorised), the window drawn from `default_rng([shuffle_seed, t])`: per row, so any worker can cut it alone.
  - The fingerprint is a sha256 over the 8-byte blake2b digest of (label, trained text) of each row in training
    order: the data the adapter trains on, whatever read it.

The driver makes one streaming pass over the Parquet files (a row group at a time, so its memory is bounded by the
largest row group; checked as `load_labeled_parquet` checks them) and keeps per row only an int64 position, an
8-byte digest and a label byte (~17 bytes/row: 3.4 MB at 200k rows), plus the held-out rows themselves. `hf:`
datasets are still loaded on the driver (`load_rows`), with the same order, excerpts and fingerprint.

Workers: worker r of N trains on the rows t with t % N == r, t < N * (T // N), in order of t; it reads them from its
own Ray Dataset (`train_rank<r>`, filtered at read time, so only its rows reach it). Ray Data's own split
(`streaming_split`) hands out blocks to whichever worker asks first: which rows a worker gets would change from run
to run and across a restart, and a resumed run would skip other rows than the ones it trained on. With the order
above, local batch k of every worker is one slice of the global batch: the first epoch's global batches are
exactly those of one worker with N x the batch. Later epochs reshuffle the local rows of each worker with one seed
shared by all (rows t..t+N-1 stay in one global batch), so they differ from a one-worker run in which rows share a
batch, not in which rows are seen. Up to N-1 rows (the last in the order) are left out so that every worker has as
many batches as the others (DDP steps in lockstep); the metadata says how many. With `train.group_by_length`
each worker groups its own rows by length in every epoch instead (WorkerBatchSampler).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from sentiment_ray.config import FinetuneConfig
from sentiment_ray.io.errors import InputError
from sentiment_ray.io.inputs import (
    check_columns,
    column_values,
    open_parquet,
    read_checked,
    resolve_parquet_files,
    text_values,
)
from sentiment_ray.model.labels import CLASS_NAMES, LabelError, normalize_labels
from sentiment_ray.training.excerpts import excerpt

logger = logging.getLogger(__name__)

SCAN_BATCH_ROWS = 8192  # rows per batch of the driver's pass: bounded memory whatever the file's row groups
TEXT, LABEL, POSITION = "text", "label", "position"  # the columns of the workers' datasets


@dataclasses.dataclass(frozen=True)
class HeldOutRows:
    """Labeled rows kept out of training, to fit the adapter's temperature on (DataConfig.calibration_rows)."""

    texts: list[str]
    labels: list[int]


@dataclasses.dataclass(frozen=True)
class RowOrder:
    """Where every input row goes: what the read tasks need to pick and cut a worker's rows."""

    positions: np.ndarray  # int64, one per input row: its place in the seeded shuffle
    calibration_rows: int
    training_rows: int  # T: after the limit, before the rows left out for equal shards
    shuffle_seed: int
    excerpt_share: float

    def training_position(self, rows: np.ndarray) -> np.ndarray:
        """t for each input row index (negative or >= T: not a training row)."""
        return self.positions[rows] - self.calibration_rows


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """What the driver knows of the training rows without holding them."""

    info: dict  # the adapter metadata's `data` section
    held_out: HeldOutRows
    order: RowOrder
    pieces: list[dict]  # Parquet: one per (file, row group): path, row_group, first (input row index); hf: []
    hf_table: object = None  # hf: the training rows (pyarrow, training order), loaded on the driver


def shuffled_positions(n: int, seed: int) -> np.ndarray:
    """positions[g] = the place of input row g in the seeded shuffle."""
    order = np.random.default_rng(seed).permutation(n)
    positions = np.empty(n, dtype=np.int64)
    positions[order] = np.arange(n, dtype=np.int64)
    return positions


def excerpt_mask(training_rows: int, share: float, seed: int) -> np.ndarray:
    """Which training positions are trained as an excerpt of themselves."""
    if share <= 0 or training_rows == 0:
        return np.zeros(training_rows, dtype=bool)
    return np.random.default_rng(seed).random(training_rows) < share


def trained_text(text: str, t: int, excerpted: bool, seed: int) -> str:
    return excerpt(text, np.random.default_rng([seed, t])) if excerpted else text


def row_digest(text: str, label: int) -> bytes:
    return hashlib.blake2b(b"%d\x1f%s" % (label, text.encode("utf-8")), digest_size=8).digest()


def digests_fingerprint(digests: bytes) -> str:
    return hashlib.sha256(digests).hexdigest()[:16]


def rows_fingerprint(texts: list[str], labels: list[int]) -> str:
    """The fingerprint of rows in order, as the driver's streaming pass computes it for the training rows."""
    return digests_fingerprint(b"".join(row_digest(t, y) for t, y in zip(texts, labels)))


def _counts(cfg: FinetuneConfig, n: int, files: list[str]) -> tuple[int, int]:
    data = cfg.data
    if n and data.calibration_rows and data.calibration_rows >= n:
        raise InputError(f"{data.train}: data.calibration_rows={data.calibration_rows} holds out all {n} "
                         "rows; nothing would be left to train on")
    calibration = min(data.calibration_rows, n)
    training = n - calibration if not data.limit else min(data.limit, n - calibration)
    if training == 0:
        held = f" (its {len(files)} Parquet file(s) hold 0 rows)" if files else ""
        raise InputError(f"{data.train}: no training rows{held}; finetuning needs at least one labeled review")
    return calibration, training


def _info(cfg: FinetuneConfig, files: list[str], labels: np.ndarray, digests: bytes, excerpts: int,
          held_out: HeldOutRows) -> dict:
    data = cfg.data
    positives = int(labels.sum())
    if positives in (0, len(labels)):
        logger.warning("%s: all %d training rows are %s; the adapter will learn that one class only",
                       data.train, len(labels), CLASS_NAMES[int(labels[0])])
    return {
        "source": data.train,
        "files": files,
        "rows": int(len(labels)),
        "positives": positives,
        "fingerprint": digests_fingerprint(digests),
        "text_column": data.text_column,
        "label_column": data.label_column,
        "shuffle_seed": data.shuffle_seed,
        "limit": data.limit,
        "excerpt_share": data.excerpt_share,
        "excerpts": excerpts,
        "calibration_rows": len(held_out.texts),
        "calibration_fingerprint": rows_fingerprint(held_out.texts, held_out.labels) if held_out.texts else None,
    }


def scan_training_data(cfg: FinetuneConfig) -> TrainingData:
    """Check the training data and fix its order on the driver, without holding its rows (Parquet) so that bad data
    ends the command before Ray starts, and so that a file of millions of reviews does not fill the driver."""
    if cfg.data.train.startswith("hf:"):
        return _load_hf(cfg)
    data = cfg.data
    files = resolve_parquet_files(data.train)
    parquets, pieces, n = [], [], 0
    for path in files:
        parquet = open_parquet(path)
        check_columns(path, parquet.schema_arrow, {data.text_column: "text", data.label_column: "label"})
        metadata = parquet.metadata
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if rows:
                pieces.append({"path": path, "row_group": group, "first": n})
            n += rows
        parquets.append(parquet)
    calibration, training = _counts(cfg, n, files)
    order = RowOrder(shuffled_positions(n, data.shuffle_seed), calibration, training, data.shuffle_seed,
                     data.excerpt_share)
    mask = excerpt_mask(training, data.excerpt_share, data.shuffle_seed)
    digests = bytearray(8 * training)
    labels = np.zeros(training, dtype=np.int8)
    held: dict[int, tuple[str, int]] = {}
    first = 0
    for path, parquet in zip(files, parquets):
        row = 0
        for batch in _row_group_batches(parquet, [data.text_column, data.label_column]):
            texts, batch_labels = validated_rows(pa.Table.from_batches([batch]), path, data.text_column,
                                                 data.label_column, first_row=row)
            places = order.positions[first + row:first + row + len(texts)]
            for text, label, place in zip(texts, batch_labels, places.tolist()):
                if place < calibration:
                    held[place] = (text, label)
                    continue
                t = place - calibration
                if t < training:
                    digests[8 * t:8 * t + 8] = row_digest(trained_text(text, t, mask[t], data.shuffle_seed), label)
                    labels[t] = label
            row += len(texts)
        first += row
    held_out = HeldOutRows([held[p][0] for p in range(calibration)], [held[p][1] for p in range(calibration)])
    info = _info(cfg, files, labels, bytes(digests), int(mask.sum()), held_out)
    return TrainingData(info, held_out, order, pieces)


def _row_group_batches(parquet, columns: list[str]):
    """The file's rows in batches, one row group read at a time without threads. Not `iter_batches`: measured on
    200k and 1M-row files, its reader's memory grew with the file (+85 MB at 200k rows, +176 MB at 1M), reading row
    group by row group stayed flat (+53 MB at 20k rows, +63 MB at 1M: the allocator's cache)."""
    for group in range(parquet.metadata.num_row_groups):
        table = parquet.read_row_group(group, columns=columns, use_threads=False)
        yield from table.to_batches(SCAN_BATCH_ROWS)
        del table


def load_rows(cfg: FinetuneConfig) -> tuple[list[str], list[int], dict, HeldOutRows]:
    """All training rows in training order (texts after excerpts), their info and the held-out rows, loaded on the
    driver: the path of `hf:` datasets, and of tools that want the rows themselves (benchmarks, tests). The same
    order, excerpts and fingerprint as `scan_training_data`."""
    data = cfg.data
    if data.train.startswith("hf:"):
        all_texts, all_labels = load_labeled_hf(data.train[3:], data.hf_split, data.text_column, data.label_column)
        files: list[str] = []
    else:
        all_texts, all_labels, files = load_labeled_parquet(data.train, data.text_column, data.label_column)
    calibration, training = _counts(cfg, len(all_texts), files)
    by_place = np.argsort(shuffled_positions(len(all_texts), data.shuffle_seed))  # input row at each position
    held_out = HeldOutRows([all_texts[g] for g in by_place[:calibration]],
                           [all_labels[g] for g in by_place[:calibration]])
    mask = excerpt_mask(training, data.excerpt_share, data.shuffle_seed)
    chosen = by_place[calibration:calibration + training]
    texts = [trained_text(all_texts[g], t, mask[t], data.shuffle_seed) for t, g in enumerate(chosen)]
    labels = [all_labels[g] for g in chosen]
    info = _info(cfg, files, np.asarray(labels, dtype=np.int8), b"".join(map(row_digest, texts, labels)),
                 int(mask.sum()), held_out)
    return texts, labels, info, held_out


def _load_hf(cfg: FinetuneConfig) -> TrainingData:
    texts, labels, info, held_out = load_rows(cfg)
    order = RowOrder(np.arange(len(texts), dtype=np.int64), 0, len(texts), cfg.data.shuffle_seed, 0.0)
    table = pa.table({TEXT: texts, LABEL: pa.array(labels, pa.int8()), POSITION: np.arange(len(texts))})
    return TrainingData(info, held_out, order, [], hf_table=table)


# ------------------------------------------------------------------------------------------------ sharding


@dataclasses.dataclass(frozen=True)
class WorkerShare:
    """The rows of worker `rank` of `world`: training positions rank, rank + world, ... below world * rows."""

    rank: int
    world: int
    rows: int  # per worker

    @classmethod
    def of(cls, training_rows: int, rank: int, world: int) -> WorkerShare:
        return cls(rank, world, training_rows // world)

    def keeps(self, t: np.ndarray) -> np.ndarray:
        return (t >= 0) & (t < self.rows * self.world) & (t % self.world == self.rank)


def dataset_name(rank: int) -> str:
    return f"train_rank{rank}"


def _read_pieces(batch: dict, order_ref: list, share: WorkerShare, columns: list[str]) -> object:
    """A Ray Data task: the rows of `share` in some Parquet row groups, with their training position, excerpts
    cut."""
    import ray

    from sentiment_ray.model.labels import normalize_labels

    order: RowOrder = ray.get(order_ref[0])
    mask = excerpt_mask(order.training_rows, order.excerpt_share, order.shuffle_seed)
    out_texts, out_labels, out_positions = [], [], []
    for path, group, first in zip(batch["path"], batch["row_group"], batch["first"]):
        table = open_parquet(str(path)).read_row_group(int(group), columns=columns)
        t = order.training_position(np.arange(first, first + table.num_rows))
        kept = np.flatnonzero(share.keeps(t))
        if not len(kept):
            continue
        table = table.take(pa.array(kept))
        texts = text_values(table.column(0))
        labels = normalize_labels(table.column(1).to_pylist())  # checked on the driver already
        for text, label, position in zip(texts, labels, t[kept].tolist()):
            out_texts.append(trained_text(text, position, mask[position], order.shuffle_seed))
            out_labels.append(label)
            out_positions.append(position)
    return pa.table({TEXT: pa.array(out_texts, pa.string()), LABEL: pa.array(out_labels, pa.int8()),
                     POSITION: pa.array(out_positions, pa.int64())})


def worker_datasets(training: TrainingData, cfg: FinetuneConfig) -> dict:
    """One Ray Dataset per worker (`train_rank<r>`), each yielding only that worker's rows."""
    import ray.data

    # A dataset keeps a copy of the DataContext it was made under. Without progress bars: the read takes seconds,
    # but its bar stays open, redrawn into the job's log, until the worker ends (hundreds of lines per run).
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        return _worker_datasets(training, cfg)
    finally:
        context.enable_progress_bars = bars


def _worker_datasets(training: TrainingData, cfg: FinetuneConfig) -> dict:
    import ray
    import ray.data

    world = cfg.ray.num_workers
    datasets = {}
    if training.hf_table is not None:
        table = training.hf_table
        for rank in range(world):
            share = WorkerShare.of(training.order.training_rows, rank, world)
            kept = np.flatnonzero(share.keeps(np.arange(table.num_rows)))
            datasets[dataset_name(rank)] = ray.data.from_arrow(table.take(kept))
        return datasets
    order_ref = [ray.put(training.order)]  # in a list: Ray Data hands it over as it is, the task gets it
    columns = [cfg.data.text_column, cfg.data.label_column]
    items = training.pieces
    for rank in range(world):
        share = WorkerShare.of(training.order.training_rows, rank, world)
        # Light tasks (num_cpus 0.25): on a small node the training workers hold most CPUs (CPU-STACK-NOTES, pitfall 7).
        pieces = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        datasets[dataset_name(rank)] = pieces.map_batches(
            _read_pieces, batch_size=1, fn_kwargs={"order_ref": order_ref, "share": share, "columns": columns},
            num_cpus=0.25, batch_format="numpy")
    return datasets


def read_worker_rows(share: WorkerShare) -> tuple[list[str], list[int]]:
    """In a training worker: its rows from its dataset shard, in training order; checked complete."""
    import ray.train

    iterator = ray.train.get_dataset_shard(dataset_name(share.rank))
    rows: list[tuple[int, str, int]] = []
    for batch in iterator.iter_batches(batch_size=4096, batch_format="pyarrow"):
        rows += zip(batch.column(POSITION).to_pylist(), batch.column(TEXT).to_pylist(), batch.column(LABEL).to_pylist())
    rows.sort()
    expected = list(range(share.rank, share.rows * share.world, share.world))
    if [p for p, _, _ in rows] != expected:
        raise RuntimeError(f"worker {share.rank} of {share.world} got {len(rows)} training rows, expected "
                           f"{share.rows} (positions {share.rank}, {share.rank + share.world}, ...)")
    return [text for _, text, _ in rows], [label for _, _, label in rows]


class WorkerBatchSampler:
    """Batches of a worker's rows (local index j = training position t // world): in order in the first epoch,
    then a permutation per epoch shared by all workers (seed, epoch). The epoch comes from the Trainer's state, so
    that a run resumed in its second epoch gets that epoch's order (accelerate does not always forward set_epoch
    through the wrappers a resumed dataloader gets).

    With `lengths` (train.group_by_length), every epoch is grouped by length as transformers' LengthGroupedSampler
    does it: a seeded permutation cut into megabatches of 50 batches, each sorted longest first, the batch holding
    the longest row first (an out-of-memory shows at step 1). Each worker groups its own rows; the batch count stays
    the same on every worker, so DDP steps stay in lockstep."""

    MEGABATCH_BATCHES = 50  # transformers' LengthGroupedSampler default (mega_batch_mult)

    def __init__(self, rows: int, batch_size: int, seed: int, epoch: Callable[[], float],
                 lengths: list[int] | None = None):
        if lengths is not None and len(lengths) != rows:
            raise ValueError(f"{len(lengths)} lengths for {rows} rows")
        self.rows, self.batch_size, self.seed, self._epoch = rows, batch_size, seed, epoch
        self.lengths = None if lengths is None else np.asarray(lengths)

    def set_epoch(self, epoch: int) -> None:  # the Trainer's state says it already
        pass

    def __len__(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    def __iter__(self):
        epoch = int(math.floor(self._epoch() + 1e-6))
        if self.lengths is not None:
            yield from self._length_grouped(np.random.default_rng([self.seed, epoch]).permutation(self.rows))
            return
        order = np.arange(self.rows) if epoch == 0 else np.random.default_rng([self.seed, epoch]).permutation(self.rows)
        for start in range(0, self.rows, self.batch_size):
            yield order[start:start + self.batch_size].tolist()

    def _length_grouped(self, order: np.ndarray):
        mega = self.MEGABATCH_BATCHES * self.batch_size
        grouped = np.concatenate([
            chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            for chunk in (order[start:start + mega] for start in range(0, self.rows, mega))
        ])
        batches = [grouped[start:start + self.batch_size].tolist() for start in range(0, self.rows, self.batch_size)]
        longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b]].max())
        batches[0], batches[longest] = batches[longest], batches[0]
        yield from batches


def worker_order_trainer(base_cls):
    """`base_cls` (TRL's SFTTrainer) feeding its rows in the order of WorkerBatchSampler instead of sampling (and,
    under DDP, sharding) them itself: each worker holds only its rows already."""
    from functools import partial

    from torch.utils.data import DataLoader
    from transformers.trainer_utils import seed_worker

    class WorkerOrderTrainer(base_cls):
        def get_train_dataloader(self):
            dataset = self._remove_unused_columns(self.train_dataset, description="Training")
            lengths = [len(ids) for ids in dataset["input_ids"]] if self.args.train_sampling_strategy == \
                "group_by_length" else None
            sampler = WorkerBatchSampler(len(dataset), self._train_batch_size, self.args.seed,
                                         lambda: self.state.epoch or 0.0, lengths)
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                                num_workers=self.args.dataloader_num_workers,
                                pin_memory=self.args.dataloader_pin_memory,
                                persistent_workers=self.args.dataloader_persistent_workers,
                                worker_init_fn=partial(seed_worker, num_workers=self.args.dataloader_num_workers,
                                                       rank=self.args.process_index))
            prepared = self.accelerator.prepare(loader)
            # Under DDP accelerate wraps the sampler in a BatchSamplerShard. Make it a passthrough, as transformers
            # does for its own rank-aware BatchRebalanceSampler. Without num_processes 1, it would hand this worker
            # every N-th of its own batches. Without batch_size None, it would fill the short last batch with rows
            # from the start of the epoch (even_batches), training them twice, and drop a short batch that is not
            # last (the length-grouped order puts the longest row's batch first).
            wrapper = getattr(prepared, "batch_sampler", None)
            if wrapper is not None and getattr(wrapper, "batch_sampler", None) is sampler:
                wrapper.num_processes, wrapper.process_index, wrapper.batch_size = 1, 0, None
            return prepared

    return WorkerOrderTrainer


def _texts(table: pa.Table, source: str, text_column: str, first_row: int = 0) -> list[str]:
    texts = column_values(table, text_column, source, first_row)
    for row, text in enumerate(texts):
        if text is None or not text.strip():
            raise InputError(
                f"{source}: column {text_column!r} row {first_row + row} is {'null' if text is None else 'empty'}; "
                "training needs text in every row (drop or fix such rows first)"
            )
    return texts


def validated_rows(table: pa.Table, source: str, text_column: str, label_column: str,
                   first_row: int = 0) -> tuple[list[str], list[int]]:
    """Texts and 0/1 labels of a table (a whole file, or the batch of it starting at row `first_row`); errors
    name the source, the column and the row in the file."""
    texts = _texts(table, source, text_column, first_row)
    try:
        labels = normalize_labels(column_values(table, label_column, source, first_row),
                                  where=f"{source}: column {label_column!r}", first_row=first_row)
    except LabelError as exc:
        raise InputError(str(exc)) from None
    return texts, labels


def load_labeled_parquet(pattern: str, text_column: str, label_column: str) -> tuple[list[str], list[int], list[str]]:
    """Texts and 0/1 labels from local Parquet, checked file by file."""
    texts, labels = [], []
    files = resolve_parquet_files(pattern)
    for path in files:
        table = read_checked(path, {text_column: "text", label_column: "label"})
        file_texts, file_labels = validated_rows(table, path, text_column, label_column)
        texts += file_texts
        labels += file_labels
    return texts, labels, files


def load_labeled_hf(name: str, split: str, text_column: str, label_column: str) -> tuple[list[str], list[int]]:
    """Texts and labels from a Hugging Face dataset (`hf:imdb`): the path users with hub access take."""
    from datasets import load_dataset

    dataset = load_dataset(name, split=split)
    source = f"hf:{name}[{split}]"
    check_columns(source, dataset.data.schema, {text_column: "text", label_column: "label"})
    return validated_rows(dataset.data.table, source, text_column, label_column)
