"""Assistant-token masks built from any chat template, for SFT with the loss on assistant turns only.

TRL marks the assistant tokens only in templates with `{% generation %}` markers, and swaps in a marked copy for
the templates it knows (`trl.chat_template_utils.get_training_chat_template`); everything else it refuses. Checked
before writing this: transformers' `return_assistant_tokens_mask` needs the same markers; open-instruct
(`sft_tulu_tokenize_and_truncate_v1`) masks by tokenizing conversation prefixes, as here, but never checks that a
prefix renders the same inside the whole conversation; LLaMA-Factory re-implements each family's template in
Python instead of reading the model's. So this module renders the model's own template and checks every prefix.

Which tokens of assistant message i are trained (the span TRL's marked templates train: the turn's content and its
end-of-turn tokens, e.g. `4<|im_end|>\\n` or `4<|eot_id|>`; not the role header, e.g. `<|im_start|>assistant\\n`):

    whole    = tokens of the whole conversation                       (what is trained on)
    prompt_i = tokens of messages[:i] with the generation prompt     (what the model is given at inference)
    turn_i   = tokens of messages[:i+1] after prompt_i               (the turn, written as the last one)

    prompt_i must be a prefix of whole and of messages[:i+1]'s tokens; the span starts after it and is turn_i
    where whole goes on with turn_i. Where whole writes the turn without a leading block of markup that the
    template writes only on the last turn (added-vocabulary tokens and whitespace: Qwen3's empty
    `<think>\\n\\n</think>\\n\\n`), the span is the turn as whole writes it. A template without a generation
    prompt leaves the role header to the model, so there the header is trained (the model must write it).

Anything else means the template rewrites an earlier turn once later messages follow (Qwen3 drops the reasoning of
assistant turns before the last user message; Mistral Nemo writes the system message only into a user turn that
ends the conversation, so it is there when prompting and gone from a conversation that ends with the answer), or
the tokenizer splits the text differently at a turn boundary: that conversation is refused, naming its turn, since
no span of `whole` is both what the model sees and what it would generate.
"""
from __future__ import annotations

from typing import Callable

from posttrain.data import DataError


class TemplateRewrite(ValueError):
    """Assistant message `turn` (its index in `messages`) has no span this module can mark; `why` says what differs."""

    def __init__(self, turn: int, why: str):
        super().__init__(f"messages[{turn}]: {why}")
        self.turn, self.why = turn, why


def _render(tokenizer, conversations: list[list[dict]], generation_prompt: bool) -> list[list[int]]:
    """Token ids of each conversation, tokenized as TRL's SFTTrainer does (`apply_chat_template`, no added
    special tokens: the template writes them)."""
    if not conversations:
        return []
    ids = tokenizer.apply_chat_template(
        conversations, tokenize=True, return_dict=False, add_generation_prompt=generation_prompt
    )
    return [list(x) for x in ids]


def _markup_ids(tokenizer) -> Callable[[int], bool]:
    """Whether a token is markup: in the added vocabulary (`<think>`, `<|im_end|>`) or whitespace. The added
    vocabulary is read on the first call only, as most conversations never ask."""
    added: set[int] = set()

    def markup(t: int) -> bool:
        if not added:
            added.update(tokenizer.get_added_vocab().values())
        return t in added or tokenizer.decode([t]).strip() == ""

    return markup


def _span(turn: list[int], rest: list[int], markup: Callable[[int], bool]) -> int | None:
    """Length of the turn's span at the start of `rest` (whole after the prompt), or None where whole writes the
    turn otherwise than as `turn` less a leading block of markup."""
    if rest[: len(turn)] == turn:
        return len(turn)
    for j in range(1, len(turn)):  # j leading tokens of the turn that whole leaves out
        if not markup(turn[j - 1]):
            return None
        if rest[: len(turn) - j] == turn[j:]:
            return len(turn) - j
    return None


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _snippet(tokenizer, ids: list[int], n: int = 12) -> str:
    text = tokenizer.decode(ids[:n]) + ("..." if len(ids) > n else "")
    return repr(text)


