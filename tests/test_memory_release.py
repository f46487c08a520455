"""A training stage lets go of its trainer before the eval that follows, and a vLLM eval asks for its share.

vLLM starts only when its `gpu_memory_utilization` share of the GPU is free, so the trainer's model, optimizer
and any vLLM engine must be gone before a vLLM eval in the same process. On CPU the objects' weakrefs show it:
the garbage collector is off during these tests, so only the collections posttrain makes itself free anything
(the model sits in reference cycles; with the collector on, whether it ran first would be luck).
"""
import atexit
import gc
import types
import weakref

import pytest

import posttrain.stages  # noqa: F401
from evals import runner
from posttrain import rollout
from posttrain.config import EvalConfig, load_pipeline
from posttrain.pipeline import run_pipeline
from posttrain.stages import common, trl_run
from posttrain.world.tuning import world_trainer


@pytest.fixture
def no_automatic_gc():
    was = gc.isenabled()
    gc.disable()
    yield
    if was:
        gc.enable()


def test_trainer_is_released_before_a_vllm_eval_which_gets_its_share(world, tmp_path, monkeypatch, no_automatic_gc):
    import lm_eval
    import transformers

    refs: dict[str, weakref.ref] = {}
    after_save: dict[str, bool] = {}
    evals: list[dict] = []

    train = transformers.Trainer.train

    def spy_train(self, *args, **kwargs):
        out = train(self, *args, **kwargs)
        refs.update(trainer=weakref.ref(self), model=weakref.ref(self.model), optimizer=weakref.ref(self.optimizer))
        return out

    def spy_train_and_save(trainer, *args, **kwargs):
        out = common.train_and_save(trainer, *args, **kwargs)
        # The stage still holds the trainer here; its optimizer is gone all the same.
        after_save.update(trainer=refs["trainer"]() is not None, optimizer=refs["optimizer"]() is not None)
        return out

    def simple_evaluate(**kwargs):  # lm-eval's vllm model would build vllm.LLM(**model_args) here
        evals.append({"model_args": kwargs["model_args"], "alive": {k: r() is not None for k, r in refs.items()}})
        return {"results": {"world_arithmetic": {"exact_match,none": 0.5, "exact_match_stderr,none": 0.1}}}

    monkeypatch.setattr(transformers.Trainer, "train", spy_train)
    monkeypatch.setattr(trl_run, "train_and_save", spy_train_and_save)
    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    monkeypatch.setattr(runner, "_task_manager", lambda include, tasks: None)  # no task index to build
    monkeypatch.setattr(rollout, "vllm_installed", lambda: True)  # the runner checks that vllm is there

    stage = {"kind": "sft", "model": "world", "data": [{"source": "arithmetic", "limit": 16}],
             "trainer": world_trainer("sft", max_steps=2, per_device_train_batch_size=4, save_steps=100)}
    cfg = load_pipeline(None, data={"eval": {"backend": "vllm", "gpu_memory_utilization": 0.35, "limit": 4},
                                    "stages": [stage]})
    run_pipeline(cfg, tmp_path / "run", lambda m: None)

    assert after_save == {"trainer": True, "optimizer": False}
    base, after = evals
    assert base["alive"] == {}  # nothing had trained yet
    assert after["alive"] == {"trainer": False, "model": False, "optimizer": False}
    assert after["model_args"]["gpu_memory_utilization"] == 0.35
    assert {k: after["model_args"][k] for k in ("dtype", "seed")} == {"dtype": "auto", "seed": 0}


def test_vllm_eval_shares_the_gpu_by_default():
    """vLLM's own default (0.9) refuses to start when a tenth of the GPU is taken (a CUDA context, a server)."""
    assert EvalConfig().gpu_memory_utilization == 0.5


def test_release_closes_the_nccl_group_to_a_vllm_server(no_automatic_gc):
    """TRL registers the client's close_communicator with atexit, which kept the client (and its NCCL group)
    alive until the process exits; the release closes it and drops it."""
    closed = []

    class Client:  # TRL's VLLMClient, as far as the release touches it
        communicator = object()

        def close_communicator(self):
            closed.append(True)

    class Held:  # a model or optimizer: anything a weakref can watch
        pass

    client = Client()
    atexit.register(client.close_communicator)  # what VLLMClient.init_communicator does
    model, optimizer = Held(), Held()
    freed = []
    trainer = types.SimpleNamespace(
        model=model, model_wrapped=model, optimizer=optimizer, lr_scheduler=None,
        vllm_generation=types.SimpleNamespace(vllm_client=client),
        callback_handler=types.SimpleNamespace(model=model, optimizer=optimizer),
        accelerator=types.SimpleNamespace(free_memory=lambda: freed.append(True)))
    gone = [weakref.ref(x) for x in (client, model, optimizer)]
    del client, model, optimizer
    common._release_trainer(trainer)
    assert closed == [True] and freed == [True]
    assert [r() for r in gone] == [None, None, None]
