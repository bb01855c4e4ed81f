"""`evaluate`: a scored output against the true labels (accuracy, F1, ROC AUC, calibration).

    job.py  run_evaluate: joins scores and labels by id, writes metrics.json and the reliability plot
"""
