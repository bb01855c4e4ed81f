"""The prepare stage run as Ray tasks (`prepare_actors: 0`): the rows of the actor, one tokenizer per process."""

import dataclasses

import pyarrow as pa

from sentiment_ray.config import ScoringModelConfig
from sentiment_ray.scoring import stages
from tests.conftest import RANDOM_ADAPTER_SPEC


def _batch(texts: list) -> pa.Table:
    return pa.table({stages.UNIT_COLUMN: [0] * len(texts), stages.ROW_COLUMN: list(range(len(texts))),
                     stages.TEXT_BYTES_COLUMN: [None if t is None else t.encode() for t in texts],
                     stages.NOT_TEXT_COLUMN: [False] * len(texts)})


def test_a_task_prepares_as_the_actor_and_a_process_loads_each_tokenizer_once(random_adapter, tiny_model_dir):
    args = {"adapter": str(random_adapter), "weights_sha256": None,
            "model": dataclasses.asdict(ScoringModelConfig(dtype="float32")),
            "prompt": RANDOM_ADAPTER_SPEC.to_dict(), "log_level": None, "fail_text": None}
    batch = _batch(["a fine film", "", None, "dull " * 200])
    stages._prepare_stage.cache_clear()

    first = stages.prepare_in_task(batch, **args)
    assert first.equals(stages.PrepareStage(**args)(batch))  # the rows of a tokenizing actor
    assert first.column("status").to_pylist() == [None, "empty_text", "empty_text", None]
    # The next batch, of this run or of a later one in the same process, finds the stage loaded.
    stages.prepare_in_task(batch, **dict(reversed(args.items())))  # the same arguments in another order
    assert stages._prepare_stage.cache_info()[:2] == (1, 1)  # hits, misses
    # Another adapter (here: the base model, zero-shot) is a stage of its own, beside the first.
    stages.prepare_in_task(batch, **{**args, "adapter": None, "model": dataclasses.asdict(
        ScoringModelConfig(name_or_path=str(tiny_model_dir), dtype="float32"))})
    assert stages._prepare_stage.cache_info()[:2] == (1, 2) and stages._prepare_stage.cache_info().currsize == 2
