"""sentiment_ray: LoRA-finetune an LLM for sentiment on Ray Train and score Parquet with Ray Data.

Importing this package never imports torch, transformers or unsloth: Unsloth must be imported before
transformers to patch it, so the heavy stacks are imported lazily, inside the code that needs them.
"""

__version__ = "0.1.0"
