"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/score.py --config configs/score/<name>.yaml ...`.

Thin on purpose: parse the command line, call the library (the same code as `sentiment-ray score`).

Where the job may be submitted again with the same arguments (a retried RayJob), pass `--resume-if-exists`:
a rerun then finishes the earlier run's output instead of being refused (docs/RESILIENCE.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds the package

from sentiment_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
