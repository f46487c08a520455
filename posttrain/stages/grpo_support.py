"""What the GRPO stage adds around TRL's GRPOTrainer (posttrain/stages/grpo.py says why each exists): prompt rows
as TRL takes them, a sampler whose epoch order survives a resume, reward error counts and the rewards that never
scored, and the vLLM server the stage starts for its rollouts.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any

from posttrain.data import DataError, DataSource, load_sources, rows_dataset
from posttrain.ranks import agree, is_main
from posttrain.registry import REWARDS
from posttrain.rewards import RewardsFailed, RewardStats, build_reward_funcs, with_models
from posttrain.rewards.scorer import check_scorer, release_scorers
from posttrain.rollout import (
    VLLMServer,
    free_port,
    grpo_rollout_args,
    resolve_backend,
    server_callback,
    server_env,
    vllm_serve_command,
)
from posttrain.stages.base import StageContext
from posttrain.stages.combine import resolve_ref


def _as_chat(prompt: Any) -> list[dict[str, str]]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def prompt_rows(rows: list[dict], chat: bool) -> list[dict]:
    """Prompt rows as TRL's GRPOTrainer takes them: all chat (the tokenizer has a template) or all plain text.

    Without a template TRL tokenizes plain prompts as they are, but a message list has nothing to render it,
    so such rows are refused (DataError: exit 2), as the DPO stage refuses conversational pairs.
    """
    if chat:
        return [{**r, "prompt": _as_chat(r["prompt"])} for r in rows]
    if any(isinstance(r["prompt"], list) for r in rows):
        raise DataError("conversational prompts need a tokenizer with a chat template; this one has none")
    return rows


def prompt_dataset(sources: list[DataSource], chat: bool, log, seed: int = 0,
                   extra: tuple[list[dict], list[dict]] = ([], [])) -> tuple[Any, list[dict]]:
    """Checked prompt rows of every source (then `extra`'s: replayed rows and their stats) as one
    `datasets.Dataset`, plus per-source stats.

    Rows are normalised by `prompt_rows` before the Dataset is built, since one Arrow column cannot hold both
    strings and message lists (a plain source mixed with a conversational one).
    """
    rows, stats = load_sources(sources, "prompt", log, seed)  # seed: a source's fraction/rows sampling
    return rows_dataset(prompt_rows(rows + extra[0], chat)), stats + extra[1]


def epoch_sampler(**repeat_sampler_kwargs: Any):
    """TRL's RepeatSampler whose order in epoch k is a function of (seed, k) only, so a resumed run repeats it.

    TRL 1.16's RepeatSampler seeds its generator once and draws a permutation on every `__iter__`, so epoch k's
    order depends on how many epochs the same object produced; a resumed trainer builds a fresh sampler and gave
    epoch 2 epoch 1's order. Checked first: transformers' Trainer calls `set_epoch(epoch)` on the train
    dataloader before every epoch, the resumed one included, and accelerate's DataLoaderShard forwards it to the
    sampler (also through skip_first_batches' SkipBatchSampler), so reseeding there is enough. Like torch's
    DistributedSampler we seed with seed + epoch, which keeps epoch 0 (every one-epoch run) as TRL orders it.
    """
    from trl.trainer.utils import RepeatSampler

    class _EpochSampler(RepeatSampler):
        epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            if self.shuffle and self.seed is not None:  # reseed in place: accelerate may hold this generator
                self.generator.manual_seed(self.seed + self.epoch)
            return super().__iter__()

    return _EpochSampler(**repeat_sampler_kwargs)


def trainer_class(base: type | None = None):
    """`base` (GRPOTrainer; the rloo stage's RLOOTrainer, whose sampler is the same RepeatSampler) with
    `epoch_sampler` as its train sampler (only the sampler's seeding changes)."""
    if base is None:
        from trl import GRPOTrainer as base

    class _EpochTrainer(base):
        def _get_train_sampler(self, dataset=None):
            # TRL's sampler first, so its batch arithmetic (prompts per generation batch, repeats per
            # num_iterations x steps_per_generation) stays TRL's; only the class changes.
            s = super()._get_train_sampler(dataset)
            return epoch_sampler(data_source=s.data_source, mini_repeat_count=s.mini_repeat_count,
                                 batch_size=s.batch_size, repeat_count=s.repeat_count, shuffle=s.shuffle,
                                 seed=s.seed)

    return _EpochTrainer


def group_problem(trainer: Any, num_generations: int) -> str | None:
    """Why a batch of `trainer` (per-device size x accumulation, in completions) holds no whole number of
    groups of `num_generations`, or None."""
    batch = trainer.per_device_train_batch_size * trainer.gradient_accumulation_steps
    if batch % num_generations:
        return (f"trainer.per_device_train_batch_size x gradient_accumulation_steps ({batch}) counts completions "
                f"and must be a multiple of num_generations ({num_generations})")
    return None


def reward_funcs(cfg: Any, ctx: StageContext, stats: RewardStats) -> tuple[list[Any], list[float]]:
    """`build_reward_funcs` for the stage's rewards, each `reward_model`'s `model` resolved to its folder
    (`${stages.<name>.model}`: that earlier stage's output in the run dir) and checked to be a reward model."""
    specs = with_models(cfg.rewards, lambda ref: resolve_ref(ref, ctx))
    for spec in specs:
        if spec.name == "reward_model":
            check_scorer(spec.params["model"])
    return build_reward_funcs(specs, stats)


def check_reward_columns(rewards: list[Any], columns: list[str]) -> None:
    """Refuse (DataError, before the model loads) a built-in reward that reads a data column the rows lack
    (ifeval's `column`): it would fail at every batch, as a traceback per call."""
    for spec in rewards:
        if spec.name not in REWARDS.names():  # a user reward file: its columns are its own business
            continue
        param = inspect.signature(REWARDS.get(spec.name)).parameters.get("column")
        column = spec.params.get("column", None if param is None else param.default)
        if column is not None and column not in columns:
            raise DataError(f"rewards: {spec.name} reads column {column!r}, which the data does not have (columns: "
                            f"{', '.join(columns)}); set its params.column")


def reward_errors_callback(stats: RewardStats):
    """A TrainerCallback that adds the reward error counts to each log record (before metrics_callback)."""
    from transformers import TrainerCallback

    class _RewardErrors(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs is not None:
                logs.update(stats.as_metrics())  # the same dict reaches the callbacks after this one

    return _RewardErrors()


def failed_rewards(stats: RewardStats, names: list[str], log) -> list[str]:
    """The rewards (of ``names``, in order) that failed on every completion of the run, each warned about;
    raise RewardsFailed when that is all of them.

    Why fail only then: a reward error scores 0 so that one bad batch does not cost a run, and a reward that
    never scored gave the policy no signal, but the others still trained it as configured minus that term:
    the model is a result (named as incomplete in DONE's metrics and the log). With no reward left, every
    group's rewards were equal, every advantage 0, and the run trained on nothing (beta > 0 only pulled it
    to its input). Reporting that as done would be a lie, and later stages would build on it. The stage
    fails before DONE: its work folder keeps the model and metrics.jsonl, a rerun with the same config
    trains again, and fixing the reward file changes the stage's inputs, so the rerun starts afresh.

    Each process counts its own calls (TRL scores each rank's completions where they were generated), so
    the main process's view is taken by every rank: they fail together or not at all (none waits forever).
    """

    failed = agree(stats.failed_every_call())
    for name in (n for n in names if n in failed):
        kinds = ", ".join(f"{k}: {n}" for k, n in failed[name].items())
        log(f"warning: reward {name!r} failed on every completion of this run ({kinds}); it scored none, so it "
            f"gave the training no signal")
    if names and all(n in failed for n in names):
        raise RewardsFailed(
            f"every reward failed on every completion ({', '.join(map(repr, names))}): the run trained on no "
            f"reward signal, so the stage is not marked done; fix the reward and rerun")
    return [n for n in names if n in failed]


def rollout_session(cfg: Any, ctx: StageContext) -> tuple[str, dict[str, Any], Any]:
    """(backend, GRPOConfig's rollout fields, run_trl_stage's `session`) for `cfg.rollout`.

    With `vllm_server` and no `url`, the main process starts `vllm serve` on `gpus` (the command TRL builds for
    server mode) while the trainer is built and trains, and stops it when the stage ends, fails or is
    interrupted. Every rank takes the main process's ports; it alone starts the server and talks to it.
    """

    backend = resolve_backend(cfg.rollout)
    serve = backend == "vllm_server" and not cfg.rollout.url
    env = server_env(cfg.rollout.gpus) if serve else None  # a bad gpus index fails on every rank, before loading
    port, group_port = agree(((cfg.rollout.port or free_port()) if serve else None,
                              (cfg.rollout.group_port or free_port("")) if backend == "vllm_server" else None))
    base_url = f"http://127.0.0.1:{port}" if serve else cfg.rollout.url

    @contextlib.contextmanager
    def session():
        try:
            with _server() as more:
                yield more
        finally:
            release_scorers()  # the reward models the rewards loaded: their memory goes back before the evals

    @contextlib.contextmanager
    def _server():
        if not (serve and is_main()):
            yield []
            return
        with VLLMServer(vllm_serve_command(ctx.input_model, cfg.rollout, port, cfg.trust_remote_code), port,
                        ctx.work_dir / "vllm_server.log", env=env, health_timeout_s=cfg.rollout.health_timeout_s,
                        log=ctx.log) as server:
            ctx.log_metrics({"event": "rollout_server", "pid": server.pid, "url": server.base_url,
                             "log": str(server.log_path)})
            yield [server_callback(server)]

    return backend, grpo_rollout_args(cfg.rollout, backend, base_url, group_port), session
