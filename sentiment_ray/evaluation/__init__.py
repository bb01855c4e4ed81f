"""`evaluate`: a scored output against the true labels (accuracy, F1, ROC AUC, calibration).

    job.py             run_evaluate: joins scores and labels by id, writes metrics.json and the reliability plot
    binary_metrics.py  accuracy, precision, recall, F1, ROC AUC and curve in numpy (sklearn's definitions)
"""
