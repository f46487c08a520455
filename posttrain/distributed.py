"""Data-parallel stages under `accelerate launch`: who trains, who writes, who waits.

    accelerate launch [--config_file configs/accelerate/<f>.yaml] -m posttrain stage|run ...
    posttrain stage|run ... --launcher accelerate --num-processes N [--accelerate-config F]   (re-executes the above)

Every process runs the same pipeline. Trainable stages (sft, dpo, grpo: TRL's trainers, which shard the data
and all-reduce the gradients through accelerate) run on every rank. Everything else happens on the main
process only (rank 0): the run directory (lock, pipeline.yaml, work folders, finalize, DONE), world models
built on first use, merges and transfers, evals and the report. The other ranks wait at barriers and exit 0.

Per stage, on both sides, in the same order (every barrier of one side meets one of the other):

    main                                       other ranks
    resolve the input model (may build it)     -
    -- barrier ----------------------------------------------------------- (input is on disk)
    trainable: clean the work folder           trainable: -
    -- barrier ----------------------------------------------------------- (work folder ready)
    train with all ranks                       train with all ranks
    save model/, finalize, DONE                -
    not trainable: run the stage               -
    -- barrier ----------------------------------------------------------- (DONE written; read it)
    eval, report                               next stage

The main process evaluates and builds world models in a single-process view (distributed environment
variables and accelerate's shared state hidden), since lm-eval and transformers' Trainer would otherwise
treat the other ranks, who are not evaluating, as partners in a collective and wait for them forever.

Ranks, barriers and their timeout: `posttrain.ranks`.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from posttrain.models import resolve_model
from posttrain.pipeline import Pipeline
from posttrain.ranks import agree, barrier, is_main, launched
from posttrain.rollout import PLANNED_PROCESSES_ENV
from posttrain.schema import read_yaml
from posttrain.stages.base import StageContext
from posttrain.stages.common import TrainableStage

REPO_ACCELERATE = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
# Set by torchrun / accelerate launch; hidden while the main process works alone (see single_process_view).
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
               "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE")
_LAUNCH_PREFIXES = ("ACCELERATE_USE_", "FSDP_", "ACCELERATE_DEEPSPEED_")


@contextlib.contextmanager
def planned_launch(launcher: str, num_processes: int | None, config: str | None) -> Iterator[None]:
    """While the CLI reads a config it is about to relaunch under `accelerate launch` (WORLD_SIZE is not set
    yet), the number of processes the launch will start, for the config checks that depend on it (a colocated
    vLLM's tensor_parallel_size): --num-processes, else the accelerate config's num_processes."""
    path = Path(config) if config else None
    if launcher != "accelerate" or launched():
        yield
        return
    if num_processes is None:
        path = path or default_accelerate_config()
        doc = yaml.safe_load(path.read_text()) if path.is_file() else None  # a missing file: refused at launch
        num_processes = doc.get("num_processes") if isinstance(doc, dict) else None
    old = os.environ.get(PLANNED_PROCESSES_ENV)
    if isinstance(num_processes, int):
        os.environ[PLANNED_PROCESSES_ENV] = str(num_processes)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PLANNED_PROCESSES_ENV, None)
        else:
            os.environ[PLANNED_PROCESSES_ENV] = old


def main_decides(check: Callable[[], None], errors: tuple[type, ...]) -> None:
    """Run `check` on the main process alone (reading the inputs once, not once a rank); an error of `errors`
    there stops every rank together: the main raises it, the others exit 2 without a word (the main says why)
    instead of waiting at the next barrier for a process that is gone."""
    if not launched():
        check()
        return
    problem = None
    if is_main():
        try:
            check()
        except errors as e:
            problem = e
    if agree(None if problem is None else str(problem)) is None:
        return
    if problem is not None:
        raise problem
    raise SystemExit(2)


@contextlib.contextmanager
def single_process_view() -> Iterator[None]:
    """Let the main process run single-process code (lm-eval, a world model's own training) mid-launch."""
    if not launched():
        yield
        return
    from accelerate.state import AcceleratorState, GradientState, PartialState

    hidden = {k: os.environ.pop(k) for k in list(os.environ)
              if k in _LAUNCH_ENV or k.startswith(_LAUNCH_PREFIXES)}
    shared = [(cls, dict(cls._shared_state)) for cls in (PartialState, AcceleratorState, GradientState)]
    for cls, _ in shared:
        cls._shared_state.clear()
    try:
        yield
    finally:
        os.environ.update(hidden)
        for cls, saved in shared:
            cls._shared_state.clear()
            cls._shared_state.update(saved)


class FollowerContext(StageContext):
    """A stage context for ranks other than the main one: it trains but writes nothing to the run dir."""

    def log_metrics(self, record: dict[str, Any]) -> None:
        return None


def _trainable(spec: Any) -> bool:
    return issubclass(spec.config, TrainableStage)


class DistributedPipeline(Pipeline):
    """Pipeline under `accelerate launch`; see the module docstring for who does what and where they meet."""

    def run(self) -> Path:
        if is_main():
            return super().run()
        for i, stage in enumerate(self.cfg.stages):
            self._run_stage(i, stage)
        return self.rd.root

    def _base_model(self) -> str:
        with single_process_view():
            return super()._base_model()

    def _resolve_input(self, i: int, stage: Any) -> tuple[str, str]:
        if is_main():
            with single_process_view():
                got = super()._resolve_input(i, stage)
            barrier()
            return got
        barrier()
        return super()._resolve_input(i, stage)

    def _execute(self, index, stage, spec, input_model, config_hash, inputs_hash, final) -> dict:
        trainable = _trainable(spec)
        if is_main():
            if trainable:
                done = super()._execute(index, stage, _after_barrier(spec), input_model, config_hash,
                                        inputs_hash, final)
            else:
                with single_process_view():
                    done = super()._execute(index, stage, spec, input_model, config_hash, inputs_hash, final)
            barrier()
            return done
        if trainable:
            work = self.rd.work_dir(index, stage.name)
            ctx = FollowerContext(run_dir=self.rd.root, work_dir=work, index=index, seed=self.cfg.seed,
                                  input_model=input_model, resolve=lambda r: resolve_model(r, self.log),
                                  log=self.log, report_to=self._trackers(stage),  # TRL's args as on rank 0
                                  run_name=f"{self.cfg.name}/{stage.name}")
            barrier()  # the main process has cleaned and created the work folder
            spec.run(stage, ctx)
        barrier()  # the main process has written DONE
        return json.loads((final / "DONE").read_text())

    def _evaluate(self, stage: Any, folder: str, model_dir: str) -> None:
        if is_main():
            with single_process_view():
                super()._evaluate(stage, folder, model_dir)


def _after_barrier(spec: Any) -> Any:
    """The stage spec whose run first waits for every rank (they start training together)."""
    import dataclasses

    def run(cfg: Any, ctx: StageContext) -> Any:
        barrier()
        return spec.run(cfg, ctx)

    return dataclasses.replace(spec, run=run)


# ---- the launcher -------------------------------------------------------------------------------------------


def default_accelerate_config() -> Path:
    import torch

    return REPO_ACCELERATE / ("ddp.yaml" if torch.cuda.is_available() else "ddp_cpu.yaml")


def launch_command(child_argv: list[str], num_processes: int | None, config: str | None) -> list[str]:
    """`accelerate launch ... -m posttrain <child_argv>`, with --multi_gpu for DDP configs (CPU included:
    accelerate forks processes through torchrun only on that path; see configs/accelerate/ddp_cpu.yaml)."""
    path = Path(config) if config else default_accelerate_config()
    if not path.is_file():
        raise FileNotFoundError(f"--accelerate-config {path}: no such file")
    dist = read_yaml(path).get("distributed_type", "")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    if dist in ("MULTI_GPU", "MULTI_CPU"):
        cmd.append("--multi_gpu")
    return [*cmd, "-m", "posttrain", *child_argv]


def relaunch(child_argv: list[str], num_processes: int | None, config: str | None) -> int:
    """Run the command under accelerate launch and return its exit status (every rank's, as torchrun reports)."""
    try:
        return subprocess.call(launch_command(child_argv, num_processes, config))
    except KeyboardInterrupt:  # the launched processes got the same Ctrl-C; torchrun stops them
        print("interrupted; resume with the command above (it names the run dir)", file=sys.stderr)
        return 130
