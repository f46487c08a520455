"""Run a pipeline's stages in order: resolve inputs, skip what is done, run, mark done, evaluate, report.

A stage is skipped when its DONE marker matches the stage's config hash and inputs hash and every model file
still has the hash DONE recorded. The inputs hash chains the previous stage's DONE key, so a changed stage
reruns itself and every stage after it, never those before it. It also holds the file hashes of an input
model from outside the run and of every other model the stage reads (`other_inputs()`: a merge's models, a
transfer's sources), so a model retrained in place reruns the stages that read it; an input the stage never
loads (`reads_input()` false: a merge with `base:`) is left out.

Evals (when `eval.enabled`): the base, then every stage, each into its stage folder's eval.json. A stage may
also name input models that are not stages of this run (`reference_models()` on its config: a merge's
`models:`, a transfer's `source_finetuned`); each is evaluated once, with the same eval block and the same
reuse of a matching eval.json, into::

    <run-dir>/inputs/<ref with / as _>/eval.json

and the report shows it as a reference row `input:<ref>` just before the first stage that reads it. Reference
rows carry `"reference": true`; the forgetting metrics leave them out (see evals.forgetting).

Lineage: every stage's record (and its eval.json) carries `parents`, the rows it is built from: the stage its
`model` input names (the previous stage by default; a merge's `base:` when set), or `base` when that input is
the base model, then every other stage its config names (`${stages.<name>.model}` in a merge's `models:`, a
transfer's source). A stage whose input is a model outside the run has none. The forgetting metrics compare a
stage only with its ancestors, so two branches from one base are never measured against each other;
`posttrain report` rebuilds the rows from the eval.json files alone.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from evals import run_report, runner
from evals.report import terminal_summary
from evals.run_report import EvalGateMitigate, EvalGateStop, base_ref, keep_in_eval, reference_record
from posttrain.config import PipelineConfig
from posttrain.config_refs import STAGE_REF
from posttrain.data import check_source
from posttrain.identity import data_identity, file_identity, input_identity
from posttrain.model_check import check_model, existing_model
from posttrain.models import is_sequence_classifier, resolve_model
from posttrain.progress import PipelineProgress
from posttrain.push import hub_problem, push_after_run
from posttrain.registry import STAGES, did_you_mean
from posttrain.rundir import (ANY_STAGE_REF, RunDir, atomic_write_text, input_folder, is_stage_ref, mark_run_dir,
                              sha256_json)
from posttrain.rundir_check import check_run_dir
from posttrain.schema import ConfigError
from posttrain.stages.base import StageContext
from posttrain import mitigate, tracking
from posttrain.world import NotBuilt, only_built


def stage_config_hash(stage: Any) -> str:
    """The hash DONE records of a stage's config; `report_to` is left out: where metrics go changes no weight."""
    return sha256_json(stage.model_dump(exclude={"report_to"}))


class PipelineError(RuntimeError):
    """A stage failed or a gate stopped the run; one line for the user."""


