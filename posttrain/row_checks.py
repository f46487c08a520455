"""The row shapes a stage's data must have, checked row by row (posttrain.data reads the rows and names the file
and the row of a bad one): `sft` (chat `messages`, or `prompt` and `completion`), `preference` (`prompt`,
`chosen`, `rejected`), `kto` (a preference pair, or KTO's unpaired `prompt`, `completion` and a true/false
`label`), `prompt` (`prompt` and a reference `answer`). Each check returns why a row is bad, or None.
"""
from __future__ import annotations

from typing import Any


ROLES = {"system", "user", "assistant", "tool"}


def _is_messages(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(m, dict) for m in v)


def _check_messages(v: Any, field: str) -> str | None:
    if not _is_messages(v):
        return f"'{field}' must be a non-empty list of {{role, content}} messages"
    for j, m in enumerate(v):
        if m.get("role") not in ROLES:
            return f"'{field}[{j}].role' must be one of {sorted(ROLES)}, got {m.get('role')!r}"
        if not isinstance(m.get("content"), str):
            return f"'{field}[{j}].content' must be a string"
    return None


def _check_text(row: dict, field: str, allow_messages: bool = True) -> str | None:
    if field not in row or row[field] is None:
        return f"missing column '{field}'"
    v = row[field]
    if allow_messages and isinstance(v, list):
        return _check_messages(v, field)
    if not isinstance(v, str):
        return f"'{field}' must be a string, got {type(v).__name__}"
    if not v.strip():
        return f"'{field}' is empty"
    return None


def check_sft(row: dict) -> str | None:
    if "messages" in row:
        err = _check_messages(row["messages"], "messages")
        if err:
            return err
        if not any(m["role"] == "assistant" and m["content"].strip() for m in row["messages"]):
            return "'messages' has no non-empty assistant turn"
        return None
    if "prompt" in row or "completion" in row:
        return _check_text(row, "prompt") or _check_text(row, "completion")
    return "missing column 'messages' (or 'prompt' and 'completion')"


def check_preference(row: dict) -> str | None:
    return _check_text(row, "prompt") or _check_text(row, "chosen") or _check_text(row, "rejected")


def check_prompt(row: dict) -> str | None:
    err = _check_text(row, "prompt")
    if err:
        return err
    if "answer" not in row or row["answer"] is None or str(row["answer"]).strip() == "":
        return "missing column 'answer'" if "answer" not in row else "'answer' is empty"
    return None


def check_kto(row: dict) -> str | None:
    """A preference pair, or an unpaired row (KTO's own format): `prompt`, `completion`, `label` true/false."""
    if "label" not in row:
        return check_preference(row)
    if not isinstance(row["label"], bool):
        return f"'label' must be true (desirable) or false (undesirable), got {row['label']!r}"
    return _check_text(row, "prompt") or _check_text(row, "completion")
