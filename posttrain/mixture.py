"""Data mixtures and replay: a source's `fraction:`/`rows:` sampling, and `replay:` of an earlier stage's data.

Sampling follows open-instruct's `dataset_mixer_list` (a proportion or an absolute count per source, counts over
the source's size upsample) and TRL's `DatasetMixtureConfig.fraction`. It departs from both in drawing with the
stage's seed and the source's name together, so two sources of one stage do not draw the same pattern of rows,
and the same seed draws the same rows on every rerun.

Replay mixes a share of an earlier stage's training data into a later stage: the rehearsal baseline of
continual learning (Robins 1995, "Catastrophic forgetting, rehearsal and pseudorehearsal"; Rolnick et al.
2019, "Experience Replay for Continual Learning"), and what LLaMA-Factory's maintainers suggest against
forgetting (#2611). The pool is the earlier stage's `data:` as that stage read it (its own limit and sampling
applied), sampled again with the replay's `fraction:` or `rows:`. A stage kind takes `replay:` by deriving from
`Replayable` (sft, dpo, kto, orpo, simpo, reward, grpo, rloo); the earlier stage must train on rows of the same shape (sft rows, preference
pairs, or prompts): a DPO stage replays a DPO or KTO stage's pairs, a GRPO stage another GRPO stage's prompts.
Only `data:` is replayed, not a DPO stage's `rehearsal:` pairs (built from prompt/answer rows of another shape).
"""
from __future__ import annotations

import random
from typing import Any

from pydantic import Field, PrivateAttr, model_serializer, model_validator

from posttrain.registry import did_you_mean
from posttrain.schema import Strict


def sample_count(n: int, fraction: float | None, rows: int | None) -> int:
    """How many rows a source of `n` rows gives: round(fraction * n) (at least 1), or `rows`."""
    if rows is not None:
        return rows
    return max(1, round(fraction * n)) if fraction is not None else n


def sample_rows(rows: list[Any], fraction: float | None, count: int | None, seed: int, salt: str) -> list[Any]:
    """`rows` sampled to `sample_count` rows, shuffled, reproducibly from (`seed`, `salt`).

    Upsampling (a count over len(rows)) takes every row `count // n` times and `count % n` further rows drawn
    without replacement, so no row is repeated more than once beyond the others. Neither set: rows unchanged
    (no shuffle: a plain source keeps its file order, as before mixtures existed)."""
    if (fraction is None and count is None) or not rows:
        return rows
    want = sample_count(len(rows), fraction, count)
    rng = random.Random(f"{seed}:{salt}")  # a str seed hashes with sha512: the same draw in every process
    whole, rest = divmod(want, len(rows))
    picked = [i for _ in range(whole) for i in range(len(rows))] + rng.sample(range(len(rows)), rest)
    rng.shuffle(picked)
    return [rows[i] for i in picked]


def spread(own: list[Any], extra: list[Any]) -> list[Any]:
    """`own` with `extra`'s rows spread evenly among them, both in their order: for a trainer that reads rows in
    order (KTO's sequential sampler), where rows appended at the end would all be met last. Row i of n sits at
    (i + 0.5) / n, own rows first on a tie."""
    if not own or not extra:
        return own + extra
    placed = [((i + 0.5) / len(own), 0, i) for i in range(len(own))] + \
             [((k + 0.5) / len(extra), 1, k) for k in range(len(extra))]
    return [(own if which == 0 else extra)[i] for _, which, i in sorted(placed)]


def check_share(fraction: float | None, rows: int | None, where: str) -> None:
    """`fraction` and `rows` exclude each other (one line naming both)."""
    if fraction is not None and rows is not None:
        raise ValueError(f"{where}set fraction or rows, not both (fraction: {fraction}, rows: {rows})")


