"""The `judge` reward with a real (tiny, constructed) judge model: a right and a wrong completion get different
scores, an unparseable reply scores 0 and is counted, and bad params are one-line errors."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from posttrain.rewards import RewardSpec, RewardStats, build_reward_funcs
from posttrain.rewards.judge import parse_score
from tests.conftest import TINY_SPECIALS, make_tiny_llama

WORDS = TINY_SPECIALS + ["what", "is", "the", "capital", "of", "france", "it", "paris", "london", "rome", "0", "9",
                         "score", ":", "question", "answer"]
# The judge's "knowledge": the token it answers after each last token of its query; every other token -> <eos>.
VERDICT = {"paris": "9", "london": "0"}
RUBRIC = "question : {prompt} answer : {completion}"


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory) -> Path:
    """A 2-layer Llama whose layers add nothing (o_proj and down_proj are 0), so its last hidden state is its
    last token's one-hot embedding, and whose lm_head maps that token to VERDICT's: greedy decoding answers "9"
    after "... paris", "0" after "... london", and ends (<eos>) after anything else."""
    import torch
    from transformers import LlamaForCausalLM

    folder = make_tiny_llama(tmp_path_factory.mktemp("judge") / "judge", WORDS, hidden_size=len(WORDS),
                             intermediate_size=8, num_attention_heads=1, num_key_value_heads=1)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = {w: i for i, w in enumerate(WORDS)}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(len(WORDS)))
        head = torch.zeros(len(WORDS), len(WORDS))
        for w, i in ids.items():
            head[ids[VERDICT.get(w, "<eos>")], i] = 1.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    return folder


def _judge(folder: Path, **params):
    stats = RewardStats()
    spec = {"name": "judge", "params": {"model": str(folder), "rubric": RUBRIC, "max_score": 10, **params}}
    (func,), _ = build_reward_funcs([spec], stats)
    return func, stats


def test_a_right_and_a_wrong_completion_are_scored_apart(judge_folder):
    func, stats = _judge(judge_folder)
    prompt = [{"role": "user", "content": "what is the capital of france"}]
    completions = [[{"role": "assistant", "content": f"it is {city}"}] for city in ("paris", "london")]
    assert func(prompts=[prompt, prompt], completions=completions) == [0.9, 0.0]
    assert stats.count() == 0


def test_an_unparseable_reply_scores_0_and_is_counted(judge_folder):
    func, stats = _judge(judge_folder, batch_size=2)
    scores = func(prompts=["what is the capital of france"] * 3, completions=["paris", "rome", "it is paris"])
    assert scores == [0.9, 0.0, 0.9]  # "rome" -> the judge says nothing
    assert stats.count("unparseable", "judge") == 1


def test_parse_score():
    assert parse_score("Score: 7/10", r"(\d+)/10", 10) == 0.7
    assert parse_score("<think>maybe 2</think> 4", r"(\d+)", 5) == 0.8
    assert parse_score("eleven", r"(\d+)", 10) is None
    assert parse_score("11", r"(\d+)", 10) is None  # outside [0, max_score]
    assert parse_score("Score: 7 of 10", r"Score: \d+", 10) == 0.7  # no group: the number in the match


@pytest.mark.parametrize("params, says", [
    ({}, "needs params: model"),
    ({"model": "no/such/folder"}, "not found"),
    ({"model": "${stages.sft.model}"}, "not resolved in reward params"),
    ({"rubric": "rate {prompt}"}, "{completion}"),
    ({"max_score": 0}, "max_score must be a positive number"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number"),
    ({"pattern": "(unclosed"}, "bad pattern"),
    ({"device": "tpu"}, "device must be"),
    ({"model": "{classifier}"}, "not a causal LM"),
    ({"backend": "sglang"}, "backend must be"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization must be in (0, 1]"),
])
def test_bad_params_are_one_line_errors(judge_folder, params, says, tmp_path):
    if params.get("model") == "{classifier}":  # a reward model's folder: a judge would answer with a random head
        (tmp_path / "config.json").write_text('{"architectures": ["LlamaForSequenceClassification"]}')
        params = {"model": str(tmp_path)}
    full = params if not params or "model" in params else {"model": str(judge_folder), **params}
    with pytest.raises(ValidationError) as e:
        RewardSpec(name="judge", params=full)
    msg = e.value.errors()[0]["msg"]
    assert says in msg and "\n" not in msg


class _FakeVLLM:
    """A stand-in `vllm` module: an LLM whose greedy reply is "9" to a query about paris, "0" otherwise."""

    def __init__(self):
        self.engines, self.sampling = [], []
        fake = self

        class SamplingParams:
            def __init__(self, **kw):
                fake.sampling.append(kw)

        class LLM:
            def __init__(self, **kw):
                fake.engines.append(kw)

            def get_tokenizer(self):
                from types import SimpleNamespace
                return SimpleNamespace(chat_template=None)

            def generate(self, prompts, params, use_tqdm=True):
                from types import SimpleNamespace
                return [SimpleNamespace(outputs=[SimpleNamespace(text="9" if "paris" in p else "0")]) for p in prompts]

        self.LLM, self.SamplingParams = LLM, SamplingParams


def test_the_vllm_backend_generates_greedily_with_one_engine(judge_folder, monkeypatch):
    """backend: vllm builds one engine per folder with its GPU share and asks greedy replies of max_new_tokens
    (a stand-in vllm module: no GPU here); `auto` keeps transformers without CUDA even with vllm installed."""
    import sys

    from posttrain.rewards import judge as judge_module

    fake = _FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    judge_module._load_vllm.cache_clear()
    func, stats = _judge(judge_folder, backend="vllm", gpu_memory_utilization=0.3, max_new_tokens=4)
    for _ in range(2):
        assert func(prompts=["capital of france?"] * 2, completions=["paris", "london"]) == [0.9, 0.0]
    assert fake.engines == [{"model": str(judge_folder), "gpu_memory_utilization": 0.3, "seed": 0}]
    assert fake.sampling == [{"temperature": 0.0, "max_tokens": 4}] * 2
    judge_module._load_vllm.cache_clear()
    import torch

    if not torch.cuda.is_available():
        assert judge_module.use_vllm("auto") is False and judge_module.use_vllm("vllm") is True


def test_the_judge_folder_is_an_input_of_the_stage(judge_folder, tmp_path):
    """A grpo stage names its judge among its other inputs: the pipeline hashes that folder into the stage's
    inputs (a retrained judge reruns the stage) and checks it before the stage runs."""
    from posttrain.pipeline import Pipeline
    from posttrain.config import load_pipeline

    stage = {"kind": "grpo", "rewards": [{"name": "exact_match"},
                                         {"name": "judge", "params": {"model": str(judge_folder), "rubric": RUBRIC}}]}
    cfg = load_pipeline(None, data={"stages": [stage]})
    assert cfg.stages[0].other_inputs() == [str(judge_folder)]
    pipe = Pipeline(cfg, tmp_path / "r", lambda m: None)
    before = pipe._model_identity(str(judge_folder))
    (judge_folder / "config.json").write_text((judge_folder / "config.json").read_text() + " ")
    assert pipe._model_identity(str(judge_folder)) != before


def test_backend_vllm_without_vllm_is_refused_at_load(judge_folder):
    import importlib.util
    import sys

    if "vllm" in sys.modules or importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(ValidationError, match="backend vllm needs vllm"):
        RewardSpec(name="judge", params={"model": str(judge_folder), "backend": "vllm"})
