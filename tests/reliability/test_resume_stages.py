"""`kill -9` during training, then the same command, for the orpo, simpo, reward and rloo stages: each resumes
from its last checkpoint and ends bit-identical to an uninterrupted run (README: bit-identical resume), as
tests/reliability/test_resume.py shows for sft and test_resume_grpo.py for grpo.

The four stages form one pipeline, so the uninterrupted run is one command, and each killed command is also the
rerun of the stage killed before it: run k kills stage k (POSTTRAIN_FAULT_KILL_STAGE) after step 3, having
resumed stage k - 1 from its checkpoint at step 2 and finished it; the last run kills nothing.
"""
import json

import yaml

from tests.conftest import run_cli
from tests.reliability.conftest import weights_sha

TRAINER = {"max_steps": 5, "save_steps": 2, "logging_steps": 1, "per_device_train_batch_size": 4,
           "learning_rate": 1e-3, "gradient_checkpointing": False, "extra": {"optim": "sgd"}}
PAIRS = [{"source": "style", "limit": 12}]  # 3 steps an epoch: step 5 is in the second epoch
STAGES = [
    {"name": "orpo", "kind": "orpo", "model": "world", "data": PAIRS, "trainer": TRAINER},
    {"name": "simpo", "kind": "simpo", "model": "world", "data": PAIRS, "trainer": TRAINER},
    {"name": "reward", "kind": "reward", "model": "world", "data": PAIRS, "trainer": TRAINER},
    # A reward with a spread inside every group, so every step has a gradient; 2 prompts a step, 4 an epoch.
    {"name": "rloo", "kind": "rloo", "model": "world", "data": [{"source": "verifiable", "limit": 4}],
     "rewards": [{"name": "format_regex", "params": {"pattern": "[02468]"}}], "num_generations": 2,
     "max_completion_length": 4, "rollout": {"backend": "hf"}, "trainer": TRAINER},
]


def test_each_new_stage_killed_then_rerun_resumes_bit_identical(world, tmp_path):
    config = tmp_path / "stages.yaml"
    config.write_text(yaml.safe_dump({"name": "resume", "eval": {"enabled": False}, "stages": STAGES}))
    full = tmp_path / "full"
    r = run_cli("run", str(config), "--run-dir", str(full))
    assert r.returncode == 0, r.stderr[-2000:]

    run_dir = tmp_path / "run"
    for i, stage in enumerate(STAGES):
        r = run_cli("run", str(config), "--run-dir", str(run_dir),
                    env={"POSTTRAIN_FAULT_KILL_AT_STEP": "3", "POSTTRAIN_FAULT_KILL_STAGE": stage["name"]})
        assert r.returncode == -9, (stage["name"], r.stderr[-2000:])
        assert (run_dir / "stages" / f".{i + 1:02d}_{stage['name']}.tmp" / "checkpoints" / "checkpoint-2").is_dir()
    r = run_cli("run", str(config), "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    for i, stage in enumerate(STAGES, start=1):
        folder = f"{i:02d}_{stage['name']}"
        assert weights_sha(run_dir, folder) == weights_sha(full, folder), stage["name"]
        records = [json.loads(x) for x in (run_dir / "stages" / folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["checkpoint"].rsplit("/", 1)[-1] for r in records if r.get("event") == "resume"] == ["checkpoint-2"]
        steps = [r["step"] for r in records if "loss" in r]
        assert steps == [1, 2, 3, 4, 5], (stage["name"], steps)
