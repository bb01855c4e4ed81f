"""The plan of a scoring run: its inputs, checked before any work starts, and the work units they are cut into.

The plan is written once, into the output (`_sentiment_ray_plan.json`), and read back by `--resume`, which must
find the same settings (inputs with their sizes and modification times, id rule, columns, adapter weights, model,
prompt) and then scores only the units that have no complete set of fragments yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from sentiment_ray.config import ConfigError, ScoreConfig
from sentiment_ray.io.errors import InputError
from sentiment_ray.io.inputs import check_columns, open_parquet, resolve_parquet_files
from sentiment_ray.scoring.work_units import WorkUnit, plan_units

logger = logging.getLogger(__name__)

DEFAULT_ID_COLUMN = "id"
PREDICTION_COLUMNS = ("label", "label_id", "score", "status", "adapter", "truncated", "error")
EXAMPLES_SHOWN = 3  # changed input files named in a refusal
UNITS_PER_ACTOR = 4  # a small input is cut into at least this many units per actor, so none sits idle


def output_schema(id_field: pa.Field, keep_fields: list[pa.Field]) -> pa.Schema:
    """The one definition of the scored output's columns (README, "Output")."""
    return pa.schema([
        id_field, *keep_fields,
        pa.field("label", pa.string()), pa.field("label_id", pa.int8()), pa.field("score", pa.float64()),
        pa.field("status", pa.string()), pa.field("adapter", pa.string()), pa.field("truncated", pa.bool_()),
        pa.field("error", pa.string()),
    ])


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute local path or URI
    rows: int
    bytes: int | None = None  # size and modification time: a resumed run refuses an input that changed
    mtime_ns: int | None = None
    # A digest of the Parquet footer (row groups, their sizes, offsets and statistics): a file replaced by one of
    # the same size whose modification time was kept (`cp -p`, `rsync -t`) still differs here.
    footer_sha256: str | None = None


@dataclass
class ScoreInputs:
    """The input files as checked on the driver."""

    files: list[InputFile]
    unreadable: list[dict]  # {"file", "error"}: skipped with skip_unreadable_files
    id_column: str  # the output's id column
    derived_ids: bool  # no input file has the id column: ids are `<file key>:<row index>`
    schema: pa.Schema  # the output's schema

    @property
    def rows_in(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]


def _same_type(a: pa.DataType, b: pa.DataType) -> bool:
    return a == b or pa.types.is_null(a) or pa.types.is_null(b)


def _identity(path: str, parquet) -> InputFile:
    from sentiment_ray.io.storage import location

    info = location(path).info()
    # The footer as Parquet serializes it, not its to_dict(): a string column's min/max statistics may hold bytes
    # that are not UTF-8 (a cut multi-byte character, bad input), which to_dict() cannot decode.
    footer = pa.BufferOutputStream()
    parquet.metadata.write_metadata_file(footer)
    digest = hashlib.sha256(footer.getvalue().to_pybytes()).hexdigest()
    return InputFile(path, parquet.metadata.num_rows, info.size, info.mtime_ns, digest)


def _input_changes(stored: list[dict], now: list[dict] | None) -> list[str]:
    """How the input files differ from those a plan recorded, naming each file (at most EXAMPLES_SHOWN). Only
    what both records hold is compared: a plan of an earlier version lacks the footer digest."""
    now = now or []
    before, after = {f["path"]: f for f in stored}, {f["path"]: f for f in now}
    changes = [f"{path}: no longer an input" for path in before if path not in after]
    changes += [f"{path}: a new input" for path in after if path not in before]
    for path in before.keys() & after.keys():
        old, new = before[path], after[path]
        what = [f"{label} {old[key]} -> {new[key]}" for key, label in (("rows", "rows"), ("bytes", "bytes"),
                                                                      ("mtime_ns", "modification time (ns)"))
                if key in old and key in new and old[key] != new[key]]
        if not what and old.get("footer_sha256") and new.get("footer_sha256") \
                and old["footer_sha256"] != new["footer_sha256"]:
            what = ["its content (same size and modification time, another Parquet footer)"]
        if what:
            changes.append(f"{path} changed since the plan was written: {', '.join(what)}")
    return sorted(changes)[:EXAMPLES_SHOWN] + ([f"{len(changes) - EXAMPLES_SHOWN} more"]
                                              if len(changes) > EXAMPLES_SHOWN else [])


def check_prompt_settings(cfg: ScoreConfig) -> None:
    """An adapter brings the prompt it was trained with (its sentiment_ray.json), and scoring uses that one:
    a `prompt.*` setting given with an adapter that differs from it is refused rather than silently ignored
    (scoring with another max_length or template than training would change the scores without a word)."""
    if not cfg.adapter:
        return
    from sentiment_ray.model.metadata import read_metadata
    from sentiment_ray.model.prompt import PromptSpec

    given, default = cfg.prompt.to_dict(), PromptSpec().to_dict()
    set_here = {k: v for k, v in given.items() if v != default[k]}
    if not set_here:
        return
    trained = read_metadata(cfg.adapter).prompt.to_dict()
    differ = {k: v for k, v in set_here.items() if v != trained[k]}
    if differ:
        shown = ", ".join(f"prompt.{k}={v!r} (the adapter's: {trained[k]!r})" for k, v in differ.items())
        raise ConfigError(f"{shown}: the adapter {cfg.adapter} scores with the prompt it was trained with; drop "
                          "these settings (the prompt is fixed at training: finetune with the prompt you want)")


