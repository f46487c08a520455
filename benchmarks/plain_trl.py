"""The raw side of the training figures: the TRL script a user would write without posttrain.

    python benchmarks/plain_trl.py sft|dpo <model folder> <train.jsonl> <args.json> <output dir>

It imports only TRL, transformers, datasets and torch, and passes TRL exactly the arguments posttrain's stage
passes for the same YAML (args.json, written by benchmarks/train.py). The last stdout line is TRL's own
train_runtime and step count as JSON, the same numbers posttrain's stage writes to train_result.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _rows(path: str, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if kind == "sft":
        return [{"messages": r["messages"]} for r in rows]
    # Preference pairs as chat, since the tokenizer has a chat template (what TRL's docs do for chat models).
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


def main(kind: str, model_dir: str, data: str, args_json: str, out: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = json.loads(Path(args_json).read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_list(_rows(data, kind))
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=out, **args), train_dataset=dataset,
                             processing_class=tokenizer)
    else:
        from trl import DPOConfig, DPOTrainer

        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        trainer = DPOTrainer(model=model, ref_model=ref, args=DPOConfig(output_dir=out, **args),
                             train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(str(Path(out) / "model"))
    print(json.dumps({"train_runtime": result.metrics["train_runtime"], "global_step": result.global_step}))


if __name__ == "__main__":
    main(*sys.argv[1:6])
