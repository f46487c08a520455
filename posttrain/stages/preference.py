"""Preference data as TRL's preference trainers take it (DPO pairs, KTO's unpaired rows), shared by those stages.

Rows are checked by posttrain.data (shape `preference`); here they become one `datasets.Dataset`: all chat
when the tokenizer has a chat template (a plain prompt becomes one user message, a plain answer one assistant
message, so the template applies exactly as at evaluation time), all plain text otherwise (TRL appends EOS to
the answers; conversational rows are refused).
"""
from __future__ import annotations

from typing import Any

from posttrain.data import DataError, DataSource, load_rows, load_sources
from posttrain.data_stream import message_features, role_and_content, stream_dataset, streamed
from posttrain.models import load_tokenizer
from posttrain.stages.replay import replay_rows


def _as_chat(value: Any, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def preference_rows(sources: list[DataSource], chat: bool, log, extra: tuple[list[dict], list[dict]] = ([], []),
                    seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Checked prompt/chosen/rejected rows of every source (then `extra`'s), all chat or all plain text, with
    per-source stats.

    Rows are normalised before any Dataset is built, since one Arrow column cannot hold both strings and
    message lists (a plain source mixed with a conversational one).
    """
    rows, stats = load_sources(sources, "preference", log, seed)  # seed: a source's fraction/rows sampling
    return as_chat_or_text(rows + extra[0], chat), stats + extra[1]


def as_chat_or_text(rows: list[dict], chat: bool) -> list[dict]:
    """Pairs (prompt/chosen/rejected) or KTO's unpaired rows (prompt/completion/label), all chat when `chat`
    (a plain prompt one user message, a plain answer one assistant message), else all plain text."""
    if chat:
        return [_strip_repeated_prompt({"prompt": _as_chat(r["prompt"], "user"),
                                        "chosen": _as_chat(r["chosen"], "assistant"),
                                        "rejected": _as_chat(r["rejected"], "assistant")}) if "chosen" in r else
                {"prompt": _as_chat(r["prompt"], "user"), "completion": _as_chat(r["completion"], "assistant"),
                 "label": r["label"]} for r in rows]
    if any(isinstance(v, list) for r in rows for v in r.values()):
        raise DataError("conversational preference rows need a tokenizer with a chat template; this one has none")
    return rows


def preference_dataset(sources: list[DataSource], chat: bool, log, extra: tuple[list[dict], list[dict]] = ([], []),
                       seed: int = 0) -> tuple[Any, list[dict]]:
    """`preference_rows` as one `datasets.Dataset` (DPOTrainer's input), plus per-source stats; an IterableDataset
    read row by row when a source streams (posttrain.data_stream; the kinds that take one: DPO)."""
    from datasets import Dataset

    if streamed(sources):
        return stream_dataset(sources, "preference", log, seed, extra, _pair_convert(chat),
                              message_features(chat, "prompt", "chosen", "rejected"))
    rows, stats = preference_rows(sources, chat, log, extra, seed)
    return Dataset.from_list(rows), stats


def preference_inputs(cfg: Any, ctx: Any, extra: tuple[list[dict], list[dict]] = ([], [])):
    """(tokenizer, seed, dataset, data stats) of a pairwise stage (dpo, orpo, simpo, reward): its `data:` pairs,
    the `replay:` pairs of earlier stages and `extra` (DPO's rehearsal), mixed with the stage's seed."""
    tokenizer = load_tokenizer(ctx.input_model, cfg.trust_remote_code)
    seed = cfg.seed_in(ctx)
    replayed = replay_rows(cfg.replay, "preference", ctx.log, seed)
    pairs = (extra[0] + replayed[0], extra[1] + replayed[1])
    dataset, data_stats = preference_dataset(cfg.data, bool(tokenizer.chat_template), ctx.log, pairs, seed)
    return tokenizer, seed, dataset, data_stats


def _pair_convert(chat: bool):
    """One streamed pair as `as_chat_or_text` makes it, or why it cannot be (a bad row)."""
    def convert(row: dict) -> dict | str:
        if not chat and any(isinstance(v, list) for v in row.values()):
            return "conversational, and the tokenizer has no chat template"
        out = as_chat_or_text([row], chat)[0]
        return {k: role_and_content(out[k]) for k in ("prompt", "chosen", "rejected")}

    return convert


def _strip_repeated_prompt(row: dict) -> dict:
    """Drop the prompt's messages from the start of chosen and rejected when both repeat them.

    TÜLU 3's preference mixture has a `prompt` column and chosen/rejected conversations that open with the same
    user turn; TRL tokenizes prompt + chosen, so the model would see the turn twice. This is the shared-prefix
    split TRL's `extract_prompt` makes for rows without a prompt column (checked first: it only runs there).
    """
    n = len(row["prompt"])
    if n and row["chosen"][:n] == row["prompt"] and row["rejected"][:n] == row["prompt"]:
        return {**row, "chosen": row["chosen"][n:], "rejected": row["rejected"][n:]}
    return row


def near_miss_pairs(sources: list[DataSource], log) -> tuple[list[dict], list[dict]]:
    """Prompt/answer rows as preference pairs: chosen = the answer, rejected = answer - 1, and again answer + 1.

    DPO's rehearsal pairs (`rehearsal:`). DPO only constrains the policy on the prompts it sees, so a skill the
    pairs never show drifts. As InstructGPT's PPO-ptx mixes pretraining gradients into RL (Ouyang et al. 2022),
    and as RPO trains on correct vs wrong math answers (Pang et al. 2024, arXiv 2404.19733), a verifiable task
    is mixed in as pairs. For integer answers (the world's arithmetic) the near miss is the error a perturbed
    model makes, so the DPO term widens exactly the margin that breaks and the NLL term on chosen rehearses the
    answer. Both near misses, not a seeded draw of one (docs/notes/dpo_world_tuning.md). A non-integer answer
    is refused, naming the source.
    """
    pairs: list[dict] = []
    stats: list[dict] = []
    for src in sources:
        rows, st = load_rows(src, "prompt", log)
        for i, row in enumerate(rows, start=1):
            answer = str(row["answer"]).strip()
            try:
                value = int(answer)
            except ValueError:
                raise DataError(f"{st['source']} row {i}: rehearsal answer {answer!r} is not an integer") from None
            pairs += [{"prompt": row["prompt"], "chosen": answer, "rejected": str(value + d)} for d in (-1, 1)]
        stats.append({**st, "rehearsal": True})
    return pairs, stats


def truncate_prompts(dataset: Any, max_prompt_length: int) -> tuple[Any, int]:
    """Keep the last `max_prompt_length` tokens of every tokenized prompt; returns (dataset, prompts cut)."""
    cut = sum(len(ids) > max_prompt_length for ids in dataset["prompt_ids"])
    if cut:
        dataset = dataset.map(lambda ex: {"prompt_ids": ex["prompt_ids"][-max_prompt_length:]})
    return dataset, cut


def prompt_cutter(max_prompt_length: int | None, log):
    """DPO's `max_prompt_length` as run_trl_stage's `prepare`: cut the trainer's tokenized prompts (None: none)."""
    if max_prompt_length is None:
        return None

    def cut_prompts(trainer: Any) -> None:
        from datasets import Dataset

        if not isinstance(trainer.train_dataset, Dataset):  # a stream: cut as it is read, so not counted ahead
            trainer.train_dataset = trainer.train_dataset.map(
                lambda ex: {"prompt_ids": ex["prompt_ids"][-max_prompt_length:]})
            log(f"dpo: keeping the last {max_prompt_length} tokens of longer prompts as the stream is read")
            return
        trainer.train_dataset, cut = truncate_prompts(trainer.train_dataset, max_prompt_length)
        if cut:
            log(f"dpo: kept the last {max_prompt_length} tokens of {cut} longer prompts")

    return cut_prompts
