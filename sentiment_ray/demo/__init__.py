"""`sentiment-ray demo`: finetune, score and evaluate on the committed IMDB sample, CPU only, no setup.

    job.py      the demo's steps
    console.py  its console: steps and result on screen, the rest in a log file
    data/       the committed IMDB samples (train and dev)
"""
