"""`export`: an adapter as a plain text-classification model, and the model cards of what this package writes.

    classifier.py  the merged `*ForSequenceClassification` folder, checked against the scorer before commit
    summary.py     ExportSummary: what was written and checked
    model_card.py  model cards (README.md with the Hub's front matter) for adapters and exported models
"""
