"""Strict configs: unknown keys and bad values fail with the file, the dotted path and a did-you-mean (the CLI's
exit 2, one line, before any model loads: tests/reliability/test_config_errors.py)."""
from pathlib import Path

import pytest

import posttrain.stages  # noqa: F401
from posttrain.config import ConfigError, PipelineConfig, load_pipeline, read_yaml, stage_pipeline

REPO = Path(__file__).resolve().parent.parent


def test_misspelled_trainer_key_names_path_and_suggestion():
    with pytest.raises(ConfigError) as e:
        stage_pipeline("sft", None, ["trainer.learning_rat=1e-5"])
    msg = str(e.value)
    assert "trainer.learning_rat" in msg and "learning_rate" in msg and "\n" not in msg


def test_unknown_key_in_yaml_names_file_and_stage_path(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("stages:\n  - kind: sft\n    trainer: {max_step: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_pipeline(f)
    msg = str(e.value)
    assert str(f) in msg and "stages[0].trainer.max_step" in msg and "max_steps" in msg


def test_unknown_stage_kind_suggests():
    with pytest.raises(ConfigError, match="did you mean 'sft'"):
        load_pipeline(None, data={"stages": [{"kind": "sfft"}]})


def test_set_values_are_typed_by_schema():
    cfg = stage_pipeline("sft", None, ["trainer.learning_rate=1e-5", "trainer.max_steps=7", "name=123"])
    st = cfg.stages[0]
    assert st.trainer.learning_rate == 1e-5 and isinstance(st.trainer.learning_rate, float)
    assert st.trainer.max_steps == 7
    assert st.name == "123"  # a string field keeps the raw text, not YAML's int


def test_set_list_of_strings_and_str_or_list_fields():
    cfg = stage_pipeline("sft", None, ['trainable.mode=patterns', 'trainable.train=["lm_head", "norm"]',
                                       "lora.target_modules=[q_proj, v_proj]"])
    st = cfg.stages[0]
    assert st.trainable.train == ["lm_head", "norm"] and st.lora.target_modules == ["q_proj", "v_proj"]
    one = stage_pipeline("sft", None, ["lora.target_modules=all-linear"]).stages[0]
    assert one.lora.target_modules == "all-linear"


def test_wrong_type_names_field():
    with pytest.raises(ConfigError, match=r"trainer\.max_steps"):
        stage_pipeline("sft", None, ["trainer.max_steps=many"])


def test_pipeline_set_addresses_stage_by_name():
    data = {"stages": [{"kind": "sft", "name": "a"}, {"kind": "sft", "name": "b"}]}
    cfg = load_pipeline(None, ["stages.b.trainer.max_steps=3"], data=data)
    assert cfg.stages[1].trainer.max_steps == 3 and cfg.stages[0].trainer.max_steps != 3


def test_duplicate_stage_names_refused():
    with pytest.raises(ConfigError, match="unique"):
        load_pipeline(None, data={"stages": [{"kind": "sft", "name": "a"}, {"kind": "sft", "name": "a"}]})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_pipeline(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_pipeline(bad)


def _all_yaml():
    return sorted(p for p in (REPO / "configs").rglob("*.y*ml") if p.suffix in (".yaml", ".yml"))


@pytest.mark.parametrize("path", _all_yaml(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_under_configs_validates(path):
    """Every YAML under configs/, recursively: pipelines, stage defaults, recipes, accelerate configs."""
    data = read_yaml(path)
    rel = path.relative_to(REPO / "configs").parts
    if rel[0] == "stages":
        stage_pipeline(data["kind"], path, None)
    elif rel[0] == "accelerate":
        assert data.get("distributed_type") in {"MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED", "NO"}, path
    elif "stages" in data:
        assert isinstance(load_pipeline(path), PipelineConfig)
    else:
        PipelineConfig.model_validate({**data, "stages": [{"kind": "sft"}]})


def test_every_stage_config_round_trips():
    """The resolved config written beside each stage (config.yaml, pipeline.yaml) validates when read back."""
    from posttrain.registry import STAGES

    for kind in STAGES.names():
        cls = STAGES.get(kind).config
        dumped = cls().model_dump()
        assert cls.model_validate(dumped).model_dump() == dumped, kind


def test_load_pipeline_registers_the_stage_kinds_itself():
    """A library caller that imports only posttrain.config still gets every stage kind (a fresh interpreter, so
    no other test has imported posttrain.stages for it)."""
    import subprocess
    import sys

    code = ("from posttrain.config import load_pipeline\n"
            "cfg = load_pipeline(None, data={'stages': [{'kind': 'sft'}, {'kind': 'merge', 'method': 'linear'}]})\n"
            "print([s.kind for s in cfg.stages])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['sft', 'merge']"


def test_unnamed_stages_get_kind_names_and_a_clash_with_one_is_refused():
    cfg = load_pipeline(None, data={"stages": [{"kind": "sft"}, {"kind": "merge", "method": "linear"},
                                               {"kind": "sft"}]})
    assert [s.name for s in cfg.stages] == ["sft", "merge1", "sft2"]
    with pytest.raises(ConfigError) as e:  # an explicit name equal to another stage's default name
        load_pipeline(None, data={"stages": [{"kind": "sft"}, {"kind": "sft", "name": "sft"}]})
    assert "stage names must be unique; repeated: sft" in str(e.value) and "\n" not in str(e.value)