class Pipeline:
    def __init__(self, cfg: PipelineConfig, run_dir: Path, log: Callable[[str], None] = print, *,
                 overwrite: bool = False, inputs_checked: bool = False):
        """`overwrite`: replace the run of another pipeline in `run_dir` (rundir.check_run_dir); `inputs_checked`:
        the caller ran `check_inputs` already (the CLI does, before it creates the run dir)."""
        self.cfg = cfg
        self.rd = RunDir(run_dir)
        self.log = log
        self.overwrite, self.inputs_checked = overwrite, inputs_checked
        self.outputs: dict[str, Path] = {}  # stage name -> finished model folder
        self.done_keys: dict[str, str] = {}  # "stage:<name>" -> DONE key
        self.records: list[dict] = []  # one per evaluated model, base first (for the report)
        self.shown: set[str] = set()  # model folders (or hub names) that already have a row in the report
        self.parents: dict[str, list[str]] = {}  # stage name -> rows it is built from (see "Lineage" above)
        self.inputs_of: dict[str, str] = {}  # stage name -> its input model folder ("" when it reads none)
        self.report: dict | None = None  # the last forgetting.json written, for the summary at the end
        # What evals.run_report reads of a run (its EvaluatedRun): records and parents above, and these.
        self.root = self.rd.root
        self.settings = cfg.eval
        self.stage_names = [s.name for s in cfg.stages if s.generates()]  # the stages the report waits for
        self.base_ref = base_ref(cfg.stages[0])
        self.progress = PipelineProgress(len(cfg.stages))  # a line as each stage starts and ends, with the time left

    def _resolve_input(self, i: int, stage: Any) -> tuple[str, str]:
        """(identity key for hashing, loadable ref) of the stage's input model ("" when the stage never loads
        it, as a merge with `base:`: not resolved, so such a first stage does not build the world model)."""
        if not stage.reads_input():
            return "unused", ""
        ref = stage.model
        if ref is None:
            if i == 0:
                ref = "world"
            else:
                prev = self.cfg.stages[i - 1].name
                return f"stage:{prev}", str(self.outputs[prev] / "model")
        m = STAGE_REF.match(ref)
        if m:
            name = m.group(1)
            if name not in self.outputs:
                earlier = list(self.outputs)
                raise PipelineError(
                    f"stages.{stage.name}.model: {ref} names no earlier stage{did_you_mean(name, earlier)}"
                )
            return f"stage:{name}", str(self.outputs[name] / "model")
        return ref, resolve_model(ref, self.log)

    def _parents(self, i: int, stage: Any, input_model: str) -> list[str]:
        """The report rows `stage` is built from: the stage its input names (`lineage_input()`: `model`, or a
        merge's `base:`), or "base" when that input is the base model (nothing for a model outside the run),
        then every other stage its config names, in order."""
        ref = stage.lineage_input()
        m = STAGE_REF.match(ref or "")
        if m:
            first = [m.group(1)]
        elif ref is None and i > 0:
            first = [self.cfg.stages[i - 1].name]
        else:
            model = input_model if ref == stage.model and input_model else resolve_model(ref, self.log)
            first = ["base"] if model == self._base_model() else []
        # A reward stage named as a reward's scorer (`reward_model`) is an input, not an ancestor: it has no row.
        scorers = {s.name for s in self.cfg.stages if not s.generates()}
        named = [n for n in ANY_STAGE_REF.findall(json.dumps(stage.model_dump())) if n not in scorers]
        return list(dict.fromkeys(first + named))

    def _referenced_keys(self, stage: Any) -> list[str]:
        """DONE keys of every earlier stage the config names anywhere (e.g. a merge's `models:`)."""
        names = sorted(set(ANY_STAGE_REF.findall(yaml.safe_dump(stage.model_dump()))))
        return [self.done_keys.get(f"stage:{n}", f"missing:{n}") for n in names]

    def _model_identity(self, ref: str) -> str:
        """What a model the config names (not a stage of the run) holds: its files' hashes, or its hub name."""
        return input_identity(ref, resolve_model(ref, self.log), {})

    def run(self) -> Path:
        if not self.inputs_checked:
            check_inputs(self.cfg, self.log, self.rd.root)
        replace = check_run_dir(self.rd.root, self.cfg.name, [(s.name, s.kind) for s in self.cfg.stages],
                                self.overwrite)
        self.rd.lock()
        try:
            if replace:
                gone = self.rd.clear()
                self.log(f"run dir: --overwrite: deleted the other pipeline's {', '.join(gone)} in {self.rd.root}")
            mark_run_dir(self.rd.root, self.cfg.name)
            tracking.reset(self.rd.root)  # what this run logs replaces what an earlier one did
            atomic_write_text(self.rd.root / "pipeline.yaml", yaml.safe_dump(self._dump(), sort_keys=False))
            if self.cfg.eval.enabled:
                base = self._base_model()
                # lm-eval loads the base before the first stage would check it: check it here (files, NaN
                # scan, and that stage's opt-ins), so pickle weights or a model's own code never load unasked.
                first = self.cfg.stages[0]
                if base:
                    check_model(base, allow_pickle=first.allow_pickle, trust_remote_code=first.trust_remote_code,
                                log=self.log)
                self._evaluate(None, "00_base", base)
                self.shown.add(base)
            for i, stage in enumerate(self.cfg.stages):
                self._run_stage(i, stage)
            if self.report is not None:  # the report is final: its matrix and BWT go to the trackers
                tracking.log_report(self.cfg.report_to, self.rd.root, self.report, f"{self.cfg.name}/report")
            self._print_summary()
            if self.cfg.push is not None:  # the `push:` block, once every stage is done (PushFailed: one line)
                push_after_run(self.cfg.push, self.rd.root, self.stage_names, self.log)
        finally:
            self.rd.unlock()
        return self.rd.root

    def _print_summary(self) -> None:
        """Per stage, the gain on its trained tasks, its forgetting and its drops (read from the report, so they
        are forgetting.json's figures), then the report's path, once (evals on)."""
        if self.report is not None:
            for line in terminal_summary(self.report, str(self.rd.root / "report" / "forgetting.md")):
                self.log(line)

    def _base_model(self) -> str:
        """The report's base row: the folder of `base_ref` ("" when there is none)."""
        ref = self.base_ref
        return resolve_model(ref, self.log) if ref else ""

    def _dump(self) -> dict:
        return {**self.cfg.model_dump(exclude={"stages"}), "stages": [s.model_dump() for s in self.cfg.stages]}

    def _run_stage(self, i: int, stage: Any) -> None:
        index = i + 1
        self.log(self.progress.start(index, stage.name))
        spec = STAGES.get(stage.kind)
        identity_ref, input_model = self._resolve_input(i, stage)
        self.parents[stage.name] = self._parents(i, stage, input_model)
        config_hash = stage_config_hash(stage)
        inputs = [
            input_identity(identity_ref, input_model, self.done_keys) if stage.reads_input() else None,
            data_identity(stage), self._referenced_keys(stage), self.cfg.seed,
        ]
        others = [self._model_identity(r) for r in stage.other_inputs() if not is_stage_ref(r)]
        others += [file_identity(f) for f in stage.input_files()]
        inputs_hash = sha256_json(inputs + [others] if others else inputs)  # no others: the hash it always had
        final = self.rd.stage_dir(index, stage.name)
        self.inputs_of[stage.name] = input_model
        if self.cfg.eval.enabled:  # a mitigation made under other settings is undone before DONE is read
            mitigate.reconcile(final, self.cfg.eval, self.log)
        done, why = RunDir.check_done(final, config_hash, inputs_hash)
        skipped = bool(done)
        if done:
            self.log(f"[{index:02d} {stage.name}] done already; skipping")
        else:
            if final.exists():
                self.log(f"[{index:02d} {stage.name}] rerunning: {why}")
            self._check_models(stage, input_model)
            done = self._execute(index, stage, spec, input_model, config_hash, inputs_hash, final)
        self.outputs[stage.name] = final
        self.done_keys[f"stage:{stage.name}"] = done["key"]
        self._evaluate_inputs(stage)
        if stage.generates():
            if self.cfg.eval.enabled and (final / "unmitigated" / "model").is_dir():
                self.records.append(mitigate.unmitigated_row(self, final, stage.name))
            self._evaluate(stage, f"{index:02d}_{stage.name}", str(final / "model"))
        elif self.cfg.eval.enabled:
            self.log(f"[{index:02d} {stage.name}] eval: its model scores text and generates none; no eval row "
                     "(its training log has the pair accuracy)")
        self.shown.add(str(final / "model"))
        self.log(self.progress.end(index, stage.name, skipped=skipped))

    def _check_models(self, stage: Any, input_model: str) -> None:
        """Check the model folders the stage reads now that they exist (a world model built on first use, an
        earlier stage's output); those checked before the run are not read again (model_check)."""
        folders = [input_model] if input_model else []
        for ref in stage.other_inputs():
            m = STAGE_REF.match(ref)
            if m and m.group(1) in self.outputs:
                folders.append(str(self.outputs[m.group(1)] / "model"))
            elif not is_stage_ref(ref):
                folders.append(resolve_model(ref, self.log))
        for folder in dict.fromkeys(folders):
            check_model(folder, allow_pickle=stage.allow_pickle, trust_remote_code=stage.trust_remote_code,
                        log=self.log)

    def _execute(self, index, stage, spec, input_model, config_hash, inputs_hash, final) -> dict:
        work = self.rd.work_dir(index, stage.name)
        self.rd.prepare_work_dir(work, config_hash, inputs_hash, self.log)
        atomic_write_text(work / "config.yaml", yaml.safe_dump(stage.model_dump(), sort_keys=False))
        ctx = StageContext(
            run_dir=self.rd.root, work_dir=work, index=index, seed=self.cfg.seed,
            input_model=input_model, resolve=lambda r: resolve_model(r, self.log), log=self.log,
            report_to=self._trackers(stage), run_name=f"{self.cfg.name}/{stage.name}",
        )
        self.log(f"[{index:02d} {stage.name}] {stage.kind} from {input_model or stage.lineage_input()}")
        start = time.time()
        result = spec.run(stage, ctx)
        if Path(result.model_dir) != work / "model":
            raise PipelineError(f"stage {stage.name} wrote its model outside {work / 'model'}")
        (work / "ATTEMPT.json").unlink(missing_ok=True)
        self.rd.finalize(work, final)
        seconds = round(time.time() - start, 1)
        done = RunDir.write_done(final, config_hash, inputs_hash, {"seconds": seconds, "metrics": result.metrics})
        self.log(f"[{index:02d} {stage.name}] done in {seconds}s -> {final / 'model'}")
        return done

    def _trackers(self, stage: Any) -> list[str]:
        """The trackers a stage reports to: its own `report_to`, else the pipeline's."""
        own = getattr(stage, "report_to", None)
        return list(self.cfg.report_to if own is None else own)

    def _evaluate(self, stage: Any, folder: str, model_dir: str) -> None:
        """Evaluate a model with the pipeline's eval block and rewrite the report (no-op when disabled)."""
        if not self.cfg.eval.enabled or not model_dir:
            return
        try:  # through the module: tests replace evaluate_into_run
            self.report = run_report.evaluate_into_run(self, stage, folder, model_dir)
        except EvalGateStop as e:
            raise PipelineError(str(e)) from None
        except EvalGateMitigate as e:  # the stage row stays the trained model's until a mitigation is kept
            self._mitigate(stage, folder, e.messages)
        finally:
            if self.records and self.records[-1]["folder"] == folder:
                trackers = self.cfg.report_to if stage is None else self._trackers(stage)
                tracking.log_eval(trackers, self.rd.root, int(folder[:2]), self.records[-1]["scores"],
                                  f"{self.cfg.name}/{self.records[-1]['name']}")

    def _mitigate(self, stage: Any, folder: str, messages: list[str]) -> None:
        """`on_drop: mitigate` (posttrain.mitigate): keep θ(α) as the stage's model, its trained model becoming
        the `<stage>:unmitigated` reference row, and evaluate the kept model as the stage's row."""
        final = self.rd.root / "stages" / folder
        try:
            done = mitigate.mitigate(self, final, self.inputs_of.get(stage.name), self.records[-1]["trains_on"],
                                     messages)
        except mitigate.MitigationFailed as e:
            raise PipelineError(str(e)) from None
        self.done_keys[f"stage:{stage.name}"] = done["key"]
        self.records[-1] = mitigate.unmitigated_row(self, final, stage.name)
        self._evaluate(stage, folder, str(final / "model"))

    def _evaluate_inputs(self, stage: Any) -> None:
        """Evaluate the input models `stage` names that have no row yet and are not stages of this run; each
        becomes a reference row before the stage's own row (the report is rewritten with the stage's eval)."""
        refs = stage.reference_models()
        if not self.cfg.eval.enabled or not refs:
            return
        for ref in refs:
            if is_stage_ref(ref):
                continue  # an earlier stage: it has its own row
            if (Path(ref).expanduser() / "adapter_config.json").is_file():
                self.log(f"eval: {ref} is a LoRA adapter; no reference row (its merged weights are not kept)")
                continue
            model_dir = resolve_model(ref, self.log)
            if model_dir in self.shown:
                continue
            self.shown.add(model_dir)
            folder = input_folder(ref)
            result = runner.evaluate_model(model_dir, out=self.rd.root / folder / "eval.json", settings=self.cfg.eval,
                                    log=self.log)
            result = keep_in_eval(self.rd.root / folder / "eval.json", result, model=model_dir)
            self.records.append(reference_record(ref, folder, model_dir, result, stage.name))


