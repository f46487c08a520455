import pytest

from posttrain.registry import Registry, RegistryError


def test_duplicate_name_is_refused():
    reg = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(RegistryError, match="registered twice"):
        reg.register("a", 2)
    assert reg.get("a") == 1


def test_unknown_name_suggests_close_match():
    reg = Registry("merge method")

    @reg.register("task_arithmetic")
    def f():
        return 1

    with pytest.raises(RegistryError) as e:
        reg.get("task_arithmetc")
    assert "did you mean 'task_arithmetic'" in str(e.value)
    assert "\n" not in str(e.value)


def test_stage_kinds_are_registered_once():
    import posttrain.stages  # noqa: F401
    from posttrain.registry import STAGES

    assert "sft" in STAGES.names()
    with pytest.raises(RegistryError):
        from posttrain.stages.base import stage

        stage("sft", object)(lambda c, x: None)


def test_the_registered_kind_is_the_config_kind_and_no_other():
    """The kind is written once, in `@stage(kind, Config)`: it becomes the config's `kind` field."""
    import posttrain.stages  # noqa: F401
    from pydantic import ValidationError

    from posttrain.registry import STAGES

    for kind in STAGES.names():
        config = STAGES.get(kind).config
        assert config.model_fields["kind"].default == kind
        other = next(k for k in STAGES.names() if k != kind)
        with pytest.raises(ValidationError) as e:
            config.model_validate({"kind": other})
        assert any(err["loc"] == ("kind",) for err in e.value.errors()), kind
    assert STAGES.get("sft").config().kind == "sft"


def test_stage_hooks_name_the_data_and_reference_models_every_kind_answers():
    """`training_data()` and `reference_models()` are StageBase hooks (empty by default), not fields read with
    getattr: a trainable stage trains on its `data:`, a merge shows its input models as reference rows."""
    import posttrain.stages  # noqa: F401
    from posttrain.config import load_pipeline

    stages = load_pipeline(None, data={"stages": [
        {"kind": "sft", "data": [{"source": "reversal"}]},
        {"kind": "merge", "method": "linear", "models": [{"model": "world-sft-arithmetic"}, {"model": "world"}]},
        {"kind": "transfer"}]}).stages
    assert [[d.source for d in s.training_data()] for s in stages] == [["reversal"], [], []]
    assert [s.reference_models() for s in stages] == [[], ["world-sft-arithmetic", "world"], ["world-sft"]]


def test_a_lazy_entry_is_listed_at_once_and_imported_on_first_use(tmp_path, monkeypatch):
    """The model loader knows world model names without importing what builds them (issue 19): a lazy entry is
    a name (listed, matched for typos) whose module registers the object when first asked for."""
    (tmp_path / "lazy_thing_mod.py").write_text(
        "from tests.test_registry import REG\nREG.register('thing', 42)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    REG.lazy("thing", "lazy_thing_mod")
    REG.lazy("ghost", "json")  # importing json registers nothing
    assert "thing" in REG and REG.names() == ["ghost", "thing"]
    assert REG.get("thing") == 42 and REG.get("thing") == 42
    with pytest.raises(RegistryError, match="importing json did not register it"):
        REG.get("ghost")
    with pytest.raises(RegistryError, match="registered twice"):
        REG.register("thing", 43)


REG = Registry("lazy thing")


def test_every_world_model_name_is_registered_by_its_module():
    from posttrain.registry import WORLD_MODELS
    from posttrain.world.trained import RECIPES

    assert set(WORLD_MODELS.names()) == {"world", "world-v2", "world-large", *RECIPES}
    for name in WORLD_MODELS.names():
        assert callable(WORLD_MODELS.get(name))  # imports the module; builds nothing
