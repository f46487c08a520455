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
