"""`kill -9` during a GRPO run whose checkpoint lies past the first epoch over the prompts, then the same
command: the final weights are bit-identical to an uninterrupted run (README: bit-identical resume).

Before the fix, TRL's RepeatSampler drew each epoch's order from one generator seeded once, so a resumed
trainer (a fresh sampler) gave its first epoch's order to epoch 2 (posttrain/stages/grpo_support.py, _EpochSampler).
"""
from tests.conftest import run_cli
from tests.reliability.conftest import weights_sha

# A reward with a spread inside every group, so every step has a gradient (a group of equal rewards has none)
# and the prompts' order reaches the weights.
SPREAD = "def spread(completions, **kw):\n    return [float(i % 2) for i in range(len(completions))]\n"


def _grpo_args(run_dir, reward) -> list[str]:
    # 8 prompts, 2 per step (4 completions / num_generations 2): 4 steps an epoch, 10 steps, checkpoints 3, 6, 9.
    return ["stage", "grpo", "--set", "eval.enabled=false", "--set", "model=world",
            "--set", "data=[{source: verifiable, limit: 8}]", "--set", f"rewards=[{{name: '{reward}:spread'}}]",
            "--set", "num_generations=2", "--set", "max_completion_length=4", "--set", "rollout.backend=hf",
            "--set", "trainer.per_device_train_batch_size=4", "--set", "trainer.max_steps=10",
            "--set", "trainer.save_steps=3", "--set", "trainer.logging_steps=1",
            "--set", "trainer.learning_rate=1e-3", "--run-dir", str(run_dir)]


def test_kill_in_second_epoch_then_rerun_resumes_bit_identical(world, tmp_path):
    reward = tmp_path / "spread.py"
    reward.write_text(SPREAD)
    full = tmp_path / "full"
    r = run_cli(*_grpo_args(full, reward))
    assert r.returncode == 0, r.stderr[-2000:]

    run_dir = tmp_path / "run"
    r = run_cli(*_grpo_args(run_dir, reward), env={"POSTTRAIN_FAULT_KILL_AT_STEP": "7"})
    assert r.returncode == -9
    r = run_cli(*_grpo_args(run_dir, reward))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr and "checkpoint-6" in r.stderr  # epoch 2, two steps into it
    assert weights_sha(run_dir, "01_grpo") == weights_sha(full, "01_grpo")
