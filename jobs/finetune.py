"""Ray job entrypoint for fine-tuning:
`ray job submit --working-dir . -- python jobs/finetune.py --config configs/finetune/<name>.yaml ...`.

Thin on purpose: parse the command line, call the library (the same code as `sentiment-ray finetune`).

Where the job may be submitted again (a retried RayJob), pass `--resume-if-exists ray.run_name=<name>`: a
rerun then resumes the named run from its last checkpoint, or reports the adapter it finished (docs/RESILIENCE.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the job's working dir holds the package

from sentiment_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
