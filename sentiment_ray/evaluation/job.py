"""Evaluate a scored Parquet folder against ground-truth labels: metrics.json (accuracy, F1, ROC AUC, calibration:
ECE and Brier, the best thresholds) plus four plots: confusion matrix, score histogram, reliability diagram, ROC.

They are written as the other commands write: into a hidden staging folder beside the output, renamed into place
when complete (sentiment_ray/io/outputs.py), so a full disk or a crash leaves nothing under the final name and
nothing that blocks a rerun. metrics.json lists every file of the output (`files_written`): all that a later
`--overwrite` may delete."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sentiment_ray.config import ConfigError
from sentiment_ray.evaluation.binary_metrics import ConfusionCounts, roc_auc, roc_curve
from sentiment_ray.io.errors import InputError, one_line, quoted_list
from sentiment_ray.io.inputs import column_values, duplicate_ids, join_key, read_checked, resolve_parquet_files
from sentiment_ray.io.outputs import check_output_location_free, commit, refuse_overlap, staging_dir, upload_output
from sentiment_ray.io.ownership import record_files, walk
from sentiment_ray.io.storage import Location, StorageError, location
from sentiment_ray.model.labels import CLASS_NAMES, normalize_labels
from sentiment_ray.training.calibration import ECE_BINS, calibration_report, reliability_bins

METRICS_FILE = "metrics.json"  # also marks a folder as an evaluation output that --overwrite may replace
CONFUSION_PLOT = "confusion_matrix.png"
HISTOGRAM_PLOT = "score_histogram.png"
RELIABILITY_PLOT = "reliability.png"
ROC_PLOT = "roc_curve.png"
SCORED_DIR = "scored"  # where `evaluate --input` scores into, inside its output folder
PLOTS = (CONFUSION_PLOT, HISTOGRAM_PLOT, RELIABILITY_PLOT, ROC_PLOT)
IDS_SHOWN = 5  # ids quoted in an error; the count says how many there are


def compute_metrics(y_true, scores, threshold: float = 0.5) -> dict:
    """Binary metrics (positive class = 1); a row is predicted positive when score >= threshold."""
    y_true = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.shape != scores.shape:
        raise ValueError(f"y_true has {y_true.size} values but scores has {scores.size}")
    if y_true.size == 0:
        raise InputError("no scored rows to evaluate")
    y_pred = (scores >= threshold).astype(np.int64)
    counts = ConfusionCounts.of(y_true, y_pred)
    both_classes = np.unique(y_true).size == 2
    return {
        "accuracy": counts.accuracy,
        "precision": counts.precision,
        "recall": counts.recall,
        "f1": counts.f1,
        "roc_auc": roc_auc(y_true, scores) if both_classes else None,
        "confusion_matrix": {"labels": list(CLASS_NAMES), "matrix": counts.matrix.tolist()},
        "n": int(y_true.size),
        "n_positive": int(y_true.sum()),
        "threshold": float(threshold),
        **calibration_report(y_true, scores),
    }


def load_scored(scored_path) -> pa.Table:
    """All scored Parquet files under a folder (or glob) as one table; needs `score` and `status`."""
    tables = [read_checked(f, {"score": "score", "status": "status"}, all_columns=True, strings_only=False)
              for f in resolve_parquet_files(str(scored_path))]
    try:
        # "permissive" lets an all-null column (null type) in one file merge with typed ones elsewhere.
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise InputError(f"{scored_path}: the scored files do not share one set of columns ({one_line(exc)})") from None


def _null_rows(values: list) -> list[int]:
    return [row for row, value in enumerate(values) if value is None]


def _load_labels(labels_path, id_column: str, label_column: str) -> tuple[list, list[int], list[str]]:
    ids: list = []
    labels: list[int] = []
    sources: list[str] = []  # each id's file, for the duplicate check's message
    for f in resolve_parquet_files(str(labels_path)):
        table = read_checked(f, {id_column: "id", label_column: "label"}, strings_only=False)
        file_ids = column_values(table, id_column, f)
        nulls = _null_rows(file_ids)
        if nulls:
            raise InputError(f"{f}: column {id_column!r} is null in {len(nulls)} row(s), e.g. rows "
                             f"{nulls[:IDS_SHOWN]}; every label needs an id to be matched with the scored output")
        labels += normalize_labels(column_values(table, label_column, f),
                                   where=f"{f}: column {label_column!r}", ids=file_ids)
        ids += file_ids
        sources += [f] * len(file_ids)
    return ids, labels, sources


def join_with_labels(scored: pa.Table, labels_path, id_column: str = "id", label_column: str = "label",
                     scored_name: str = "scored output"):
    """Match scored rows to true labels by id.

    Returns (ids, y_true, scores, n_unscored) for the rows that have a score; rows without one
    (status != "ok") are only counted. The truth always comes from labels_path, never from the
    scored table's own `label` column (that one is the prediction). `scored_name` says in errors
    which scored output is meant.
    """
    if id_column not in scored.column_names:
        raise InputError(f"{scored_name} is missing id column {id_column!r} (has {', '.join(scored.column_names)})")
    scored_ids = column_values(scored, id_column, scored_name)
    nulls = _null_rows(scored_ids)
    if nulls:
        raise InputError(f"{scored_name}: column {id_column!r} is null in {len(nulls)} row(s), e.g. rows "
                         f"{nulls[:IDS_SHOWN]}; every scored row needs an id to be matched with its label")
    label_ids, label_values, label_sources = _load_labels(labels_path, id_column, label_column)

    # Compared as they are joined (data.join_key: 1 and "1" are one id), so ids that differ only in type across
    # files are duplicates here rather than a silent collision in the join.
    for side, values, sources in ((scored_name, scored_ids, None), (f"labels {labels_path}", label_ids, label_sources)):
        dups = duplicate_ids(values, sources)
        if dups:
            shown = ", ".join(dups[:IDS_SHOWN])
            raise InputError(f"{side}: {len(dups)} duplicate {id_column!r} values, e.g. [{shown}]")

    scored_keys, label_keys = [join_key(v) for v in scored_ids], [join_key(v) for v in label_ids]
    truth = dict(zip(label_keys, label_values))

    score_col = pc.cast(scored.column("score"), pa.float64())
    has_score = pc.and_(pc.is_valid(score_col), pc.invert(pc.is_nan(score_col)))
    status = scored.column("status").cast(pa.string())
    is_ok = pc.equal(status, "ok")
    usable = pc.fill_null(pc.and_(has_score, is_ok), False).to_pylist()
    n_unscored = usable.count(False)

    rows = [i for i, ok in enumerate(usable) if ok]
    if not rows:
        statuses = dict(Counter(status.to_pylist()))
        raise InputError(f"{scored_name}: no scored rows to evaluate ({scored.num_rows} rows"
                         + (f", statuses {statuses})" if statuses else ")"))
    missing = [scored_ids[i] for i in rows if scored_keys[i] not in truth]
    if missing:
        raise InputError(f"{len(missing)} scored {id_column!r} values have no label in {labels_path}, "
                         f"e.g. {quoted_list(missing[:IDS_SHOWN])}")
    score_values = score_col.to_pylist()
    ids = [scored_ids[i] for i in rows]
    y_true = np.array([truth[scored_keys[i]] for i in rows], dtype=np.int64)
    scores = np.array([score_values[i] for i in rows], dtype=np.float64)
    return ids, y_true, scores, n_unscored


def _axes(figsize: tuple[float, float]):
    """A figure on an Agg canvas directly, and its axes: no pyplot global state, no interactive backend needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_plots(y_true, scores, out_dir, threshold: float = 0.5) -> list[Path]:
    """confusion_matrix.png (annotated counts), score_histogram.png (scores split by true label), reliability.png
    and roc_curve.png."""
    y_true = np.asarray(y_true, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix = ConfusionCounts.of(y_true, (scores >= threshold).astype(np.int64)).matrix

    fig, ax = _axes((4.5, 4))
    ax.imshow(matrix, cmap="Blues", vmin=0)
    for (row, col), count in np.ndenumerate(matrix):
        dark = count > matrix.max() / 2
        ax.text(col, row, str(count), ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks([0, 1], labels=list(CLASS_NAMES))
    ax.set_yticks([0, 1], labels=list(CLASS_NAMES))
    ax.set_xlabel(f"predicted (score >= {threshold:g})")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    confusion_path = _save(fig, out_dir / CONFUSION_PLOT)

    fig, ax = _axes((6, 4))
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
    histogram_path = _save(fig, out_dir / HISTOGRAM_PLOT)
    return [confusion_path, histogram_path, _reliability_plot(y_true, scores, out_dir),
            _roc_plot(y_true, scores, out_dir)]


def _reliability_plot(y_true, scores, out_dir: Path) -> Path:
    """Fraction of true positives against the mean score, per bin of the ECE; the diagonal is calibrated."""
    filled = [b for b in reliability_bins(y_true, scores) if b.rows]
    fig, ax = _axes((5, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="calibrated")
    ax.plot([b.mean_score for b in filled], [b.fraction_positive for b in filled], marker="o", color="tab:blue",
            label="this model")
    for b in filled:
        ax.annotate(str(b.rows), (b.mean_score, b.fraction_positive), textcoords="offset points", xytext=(4, -10),
                    fontsize=7, color="gray")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"mean score in the bin ({ECE_BINS} equal-width bins; rows per bin in gray)")
    ax.set_ylabel("fraction of true positives")
    ax.set_title("Reliability diagram")
    ax.legend(loc="upper left")
    return _save(fig, out_dir / RELIABILITY_PLOT)


def _roc_plot(y_true, scores, out_dir: Path) -> Path:
    fig, ax = _axes((5, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="chance")
    if np.unique(y_true).size == 2:
        fpr, tpr, _ = roc_curve(y_true, scores)
        ax.plot(fpr, tpr, color="tab:blue", label=f"ROC AUC {roc_auc(y_true, scores):.4f}")
    else:
        ax.text(0.5, 0.5, "one class only: no ROC curve", ha="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right")
    return _save(fig, out_dir / ROC_PLOT)


def is_evaluation_file(path: str) -> bool:
    """A file that evaluate writes into its output: what a metrics.json that lists no files (an earlier
    release's) vouches for; `scored/` holds a score output of its own (`evaluate --input`)."""
    from sentiment_ray.scoring.output import is_score_file

    if path.startswith(f"{SCORED_DIR}/"):
        return is_score_file(path[len(SCORED_DIR) + 1:])
    return path in (METRICS_FILE, *PLOTS)


def check_scored_finished(scored_path) -> None:
    """A `score` output that its run left unfinished (a plan, no manifest) holds only part of its rows: metrics
    on it would be silently wrong. Refused, naming the rows committed and planned."""
    from sentiment_ray.scoring.output import MANIFEST_FILE, PLAN_FILE, Fragment, fragments_by_unit, unit_progress
    from sentiment_ray.scoring.work_units import WorkUnit

    try:
        folder = location(str(scored_path))
        plan_file = folder.join(PLAN_FILE)
        if not plan_file.is_file() or folder.join(MANIFEST_FILE).is_file():
            return
        units = [WorkUnit(**unit) for unit in json.loads(plan_file.read_text())["units"]]
    except (StorageError, OSError, ValueError, KeyError, TypeError):
        return  # not a score output this check can read: reading it reports what is wrong
    fragments = [f for f in (Fragment.parse(c.name) for c in folder.children()) if f is not None]
    committed = sum(f.rows for unit, own in zip(units, fragments_by_unit(units, fragments))
                    for f in unit_progress(unit, own).kept)
    planned = sum(unit.rows for unit in units)
    raise InputError(f"scored output {folder} is unfinished: its run committed {committed} of {planned} planned "
                     f"rows and wrote no {MANIFEST_FILE}; finish it with `sentiment-ray score ... --resume` first")


def check_evaluation(out_dir, *, overwrite: bool, threshold: float, inputs: dict[str, object]) -> Path | Location:
    """Everything about an evaluation that can be refused before any work (scoring included): the threshold,
    and the output rules of outputs.py: not an input (`inputs` maps each flag to its path), not the home folder
    or a filesystem root, writable, and replaced only when it holds an earlier evaluation's metrics.json and
    `overwrite` is set. The output may already hold `scored/` when that is the --scored input, or where
    `evaluate --input` (no --scored) is about to score into: that is the layout evaluate and the demo write, and
    scoring applies the output rules to it itself. Returns the resolved output folder: a Path, or a Location
    for an object-store URI."""
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be in [0, 1] (a score >= it is positive), got {threshold}")
    out = location(out_dir)
    own_scored = out.join(SCORED_DIR)
    inputs = {flag: path for flag, path in inputs.items() if path is not None}
    scored_is_ours = "--scored" not in inputs or location(str(inputs["--scored"])) == own_scored
    for flag, path in inputs.items():
        if not (flag == "--scored" and scored_is_ours):
            refuse_overlap(out.uri, [path], f"{flag} path")
    if "--scored" in inputs:
        check_scored_finished(inputs["--scored"])
    checked = check_output_location_free(out, overwrite, METRICS_FILE, legacy=is_evaluation_file,
                                         own_entries=(SCORED_DIR,) if scored_is_ours else ())
    return Path(checked.path) if checked.is_local else checked


def evaluate(scored_path, labels_path, out_dir, id_column: str = "id", label_column: str = "label",
             threshold: float = 0.5, overwrite: bool = False) -> dict:
    """Join scored output with labels, write metrics.json and the plots into out_dir, return the metrics."""
    out_dir = check_evaluation(out_dir, overwrite=overwrite, threshold=threshold,
                               inputs={"--scored": scored_path, "--labels": labels_path})
    return write_evaluation(scored_path, labels_path, out_dir, id_column, label_column, threshold)


def write_evaluation(scored_path, labels_path, out_dir: Path | Location, id_column: str = "id",
                     label_column: str = "label", threshold: float = 0.5) -> dict:
    """evaluate() once `check_evaluation` has passed: the metrics and plots, written into out_dir (into a local
    folder first, then uploaded, for an object-store output)."""
    scored = load_scored(scored_path)
    _, y_true, scores, n_unscored = join_with_labels(scored, labels_path, id_column, label_column,
                                                     scored_name=f"scored output {scored_path}")
    metrics = compute_metrics(y_true, scores, threshold)
    metrics.update(n_unscored=n_unscored, scored_path=str(scored_path), labels_path=str(labels_path))
    out = location(str(out_dir)) if not isinstance(out_dir, Location) else out_dir
    # The scored output inside this one (what `evaluate --input` scored, or the --scored folder given) stays and
    # becomes part of it; an old one of an earlier evaluation of other rows goes with that evaluation.
    keep = (SCORED_DIR,) if location(str(scored_path)) == out.join(SCORED_DIR) else ()
    kept_files = [f"{SCORED_DIR}/{e.path}" for e in walk(out.join(SCORED_DIR)) if not e.is_dir] if keep else []
    # check_evaluation applied --overwrite already (hence overwrite=True below): what is there now is replaced
    # only while it is still an earlier evaluation, which the commit checks again.
    if not out.is_local:
        with tempfile.TemporaryDirectory(prefix="sentiment-ray-evaluate-") as staging:
            _write_results(metrics, y_true, scores, Path(staging), threshold, kept_files)
            upload_output(Path(staging), out, overwrite=True, marker=METRICS_FILE, own_entries=keep,
                          legacy=is_evaluation_file)
        return metrics
    final = Path(out.path)
    staging = staging_dir(final)
    try:
        staging.mkdir()
        _write_results(metrics, y_true, scores, staging, threshold, kept_files)
        commit(staging, final, overwrite=True, marker=METRICS_FILE, legacy=is_evaluation_file, keep=keep)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk or a crash leaves nothing that blocks a rerun
        raise
    return metrics


def _write_results(metrics: dict, y_true, scores, out_dir: Path, threshold: float, kept_files: list[str]) -> None:
    write_plots(y_true, scores, out_dir, threshold)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    record_files(out_dir, METRICS_FILE, extra=kept_files)


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
        f"ECE ({metrics['ece_bins']} bins): {num(metrics['ece'])}   Brier: {num(metrics['brier'])}",
        "best threshold on these rows: accuracy {:.4f} at {:g}, F1 {:.4f} at {:g}".format(
            metrics["best_threshold"]["accuracy"]["value"], metrics["best_threshold"]["accuracy"]["threshold"],
            metrics["best_threshold"]["f1"]["value"], metrics["best_threshold"]["f1"]["threshold"]),
        "confusion matrix (rows = true, cols = predicted):",
        f"{'':>10} {'negative':>9} {'positive':>9}",
        f"{'negative':>10} {tn:>9} {fp:>9}",
        f"{'positive':>10} {fn:>9} {tp:>9}",
    ]
    return "\n".join(lines)
