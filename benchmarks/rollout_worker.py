"""One rollout side on the GPU: `python -m benchmarks.rollout_worker hf|vllm` prints {"tokens_per_second": x}.
Greedy decoding of 64 new tokens for 256 world prompts from world-sft; tokens counted as generated ids."""
from __future__ import annotations

import json
import sys
import time

PROMPTS, NEW_TOKENS = 256, 64


def _prompts(tok) -> list[str]:
    from posttrain.world import task_file

    rows = [json.loads(line) for line in task_file("arithmetic", "test", lambda m: None).read_text().splitlines()]
    chats = [[{"role": "user", "content": r["prompt"]}] for r in rows[:PROMPTS]]
    return [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]


def main(backend: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models import resolve_model

    model_dir = resolve_model("world-sft", lambda m: None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = _prompts(tok)
    if backend == "vllm":
        from vllm import LLM, SamplingParams

        llm = LLM(model=model_dir, gpu_memory_utilization=0.3, seed=0)
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
        tok.padding_side = "left"
        batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to("cuda")
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    print(json.dumps({"tokens_per_second": tokens / (time.perf_counter() - start)}))


if __name__ == "__main__":
    main(sys.argv[1])