class Replay(Strict):
    """One `replay:` entry: a share of earlier stage `from`'s training data mixed into this stage's."""

    from_: str = Field(alias="from", description="an earlier stage's name")
    fraction: float | None = Field(None, gt=0, description="of the earlier stage's rows (> 1 upsamples)")
    rows: int | None = Field(None, ge=1, description="an absolute count (over the earlier stage's rows upsamples)")
    _sources: list[Any] = PrivateAttr(default_factory=list)  # the earlier stage's data sources (resolve_replays)

    @model_validator(mode="after")
    def _one_share(self) -> "Replay":
        check_share(self.fraction, self.rows, "")
        if self.fraction is None and self.rows is None:
            raise ValueError("set fraction (of the earlier stage's rows) or rows (a count)")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict:
        # `from` as the YAML writes it, so a saved config.yaml reads back; an unset share left out.
        out = handler(self)
        out = {"from": out.pop("from_"), **out}
        return {k: v for k, v in out.items() if v is not None}

    def sources(self) -> list[Any]:
        """The earlier stage's data sources, set when the pipeline config was validated."""
        return list(self._sources)


class Replayable(Strict):
    """The `replay:` field of a stage kind that mixes earlier stages' data into its own `data:` rows (listed before
    the kind's other base, `class X(Replayable, TrainableStage)`, so the field comes after the shared ones)."""

    replay: list[Replay] = Field(default_factory=list, description="shares of earlier stages' data to mix in")

    @model_serializer(mode="wrap")
    def _dump_replay(self, handler: Any) -> dict:
        # Left out while empty: a field every dump carried would change the config hash of every finished stage.
        out = handler(self)
        if not out.get("replay"):
            out.pop("replay", None)
        return out


def _replay_pool(stage: Any) -> tuple[list[Any], set[str]]:
    """A stage's `data:` sources (what a later stage can replay; `training_data()`) and the shapes of their rows
    (from `data_sources()`, which also lists other inputs: a DPO stage's `rehearsal:` prompts)."""
    sources = stage.training_data()
    # KTO's sources hold pairs or unpaired rows: its pairs replay into DPO-like stages and back (an unpaired row
    # replayed into a pair-only stage is refused by the row check, naming the row)
    return sources, {"preference" if shape == "kto" else shape for src, shape in stage.data_sources()
                     if any(src is s for s in sources)}


def resolve_replays(stages: list[Any], names: list[str]) -> str | None:
    """Attach to every `replay:` entry the data sources of the stage it names; returns the first problem as one
    line with its key path (a stage not earlier, a stage without training data, rows of another shape: naming
    both kinds), else None."""
    for i, stage in enumerate(stages):
        _, shapes = _replay_pool(stage)
        for j, r in enumerate(getattr(stage, "replay", None) or []):
            where = f"stages[{i}].replay[{j}].from"
            if r.from_ not in names[:i]:
                if r.from_ in names[i:]:
                    return f"{where}: {r.from_!r} is not an earlier stage (replay mixes in data already trained on)"
                return f"{where}: no earlier stage {r.from_!r}{did_you_mean(r.from_, names[:i])}"
            earlier = stages[names.index(r.from_)]
            sources, theirs = _replay_pool(earlier)
            if not sources:
                return f"{where}: stage {r.from_!r} ({earlier.kind}) trains on no data to replay"
            unbounded = [k for k, s in enumerate(sources) if getattr(s, "streaming", False) and s.limit is None]
            if unbounded:  # replay holds its pool in memory (posttrain.stages.replay): a whole stream would not fit
                return (f"{where}: stage {r.from_!r} streams its data[{unbounded[0]}] without limit, and replay reads "
                        "the rows it mixes in into memory; set limit on that source")
            if theirs != shapes:
                return (f"{where}: stage {r.from_!r} ({earlier.kind}) trains on {'/'.join(sorted(theirs))} rows, "
                        f"stage {names[i]!r} ({stage.kind}) on {'/'.join(sorted(shapes))} rows; a {stage.kind} "
                        f"stage replays only {'/'.join(sorted(shapes))} rows")
            r._sources = list(sources)
    return None