def check_inputs(cfg: PipelineConfig, log: Callable[[str], None] = print, run_dir: Path | None = None) -> None:
    """Read and check every data source of every stage, then every input model folder that exists now (files,
    headers, sizes, a NaN/Inf scan: model_check), before a run dir is made or any model loads: bad input fails
    here (exit 2, naming the file and the row) in seconds, not after the base eval. A world task or world model
    not built yet, an earlier stage's output and a hub model not downloaded are checked once they exist: the
    world builds its own data, and a stage checks its input models when it starts.

    The first stages of `run_dir` whose DONE records their config as it is now are left out: a rerun of a
    finished pipeline skips them and reads none of their inputs, so reading them here would only cost time
    (should one of their inputs have changed, the stage reruns and its loader and input check run then)."""
    check_services(cfg)
    done = _done_by_config(cfg, run_dir)
    if done:
        log(f"inputs: not read for {', '.join(done)}, finished with this config (read if it reruns)")
    stages = cfg.stages[len(done):]
    for stage in stages:
        max_length = getattr(getattr(stage, "trainer", None), "max_length", None)
        for src, shape in stage.data_sources():
            with only_built():
                try:  # max_length cuts sft and preference rows (grpo's prompts have limits of their own)
                    check_source(src, shape, log, max_length if shape in ("sft", "preference") else None)
                except NotBuilt:
                    pass
    for i, stage in enumerate(stages, start=len(done)):
        refs = [stage.model or ("world" if i == 0 else "")] if stage.reads_input() else []
        scoring = set(stage.scorers())
        for ref in dict.fromkeys(refs + list(stage.other_inputs())):
            folder = existing_model(ref) if ref and not is_stage_ref(ref) else None
            if folder and stage.generates() and ref not in scoring and is_sequence_classifier(folder):
                raise ConfigError(f"stages[{i}] ({stage.name}): {ref} is a reward model (a sequence classifier: it "
                                  f"scores text and generates none); a {stage.kind} stage needs a language model")
            if folder:
                check_model(folder, allow_pickle=stage.allow_pickle, trust_remote_code=stage.trust_remote_code,
                            log=log)


