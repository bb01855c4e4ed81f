"""Evaluate a scored Parquet folder against ground-truth labels: metrics.json plus two plots."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sentiment_ray.labels import CLASS_NAMES, normalize_labels

METRICS_FILE = "metrics.json"
CONFUSION_PLOT = "confusion_matrix.png"
HISTOGRAM_PLOT = "score_histogram.png"


def compute_metrics(y_true, scores, threshold: float = 0.5) -> dict:
    """Binary metrics (positive class = 1); a row is predicted positive when score >= threshold."""
    from sklearn import metrics as skm

    y_true = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.shape != scores.shape:
        raise ValueError(f"y_true has {y_true.size} values but scores has {scores.size}")
    if y_true.size == 0:
        raise ValueError("no scored rows to evaluate")
    y_pred = (scores >= threshold).astype(np.int64)
    (tn, fp), (fn, tp) = skm.confusion_matrix(y_true, y_pred, labels=[0, 1]).tolist()
    both_classes = np.unique(y_true).size == 2
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, pos_label=1, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, pos_label=1, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, pos_label=1, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y_true, scores)) if both_classes else None,
        "confusion_matrix": {"labels": list(CLASS_NAMES), "matrix": [[tn, fp], [fn, tp]]},
        "n": int(y_true.size),
        "n_positive": int(y_true.sum()),
        "threshold": float(threshold),
    }


def _parquet_files(path) -> list[Path]:
    """The Parquet files named by a file, a folder (recursively) or a glob."""
    text = str(path)
    if any(ch in text for ch in "*?["):
        matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
        files = [f for m in matches for f in (_folder_files(m) if m.is_dir() else [m])]
        files = [f for f in files if f.suffix == ".parquet"]
    else:
        p = Path(path)
        files = _folder_files(p) if p.is_dir() else ([p] if p.is_file() else [])
    if not files:
        raise FileNotFoundError(f"no Parquet files found at {text}")
    return files


def _folder_files(folder: Path) -> list[Path]:
    # Like pyarrow datasets, skip "_"/"." files (manifests, _SUCCESS markers, hidden temp files).
    return sorted(f for f in folder.rglob("*.parquet")
                  if f.is_file() and not f.name.startswith(("_", ".")))


def _read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
    for name in columns or []:
        if name not in schema.names:
            raise ValueError(f"{path}: missing column {name!r} (has {', '.join(schema.names)})")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None


def load_scored(scored_path) -> pa.Table:
    """All scored Parquet files under a folder (or glob) as one table; needs `score` and `status`."""
    tables = []
    for f in _parquet_files(scored_path):
        table = _read_parquet(f)
        for name in ("score", "status"):
            if name not in table.column_names:
                raise ValueError(f"{f}: scored output is missing column {name!r}")
        tables.append(table)
    # "permissive" lets an all-null column (null type) in one file merge with typed ones elsewhere.
    return pa.concat_tables(tables, promote_options="permissive")


def _load_labels(labels_path, id_column: str, label_column: str) -> tuple[list, list[int]]:
    ids: list = []
    labels: list[int] = []
    for f in _parquet_files(labels_path):
        table = _read_parquet(f, [id_column, label_column])
        file_ids = table.column(id_column).to_pylist()
        labels += normalize_labels(table.column(label_column).to_pylist(),
                                   where=f"{f}: column {label_column!r}", ids=file_ids)
        ids += file_ids
    return ids, labels


def _duplicates(values: list) -> list:
    seen, dups = set(), []
    for v in values:
        if v in seen and v not in dups:
            dups.append(v)
        seen.add(v)
    return dups


def join_with_labels(scored: pa.Table, labels_path, id_column: str = "id", label_column: str = "label"):
    """Match scored rows to true labels by id.

    Returns (ids, y_true, scores, n_unscored) for the rows that have a score; rows without one
    (status != "ok") are only counted. The truth always comes from labels_path, never from the
    scored table's own `label` column (that one is the prediction).
    """
    if id_column not in scored.column_names:
        raise ValueError(f"scored output is missing id column {id_column!r} (has {', '.join(scored.column_names)})")
    label_ids, label_values = _load_labels(labels_path, id_column, label_column)
    scored_ids = scored.column(id_column).to_pylist()

    for side, values in (("scored output", scored_ids), (f"labels {labels_path}", label_ids)):
        dups = _duplicates(values)
        if dups:
            raise ValueError(f"{side}: {len(dups)} duplicate {id_column!r} values, e.g. {dups[:5]!r}")

    # An id written as int on one side and as string on the other should still match.
    if any(isinstance(v, str) for v in scored_ids) != any(isinstance(v, str) for v in label_ids):
        scored_keys, label_keys = [str(v) for v in scored_ids], [str(v) for v in label_ids]
    else:
        scored_keys, label_keys = scored_ids, label_ids
    truth = dict(zip(label_keys, label_values))

    score_col = pc.cast(scored.column("score"), pa.float64())
    has_score = pc.and_(pc.is_valid(score_col), pc.invert(pc.is_nan(score_col)))
    is_ok = pc.equal(scored.column("status").cast(pa.string()), "ok")
    usable = pc.fill_null(pc.and_(has_score, is_ok), False).to_pylist()
    n_unscored = usable.count(False)

    rows = [i for i, ok in enumerate(usable) if ok]
    missing = [scored_ids[i] for i in rows if scored_keys[i] not in truth]
    if missing:
        raise ValueError(f"{len(missing)} scored {id_column!r} values have no label in {labels_path}, "
                         f"e.g. {missing[:5]!r}")
    score_values = score_col.to_pylist()
    ids = [scored_ids[i] for i in rows]
    y_true = np.array([truth[scored_keys[i]] for i in rows], dtype=np.int64)
    scores = np.array([score_values[i] for i in rows], dtype=np.float64)
    return ids, y_true, scores, n_unscored


def write_plots(y_true, scores, out_dir, threshold: float = 0.5) -> list[Path]:
    """confusion_matrix.png (annotated counts) and score_histogram.png (scores split by true label)."""
    # Figure + Agg canvas directly: no pyplot global state, no interactive backend needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y_true = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix = np.array(compute_metrics(y_true, scores, threshold)["confusion_matrix"]["matrix"])

    fig = Figure(figsize=(4.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues", vmin=0)
    for (row, col), count in np.ndenumerate(matrix):
        dark = count > matrix.max() / 2
        ax.text(col, row, str(count), ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks([0, 1], labels=list(CLASS_NAMES))
    ax.set_yticks([0, 1], labels=list(CLASS_NAMES))
    ax.set_xlabel(f"predicted (score >= {threshold:g})")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    confusion_path = out_dir / CONFUSION_PLOT
    fig.savefig(confusion_path, dpi=100)

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 21)
    for cls, color in ((0, "tab:red"), (1, "tab:blue")):
        part = scores[y_true == cls]
        ax.hist(part, bins=bins, alpha=0.6, color=color, label=f"true {CLASS_NAMES[cls]} (n={part.size})")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("score (probability of positive)")
    ax.set_ylabel("rows")
    ax.set_title("Score distribution by true label")
    ax.legend()
    fig.tight_layout()
    histogram_path = out_dir / HISTOGRAM_PLOT
    fig.savefig(histogram_path, dpi=100)
    return [confusion_path, histogram_path]


def evaluate(scored_path, labels_path, out_dir, id_column: str = "id", label_column: str = "label",
             threshold: float = 0.5, overwrite: bool = False) -> dict:
    """Join scored output with labels, write metrics.json and the plots into out_dir, return the metrics."""
    out_dir = Path(out_dir)
    metrics_path = out_dir / METRICS_FILE
    if metrics_path.exists() and not overwrite:
        raise FileExistsError(f"{metrics_path} already exists; pass overwrite=True (--overwrite) to replace it")
    scored = load_scored(scored_path)
    _, y_true, scores, n_unscored = join_with_labels(scored, labels_path, id_column, label_column)
    metrics = compute_metrics(y_true, scores, threshold)
    metrics.update(n_unscored=n_unscored, scored_path=str(scored_path), labels_path=str(labels_path))
    write_plots(y_true, scores, out_dir, threshold)
    # Written last, so a failed run never leaves a metrics.json that blocks the retry.
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_metrics(metrics: dict) -> str:
    """A short human-readable summary of a metrics dict."""
    def num(value):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    (tn, fp), (fn, tp) = metrics["confusion_matrix"]["matrix"]
    lines = [
        f"rows evaluated: {metrics['n']} ({metrics['n_positive']} positive), "
        f"unscored: {metrics.get('n_unscored', 0)}",
        f"threshold: {metrics['threshold']:g}",
        f"accuracy:  {num(metrics['accuracy'])}",
        f"precision: {num(metrics['precision'])}",
        f"recall:    {num(metrics['recall'])}",
        f"F1:        {num(metrics['f1'])}",
        f"ROC AUC:   {num(metrics['roc_auc'])}",
        "confusion matrix (rows = true, cols = predicted):",
        f"{'':>10} {'negative':>9} {'positive':>9}",
        f"{'negative':>10} {tn:>9} {fp:>9}",
        f"{'positive':>10} {fn:>9} {tp:>9}",
    ]
    return "\n".join(lines)
