"""Running on Ray: connecting, logging, metrics, signals, and the fault hooks that tests use.

    ray_cluster.py    joining or starting Ray; requests no node can meet refused before work starts
    logging_setup.py  logging for the command line, Ray jobs and the workers they start
    metrics.py        Ray metrics of the jobs (dashboard, Prometheus)
    signals.py        SIGTERM ends a command as Ctrl-C does
    faults.py         environment-driven failure injection: killed actors, bad rows, a full disk, slow batches
"""
