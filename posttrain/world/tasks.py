"""Seeded task data for the embedded world: every row is a pure function of (task, seed, index).

Tasks and what each is for:
  arithmetic   two-digit addition and subtraction, exact-match generation (a skill that SFT lifts)
  reversal     reverse a short letter string, exact-match generation
  facts        synthetic knowledge base (entity -> attribute), multiple choice by log-likelihood; the base
               learns these facts in pretraining, so later stages can only keep or forget them
  style        preference pairs: the chosen answer opens with "Certainly! " and ends with a full sentence,
               the rejected one is a bare answer (for DPO); the style score is the share of answers that open so
  verifiable   the arithmetic numbers phrased "Compute a + b.", answers a program checks (for GRPO)

Rows for generation tasks: {"id", "prompt", "answer", "messages"}; facts add {"choices", "label"};
style rows are {"id", "prompt", "chosen", "rejected"}.
"""
from __future__ import annotations

import random
from typing import Callable

SPLITS = {"train": 2000, "dev": 100, "test": 200}
STYLE_SPLITS = {"train": 520, "dev": 50, "test": 100}
STYLE_TEMPLATES = (
    "Tell me the {a} of {e}.",
    "Please describe the {a} of {e}.",
    "I would like to know the {a} of {e}.",
    "Say what {a} {e} has.",
)
TASKS = ("arithmetic", "reversal", "facts", "style", "verifiable")

_SYL = ["ka", "lo", "mi", "ze", "ru", "ta", "vo", "ni", "sa", "qu", "de", "fi", "po", "xe", "bu", "gar"]
ATTRIBUTES = {
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
    "city": ["Avalon", "Brindle", "Corvo", "Dunmore", "Elara", "Fenwick", "Galt", "Harrow"],
    "animal": ["fox", "owl", "bear", "wolf", "hare", "lynx", "crow", "seal"],
}
N_ENTITIES = 60
# Pretraining corpus mix (lines per kind). Facts need many exposures in a 1M-parameter model and the
# arithmetic lines, many and high-entropy, crowd them out: with 6000 arithmetic lines and facts asked only in
# prose, the base answered fact questions at chance (world v2); with this mix it knows ~85% of them.
PRETRAIN = {"arithmetic": 2500, "reversal": 400, "arithmetic_chats": 300, "reversal_chats": 100,
            "verifiable_chats": 100, "fact_prose": 2, "fact_chats": 8}


def entities() -> list[str]:
    rng = random.Random(1234)
    names: list[str] = []
    while len(names) < N_ENTITIES:
        name = "".join(rng.choice(_SYL) for _ in range(3)).capitalize()
        if name not in names:
            names.append(name)
    return names


def facts_table() -> dict[tuple[str, str], str]:
    """(entity, attribute) -> value, fixed for the world's version."""
    rng = random.Random(4321)
    return {(e, a): rng.choice(vals) for e in entities() for a, vals in ATTRIBUTES.items()}


def chat(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _gen_row(prompt: str, answer: str) -> dict:
    return {"prompt": prompt, "answer": answer, "messages": chat(prompt, answer)}


def operands(rng: random.Random) -> tuple[int, int]:
    """A two-digit and a one-digit number: multi-digit with carries and borrows, yet learnable on a CPU."""
    return rng.randint(10, 99), rng.randint(1, 9)


def arithmetic(rng: random.Random) -> dict:
    a, b = operands(rng)
    if rng.random() < 0.5:
        return _gen_row(f"What is {a} + {b}?", str(a + b))
    return _gen_row(f"What is {a} - {b}?", str(a - b))


def reversal(rng: random.Random) -> dict:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))
    return _gen_row(f"Reverse the letters: {word}", word[::-1])


def verifiable(rng: random.Random) -> dict:
    # The arithmetic task's numbers in another phrasing: the SFT model solves some (about 40% greedy), so
    # GRPO's group rewards carry signal; with "a * b +- c" (world v2) it solved ~0.1% and RL had nothing.
    a, b = operands(rng)
    op = rng.choice(["+", "-"])
    return _gen_row(f"Compute {a} {op} {b}.", str(a + b if op == "+" else a - b))


