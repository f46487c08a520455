"""``judge``: a local causal LM asked a rubric about each completion, its answer parsed to a score in [0, 1]
(LLM-as-a-judge: Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena", arXiv 2306.05685;
as a GRPO/RLVR reward, open-instruct's ``LMJudgeVerifier``).

The rubric is a template with ``{prompt}`` and ``{completion}``; the judge's reply (after a ``</think>``, if it
thinks) is searched with ``pattern``, the first group (else the whole match) read as a number and divided by
``max_score``. Departures from open-instruct's verifier: the judge is a local model folder run with transformers
(greedy, ``max_new_tokens``), not an API; the score is the number parsed from the reply, not a JSON field. A reply
with no number, or one outside [0, max_score], scores 0 and is counted (``rewards/errors/judge/unparseable``).

The judge loads once per process and model folder, in inference mode; it is never trained and its memory stays
held until the process ends. ``backend``: ``vllm`` generates with a ``vllm.LLM`` engine of the folder on the
trainer's GPU (``gpu_memory_utilization`` is its share: the trainer holds the rest), ``transformers`` with
``generate`` (on the GPU when CUDA is there, ``device: auto``), and ``auto`` picks vLLM when CUDA and vllm (the
``gpu`` extra) are both there. Both decode greedily; tests/test_rewards_judge.py runs the vLLM path against a
stand-in ``vllm`` module (no GPU here), so what vLLM itself generates is checked only on a GPU.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import re
import threading
from pathlib import Path
from typing import Any

from posttrain.registry import REWARDS
from posttrain.rewards.stats import RewardStats

log = logging.getLogger(__name__)

UNPARSEABLE = "unparseable"
DEFAULT_RUBRIC = ("Rate how well the answer responds to the request, from 0 (wrong or useless) to 10 (correct and "
                  "complete). Reply with the number only.\n\nRequest: {prompt}\n\nAnswer: {completion}\n\nScore:")
DEFAULT_PATTERN = r"(\d+(?:\.\d+)?)"
_warned: set[str] = set()
_lock = threading.Lock()  # reward calls may come from a thread pool; one generate at a time per process


def prompt_text(prompt: Any) -> str:
    """A prompt as text: strings as they are; a conversation as ``role: content`` lines (one message: its
    content alone)."""
    if isinstance(prompt, str) or prompt is None:
        return prompt or ""
    messages = [m for m in prompt if isinstance(m, dict)]
    if len(messages) == 1:
        return str(messages[0].get("content", ""))
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


def parse_score(reply: str, pattern: str, max_score: float) -> float | None:
    """The score in ``reply`` divided by ``max_score``, or None when no number in [0, max_score] is found."""
    reply = reply.split("</think>")[-1]
    found = re.search(pattern, reply, flags=re.DOTALL)
    if found is None:
        return None
    text = found.group(1) if found.groups() else found.group(0)
    if not found.groups():  # no group: the first number in the match ("Score: 7" for pattern "Score: \d+")
        number = re.search(r"[-+]?\d+(?:\.\d+)?", text)
        text = number.group(0) if number else None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value / max_score if math.isfinite(value) and 0 <= value <= max_score else None


@functools.lru_cache(maxsize=2)
def _load(model: str, device: str, stamp: int):
    """(tokenizer, model) of a judge folder, loaded once per process, device and ``stamp`` (the folder's mtime:
    a stage that rewrote the folder since, renaming its new version into place, gets the new judge)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"  # generation continues the right end of every row
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = torch.float32 if device == "cpu" else "auto"  # bf16 matmuls on CPU are slow where they run at all
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device).eval()
    lm.requires_grad_(False)
    return tok, lm


def use_vllm(backend: str) -> bool:
    """Whether the judge generates with vLLM: asked for, or `auto` with CUDA and vllm installed."""
    if backend != "auto":
        return backend == "vllm"
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


@functools.lru_cache(maxsize=2)
def _load_vllm(model: str, gpu_memory_utilization: float, stamp: int):
    """A vLLM engine of a judge folder, once per process (and folder version, as ``_load``)."""
    import vllm

    return vllm.LLM(model=model, gpu_memory_utilization=gpu_memory_utilization, seed=0)


def _vllm_replies(model: str, queries: list[str], max_new_tokens: int, gpu_memory_utilization: float,
                  chat_template: bool) -> list[str]:
    import vllm

    llm = _load_vllm(model, gpu_memory_utilization, Path(model).stat().st_mtime_ns)
    tok = llm.get_tokenizer()
    if chat_template and getattr(tok, "chat_template", None):
        queries = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in queries]
    with _lock:
        outputs = llm.generate(queries, vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens),
                               use_tqdm=False)
    return [o.outputs[0].text for o in outputs]


