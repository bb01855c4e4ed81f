"""The scoring job: Ray Data streams Parquet through an actor pool of scorers and writes labeled Parquet.

Each actor loads base + adapter once (`ScoringActor.__init__`) and scores one batch per call. The output folder
is written under a staging name and renamed only after the row count matches the input, with a manifest
beside the data; a run that fails leaves no folder at the final name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from sentiment_ray.config import ScoreConfig, ScoringModelConfig, to_dict
from sentiment_ray.data import InputError, check_columns, count_rows, open_parquet, resolve_parquet_files
from sentiment_ray.outputs import check_output_free, commit, staging_dir
from sentiment_ray.prompt import PromptSpec

PREDICTION_COLUMNS = ("label", "label_id", "score", "status", "adapter")
MANIFEST_FILE = "_sentiment_ray_manifest.json"
PROGRESS_EVERY_S = 20.0  # Ray Data counts finished blocks only; a small file is one block for minutes on CPU


class ScoringActor:
    """Ray Data callable class: one model per actor, one forward pass per batch."""

    def __init__(self, adapter: str | None, model: dict, prompt: dict, id_column: str, text_column: str,
                 keep_columns: list[str], torch_threads: int | None, max_batch_tokens: int | None = None):
        import torch

        if torch_threads and not torch.cuda.is_available():
            torch.set_num_threads(torch_threads)  # Ray pins OMP threads to the reserved CPUs; say it explicitly
        from sentiment_ray.scorer import SentimentScorer

        self.scorer = SentimentScorer.load(adapter, ScoringModelConfig(**model), PromptSpec.from_dict(prompt),
                                           max_batch_tokens)
        self.id_column = id_column
        self.text_column = text_column
        self.keep_columns = keep_columns
        self.rows_done = 0
        self.started = self.last_report = time.perf_counter()

    def _report_progress(self, rows: int) -> None:
        self.rows_done += rows
        now = time.perf_counter()
        if now - self.last_report >= PROGRESS_EVERY_S:
            self.last_report = now
            print(f"[score] actor scored {self.rows_done} rows ({self.rows_done / (now - self.started):.1f} rows/s)",
                  flush=True)

    def __call__(self, batch: pa.Table) -> pa.Table:
        result = self.scorer.score_texts(batch.column(self.text_column).to_pylist())
        self._report_progress(batch.num_rows)
        columns = {name: batch.column(name) for name in [self.id_column, *self.keep_columns]}
        columns["label"] = pa.array(result.labels, pa.string())
        columns["label_id"] = pa.array(result.label_ids, pa.int8())
        columns["score"] = pa.array(result.scores, pa.float64())
        columns["status"] = pa.array(result.statuses, pa.string())
        columns["adapter"] = pa.array([self.scorer.identity] * batch.num_rows, pa.string())
        return pa.table(columns)


def check_inputs(cfg: ScoreConfig) -> tuple[list[str], int]:
    """Every input file readable and holding the needed columns, before any work starts: (files, rows)."""
    clash = sorted(set(cfg.keep_columns) & (set(PREDICTION_COLUMNS) | {cfg.id_column}))
    if clash:
        raise InputError(f"keep_columns {clash} would collide with the id or prediction columns {list(PREDICTION_COLUMNS)}")
    files = resolve_parquet_files(cfg.input)
    if any("://" in f for f in files):
        return files, -1  # remote storage: Ray Data checks while reading, counts come from the output
    needed = {cfg.id_column: "id", cfg.text_column: "text", **{c: "kept" for c in cfg.keep_columns}}
    for path in files:
        check_columns(path, open_parquet(path).schema_arrow, needed)
    return files, count_rows(files)


def read_reviews(files: list[str], cfg: ScoreConfig):
    """The input as a Ray Dataset of the needed columns, in blocks of one batch each."""
    import ray

    dataset = ray.data.read_parquet(files).select_columns([cfg.id_column, cfg.text_column, *cfg.keep_columns])
    # Ray reads small files as one block, which would leave all but one actor (one GPU) idle; a streaming
    # repartition hands the pool one block per batch without a shuffle.
    return dataset.repartition(target_num_rows_per_block=cfg.batch_size)


def run_scoring(cfg: ScoreConfig) -> dict:
    """Score `cfg.input` into `cfg.output`; returns the manifest (counts, rows/s, adapter identity)."""
    import ray

    from sentiment_ray.metadata import read_metadata
    from sentiment_ray.ray_cluster import ensure_ray

    final = check_output_free(cfg.output, cfg.overwrite)
    files, rows_in = check_inputs(cfg)
    adapter = str(Path(cfg.adapter).expanduser().resolve()) if cfg.adapter else None
    if adapter:
        read_metadata(adapter)  # fail here, not in every actor, if the folder is not an adapter
    model = to_dict(cfg.model)
    if model["name_or_path"] and Path(model["name_or_path"]).expanduser().exists():
        model["name_or_path"] = str(Path(model["name_or_path"]).expanduser().resolve())
    print(f"[score] {rows_in} rows in {len(files)} file(s) -> {final}", flush=True)

    started = time.perf_counter()
    ensure_ray(cfg.ray)
    scored = read_reviews(files, cfg).map_batches(
        ScoringActor,
        fn_constructor_kwargs={
            "adapter": adapter,
            "model": model,
            "prompt": cfg.prompt.to_dict(),
            "id_column": cfg.id_column,
            "text_column": cfg.text_column,
            "keep_columns": list(cfg.keep_columns),
            "torch_threads": cfg.torch_threads or max(1, int(cfg.num_cpus_per_actor)),
            "max_batch_tokens": cfg.max_batch_tokens,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.pool_size),
        num_cpus=cfg.num_cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor,
    )
    staging = staging_dir(final)
    # Blocks are one batch each (see read_reviews); gather them so the output is not thousands of tiny files.
    scored.write_parquet(str(staging), min_rows_per_file=cfg.rows_per_file)
    seconds = time.perf_counter() - started

    written = pads.dataset(str(staging), format="parquet")
    rows_out = written.count_rows()
    if rows_in >= 0 and rows_out != rows_in:
        raise RuntimeError(f"scoring wrote {rows_out} rows for {rows_in} input rows; partial output left in {staging}")
    counted = pc.value_counts(written.to_table(columns=["status"]).column("status"))
    status_counts = {entry["values"].as_py(): entry["counts"].as_py() for entry in counted}
    identity = written.head(1, columns=["adapter"]).column("adapter")[0].as_py() if rows_out else None
    manifest = {
        "rows_in": rows_in if rows_in >= 0 else rows_out,
        "rows_out": rows_out,
        "status_counts": status_counts,
        "adapter": identity,
        "input_files": files,
        "seconds": round(seconds, 2),
        "rows_per_second": round(rows_out / seconds, 2) if seconds else None,
        "config": to_dict(cfg),
    }
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    commit(staging, final, cfg.overwrite)
    print(f"[score] {rows_out} rows scored into {final} in {seconds:.1f} s ({manifest['rows_per_second']} rows/s, "
          f"start-up included); statuses {status_counts}", flush=True)
    return {**manifest, "output": str(final)}
