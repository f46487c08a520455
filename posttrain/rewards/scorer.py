"""The `reward_model` reward: a sequence-classification model folder (a `reward` stage's output, or any
one-output reward model such as Skywork's or ArmoRM's) scores each prompt + completion.

This is the learned reward of RLHF (Ouyang et al. 2022, "Training language models to follow instructions with
human feedback", arXiv 2203.02155), used as GRPO's and RLOO's reward in place of a program, as TRL's trainers
take a model for `reward_funcs`. How it departs from TRL's handling of a model reward:

* **The text is built as TRL's RewardTrainer trained it**: a conversational prompt (message list) gets the
  completion as one assistant message and the reward model's own chat template over the whole conversation; a
  plain prompt is prompt + completion + the reward tokenizer's EOS (RewardTrainer appends EOS to plain rows;
  GRPOTrainer scores plain text without it, so a model trained on EOS-ended rows saw a different last token).
* **Loaded once per process** (`_scorer`, cached by folder) and released when the stage ends
  (`release_scorers`), not per call. It runs on the process's GPU (else the CPU), in batches of
  `batch_size` rows, with gradients off.
"""
from __future__ import annotations

import functools
from typing import Any

from posttrain.registry import REWARDS
from posttrain.schema import ConfigError


def check_scorer(folder: str) -> None:
    """Refuse (ConfigError: exit 2, before the stage trains) a folder that is no one-output sequence classifier:
    a causal LM would load with a new, random score head and score noise without any error."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"reward_model: {folder} is not a sequence-classification model (architectures: "
                          f"{', '.join(archs) or 'none'}); give a reward stage's output (${{stages.<name>.model}}) "
                          "or a one-output reward model folder")
    if config.num_labels != 1:
        raise ConfigError(f"reward_model: {folder} has {config.num_labels} outputs; a reward model has one")


@functools.lru_cache(maxsize=4)
def _scorer(folder: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a sequence-classification folder, in eval mode on the process's GPU (under
    `accelerate launch`, each rank's own) in the dtype it is stored in, or on the CPU in float32."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cuda = torch.cuda.is_available()
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, use_safetensors=True, dtype="auto" if cuda else torch.float32).to("cuda" if cuda else "cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:  # the classifier finds each row's last token by its padding
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def release_scorers() -> None:
    """Drop the loaded reward models (the stage calls this when it ends: their memory goes back for the evals)."""
    _scorer.cache_clear()


def scored_ids(tokenizer: Any, prompt: Any, completion: str) -> list[int]:
    """Token ids of prompt + completion as TRL's RewardTrainer tokenizes a chosen or rejected row."""
    if isinstance(prompt, list):
        messages = [*prompt, {"role": "assistant", "content": completion}]
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    text = f"{prompt or ''}{completion}"
    if tokenizer.eos_token and not text.endswith(tokenizer.eos_token):
        text += tokenizer.eos_token
    return tokenizer(text)["input_ids"]


@REWARDS.register("reward_model")
def reward_model(completions: list[str], prompts: list[Any] | None = None, *, model: str, batch_size: int = 8,
                 **kwargs: Any) -> list[float]:
    """The score a sequence-classification model (`model`: a folder, or ${stages.<reward stage>.model}) gives
    each prompt + completion."""
    import torch

    net, tokenizer = _scorer(model)
    prompts = list(prompts) if prompts is not None else [None] * len(completions)
    rows = [scored_ids(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    out: list[float] = []
    device = next(net.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(r) for r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # right padding, as RewardTrainer's collator pads
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        with torch.no_grad():
            logits = net(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out += logits[:, 0].float().cpu().tolist()
    return out


def _check_params(params: dict[str, Any]) -> None:
    """Refuse at load what the first scoring would trip on: a batch size that is no positive whole number."""
    size = params.get("batch_size", 8)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"reward 'reward_model': batch_size must be a whole number of at least 1, got {size!r}")


reward_model.check_params = _check_params  # builtin.check_params calls it after the generic checks
