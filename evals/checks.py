"""Checks of a pipeline's eval settings before anything runs: `eval.max_drop` and `trains_on:` must name what
the suite scores (posttrain's CLI runs them on every `run` and `stage`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import yaml

from evals.runner import SUITES_DIR, WORLD_TASKS_DIR, Suite, load_suite
from posttrain.registry import did_you_mean
from posttrain.schema import ConfigError


def check_eval_config(cfg: Any, warn: Callable[[str], None] = print) -> None:
    """Refuse a pipeline whose `eval.max_drop` or `trains_on:` names what its suite never scores.

    `cfg` is a loaded PipelineConfig. `eval.max_drop` keys are matched as `check_gate` matches them: a task
    name (all its metrics) or a full `task/metric` key; `trains_on` entries are task names, as
    `backward_transfer` matches a key's task. Cheap: the suite YAML lists its tasks and the world task YAMLs
    their metrics; no model loads and lm-eval's task index is not built, so the metric of an lm-eval task is
    left to the gate, and a task that is not in the suite passes when it reads as a subtask of one of the
    suite's lm-eval tasks (`mmlu_anatomy` under `mmlu`: lm-eval reports a group's subtasks too). Nothing is
    checked when evals are off: nothing reads the block then. Raises ConfigError naming the key path. A
    `trains_on` task that exists (a world task, or a task of a shipped suite) but is not in this suite is only
    warned about: backward transfer leaves that stage's term out, the run is otherwise fine (a shipped pipeline
    run with a custom suite).
    """
    if not cfg.eval.enabled:
        if cfg.eval.max_drop:
            warn(f"warning: eval.max_drop is set but evals are off (eval.enabled: false): no gate runs, "
                 f"on_drop: {cfg.eval.on_drop} never acts")
        return
    spec = load_suite(cfg.eval.suite)
    if cfg.eval.on_drop == "mitigate":
        _check_mitigate(cfg, spec)
        for stage in (s for s in cfg.stages if not s.reads_input()):  # a linear merge, a merge with `base:`
            warn(f"warning: stages.{stage.name} reads no input model: should it break eval.max_drop, on_drop: "
                 "mitigate has no parent to interpolate it with, and the run stops there")
    for name in cfg.eval.max_drop:
        problem = _unknown_gate_key(name, spec)
        if problem:
            raise ConfigError(f"eval.max_drop.{name}: {problem}")
    for stage in cfg.stages:
        for task in stage.trains_on:
            problem = _unknown_task(task, spec)
            if problem and "/" in task and not _unknown_task(task.split("/", 1)[0], spec):
                problem = f"trains_on names tasks, not task/metric keys (did you mean {task.split('/', 1)[0]!r}?)"
            if problem and _known_task(task):
                warn(f"warning: stages.{stage.name}.trains_on: {task!r} is not in suite {spec.name!r}; backward "
                     "transfer leaves this stage's term out")
            elif problem:
                raise ConfigError(f"stages.{stage.name}.trains_on: {problem}")


def _check_mitigate(cfg: Any, spec: Suite) -> None:
    """`on_drop: mitigate` chooses α on dev splits: it needs limits to meet and a dev split posttrain can score
    for every task (the world's tasks have one; an lm-eval task's dev split is not selectable yet)."""
    if not cfg.eval.max_drop:
        raise ConfigError("eval.on_drop: mitigate needs eval.max_drop: the limits an interpolation must meet")
    no_dev = [t for t in spec.tasks if not _world_task(t)]
    if no_dev:
        raise ConfigError(f"eval.on_drop: mitigate scores dev splits, and suite {spec.name!r} has tasks without one "
                          f"posttrain can select ({', '.join(no_dev[:3])}); use world tasks, or on_drop: stop")


def _known_task(task: str) -> bool:
    """A world task or a task of a shipped suite (a real task, though maybe not in the suite at hand)."""
    return _world_task(task) is not None or any(
        task in load_suite(path.stem).tasks for path in sorted(SUITES_DIR.glob("*.yaml")))


def _world_task(task: str) -> Path | None:
    path = WORLD_TASKS_DIR / f"{task}.yaml"
    return path if path.is_file() else None


def _unknown_task(task: str, spec: Suite) -> str | None:
    """Why `task` is scored by no eval of `spec`, or None when it is (see `check_eval_config`)."""
    if task in spec.tasks:
        return None
    groups = [t for t in spec.tasks if not _world_task(t)]
    if any(task.startswith(f"{g}_") for g in groups):
        return None

    return (f"no task {task!r} in suite {spec.name!r}{did_you_mean(task, spec.tasks)}; "
            f"its tasks: {', '.join(spec.tasks)}")


def _unknown_gate_key(name: str, spec: Suite) -> str | None:
    """Why the `eval.max_drop` entry `name` (a task, or a `task/metric` key) matches no key, or None."""
    task, _, metric = name.partition("/")
    problem = _unknown_task(task, spec)
    keys = _world_task_keys(task) if metric and not problem else None
    if problem or keys is None or name in keys:
        return problem

    return f"task {task!r} has no metric {metric!r}{did_you_mean(name, keys)}; its keys: {', '.join(keys)}"


def _world_task_keys(task: str) -> list[str] | None:
    """The score keys a world task reports (as `scores_from_results` names them); None when unknown here."""
    path = _world_task(task)
    if path is None:
        return None
    doc = yaml.safe_load(path.read_text()) or {}  # world task YAMLs use no !function tags
    metrics = [m["metric"] for m in doc.get("metric_list") or [] if isinstance(m, dict) and "metric" in m]
    filters = [f["name"] for f in doc.get("filter_list") or [] if isinstance(f, dict) and "name" in f] or ["none"]
    if not metrics:  # lm-eval's defaults for the output type: not known without lm-eval
        return None
    # One filter: the key is task/metric; several: task/metric@filter (see scores_from_results).
    return [f"{task}/{m}" if len(filters) == 1 else f"{task}/{m}@{f}" for m in metrics for f in filters]