def generate_replies(model: str, queries: list[str], *, max_new_tokens: int, batch_size: int, device: str,
                     chat_template: bool, backend: str = "auto", gpu_memory_utilization: float = 0.2) -> list[str]:
    """The judge's greedy reply to each query: vLLM (`use_vllm`) or transformers ``generate``."""
    if use_vllm(backend):
        return _vllm_replies(model, queries, max_new_tokens, gpu_memory_utilization, chat_template)
    import torch

    tok, lm = _load(model, device, Path(model).stat().st_mtime_ns)
    if chat_template and tok.chat_template:
        queries = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in queries]
    replies: list[str] = []
    with _lock, torch.inference_mode():
        for start in range(0, len(queries), batch_size):
            enc = tok(queries[start:start + batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=not chat_template or not tok.chat_template).to(lm.device)
            out = lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            replies += tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return replies


@REWARDS.register("judge")
def judge(completions: list[str], prompts: list[Any] | None = None, *, model: str, rubric: str = DEFAULT_RUBRIC,
          pattern: str = DEFAULT_PATTERN, max_score: float = 10.0, max_new_tokens: int = 16, batch_size: int = 8,
          device: str = "auto", chat_template: bool = True, backend: str = "auto",
          gpu_memory_utilization: float = 0.2, stats: RewardStats | None = None, **kwargs: Any) -> list[float]:
    """The judge's score of each completion in [0, 1]: ``rubric`` filled with the prompt and the completion,
    answered greedily by the causal LM folder ``model``, parsed with ``pattern`` and divided by ``max_score``.
    A reply without a score in [0, max_score] scores 0 (counted as unparseable)."""
    prompts = list(prompts) if prompts is not None else [None] * len(completions)
    queries = [rubric.replace("{prompt}", prompt_text(p)).replace("{completion}", c)  # not str.format: a
               for p, c in zip(prompts, completions, strict=True)]                  # completion may hold braces
    replies = generate_replies(model, queries, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                               chat_template=chat_template, backend=backend,
                               gpu_memory_utilization=gpu_memory_utilization)
    out = []
    for reply in replies:
        value = parse_score(reply, pattern, max_score)
        if value is None:
            if stats is not None:
                stats.record("judge", UNPARSEABLE)
            if UNPARSEABLE not in _warned:
                _warned.add(UNPARSEABLE)
                log.warning("reward 'judge': no score in [0, %g] in the judge's reply %r; scoring it 0 (counted as "
                            "unparseable)", max_score, reply[:200])
        out.append(0.0 if value is None else value)
    return out


def _check_params(params: dict[str, Any]) -> None:
    """Refuse what would fail at the first call: a model that is no folder, a rubric without {completion}."""
    model = params.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError(f"reward 'judge': model must be a model folder, got {model!r}")
    if "${" in model:  # the pipeline substitutes `${stages.<name>.model}` in a stage's `model:`, not in params
        raise ValueError(f"reward 'judge': model {model!r}: a stage reference is not resolved in reward params; "
                         "give the judge's folder path")
    if not (Path(model) / "config.json").is_file():
        raise ValueError(f"reward 'judge': model folder {model!r} not found (no config.json there)")
    archs = json.loads((Path(model) / "config.json").read_text()).get("architectures") or []
    if any(not str(a).endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise ValueError(f"reward 'judge': model {model!r} is a {archs[0]}, not a causal LM that can answer a "
                         "rubric (a reward model? score with the reward_model reward)")
    rubric = params.get("rubric", DEFAULT_RUBRIC)
    if not isinstance(rubric, str) or "{completion}" not in rubric:
        raise ValueError("reward 'judge': rubric must be a string with {completion} (and usually {prompt}) in it")
    for key in ("max_score", "max_new_tokens", "batch_size"):
        value = params.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"reward 'judge': {key} must be a positive number, got {value!r}")
    for key in ("max_new_tokens", "batch_size"):
        if not isinstance(params.get(key, 1), int):
            raise ValueError(f"reward 'judge': {key} must be a whole number, got {params[key]!r}")
    if params.get("device", "auto") not in ("auto", "cpu") and not str(params.get("device")).startswith("cuda"):
        raise ValueError(f"reward 'judge': device must be auto, cpu or cuda[:N], got {params['device']!r}")
    if params.get("backend", "auto") not in ("auto", "transformers", "vllm"):
        raise ValueError(f"reward 'judge': backend must be auto, transformers or vllm, got {params['backend']!r}")
    if params.get("backend") == "vllm":
        import sys
        import importlib.util

        if "vllm" not in sys.modules and importlib.util.find_spec("vllm") is None:
            raise ValueError("reward 'judge': backend vllm needs vllm (pip install .[gpu], on a CUDA machine); "
                             "backend auto uses transformers without it")
    share = params.get("gpu_memory_utilization", 0.2)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"reward 'judge': gpu_memory_utilization must be in (0, 1], got {share!r}")


judge.check_params = _check_params  # builtin.check_params calls it after the generic checks
