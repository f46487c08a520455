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


def test_unnamed_stages_get_kind_names_that_skip_the_names_users_gave():
    cfg = load_pipeline(None, data={"stages": [{"kind": "sft"}, {"kind": "merge", "method": "linear"},
                                               {"kind": "sft"}]})
    assert [s.name for s in cfg.stages] == ["sft", "merge1", "sft2"]
    # A default name another stage was given by the user is skipped (it used to be refused as a repeat the
    # user never wrote); --set addresses the stage by the name it gets, as validation names it.
    clash = [{"kind": "sft", "name": "sft1"}, {"kind": "sft"}, {"kind": "sft", "name": "sft_1"}]
    cfg = load_pipeline(None, ["stages.sft_1_2.trainer.max_steps=4", "stages.sft1.trainer.max_steps=5"],
                        data={"stages": clash})
    assert [(s.name, s.trainer.max_steps) for s in cfg.stages][:2] == [("sft1", 5), ("sft_1_2", 4)]
    assert cfg.stages[2].name == "sft_1" and cfg.stages[2].trainer.max_steps not in (4, 5)
    cfg = load_pipeline(None, data={"stages": [{"kind": "sft"}, {"kind": "sft", "name": "sft"}]})
    assert [s.name for s in cfg.stages] == ["sft_0", "sft"]
    with pytest.raises(ConfigError) as e:  # a name the user wrote twice is still refused
        load_pipeline(None, data={"stages": [{"kind": "sft", "name": "a"}, {"kind": "dpo", "name": "a"}]})
    assert "stage names must be unique; repeated: a" in str(e.value) and "\n" not in str(e.value)


# ---- checked at load: stage references and local model paths (before any stage trains) --------------------------

def _load(stages, sets=None, **top):
    return load_pipeline(None, sets, data={"eval": {"enabled": False}, **top, "stages": stages})


@pytest.mark.parametrize("stages,expected", [
    ([{"name": "a", "kind": "sft"}, {"name": "b", "kind": "sft", "model": "${stages.aa.model}"}],
     "stages[1].model: ${stages.aa.model} names no earlier stage (did you mean 'a'?)"),
    ([{"name": "a", "kind": "sft", "model": "${stages.b.model}"}, {"name": "b", "kind": "sft"}],
     "stages[0].model: ${stages.b.model} names no earlier stage ('b' runs after this stage)"),
    ([{"name": "a", "kind": "sft", "model": "${stages.a.model}"}],
     "stages[0].model: ${stages.a.model} names no earlier stage ('a' is this stage)"),
    ([{"name": "a", "kind": "sft"}, {"name": "b", "kind": "sft", "model": "${stages.a.modle}"}],
     "stages[1].model: ${stages.a.modle} is not a model reference (did you mean '${stages.a.model}'?)"),
    ([{"name": "a", "kind": "sft"}, {"name": "m", "kind": "merge", "method": "linear",
                                     "models": [{"model": "${stages.a.model}"}, {"model": "${stages.bb.model}"}]}],
     "stages[1].models[1].model: ${stages.bb.model} names no earlier stage"),
    ([{"name": "a", "kind": "sft"}, {"name": "m", "kind": "merge", "base": "${stages.m.model}"}],
     "stages[1].base: ${stages.m.model} names no earlier stage ('m' is this stage)"),
    ([{"name": "a", "kind": "sft"}, {"name": "t", "kind": "transfer", "target_base": "${stages.x.model}"}],
     "stages[1].target_base: ${stages.x.model} names no earlier stage; earlier stages: a"),
    ([{"kind": "sft"}, {"kind": "sft", "trains_on": ["${stages.sft.data}"]}],  # any field, not only models
     "stages[1].trains_on[0]: ${stages.sft.data} is not a model reference"),
])
def test_stage_references_are_checked_when_the_config_loads(stages, expected):
    with pytest.raises(ConfigError) as e:
        _load(stages)
    assert str(e.value).startswith(f"<config>: {expected}") and "\n" not in str(e.value)


def test_valid_references_and_the_stage_command(tmp_path):
    cfg = _load([{"kind": "sft"}, {"kind": "sft", "model": "${stages.sft.model}"},
                 {"kind": "merge", "method": "linear", "models": [{"model": "${stages.sft1.model}"}]}])
    assert cfg.stages[2].models[0].model == "${stages.sft1.model}"
    with pytest.raises(ConfigError, match=r"^<sft defaults>: model: \$\{stages\.a\.model\} names no earlier stage"):
        stage_pipeline("sft", None, ["model=${stages.a.model}"])