def check_services(cfg: PipelineConfig) -> None:
    """The outside services the run will call, asked before it starts: wandb (in any stage's `report_to`) needs
    credentials or offline mode, a `push:` block needs the hub online and a token. Without this they fail after
    the base eval (wandb at the first stage) or after the whole run (the upload)."""
    trackers = set(cfg.report_to).union(*(getattr(s, "report_to", None) or [] for s in cfg.stages))
    problem = tracking.wandb_problem() if "wandb" in trackers else None
    if problem:
        raise ConfigError(problem)
    problem = hub_problem() if cfg.push is not None else None
    if problem:
        raise ConfigError(f"push.repo {cfg.push.repo}: {problem}, or remove the `push:` block")


def _done_by_config(cfg: PipelineConfig, run_dir: Path | None) -> list[str]:
    """Names of the first stages whose DONE in `run_dir` records their config as it is now, in order."""
    out: list[str] = []
    for index, stage in enumerate(cfg.stages, start=1):
        final = RunDir(run_dir).stage_dir(index, stage.name) if run_dir is not None else None
        try:
            done = json.loads((final / "DONE").read_text()) if final is not None else {}
        except (OSError, ValueError):
            done = {}
        if not isinstance(done, dict) or done.get("config_sha256") != stage_config_hash(stage):
            break
        out.append(stage.name)
    return out


def run_pipeline(cfg: PipelineConfig, run_dir: Path, log: Callable[[str], None] = print, **kw: Any) -> Path:
    """Run `cfg` into `run_dir` (keywords: Pipeline's)."""
    return Pipeline(cfg, run_dir, log, **kw).run()