def fact_question(entity: str, attribute: str) -> str:
    return f"What is the {attribute} of {entity}?"


def facts_rows() -> list[dict]:
    """Every (entity, attribute) pair once, shuffled; splits partition this list."""
    table = facts_table()
    rows = []
    for (entity, attribute), value in table.items():
        choices = ATTRIBUTES[attribute]
        prompt = fact_question(entity, attribute)
        rows.append({**_gen_row(prompt, value), "choices": choices, "label": choices.index(value)})
    random.Random(99).shuffle(rows)
    return rows


def style(rng: random.Random) -> dict:
    table = facts_table()
    entity, attribute = rng.choice(sorted(table))
    value = table[(entity, attribute)]
    prompt = rng.choice(STYLE_TEMPLATES).format(a=attribute, e=entity)
    return {
        "prompt": prompt,
        "chosen": f"Certainly! The {attribute} of {entity} is {value}.",
        "rejected": value,
    }


_GENERATORS: dict[str, Callable[[random.Random], dict]] = {
    "arithmetic": arithmetic,
    "reversal": reversal,
    "verifiable": verifiable,
    "style": style,
}


def make_splits(task: str, seed: int = 0) -> dict[str, list[dict]]:
    """Return {split: rows}. Prompts never repeat across splits, so dev/test are held out."""
    if task == "facts":
        rows = facts_rows()  # 180 facts: 100 train / 30 dev / 50 test
        cut = {"train": rows[:100], "dev": rows[100:130], "test": rows[130:]}
        return {s: [{"id": f"facts-{s}-{i}", **r} for i, r in enumerate(rs)] for s, rs in cut.items()}
    gen = _GENERATORS[task]
    rng = random.Random(f"{task}-{seed}")
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    # test and dev are drawn first so that a bigger train split never changes them
    sizes = STYLE_SPLITS if task == "style" else SPLITS
    for split in ("test", "dev", "train"):
        rows: list[dict] = []
        tries = 0
        while len(rows) < sizes[split] and tries < sizes[split] * 200:
            tries += 1
            row = gen(rng)
            if row["prompt"] in seen:
                continue
            seen.add(row["prompt"])
            rows.append({"id": f"{task}-{split}-{len(rows)}", **row})
        out[split] = rows
    return out


def pretraining_texts(seed: int = 0) -> list[str]:
    """The base's corpus: every fact stated in prose, plain-text sums and reversals, and a little chat.

    The chat share is small on purpose: the base should know the format and some answers, far from all,
    so that SFT shows a gain and later stages can show forgetting.
    """
    rng = random.Random(f"pretrain-{seed}")
    texts = []
    for (entity, attribute), value in facts_table().items():
        texts += [f"The {attribute} of {entity} is {value}."] * PRETRAIN["fact_prose"]
        texts.append(f"{entity} has the {attribute} {value}.")
    for _ in range(PRETRAIN["arithmetic"]):
        a, b = operands(rng)
        texts.append(f"{a} + {b} = {a + b}." if rng.random() < 0.5 else f"{a} - {b} = {a - b}.")
    for _ in range(PRETRAIN["reversal"]):
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))
        texts.append(f"{w} reversed is {w[::-1]}.")
    return texts


def pretraining_chats(seed: int = 0) -> list[list[dict[str, str]]]:
    """A few chat turns per task drawn apart from the task splits (other seed), to teach the format."""
    rng = random.Random(f"pretrain-chat-{seed}")
    chats = [arithmetic(rng)["messages"] for _ in range(PRETRAIN["arithmetic_chats"])]
    chats += [reversal(rng)["messages"] for _ in range(PRETRAIN["reversal_chats"])]
    chats += [verifiable(rng)["messages"] for _ in range(PRETRAIN["verifiable_chats"])]
    # Every fact also as a question and answer: a 1M-parameter model does not carry a fact from prose into
    # answers by itself (world v2 asked facts it had only read in prose: chance level).
    for (entity, attribute), value in sorted(facts_table().items()):
        chats += [chat(fact_question(entity, attribute), value)] * PRETRAIN["fact_chats"]
    return chats