def test_missing_local_model_paths_are_refused_with_their_key_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nodir").mkdir()
    with pytest.raises(ConfigError, match=r"^<config>: stages\[1\]\.model: model './no_such_dir' is not a folder"):
        _load([{"name": "a", "kind": "sft"}, {"name": "b", "kind": "sft", "model": "./no_such_dir"}])
    gone = str(tmp_path / "gone")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.models\[1\]\.model: model '.*gone' is not a folder"):
        _load([{"kind": "merge", "method": "linear", "models": [{"model": "world"}, {"model": gone}]}])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.target_base: model 'world-nope' is not a folder, a world "
                                          r"model \(did you mean 'world-v2'"):
        _load([{"kind": "transfer", "target_base": "world-nope"}])
    with pytest.raises(ConfigError, match=r"^<sft defaults>: model: model '~/no/such/model' is not a folder"):
        stage_pipeline("sft", None, ["model=~/no/such/model"])
    # What exists, world models and hub-shaped names (never looked up here) load.
    cfg = _load([{"kind": "sft", "model": "./nodir"}, {"kind": "sft", "model": "nodir"},
                 {"kind": "transfer", "source_finetuned": "some-org/some-model", "target_base": "world-v2"}])
    assert [s.model for s in cfg.stages[:2]] == ["./nodir", "nodir"]


def _cache_hub_model(cache: Path, name: str) -> None:
    """A hub cache entry for `name` as huggingface_hub lays it out (refs/main -> snapshots/<sha>/config.json)."""
    repo = cache / ("models--" + name.replace("/", "--"))
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")


