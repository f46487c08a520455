"""posttrain command line: run | stage | merge | eval | report | list | push.

Exit codes: 0 success, 2 bad input (config, data, model reference), 1 a failed run, 130 interrupted (Ctrl-C),
143 terminated (SIGTERM; unwinds as Ctrl-C does). Errors print one line;
the traceback of a failed run goes to <run-dir>/error.log. The last line `stage` and `run` print is the run
directory.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

import yaml

from evals import runner  # through the module: tests replace evaluate_model
from evals.report import terminal_summary
from evals.run_report import rerender_report
from evals.checks import check_eval_config
from posttrain import distributed as dist
from posttrain.cli_list import list_keys
from posttrain.config import load_pipeline, stage_pipeline
from posttrain.data import DataError
from posttrain.merging.mergekit import from_mergekit
from posttrain.model_files import check_folder_files
from posttrain.models import ModelError, is_sequence_classifier, resolve_model
from posttrain.pipeline import Pipeline, check_inputs
from posttrain.push import add_parser as add_push_parser, push_command
from posttrain.progress import VERBOSE_ENV
from posttrain.registry import RegistryError
from posttrain.rollout import RolloutServerError
from posttrain.rundir import RunDir, RunDirLocked, RunDirRefused, open_run_dir
from posttrain.rundir_check import check_run_dir
from posttrain.schema import ConfigError, read_yaml

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _bad_input_types() -> tuple[type, ...]:
    return (ConfigError, DataError, ModelError, RegistryError, RunDirRefused)


def _default_stage_file(kind: str) -> Path | None:
    path = REPO_CONFIGS / "stages" / f"{kind}.yaml"
    return path if path.is_file() else None


def _pipeline_defaults() -> dict:
    path = REPO_CONFIGS / "default.yaml"
    return read_yaml(path) if path.is_file() else {}


def _load(args: argparse.Namespace):
    if args.command == "merge":  # a mergekit YAML, translated into a merge stage and run as `posttrain stage merge`
        return stage_pipeline("merge", args.from_mergekit, args.set, base=_pipeline_defaults(),
                              doc=from_mergekit(args.from_mergekit))
    if args.command == "stage":
        path = args.config or _default_stage_file(args.kind)
        return stage_pipeline(args.kind, path, args.set, base=_pipeline_defaults())
    return load_pipeline(args.pipeline, args.set)


# Set for the processes `--launcher accelerate` starts: the parent checked the inputs already.
_INPUTS_CHECKED = "POSTTRAIN_INPUTS_CHECKED"


def _run(args: argparse.Namespace) -> int:
    with dist.planned_launch(args.launcher, args.num_processes, args.accelerate_config):
        cfg = _load(args)  # config errors surface here, before any model loads (or any process is launched)
    _preflight(cfg, args)
    _check_run(cfg, args, inputs=os.environ.pop(_INPUTS_CHECKED, None) != "1")  # before a run dir exists
    if args.launcher == "accelerate" and not dist.launched():
        os.environ[_INPUTS_CHECKED] = "1"
        return dist.relaunch(_strip_launcher_options(args.argv), args.num_processes, args.accelerate_config)
    log = _log if dist.is_main() else _quiet  # the other ranks of a launch repeat the main's lines: keep quiet
    run_dir, created = open_run_dir(args.run_dir, cfg.name) if dist.is_main() else (None, None)
    run_dir = Path(dist.agree(str(run_dir)))  # the main's on every rank (a default one is named by the time)
    runner = dist.DistributedPipeline if dist.launched() else Pipeline
    try:
        runner(cfg, run_dir, log, overwrite=args.overwrite, inputs_checked=True).run()
    except _bad_input_types() as e:
        _log(f"error: {e}")
        if created is not None:
            created.undo()  # nothing ran: leave no empty run dir behind, and `latest` where it was
        return 2
    except RunDirLocked as e:
        _log(f"error: {e}")
        return 1
    except KeyboardInterrupt as e:
        _log(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'}; resume with: "
             f"{_resume_command(args, run_dir)}")
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:  # noqa: BLE001 - a failed run: one line here, the traceback in error.log
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not dist.is_main():
            _log(f"error (rank {dist.rank()}): {first}")
            return 1
        (run_dir / "error.log").write_text(traceback.format_exc())
        _log(f"error: {first} (traceback in {run_dir / 'error.log'})")
        _log_server_tail(e)
        _log(f"rerun with: {_resume_command(args, run_dir)}")
        return 1
    if dist.is_main():
        (run_dir / "error.log").unlink(missing_ok=True)  # an earlier failure's traceback; this run succeeded
        print(run_dir)
    return 0


def _preflight(cfg, args: argparse.Namespace) -> None:
    """Checks that need no model, made before a run dir exists or a process is launched (exit 2)."""
    if args.run_dir and Path(args.run_dir).exists() and not Path(args.run_dir).is_dir():
        raise ConfigError(f"--run-dir {args.run_dir}: exists and is not a folder")
    if args.run_dir:
        _check_writable_parent(Path(args.run_dir), "--run-dir")
    if args.launcher == "accelerate" and args.num_processes is not None and args.num_processes < 2:
        raise ConfigError("--num-processes must be at least 2 with --launcher accelerate (one process needs no "
                          "launcher: drop --launcher)")

    check_eval_config(cfg, _log)  # the suite, max_drop keys and trains_on tasks (reads YAMLs only)


def _check_run(cfg, args: argparse.Namespace, inputs: bool) -> None:
    """Before the run dir is made or written: `--run-dir` free (else exit 1 at once) and one this pipeline may
    run into (rundir_check), then, with `inputs`, every data source and existing input model (pipeline.check_inputs:
    exit 2 on bad input). Under a launcher the main process alone checks, and every rank stops with it."""
    run_dir = Path(args.run_dir) if args.run_dir else None

    def check() -> None:
        if run_dir is not None:
            RunDir(run_dir).check_free()
            check_run_dir(run_dir, cfg.name, [(s.name, s.kind) for s in cfg.stages], args.overwrite)
        if inputs:
            check_inputs(cfg, _log, run_dir)

    dist.main_decides(check, (*_bad_input_types(), RunDirLocked))


def _resume_command(args: argparse.Namespace, run_dir: Path) -> str:
    """The command that continues this run: the same one, naming the run dir when it was a new default one."""
    import shlex

    argv = list(args.argv) if args.run_dir else [*args.argv, "--run-dir", str(run_dir)]
    return shlex.join([*_program(), *argv])


def _program() -> list[str]:
    """posttrain as the user can type it here: `posttrain` when that name on PATH is this program, else the path
    it was started by (`.venv/bin/posttrain` under `make`, where it is not on PATH), else `<python> -m posttrain`;
    a path under the working folder is written relative to it."""
    import shutil

    started = Path(sys.argv[0])
    if started.name == "posttrain":
        on_path = shutil.which("posttrain")
        if on_path and os.path.realpath(on_path) == os.path.realpath(started):
            return ["posttrain"]
        return [_typed_path(started)]
    return [_typed_path(Path(sys.executable)), "-m", "posttrain"]


def _typed_path(path: Path) -> str:
    """`path` relative to the working folder when under it (`./x` for a bare name), else absolute."""
    full = path.absolute()
    try:
        rel = full.relative_to(Path.cwd())
    except ValueError:
        return str(full)
    return str(rel) if len(rel.parts) > 1 else f"./{rel}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, Slurm, Kubernetes) raised as an interrupt, so that it unwinds as Ctrl-C does:
    the rollout server and sandboxes are stopped, the run dir unlocked, and the resume command printed."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _quiet(msg: str) -> None:
    return None


_LAUNCH_OPTIONS = ("--launcher", "--num-processes", "--accelerate-config")


def _strip_launcher_options(argv: list[str]) -> list[str]:
    """The command line minus the launcher's own options (`--opt value` and `--opt=value`), for the child."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in _LAUNCH_OPTIONS:
            skip = True
        elif not a.startswith(tuple(o + "=" for o in _LAUNCH_OPTIONS)):
            out.append(a)
    return out


