"""The zero-setup demo: embedded SmolLM2, the committed IMDB sample, a private local Ray, CPU only.

Zero-shot scoring of held-out dev reviews, a finetune on train reviews it never scores, scoring again with the
adapter, and an evaluation of both, each through the same library code as the jobs. The console shows the five
steps and the result table; Ray's output, the workers' and the library's debug lines go to `demo.log` in the
run folder (sentiment_ray/demo/console.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq

from sentiment_ray.config import FinetuneConfig, RayConfig, ScoreConfig, load_config
from sentiment_ray.demo.console import DEMO_LOGGER, demo_console

logger = logging.getLogger(DEMO_LOGGER)  # the module's own name: the console shows its lines unindented

DEMO_DATA = Path(__file__).parent / "data"
REPO_ROOT = Path(__file__).resolve().parents[2]
FINETUNE_CONFIG = REPO_ROOT / "configs" / "finetune" / "smollm2_cpu.yaml"
SCORE_CONFIG = REPO_ROOT / "configs" / "score" / "smollm2_cpu.yaml"
DEFAULT_EVAL_ROWS = 500
LOG_FILE = "demo.log"


STEPS = 5


def _step(number: int, title: str) -> float:
    logger.info("[%d/%d] %s", number, STEPS, title)
    return time.perf_counter()


def _subset(src: Path, rows: int, dest: Path) -> Path:
    table = pq.read_table(src)
    pq.write_table(table.slice(0, min(rows, table.num_rows)), dest)
    return dest


def run_demo(output_dir: str | Path = "demo_output", train_rows: int | None = None, eval_rows: int | None = None,
             console_level: int = logging.INFO) -> dict:
    """The five steps, with the console kept to them and the result (`console_level`: the CLI's -v/-q); the
    summary is returned and written to `summary.json` in the run folder."""
    import ray

    started = time.perf_counter()
    run_dir = Path(output_dir).resolve() / datetime.now().strftime("run-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=False)  # each run gets a fresh folder: nothing is overwritten
    (run_dir / "data").mkdir()
    log_file = run_dir / LOG_FILE
    ray_was_running = ray.is_initialized()
    try:
        with demo_console(log_file, console_level) as console:
            logger.info("sentiment_ray demo: Ray's and the workers' output goes to %s", log_file)
            try:
                summary = _run_steps(run_dir, train_rows, eval_rows, started)
            except Exception:
                logger.debug("the demo failed", exc_info=True)  # the traceback in the log file, after its causes
                raise
            finally:
                if not ray_was_running:  # shut down here, so that Ray's last words go to the log file too
                    ray.shutdown()
            # The demo's result, written to the console on purpose (not a log line: -q does not hide it).
            console.write(format_summary(summary) + "\n")
            logger.debug("summary: %s", json.dumps(summary))
    finally:  # the console's last line, also after a failure: part of the demo's output to the user, on purpose
        print(f"full log (Ray, workers, debug lines): {log_file}", flush=True)
    return summary


def _run_steps(run_dir: Path, train_rows: int | None, eval_rows: int | None, started: float) -> dict:
    from sentiment_ray.evaluation.job import evaluate
    from sentiment_ray.model.embedded import prepare_embedded_model
    from sentiment_ray.ops.ray_cluster import ensure_ray
    from sentiment_ray.scoring import run_scoring
    from sentiment_ray.training.job import run_finetune

    timings: dict[str, float] = {}
    t = _step(1, "prepare the embedded model (SmolLM2-135M-Instruct from PyPI, once)")
    model_path = str(prepare_embedded_model())
    timings["prepare_model_s"] = time.perf_counter() - t

    finetune_cfg: FinetuneConfig = load_config(FinetuneConfig, FINETUNE_CONFIG, [
        f"output_dir={run_dir / 'adapter'}",
        f"data.train={DEMO_DATA / 'train_sample.parquet'}",
        f"model.name_or_path={model_path}",
        "ray.address=local",
    ] + ([f"data.limit={train_rows}"] if train_rows else []))
    eval_file = _subset(DEMO_DATA / "dev_sample.parquet", eval_rows or DEFAULT_EVAL_ROWS,
                        run_dir / "data" / "dev.parquet")
    score_cfg: ScoreConfig = load_config(ScoreConfig, SCORE_CONFIG, [
        f"input={eval_file}", f"output={run_dir / 'zero_shot' / 'scored'}", "ray.address=local"])
    score_cfg = dataclasses.replace(score_cfg, prompt=finetune_cfg.prompt,
                                    model=dataclasses.replace(score_cfg.model, name_or_path=model_path))

    t = _step(2, "start a private local Ray")
    cpus = os.cpu_count() or 2
    ensure_ray(RayConfig(address="local"))
    timings["ray_start_s"] = time.perf_counter() - t

    results = {}
    t = _step(3, f"zero-shot scoring of {pq.read_metadata(eval_file).num_rows} held-out dev reviews")
    zero = run_scoring(dataclasses.replace(score_cfg, output=str(run_dir / "zero_shot" / "scored")))
    results["zero_shot"] = evaluate(zero.output, str(eval_file), run_dir / "zero_shot")
    results["zero_shot"]["rows_per_second"] = zero.rows_per_second
    timings["zero_shot_s"] = time.perf_counter() - t

    t = _step(4, f"finetune (Ray Train + TRL SFTTrainer + LoRA) on {finetune_cfg.data.limit} train reviews")
    trained = run_finetune(finetune_cfg, command="sentiment-ray demo  # its finetune step")
    timings["finetune_s"] = time.perf_counter() - t

    t = _step(5, "score the same dev reviews with the adapter")
    tuned = run_scoring(dataclasses.replace(
        score_cfg, adapter=trained["adapter_dir"], model=dataclasses.replace(score_cfg.model, name_or_path=""),
        output=str(run_dir / "finetuned" / "scored")))
    results["finetuned"] = evaluate(tuned.output, str(eval_file), run_dir / "finetuned")
    results["finetuned"]["rows_per_second"] = tuned.rows_per_second
    timings["finetuned_scoring_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    summary = {
        "run_dir": str(run_dir),
        "cpus": cpus,
        "eval_rows": results["finetuned"]["n"],
        "train_rows": trained["data"]["rows"],
        "zero_shot": {k: results["zero_shot"][k] for k in ("accuracy", "f1", "roc_auc", "rows_per_second")},
        "finetuned": {k: results["finetuned"][k] for k in ("accuracy", "f1", "roc_auc", "rows_per_second")},
        "train": trained["metrics"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(s: dict) -> str:
    z, f = s["zero_shot"], s["finetuned"]
    lines = [
        "",
        f"sentiment_ray demo: SmolLM2-135M-Instruct on {s['cpus']} CPU cores, "
        f"{s['eval_rows']} held-out IMDB dev reviews",
        f"{'':12}{'accuracy':>10}{'F1':>8}{'ROC AUC':>9}{'rows/s':>8}",
        f"{'zero-shot':12}{z['accuracy']:>10.3f}{z['f1']:>8.3f}{z['roc_auc']:>9.3f}{z['rows_per_second']:>8.1f}",
        f"{'finetuned':12}{f['accuracy']:>10.3f}{f['f1']:>8.3f}{f['roc_auc']:>9.3f}{f['rows_per_second']:>8.1f}",
        f"finetuned on {s['train_rows']} train reviews: {s['train']['steps']} steps, "
        f"{s['train']['train_seconds']:.0f} s, {s['train']['tokens_per_second']:.0f} tokens/s",
        f"wall time {s['timings_s']['total_s']:.0f} s  (rows/s include actor start-up)",
        f"outputs: {s['run_dir']}  (adapter/, zero_shot/, finetuned/: scored Parquet, metrics.json, plots)",
    ]
    return "\n".join(lines)
