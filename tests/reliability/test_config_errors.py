"""Item 6: config errors fail before any model loads, with exit code 2 and one line. How fast is measured by
`make bench` (the config-error figure), never here: a timed test fails on a loaded machine, not on slow code.

Each case runs the real CLI in a subprocess (`python -m posttrain ...`). "Before any model loads" is checked
by what the run dir holds afterwards: the base model's eval and every stage write under `stages/` before
they load a model, so a refusal that came in time leaves no `stages/` folder (usually no run dir at all).
"""
import pytest

PIPELINE_UNKNOWN_KEY = "stages:\n  - kind: sft\n    trainer: {max_step: 3}\n"
PIPELINE_UNKNOWN_KIND = "stages:\n  - kind: sfft\n"

CASES = {
    "unknown-key-set": (["stage", "sft", "--set", "trainer.learning_rat=1e-5"],
                        ["trainer.learning_rat", "did you mean 'learning_rate'"]),
    "unknown-key-yaml": (["run", "{tmp}/unknown_key.yaml"],
                         ["unknown_key.yaml", "stages[0].trainer.max_step", "did you mean 'max_steps'"]),
    "wrong-type": (["stage", "sft", "--set", "trainer.max_steps=many"], ["trainer.max_steps", "'many'"]),
    "missing-pipeline-file": (["run", "{tmp}/nope.yaml"], ["nope.yaml", "not found"]),
    "missing-data-file": (["stage", "sft", "--set", "data=[{{source: {tmp}/nope.jsonl}}]"],
                          ["data[0].source", "nope.jsonl", "not found"]),
    "missing-reward-file": (["stage", "grpo", "--set", "rewards=[{{name: '{tmp}/nope.py:score'}}]"],
                            ["nope.py", "not found"]),
    "missing-model-folder": (["stage", "sft", "--set", "model={tmp}/no_model"], ["no_model", "is not a folder"]),
    "unknown-stage-kind": (["run", "{tmp}/unknown_kind.yaml"], ["unknown_kind.yaml", "sfft", "did you mean 'sft'"]),
    "unknown-reward": (["stage", "grpo", "--set", "rewards=[{{name: numeric_mach}}]"],
                       ["rewards[0].name", "did you mean 'numeric_match'"]),
    "unknown-merge-method": (["stage", "merge", "--set", "method=tie"], ["method", "did you mean 'ties'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_error_exits_2_with_one_line_before_any_model_loads(case, tmp_path, cli):
    (tmp_path / "unknown_key.yaml").write_text(PIPELINE_UNKNOWN_KEY)
    (tmp_path / "unknown_kind.yaml").write_text(PIPELINE_UNKNOWN_KIND)
    args, expected = CASES[case]
    run_dir = tmp_path / "run"
    r = cli(*[a.format(tmp=tmp_path) for a in args], "--run-dir", str(run_dir))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    for part in expected:
        assert part in lines[0], lines[0]
    assert not (run_dir / "stages").exists()  # no eval, no stage: no model was loaded


def test_set_errors_name_the_set_and_hint_nested_keys(tmp_path):
    """A bad value given with --set names the --set, not the YAML file it overrode; a TRL-style flat key gets
    the same did-you-mean at the command line as in a file."""
    from posttrain.config import ConfigError, load_pipeline, stage_pipeline
    from tests.conftest import REPO

    stage_yaml = REPO / "configs" / "stages" / "sft.yaml"
    with pytest.raises(ConfigError) as e:
        stage_pipeline("sft", stage_yaml, ["trainer.max_steps=many"])
    assert str(e.value).startswith("--set trainer.max_steps=many: trainer.max_steps:") and "sft.yaml" not in str(e.value)
    with pytest.raises(ConfigError, match=r"--set lerning_rate: unknown key 'lerning_rate' \(did you mean "
                                          r"'trainer.learning_rate'\?\)"):
        stage_pipeline("sft", stage_yaml, ["lerning_rate=1e-4"])
    (tmp_path / "p.yaml").write_text("stages:\n  - {kind: sft}\n")
    with pytest.raises(ConfigError, match=r"^--set stages.sft.trainer.max_steps=many: stages\[0\].trainer.max_steps"):
        load_pipeline(tmp_path / "p.yaml", ["stages.sft.trainer.max_steps=many"])
    with pytest.raises(ConfigError, match=r"^.*p.yaml: stages\[0\].trainer.max_steps"):  # the file's own value
        (tmp_path / "p.yaml").write_text("stages:\n  - {kind: sft, trainer: {max_steps: many}}\n")
        load_pipeline(tmp_path / "p.yaml", ["seed=3"])
