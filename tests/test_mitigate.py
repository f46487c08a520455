"""`eval.on_drop: mitigate` (posttrain/mitigate.py, evals/mitigation.py): the rule on hand-made scores, then
configs/pipelines/mitigate.yaml with a 3-step SFT and lm-eval stubbed at its boundary by scores that are a
function of the weights: r = |M − parent| / |stage − parent| (0 for the parent, α for θ(α), 1 for the trained
stage). The dev scores make α = 0.5 the largest passing one; the test scores would pass none, so a choice made
on the test split would fail the run or pick another α."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evals.mitigation import best_tradeoff, choose, trial
from posttrain.config import load_pipeline
from posttrain.pipeline import PipelineError, run_pipeline
from posttrain.schema import ConfigError
from posttrain.world.tuning import world_trainer

REPO = Path(__file__).resolve().parents[1]
ARITH, REV = "world_arithmetic/exact_match", "world_reversal/exact_match"


def _scores(arith: float, rev: float) -> dict:
    return {ARITH: {"value": arith, "stderr": 0.01}, REV: {"value": rev, "stderr": 0.01}}


def test_the_largest_passing_alpha_is_kept_and_the_stage_never():
    base, parent = _scores(0.9, 0.1), _scores(0.9, 0.1)
    limits = {"world_arithmetic": 0.3}
    judged = [{**trial(1.0, _scores(0.1, 0.9), base, parent, limits, ["world_reversal"]), "stage": True}]
    judged += [trial(a, _scores(0.9 - 0.5 * a, 0.1 + 0.8 * a), base, parent, limits, ["world_reversal"])
               for a in (0.9, 0.75, 0.5, 0.25)]
    assert [t["ok"] for t in judged] == [False, False, False, True, True]
    assert choose(judged)["alpha"] == 0.5
    assert judged[3]["gain"] == pytest.approx(0.4) and judged[3]["worst_drop"] == pytest.approx(0.25)
    judged[0]["ok"] = True  # the stage itself is what broke the gate: never kept, even when its dev scores pass
    assert choose(judged)["alpha"] == 0.5
    failing = [t | {"ok": False} for t in judged]
    assert choose(failing) is None and best_tradeoff(failing)["alpha"] == 0.25


def test_mitigate_needs_limits_and_dev_splits():
    with pytest.raises(ConfigError, match="needs eval.max_drop"):
        from evals.checks import check_eval_config
        check_eval_config(load_pipeline(None, data={"eval": {"on_drop": "mitigate"}, "stages": [{"kind": "sft"}]}))
    with pytest.raises(ConfigError, match="mitigate_alphas"):
        load_pipeline(None, data={"eval": {"mitigate_alphas": [1.0]}, "stages": [{"kind": "sft"}]})
    with pytest.raises(ConfigError, match=r"eval.max_drop.*world_facts: an allowed drop is 0 or more"):
        load_pipeline(None, data={"eval": {"max_drop": {"world_facts": -0.1}}, "stages": [{"kind": "sft"}]})


def _float_tensors(folder: Path) -> dict:
    return {k: v.double() for k, v in load_file(folder / "model.safetensors").items() if v.is_floating_point()}


def _distance(a: dict, b: dict) -> float:
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5


class FakeEvals:
    """lm-eval stubbed: scores from r (see the module docstring); dev splits pass from α ≤ 0.6, test ones never."""

    def __init__(self, parent: Path, stage_dir: Path):
        self.parent_dir, self.parent, self.stage_dir, self.calls = parent, _float_tensors(parent), stage_dir, []

    def r(self, model_dir: Path) -> float:
        if model_dir.resolve() == self.parent_dir.resolve():  # the base (and parent): evaluated before training
            return 0.0
        trained = self.stage_dir / "unmitigated" / "model"
        stage = _float_tensors(trained if trained.is_dir() else self.stage_dir / "model")
        return _distance(_float_tensors(model_dir), self.parent) / _distance(stage, self.parent)

    def __call__(self, model_dir, spec, include, limit, settings, log):
        split = "dev" if str(include).endswith("_dev") else "test"
        self.calls.append((str(model_dir), split))
        r = self.r(Path(model_dir))
        penalty = 0.25 if split == "test" and r > 1e-6 else 0.0
        scores = _scores(0.9 - 0.5 * r - penalty, 0.1 + 0.8 * r)
        return {"scores": scores, "seconds": 0.0, "backend": "fake", "lm_eval": {}, "task_configs": {}}


@pytest.fixture(scope="module")
def mitigated(world, tmp_path_factory):
    """configs/pipelines/mitigate.yaml on the world base, 3 SFT steps, evals faked; (run dir, fake, log, cfg)."""
    import evals.runner

    raw = yaml.safe_load((REPO / "configs/pipelines/mitigate.yaml").read_text())
    raw["eval"].update(max_drop={"world_arithmetic": 0.3}, mitigate_alphas=[0.9, 0.75, 0.5, 0.25])
    stage = raw["stages"][0]
    stage.update(model="world", trainer=world_trainer("sft", max_steps=3, per_device_train_batch_size=4,
                                                      learning_rate=1e-2))
    stage["data"][0]["limit"] = 12
    cfg = load_pipeline(None, data=raw)
    run_dir = tmp_path_factory.mktemp("mitigate") / "run"
    fake, log = FakeEvals(world / "base", run_dir / "stages" / "01_sft_reversal"), []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evals.runner, "_run_lm_eval", fake)
        run_pipeline(cfg, run_dir, log.append)
    return run_dir, fake, log, raw


def test_the_kept_alpha_is_the_largest_passing_on_dev_computed_here(mitigated, world):
    run_dir, fake, log, _ = mitigated
    final = run_dir / "stages" / "01_sft_reversal"
    parent, stage = _float_tensors(world / "base"), _float_tensors(final / "unmitigated" / "model")
    expected = None
    for alpha in (0.9, 0.75, 0.5, 0.25):  # θ(α) built here, scored by the same dev rule, the gate's limit 0.3
        theta = {k: parent[k] + alpha * (stage[k] - parent[k]) for k in parent}
        r = _distance(theta, parent) / _distance(stage, parent)
        if 0.9 - (0.9 - 0.5 * r) <= 0.3:
            expected = alpha
            break
    m = json.loads((final / "mitigation.json").read_text())
    assert expected == 0.5 and m["chosen"] == expected
    kept = _float_tensors(final / "model")
    for k in parent:  # the kept model is θ(0.5), written by the merge code in float32
        torch.testing.assert_close(kept[k], parent[k] + 0.5 * (stage[k] - parent[k]), rtol=0, atol=1e-6)
    done = json.loads((final / "DONE").read_text())
    assert done["mitigated"] == {"method": "interpolate", "alpha": 0.5, "parent": str(world / "base")}
    # Choosing never looked at a test score of an interpolation: every θ(α) was scored on dev only.
    trials = [(m_, split) for m_, split in fake.calls if "/mitigation/alpha_" in m_]
    assert len(trials) == 4 and {split for _, split in trials} == {"dev"}
    assert any("after mitigation" in line for line in log)  # the kept model still breaks the test-split gate


def test_the_report_holds_both_rows_and_the_tradeoff(mitigated):
    run_dir, _, _, _ = mitigated
    report = json.loads((run_dir / "report" / "forgetting.json").read_text())
    names = [s["name"] for s in report["stages"]]
    assert names == ["base", "sft_reversal:unmitigated", "sft_reversal"]
    m = json.loads((run_dir / "stages" / "01_sft_reversal" / "mitigation.json").read_text())
    assert report["mitigation"]["sft_reversal"]["chosen"] == 0.5
    assert [t["alpha"] for t in report["mitigation"]["sft_reversal"]["trials"]] == [1.0, 0.9, 0.75, 0.5, 0.25]
    assert [t["gain"] for t in report["mitigation"]["sft_reversal"]["trials"]] == [t["gain"] for t in m["trials"]]
    md = (run_dir / "report" / "forgetting.md").read_text()
    assert "mitigated: interpolate α=0.5" in md and (run_dir / "report" / "mitigation_sft_reversal.png").is_file()
    unmitigated = report["stages"][1]["scores"][ARITH]["value"]
    kept = report["stages"][2]["scores"][ARITH]["value"]
    assert unmitigated == pytest.approx(0.9 - 0.5 - 0.25) and kept == pytest.approx(0.9 - 0.25 - 0.25, abs=1e-4)


def test_a_rerun_reuses_the_mitigation_and_a_new_grid_redoes_it(mitigated):
    import evals.runner

    run_dir, fake, _, raw = mitigated
    final = run_dir / "stages" / "01_sft_reversal"
    before = (final / "DONE").read_text()
    log: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evals.runner, "_run_lm_eval", fake)
        n = len(fake.calls)
        run_pipeline(load_pipeline(None, data=raw), run_dir, log.append)
        assert (final / "DONE").read_text() == before and len(fake.calls) == n  # nothing trained or evaluated
        raw2 = {**raw, "eval": {**raw["eval"], "mitigate_alphas": [0.8, 0.4]}}
        run_pipeline(load_pipeline(None, data=raw2), run_dir, log.append)
    assert any("undoing its mitigation (other settings)" in line for line in log)
    assert not any("sft reversal] sft from" in line for line in log)  # the trained model was not retrained
    assert json.loads((final / "mitigation.json").read_text())["chosen"] == 0.4


def test_no_passing_alpha_fails_the_stage_naming_the_best_tradeoff(mitigated, tmp_path):
    import evals.runner

    _, fake, _, raw = mitigated
    strict = {**raw, "eval": {**raw["eval"], "max_drop": {"world_arithmetic": 0.05}}}
    with pytest.MonkeyPatch.context() as mp:
        fake2 = FakeEvals.__new__(FakeEvals)
        fake2.parent_dir, fake2.parent, fake2.calls = fake.parent_dir, fake.parent, []
        fake2.stage_dir = tmp_path / "run" / "stages" / "01_sft_reversal"
        mp.setattr(evals.runner, "_run_lm_eval", fake2)
        with pytest.raises(PipelineError) as e:
            run_pipeline(load_pipeline(None, data=strict), tmp_path / "run", lambda m: None)
    msg = str(e.value)
    assert "\n" not in msg and "no interpolation" in msg and "best trade-off α=0.25" in msg


def test_a_search_cut_short_leaves_nothing_a_rerun_trips_on(mitigated):
    """kill -9 during the search leaves a trial folder (and a partial one): the next search starts afresh."""
    import evals.runner

    run_dir, fake, _, raw = mitigated
    final = run_dir / "stages" / "01_sft_reversal"
    raw2 = {**raw, "eval": {**raw["eval"], "mitigate_alphas": [0.9, 0.75, 0.5, 0.25, 0.2]}}
    (final / "mitigation" / "alpha_0.9" / "x").mkdir(parents=True)  # what a killed search left
    (final / "mitigation" / ".alpha_0.9.partial").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evals.runner, "_run_lm_eval", fake)
        run_pipeline(load_pipeline(None, data=raw2), run_dir, lambda m: None)
    assert json.loads((final / "mitigation.json").read_text())["chosen"] == 0.5
    assert not (final / "mitigation").exists()


def test_a_gate_with_evals_off_is_warned_about():
    from evals.checks import check_eval_config

    said = []
    check_eval_config(load_pipeline(None, data={"eval": {"enabled": False, "max_drop": {"world_facts": 0.1},
                                                         "on_drop": "mitigate"}, "stages": [{"kind": "sft"}]}),
                      said.append)
    assert said and "evals are off" in said[0] and "mitigate never acts" in said[0]


def test_a_stage_without_an_input_model_is_warned_about_before_the_run():
    """A linear merge reads no input model: mitigation could not interpolate it, which the user hears at load."""
    from evals.checks import check_eval_config

    said = []
    models = [{"model": "world-sft-arithmetic"}, {"model": "world-sft-reversal"}]
    check_eval_config(load_pipeline(None, data={
        "eval": {"max_drop": {"world_facts": 0.1}, "on_drop": "mitigate"},
        "stages": [{"kind": "sft", "name": "a"}, {"kind": "merge", "name": "m", "method": "linear", "models": models},
                   {"kind": "merge", "name": "t", "method": "task_arithmetic", "models": models}]}), said.append)
    assert len(said) == 1 and said[0].startswith("warning: stages.m reads no input model")
