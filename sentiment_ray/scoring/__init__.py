"""The scoring job as a streaming Ray Data pipeline, on any storage (local disk, s3://, gs://).

    work_units.py  the grain of commit, resume and retry: row ranges of the input files
    plan.py    inputs checked, work units, the plan a resumed run must match
    stages.py  read (work units) -> prepare (CPU actors or tasks: tokenize) -> score (GPU actors)
    sink.py    fragments with deterministic names; the check that every unit is there once
    output.py  the output folder: what may be done with it, fragments, what a resume has left to score
    progress.py  the driver's progress line: rows scored, rows/s, time left
    manifest.py  the manifest: the commit marker, and what `score` returns
    node_loss.py  a lost node: the pipeline stopped, re-formed on the nodes left, or a bounded wait
    lost_node_callback.py  the Ray Data execution callback that notices the loss on the executor's loop
    job.py     the chain, on the driver
"""

from sentiment_ray.scoring.job import run_scoring
from sentiment_ray.scoring.manifest import ScoreManifest
from sentiment_ray.scoring.output import MANIFEST_FILE, PLAN_FILE

__all__ = ["MANIFEST_FILE", "PLAN_FILE", "ScoreManifest", "run_scoring"]
