"""sentiment_ray: LoRA-finetune an LLM for sentiment on Ray Train and score Parquet with Ray Data.

Packages by job. Each imports only those above it in this list, never a sibling on its line or one below; config.py,
which imports only model's names, prompt and hub id, is open to all (tests/test_architecture.py checks both):

    io/          storage (local, s3://, gs://), reading Parquet, outputs, ownership, the run lock
    model/       prompt, labels, adapter metadata, base models, the scorer, backends/, forwards/
    config.py    the typed configs of every command (above model's names and prompt, below the rest)
    ops/         Ray connection, logging, metrics, signals, fault hooks
    export/      `export`: the merged classifier; model cards
    training/    `finetune`: Ray Train + TRL              scoring/  `score`: the streaming Ray Data pipeline
    evaluation/  `evaluate`
    demo/        `demo`                                   predict.py  `predict`, and `sentiment_ray.predict.predict`
    cli.py       the `sentiment-ray` command

Importing this package never imports torch, transformers or unsloth: Unsloth must be imported before
transformers to patch it, so the heavy stacks are imported lazily, inside the code that needs them.
"""

__version__ = "0.1.0"
