"""The manifest of a scoring output: its commit marker (written last, sentiment_ray/scoring/output.py) and what
`score` returns and prints. One definition, so the file, the return value and the CLI's summary agree."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from sentiment_ray.scoring.stages import StageActivity


@dataclass(frozen=True)
class UnitCounts:
    total: int
    committed_before_this_run: int  # units whose rows were all committed by earlier runs (a resume)
    scored_this_run: int  # units with rows scored by this run (on a resume: only their missing rows)
    rows_per_unit: int
    fragments: int  # objects holding the rows (a unit is one or more fragments)


@dataclass(frozen=True)
class Timeline:
    """When this run reached each step, in seconds from the command's start (the `score` process's start; for
    `run_scoring` called in a program, the call). Steps a run did not take (nothing left to score) are None; the
    others increase."""

    ray_ready: float | None  # connected to (or started) Ray
    pipeline_started: float | None  # the streaming pipeline and its actor pools started
    scoring_actor_ready: float | None  # the first scoring actor had its model loaded (and compiled)
    first_batch: float | None  # a scoring actor began its first batch
    last_batch: float | None  # the last batch of the run was scored
    committed: float  # every unit checked; the manifest, the commit marker, is written now

    def steps(self) -> list[tuple[str, float]]:
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def describe(self) -> str:
        return ", ".join(f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in self.steps())


@dataclass(frozen=True)
class ScoreManifest:
    output: str
    rows_in: int
    rows_out: int
    rows_scored: int  # status ok
    rows_marked: int  # rows out with another status (empty_text, invalid_utf8, ...): kept, not scored
    rows_skipped: int  # rows of units that could not be read (--skip-unreadable-files): not in the output
    rows_truncated: int
    status_counts: dict[str, int]
    files_skipped: list[dict]
    units_skipped: list[dict]
    units: UnitCounts
    ids: str  # where the id column comes from
    adapter: str | None
    input_files: list[str]
    seconds: float  # this run's wall time, start-up included
    rows_scored_this_run: int
    rows_per_second: float | None  # this run's rows over its wall time
    score_stage: StageActivity | None  # this run's scoring actors: how much of their active time went to batches
    config: dict
    plan_settings: dict | None  # what a later --resume on this finished output checks its inputs against
    timeline: Timeline | None = None  # this run's steps in seconds from the command's start
    # Every file of the output (relative names, this manifest included): all that a later --overwrite may delete
    # (sentiment_ray/io/ownership.py). None in a manifest of an earlier release.
    files_written: list[str] | None = None
    # model.quantization as this run's scoring actors applied it (config.model.quantization is what was asked):
    # "none", "fp8_rowwise", or "none (fp8 unavailable: why)"; several, "; "-joined, where actors differed. None:
    # no actor reported (nothing left to score, or a manifest of an earlier release).
    quantization: str | None = None

    @staticmethod
    def applied_quantization(activity: StageActivity | None) -> str | None:
        """The quantization this run's scoring actors applied, from their readiness reports (None: none reported)."""
        applied = sorted({a.quantization for a in (activity.per_actor if activity else ()) if a.quantization})
        return "; ".join(applied) or None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str) + "\n"

    @classmethod
    def from_json(cls, text: str, output: str) -> ScoreManifest:
        """A manifest as written; one from an older release lacks the fields added since (None here)."""
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {name: data.get(name) for name in known}
        values["output"] = output  # where it is now, which is what a caller reads from
        units = data.get("units") or {}
        values["units"] = UnitCounts(**{f.name: units.get(f.name) for f in dataclasses.fields(UnitCounts)})
        stage = data.get("score_stage")
        values["score_stage"] = StageActivity.from_dict(stage) if stage else None
        timeline = data.get("timeline")
        values["timeline"] = Timeline(**timeline) if timeline else None
        return cls(**values)
