"""Storage and files, at the bottom of the package: it imports nothing else of sentiment_ray.

    errors.py     InputError, quoting values in one-line messages, the causes under a wrapped error
    storage.py    one API over local disk and object stores (s3://, gs://) through pyarrow.fs
    inputs.py     finding, checking and reading review Parquet; every error names the file, column and row
    outputs.py    output folders: never overwritten silently, never looking finished while half-written
    ownership.py  what at an output this tool wrote: the only files `--overwrite` may delete
    run_lock.py   one run at a time per output, however its path is spelled (flock; S3/GCS conditional writes)
"""