def test_a_dir_name_model_ref_whose_dir_is_local_is_checked_at_load(tmp_path, monkeypatch):
    """`models/llama_aa` with a local `models/` is refused at load, as resolve_model refuses it when the stage
    starts (after earlier stages trained); an `org/name` without a local `org/`, or cached, loads untouched."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llama_a").mkdir(parents=True)
    (tmp_path / "models" / "deeper").mkdir()
    with pytest.raises(ConfigError) as e:
        _load([{"name": "a", "kind": "sft"}, {"name": "b", "kind": "sft", "model": "models/llama_aa"}])
    assert str(e.value) == ("<config>: stages[1].model: model 'models/llama_aa' is not a folder: models has no "
                            "'llama_aa' (did you mean 'llama_a'?), and no hub model of that name is cached "
                            "(download it first if you meant one)")
    with pytest.raises(ConfigError, match=r"^<config>: stages\[1\]\.models\[1\]\.model: model 'models/llama_zz' "
                                          r"is not a folder: models has no 'llama_zz' \(did you mean 'llama_a'"):
        _load([{"name": "a", "kind": "sft"}, {"name": "m", "kind": "merge", "method": "linear",
                                             "models": [{"model": "${stages.a.model}"}, {"model": "models/llama_zz"}]}])
    with pytest.raises(ConfigError, match=r"^<transfer defaults>: target_base: model 'models/deeper/x' is not a "
                                          r"folder: models/deeper has no 'x'$"):
        stage_pipeline("transfer", None, ["target_base=models/deeper/x"])
    _cache_hub_model(tmp_path / "hub", "models/cached")
    cfg = _load([{"kind": "sft", "model": "some-org/some-model"}, {"kind": "sft", "model": "models/cached"},
                 {"kind": "sft", "model": "models/llama_a"}])
    assert [s.model for s in cfg.stages] == ["some-org/some-model", "models/cached", "models/llama_a"]


@pytest.mark.parametrize("kind,sets,expected", [
    ("sft", ["model="], "model: empty model reference (null or omit it for the default)"),
    ("merge", ["base="], "base: empty model reference (null or omit it for the default)"),
    ("merge", ["base= "], "base: empty model reference (null or omit it for the default)"),
    ("merge", ["models.1.model= "], "models[1].model: empty model reference"),
    ("transfer", ["target_base="], "target_base: empty model reference (null or omit it for the default)"),
    ("transfer", ["source_finetuned="], "source_finetuned: empty model reference (omit it for the default)"),
])
def test_an_empty_model_reference_is_refused_at_load(kind, sets, expected):
    """'' is `Path('.')` to the loader, and a merge read an empty `base:` as unset for its lineage but as set for
    its input (a TypeError once earlier stages had trained): refused at load, with the key path."""
    with pytest.raises(ConfigError) as e:
        stage_pipeline(kind, None, sets)
    assert str(e.value) == f"<{kind} defaults>: {expected}"


def test_an_empty_model_reference_in_a_pipeline_names_its_stage():
    with pytest.raises(ConfigError) as e:
        _load([{"kind": "sft"}, {"kind": "merge", "method": "linear", "base": ""}])
    assert str(e.value) == "<config>: stages[1].base: empty model reference (null or omit it for the default)"
    with pytest.raises(ConfigError, match=r"^<config>: stages\[2\]\.model: empty model reference"):
        _load(UNNAMED, ["stages.dpo2.model="])
    assert _load([{"kind": "sft", "model": "world"}], ["stages.0.model=null"]).stages[0].model is None


def test_a_world_task_typo_is_refused_at_load_and_hub_dataset_names_are_not():
    """`reversl` was taken for a hub dataset: 5 hub retries after earlier stages trained, then an error with no
    key path or did-you-mean. A bare name close to a world task is refused at load; others still reach the hub."""
    with pytest.raises(ConfigError) as e:
        _load([{"kind": "sft"}, {"kind": "sft", "data": [{"source": "reversl"}]}])
    assert str(e.value) == ("<config>: stages[1].data[0].source: no world task 'reversl' (did you mean "
                            "'reversal'?); a hub dataset is named org/name")
    cfg = _load([{"kind": "sft", "data": [{"source": "reversal"}, {"source": "gsm8k"}, {"source": "org/reversl"}]}])
    assert [d.source for d in cfg.stages[0].data] == ["reversal", "gsm8k", "org/reversl"]


@pytest.mark.parametrize("source,expected", [
    ("fact", "no world task 'fact' (did you mean 'facts'?); a hub dataset is named org/name"),
    ("", "empty source (a world task: arithmetic, reversal, facts, style, verifiable; a .jsonl/.json/.parquet "
         "file; or a hub dataset)"),
    ("{tmp}", "{tmp} is a folder, not a data file (use a .jsonl, .json or .parquet file)"),
    ("{tmp}/notes.txt", "{tmp}/notes.txt: unsupported data file type (use a .jsonl, .json or .parquet file)"),
])
def test_data_sources_that_cannot_load_are_refused_at_load(tmp_path, source, expected):
    (tmp_path / "notes.txt").write_text("a line\n")
    stages = [{"kind": "sft"}, {"kind": "sft", "data": [{"source": source.format(tmp=tmp_path)}]}]
    with pytest.raises(ConfigError) as e:
        _load(stages)
    assert str(e.value) == f"<config>: stages[1].data[0].source: {expected.format(tmp=tmp_path)}"


# ---- error lines: the unknown key first, hints for flat keys, no dump of the input ---------------------------------

def test_an_unknown_key_is_reported_before_the_required_key_it_misspells():
    with pytest.raises(ConfigError) as e:
        _load([{"kind": "sft", "data": [{"sourc": "arithmetic"}]}])
    assert str(e.value) == "<config>: stages[0].data[0].sourc: unknown key (did you mean 'source'?)"


@pytest.mark.parametrize("key,hint", [
    ("learning_rate", "'trainer.learning_rate'"), ("num_train_epochs", "'trainer.num_train_epochs'"),
    ("per_device_train_batch_size", "'trainer.per_device_train_batch_size'"), ("r", "'lora.r'"),
    ("learning_rat", "'trainer.learning_rate'"),
])
def test_a_flat_trl_key_at_stage_level_suggests_its_block(key, hint):
    with pytest.raises(ConfigError) as e:
        _load([{"kind": "sft", key: 1}])
    assert str(e.value) == f"<config>: stages[0].{key}: unknown key (did you mean {hint}?)"


@pytest.mark.parametrize("stages,expected", [
    ([{"name": "a", "kind": "stf"}], "<config>: stages[0].kind: unknown stage kind 'stf' (did you mean 'sft'?)"),
    ([{"name": "a"}], "<config>: stages[0]: needs a 'kind'"),
    ([{"name": "a", "kind": "sft"}, {"name": "a", "kind": "sft"}], "<config>: stages: stage names must be unique"),
    ([{"kind": "grpo", "rewards": [{"name": "format_regex", "params": {"patern": "x"}}]}],
     "<config>: stages[0].rewards[0]: reward 'format_regex' has no param 'patern' (did you mean 'pattern'?)"),
])
def test_errors_name_the_path_once_and_do_not_dump_the_input(stages, expected):
    with pytest.raises(ConfigError) as e:
        _load(stages)
    msg = str(e.value)
    assert msg.startswith(expected) and "(got" not in msg and "{" not in msg and len(msg) < 200, msg


def test_a_non_utf8_file_is_a_config_error(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_bytes(b"stages:\n  - kind: sft\n    name: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: not UTF-8 text"):
        load_pipeline(f)


# ---- --set: auto-named stages, null, booleans, list indices; the pipeline name; the other command -----------------

UNNAMED = [{"kind": "sft"}, {"kind": "sft", "data": [{"source": "reversal"}]}, {"kind": "dpo"}]


def test_set_addresses_unnamed_stages_by_the_names_they_get():
    cfg = _load(UNNAMED, ["stages.sft1.trainer.max_steps=5", "stages.dpo2.trainer.max_steps=6"])
    assert [(s.name, s.trainer.max_steps) for s in cfg.stages][1:] == [("sft1", 5), ("dpo2", 6)]
    with pytest.raises(ConfigError) as e:
        _load(UNNAMED, ["stages.sft3.trainer.max_steps=5"])
    assert "no stage 'sft3' (did you mean 'sft' or 'sft1'?); stages has 3 entries (0..2): sft, sft1, dpo2" in str(e.value)
    with pytest.raises(ConfigError, match=r"stages has 2 entries \(0\.\.1\)"):
        _load([{"kind": "sft", "name": "x"}, {"kind": "sft", "name": "x"}], ["stages.2.kind=sft"])


def test_set_index_into_other_lists():
    cfg = _load(UNNAMED, ["stages.1.data.0.limit=3"])
    assert cfg.stages[1].data[0].limit == 3 and cfg.stages[1].data[0].source == "reversal"
    with pytest.raises(ConfigError, match=r"--set stages\.1\.data\.1\.source: stages\.1\.data has 1 entry \(0\)"):
        _load(UNNAMED, ["stages.1.data.1.source=x"])
    with pytest.raises(ConfigError, match=r"unknown key 'sourc' \(did you mean 'source'\?\)"):
        _load(UNNAMED, ["stages.1.data.0.sourc=x"])
    one = stage_pipeline("merge", None, ["models.1.weight=0.25"]).stages[0]  # the default list, edited
    assert [m.weight for m in one.models] == [1.0, 0.25]
    with pytest.raises(ConfigError, match="max_steps is a value, not a block"):
        stage_pipeline("sft", None, ["trainer.max_steps.x=1"])


@pytest.mark.parametrize("null", ["null", "~", "NULL"])
def test_set_null_resets_a_field_to_none(null):
    cfg = _load([{"kind": "sft", "model": "world", "trainer": {"max_length": 64}}],
                [f"stages.0.model={null}", f"stages.0.trainer.max_length={null}"])
    assert cfg.stages[0].model is None and cfg.stages[0].trainer.max_length is None


def test_booleans_are_not_numbers_but_ints_are_floats():
    for sets in (["trainer.max_steps=true"], ["trainer.learning_rate=false"], ["eval.max_drop={arithmetic: true}"]):
        with pytest.raises(ConfigError, match="expected a number"):
            stage_pipeline("sft", None, sets)
    with pytest.raises(ConfigError, match=r"stages\[0\]\.trainer\.max_steps: expected a number, got True"):
        _load([{"kind": "sft", "trainer": {"max_steps": True}}])
    st = stage_pipeline("sft", None, ["trainer.learning_rate=1", "trainer.bf16=true", "eval.max_drop={a: 0}"])
    assert st.stages[0].trainer.learning_rate == 1.0 and isinstance(st.stages[0].trainer.learning_rate, float)
    assert st.stages[0].trainer.bf16 is True and st.eval.max_drop == {"a": 0.0}


@pytest.mark.parametrize("name", ["../../x", "foo bar", "a/b", ".hidden"])
def test_pipeline_name_is_checked_like_a_stage_name(name):
    with pytest.raises(ConfigError, match=r"^<config>: name: String should match pattern"):
        _load([{"kind": "sft"}], [f"name={name}"])
    assert _load([{"kind": "sft"}], ["name=run-1.b_c"]).name == "run-1.b_c"


def test_a_file_for_the_other_command_names_that_command(tmp_path):
    pipe = REPO / "configs" / "pipelines" / "sft_two_tasks.yaml"
    with pytest.raises(ConfigError, match=rf"pipeline file, not a stage config: run it with `posttrain run {pipe}`"):
        stage_pipeline("sft", pipe, None)
    stage = REPO / "configs" / "stages" / "sft.yaml"
    with pytest.raises(ConfigError, match=rf"stage config \(kind: sft\): run it with `posttrain stage sft --config {stage}`"):
        load_pipeline(stage)
