"""The Ray Data execution callback that stops a scoring pipeline once a node it started on is lost (node_loss.py).

A module's class, not one made per pipeline: Ray pickles the DataContext, its callback classes included, into every
task it starts, and a class pickled by value would carry the pipeline's state (its executor, which cannot be
pickled) along. The state stays on the driver, in node_loss's registry, found by a key in the context's config.
Imported only where a pipeline runs: it imports Ray Data.
"""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager

from ray.data._internal.execution.execution_callback import ExecutionCallback

from sentiment_ray.scoring import node_loss


class StopOnLostNode(ExecutionCallback):
    """Raises NodeLost on the executor's own loop (which ends the execution as an operator error does) once a
    node the pipeline started on is gone; asks the GCS at most every node_loss.CHECK_EVERY_S seconds."""

    def __init__(self):
        self.watch = None
        self.checked = time.monotonic()

    def before_execution_starts(self, executor) -> None:
        self.watch = node_loss.watch_of(executor._data_context)  # noqa: SLF001 - the context this execution runs

    def on_execution_step(self, executor) -> None:
        if self.watch is None:
            return
        # Every step (lists of a few tasks and actors): Ray Data forgets them when the execution stops, and they
        # must be ended before the next pipeline starts (node_loss.end_pipeline)
        self.watch.write_tasks = node_loss.write_tasks_of(executor)
        self.watch.actors = node_loss.actors_of(executor)
        now = time.monotonic()
        if now - self.checked < node_loss.CHECK_EVERY_S:
            return
        self.checked = now
        node_loss.check_nodes(self.watch)


@contextmanager
def watching(dataset, nodes_at_start: set[str]):
    """While the body runs `dataset`, a node of `nodes_at_start` found dead stops it with NodeLost (raised on
    the executor's loop by StopOnLostNode, which finds this watch by the key in the dataset's
    DataContext: Ray ships the context, callback classes included, to every task, so the class is a module's and
    its state stays here, on the driver)."""
    key = uuid.uuid4().hex
    watch = node_loss.PipelineWatch(set(nodes_at_start))
    node_loss._WATCHES[key] = watch
    context = dataset.context
    context.set_config(node_loss.WATCH_KEY, key)
    context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, StopOnLostNode]
    try:
        yield watch
    finally:
        node_loss._WATCHES.pop(key, None)