def check_inputs(cfg: ScoreConfig) -> ScoreInputs:
    """Every input file's footer read and its columns checked before any work starts. A column named in the
    config (text, kept, or an id_column set explicitly) must be in the files: a typo is an error naming the file
    and its columns, never a silent switch to derived ids."""
    id_column = cfg.id_column or DEFAULT_ID_COLUMN
    if id_column in PREDICTION_COLUMNS:
        raise InputError(f"id_column {id_column!r} would collide with the prediction column of that name "
                         f"(the output's columns: the id, kept columns and {list(PREDICTION_COLUMNS)}); name another "
                         "id column")
    repeated = sorted({c for c in cfg.keep_columns if cfg.keep_columns.count(c) > 1})
    if repeated:
        raise InputError(f"keep_columns names {repeated} more than once; name each column once")
    clash = sorted(set(cfg.keep_columns) & (set(PREDICTION_COLUMNS) | {id_column}))
    if clash:
        raise InputError(f"keep_columns {clash} would collide with the id or prediction columns "
                         f"{list(PREDICTION_COLUMNS)}")
    check_prompt_settings(cfg)
    files, unreadable, schemas = [], [], {}
    for path in resolve_parquet_files(cfg.input):
        try:
            parquet = open_parquet(path)
            schema = parquet.schema_arrow
        except InputError as exc:
            if not cfg.skip_unreadable_files:
                raise InputError(f"{exc}; pass --skip-unreadable-files to skip and report it instead") from None
            logger.warning("skipping %s", exc)
            unreadable.append({"file": path, "error": str(exc)})
            continue
        check_columns(path, schema, {cfg.text_column: "text", **{c: "kept" for c in cfg.keep_columns}},
                      strings_only=False)  # a non-string text column is scored as marked rows
        files.append(_identity(path, parquet))  # the row count and digest from the footer already read
        schemas[path] = schema
    if not files:
        raise InputError(f"no readable Parquet file among {len(unreadable)} matching {cfg.input!r}")
    paths = [f.path for f in files]
    with_id = [p for p in paths if id_column in schemas[p].names]
    if cfg.id_column is not None and not with_id:
        raise InputError(f"{paths[0]}: no id column {id_column!r} (columns: {schemas[paths[0]].names}); name a "
                         "column the input files have, or set no id column to derive ids '<file key>:<row index>'")
    if with_id and len(with_id) != len(paths):
        missing = next(p for p in paths if id_column not in schemas[p].names)
        raise InputError(f"{missing}: no id column {id_column!r} (columns: {schemas[missing].names}), but "
                         f"{with_id[0]} has one; give every file an id column, or none (ids are then derived)")
    first = schemas[paths[0]]
    for name in ([id_column] if with_id else []) + list(cfg.keep_columns):
        for path in paths[1:]:
            if not _same_type(schemas[path].field(name).type, first.field(name).type):
                raise InputError(f"{path}: column {name!r} is {schemas[path].field(name).type} but "
                                 f"{paths[0]} has {first.field(name).type}; all input files must agree")
    id_type = first.field(id_column).type if with_id else pa.string()
    schema = output_schema(pa.field(id_column, id_type), [first.field(c) for c in cfg.keep_columns])
    return ScoreInputs(files, unreadable, id_column, not with_id, schema)


def rows_per_unit(cfg: ScoreConfig, rows_in: int) -> int:
    spread = math.ceil(rows_in / (cfg.pool_size * UNITS_PER_ACTOR)) if rows_in else cfg.unit_rows
    rows = min(cfg.unit_rows, spread)
    return max(cfg.batch_size, math.ceil(rows / cfg.batch_size) * cfg.batch_size)


@dataclass
class ScorePlan:
    settings: dict  # what a resumed run must share (JSON-normal: as read back from the plan file)
    rows_per_unit: int
    units: list[WorkUnit] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"settings": self.settings, "rows_per_unit": self.rows_per_unit,
                           "units": [asdict(u) for u in self.units]}) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ScorePlan:
        data = json.loads(text)
        return cls(data["settings"], data["rows_per_unit"], [WorkUnit(**u) for u in data["units"]])

    def changed_settings(self, other: ScorePlan) -> list[str]:
        """The settings of this (recorded) plan that `other` (this run's) does not share; an input file that
        changed is named with what changed."""
        changed = []
        for key, value in self.settings.items():
            if key == "inputs":
                changes = _input_changes(value, other.settings.get(key))
                if changes:
                    changed.append(f"inputs ({'; '.join(changes)})")
            elif key == "model" and isinstance(value, dict):
                if _with_added_model_settings(value) != _with_added_model_settings(other.settings.get(key) or {}):
                    changed.append(key)
            elif other.settings.get(key) != value:
                changed.append(key)
        return changed


# Model settings added after plans were first written, with the value every run before them had: an unfinished run
# of an earlier release resumes as long as the new setting keeps that value (another is a changed model).
MODEL_SETTINGS_ADDED = {"quantization": "none"}


def _with_added_model_settings(model: dict) -> dict:
    return {**MODEL_SETTINGS_ADDED, **model}


def make_plan(cfg: ScoreConfig, inputs: ScoreInputs, adapter_identity: str | None, model: dict,
              threshold: float = 0.5) -> ScorePlan:
    """What this run will do: the settings a resumed run must share, and the work units."""
    settings = {
        "inputs": [asdict(f) for f in inputs.files],
        "unreadable_files": [u["file"] for u in inputs.unreadable],
        "id_column": inputs.id_column, "derived_ids": inputs.derived_ids, "text_column": cfg.text_column,
        "keep_columns": list(cfg.keep_columns),
        "adapter": adapter_identity,
        "model": model,
        "prompt": None if adapter_identity else cfg.prompt.to_dict(),
        "threshold": threshold,
    }
    unit_size = rows_per_unit(cfg, inputs.rows_in)
    units = plan_units(inputs.paths, unit_size)
    return ScorePlan(json.loads(json.dumps(settings, default=str)), unit_size, units)
