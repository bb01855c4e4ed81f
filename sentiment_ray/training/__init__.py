"""The finetune job: LoRA on Ray Train workers with TRL's SFTTrainer (Unsloth on GPU, transformers + peft on CPU).

    job.py               run_finetune: checks, then a TorchTrainer whose workers train; the adapter committed
    data.py              the training rows: one order for any number of workers, fed as Ray Datasets
    excerpts.py          short excerpts of labeled reviews mixed into training
    checkpoints.py       resumable runs: Ray Train checkpoints, a restarted worker continues from the latest
    worker_room.py       workers the cluster no longer holds (a lost node): a bounded wait, then one line
    calibration.py       temperature and threshold fitted on held-out rows; reliability of the scores
    trl_cpu_fallback.py  a plain-PyTorch stand-in for TRL's Triton kernel, so SFTTrainer trains on CPU
"""