def _log_server_tail(e: Exception) -> None:
    """A rollout server's failure carries its last log lines, which say why: show them below the error."""
    if isinstance(e, RolloutServerError):
        for line in str(e).strip().splitlines()[1:]:
            _log(f"  | {line}")


def _report(args: argparse.Namespace) -> int:
    import json

    out = rerender_report(Path(args.run_dir))
    for line in terminal_summary(json.loads((out.parent / "forgetting.json").read_text())):
        _log(line)
    print(out)
    return 0


def _quiet_libraries(verbose: bool) -> None:
    """Unless --verbose, keep the progress bars of transformers (model loading and saving), datasets and tqdm
    off the terminal through their own switches, read when they are imported (after this); a training stage
    takes the trainer's dicts and bar off itself (posttrain.progress)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    # TQDM_DISABLE: for bars a library opens without `disable=` (lm-eval's context building). tqdm reads it only
    # when first imported, which torch has done by now; posttrain.progress.terminal_only_bars reads it per bar.
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TQDM_DISABLE"):
        os.environ.setdefault(name, "1")


def _eval(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    if args.out:
        _check_writable_parent(Path(args.out), "--out")
    model = resolve_model(args.model, _log)  # world names and local folders as stages take them
    if is_sequence_classifier(model):  # lm-eval would score it with a random LM head, without a word
        raise ConfigError(f"{args.model}: a sequence classifier (a reward model) scores text and does not generate; "
                          "evaluate the language model it was trained from, or use it as a reward (reward_model)")
    check_folder_files(model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, log=_log)
    import jinja2

    try:
        result = runner.evaluate_model(model, suite=args.suite, limit=args.limit, out=args.out, log=_log,
                                trust_remote_code=args.trust_remote_code)
    except OSError as e:  # transformers could not load it (a hub name not cached here, a broken folder)
        raise ModelError(f"{args.model}: cannot load the model: {str(e).strip().splitlines()[0]}") from None
    except jinja2.TemplateError as e:  # a template error, or one its sandbox stopped (SecurityError)
        raise ModelError(f"{args.model}: its chat template failed: {type(e).__name__}: {e}") from None
    for key, score in sorted(result["scores"].items()):
        stderr = score.get("stderr")
        print(f"{key}: {score['value']:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else ""))
    return 0


def _merge(args: argparse.Namespace) -> int:
    """`posttrain merge --from-mergekit cfg.yml`: the mergekit YAML as a merge stage, printed or run."""
    if args.print:  # the stage `posttrain merge` would run: --set applied, validated (refused as a run is)
        stage = _load(args).stages[0]
        print(yaml.safe_dump(stage.model_dump(mode="json", exclude_unset=True), sort_keys=False), end="")
        return 0
    return _run(args)


def _check_writable_parent(path: Path, option: str) -> None:
    """Refuse a path under an existing file (mkdir would raise NotADirectoryError / FileExistsError)."""
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir() and parent != path:
                raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
            return


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a pipeline YAML")
    r.add_argument("pipeline")
    s = sub.add_parser("stage", help="run one stage on the embedded default (or --config)")
    s.add_argument("kind")
    s.add_argument("--config", help="stage config YAML (default: the checkout's configs/stages/<kind>.yaml, not ./configs)")
    m = sub.add_parser("merge", help="run a merge stage read from a mergekit YAML (--from-mergekit)")
    m.add_argument("--from-mergekit", required=True, metavar="CFG",
                   help="a mergekit-yaml config; its names are mapped to the merge stage's (README, merge methods)")
    m.add_argument("--print", action="store_true", help="print the merge stage config it becomes; run nothing")
    m.set_defaults(launcher="none", num_processes=None, accelerate_config=None)
    for q in (r, s, m):
        q.add_argument("--set", action="append", default=[], metavar="a.b=v", help="override a config value")
        q.add_argument("--run-dir", help="default: runs/<timestamp>-<name>; an existing one must be a run dir of "
                       "this pipeline (to rerun or resume it) or an empty folder")
        q.add_argument("--overwrite", action="store_true",
                       help="replace the run dir's run of another pipeline (its files are deleted first)")
        q.add_argument("--verbose", action="store_true",
                       help="print the trainers' log dicts and progress bars (default: a compact progress line; "
                            "every log record is in the stage's metrics.jsonl either way)")
    for q in (r, s):
        q.add_argument("--launcher", choices=["none", "accelerate"], default="none",
                       help="accelerate: re-run this command under `accelerate launch` (data-parallel training)")
        q.add_argument("--num-processes", type=int, default=None, metavar="N",
                       help="with --launcher accelerate: processes (GPUs) per machine; default: the config's")
        q.add_argument("--accelerate-config", default=None, metavar="F",
                       help="with --launcher accelerate: default configs/accelerate/ddp.yaml (ddp_cpu.yaml on CPU)")
    sub.add_parser("list", help="registered stage kinds with their config fields and defaults")
    rep = sub.add_parser("report", help="re-render the forgetting report of a run dir")
    rep.add_argument("run_dir")
    e = sub.add_parser("eval", help="evaluate one model folder with an eval suite")
    e.add_argument("model")
    e.add_argument("--suite", default="world")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--out", help="write eval.json here")
    e.add_argument("--allow-pickle", action="store_true", help="load pickle (.bin) weights (they can run code)")
    e.add_argument("--trust-remote-code", action="store_true", help="load a model whose config names its own code")
    add_push_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    handlers = {"run": _run, "stage": _run, "merge": _merge, "list": list_keys, "report": _report, "eval": _eval,
                "push": push_command}
    if args.command in ("run", "stage", "merge"):
        _quiet_libraries(args.verbose)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt as e:  # before a run dir exists (imports, config), or eval/report: nothing to resume
        _log("terminated" if isinstance(e, Terminated) else "interrupted")
        return 143 if isinstance(e, Terminated) else 130
    except _bad_input_types() as e:
        _log(f"error: {e}")
        return 2
    except RunDirLocked as e:  # found before the run started (_check_run)
        _log(f"error: {e}")
        return 1
    except (ValueError, FileNotFoundError) as e:
        _log(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