def assistant_tokens_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_masks) of one conversation under the tokenizer's chat template: 1 on the tokens of every
    assistant turn (content and end-of-turn tokens, the rule in the module docstring), 0 elsewhere.

    Raises TemplateRewrite naming the first assistant turn the template writes differently once later messages
    follow (or whose prompt does not tokenize as a prefix of the whole conversation)."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    ends = _render(tokenizer, [messages[: i + 1] for i in turns], generation_prompt=False)
    ends_whole = bool(turns) and turns[-1] == len(messages) - 1  # then the last of `ends` is the whole conversation
    whole = ends[-1] if ends_whole else _render(tokenizer, [messages], generation_prompt=False)[0]
    prompts = _render(tokenizer, [messages[:i] for i in turns], generation_prompt=True)
    markup = _markup_ids(tokenizer)
    mask = [0] * len(whole)
    for i, prompt, end in zip(turns, prompts, ends):
        start = len(prompt)
        for other in (whole, end):
            at = _common_prefix(prompt, other)
            if at < start:
                raise TemplateRewrite(i, (
                    "the conversation before this assistant turn does not tokenize the same when it prompts for the "
                    f"turn ({_snippet(tokenizer, prompt[at:])}) and when the turn follows "
                    f"({_snippet(tokenizer, other[at:])}), so its prompt is not a prefix of what is trained"))
        n = _span(end[start:], whole[start:], markup)
        if n is None:
            raise TemplateRewrite(i, (
                f"the chat template writes this turn as {_snippet(tokenizer, end[start:])} when it ends the "
                f"conversation and as {_snippet(tokenizer, whole[start:])} when later messages follow it "
                "(a template that rewrites earlier turns, e.g. dropping their reasoning)"))
        mask[start:start + n] = [1] * n
    return whole, mask


def mask_conversations(tokenizer, dataset, row_name: Callable[[int], str]):
    """`dataset` (a `datasets.Dataset` or IterableDataset with a `messages` column) tokenized as TRL takes it ready-made: `input_ids`
    and `assistant_masks` (TRL turns them into labels, -100 off the mask, then truncates to max_length). A row whose
    template rewrites an earlier turn is a DataError naming the row (`row_name(index)`) and the turn."""
    from jinja2 import TemplateError

    def tokenize(row: dict, index: int) -> dict:
        try:
            ids, mask = assistant_tokens_mask(tokenizer, row["messages"])
        except TemplateRewrite as e:
            raise DataError(
                f"{row_name(index)}: {e}; assistant-only loss cannot be marked there. Fix the row, set "
                "assistant_only_loss: false (loss on the whole conversation), or use a chat template with "
                "{% generation %} markers") from None
        except TemplateError as e:  # the template's own raise_exception, or a message it cannot read
            raise DataError(f"{row_name(index)}: the chat template cannot render it, or the conversation before "
                            f"one of its assistant turns ({e})") from None
        return {"input_ids": ids, "assistant_masks": mask}

    from datasets import Dataset

    # An IterableDataset (a streamed stage: posttrain.data_stream) maps lazily, as the trainer reads; its map()
    # takes no `desc`.
    shown = {"desc": "Assistant masks"} if isinstance(dataset, Dataset) else {}
    return dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names, **shown)


def source_row_names(data_stats: list[dict]) -> Callable[[int], str]:
    """Names row `index` of the concatenated SFT data by its source and its 1-based number among that source's
    kept rows: the file's row number where no bad row was skipped and no blank line comes before it (data.py keeps
    no row numbers past its checks). A streamed mix (posttrain.data_stream) is named by the row's place in it."""
    def name(index: int) -> str:
        if any(s["rows"] is None for s in data_stats):  # a stream: its rows' sources are not counted ahead
            return f"row {index + 1} of the streamed data, in the order read"
        for s in data_stats:
            if index < s["rows"]:
                kept = " among the rows kept" if s["bad_rows"] else ""
                return f"{s['source']} row {index + 1}{kept}"
            index -= s["rows"]
        return f"row {index + 1}"

    return name
