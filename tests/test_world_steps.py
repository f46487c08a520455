"""What the world build says while it runs (posttrain/world/steps.py) and while it waits for another build."""
from __future__ import annotations

import fcntl
import threading

from posttrain.world import wait_for_lock
from posttrain.world.build import BUILD_SECONDS
from posttrain.world.steps import Steps


def test_steps_are_numbered_with_the_time_left_in_all_and_each_is_closed():
    logs: list[str] = []
    steps = Steps("world", {"data": 5, "tokenizer": 10, "pretraining": 150}, logs.append)
    steps.step("data")
    steps.step("tokenizer")
    steps.step("pretraining")
    steps.done()
    assert [line for line in logs if "step" in line] == [
        "world: step 1/3: data (about 2m45s left in all on 2 CPU cores)",
        "world: step 2/3: tokenizer (about 2m40s left in all on 2 CPU cores)",
        "world: step 3/3: pretraining (about 2m30s left in all on 2 CPU cores)"]
    assert [line.split(" done in ")[0] for line in logs if " done in " in line] == [
        "world: data", "world: tokenizer", "world: pretraining"]
    assert list(BUILD_SECONDS) == ["task data", "tokenizer", "pretraining the base"]  # build_world's steps


def test_waiting_for_another_build_is_said_once_then_the_lock_is_taken(tmp_path):
    path = tmp_path / "world-x.lock"
    holder = open(path, "w")
    fcntl.flock(holder, fcntl.LOCK_EX)
    said = threading.Event()
    logs: list[str] = []

    def log(msg: str) -> None:
        logs.append(msg)
        said.set()

    with open(path, "w") as lock:
        waiter = threading.Thread(target=wait_for_lock, args=(lock, "waiting for world-x", log))
        waiter.start()
        assert said.wait(60)  # it says so before it blocks
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
        waiter.join(60)
        assert not waiter.is_alive() and logs == ["waiting for world-x"]
        with open(path, "w") as third:  # the waiter holds it now
            try:
                fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError("the lock was free")
            except BlockingIOError:
                pass

    logs.clear()
    with open(path, "w") as lock:
        wait_for_lock(lock, "waiting", logs.append)  # free: taken at once, nothing said
    assert logs == []


def test_a_merge_of_world_models_says_what_the_world_can_show_and_others_do_not(tmp_path):
    import posttrain.world.trained  # noqa: F401  (registers the named world models)
    from posttrain.world.notes import NOTES, log_note

    logs: list[str] = []
    log_note("merge", ["world-sft", "world-dpo-style", "world-grpo-verifiable"], logs.append)
    assert logs == NOTES["merge"] and any("CANNOT" in line for line in logs)
    for refs in (["world-sft", str(tmp_path)], [None, "org/model"], []):
        logs.clear()
        log_note("merge", refs, logs.append)
        assert logs == []
    log_note("sft", ["world"], logs.append)  # no note for that kind
    assert logs == []
