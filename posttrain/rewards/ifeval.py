"""``ifeval``: a verifiable reward for instruction-following constraints (IFEval, Zhou et al. 2023, arXiv
2311.07911), as TÜLU 3's RLVR (Lambert et al. 2024, arXiv 2411.15124) scores its IF rows.

The constraint is read from a data column (``column``, default ``answer``) and comes in either of two formats:

* open-instruct's (``IFEvalVerifierOld`` in open_instruct/ground_truth_utils.py, the format of
  allenai/RLVR-GSM-MATH-IF-Mixed-Constraints' ``ground_truth``): a JSON object (or its string) with ``func_name``,
  one of the 25 functions of open_instruct/if_functions.py, and that function's arguments; None-valued
  arguments are dropped, as there. Scores 1 or 0.
* Google's IFEval / lm-eval's (``{"instruction_id_list": [...], "kwargs": [...]}``; ``instruction_id`` is
  accepted too, as open-instruct's newer ``IFEvalVerifier`` writes it): every instruction must hold, scoring 1
  or 0 (lm-eval's strict prompt-level accuracy); with ``partial: true``, the fraction that hold (open-instruct's
  newer verifier).

Both map one to one onto the checks in ``ifeval_checks.py`` (``OPEN_INSTRUCT`` and ``IFEVAL`` below; the
25 IFEval ids of lm-eval's registry and open-instruct's 25 functions name the same 25 checks), with these
semantics per format where the two sources differ: keyword frequency (open-instruct: whole words, exactly N;
IFEval: substrings, less than / at least), forbidden words (substring / whole word), letter frequency
(case-sensitive, exactly / case-insensitive, less than / at least), the paragraph divider (``* * *`` / ``***``),
JSON (bare / a code fence allowed), repeat-prompt and end phrase (exact / ignoring case), all-capitals and
all-lowercase (any text / English only). The other checks are the same in both; ``ifeval_checks.py`` says where
a check departs from one source or both.

Departures: the completion is read after its last ``</think>`` with ``<answer>`` tags removed (open-instruct's
``remove_thinking_section``). A row whose column holds no IF spec (a GSM8K number, a MATH expression) scores
None: TRL's GRPOTrainer turns None into NaN and leaves it out (``nansum`` over rewards, ``nanmean`` for the
logged mean), so math rows get their signal from the math reward alone. An unknown check or bad arguments score
0 and are counted (``rewards/errors/ifeval/unknown_check``, ``.../bad_spec``); open-instruct raises on both. A
language check without langdetect scores None, counted as ``unavailable`` and warned about once.
"""
from __future__ import annotations

import ast
import inspect
import json
import logging
import threading
from typing import Any, Callable

from posttrain.registry import REWARDS
from posttrain.rewards import ifeval_checks as C
from posttrain.rewards.stats import RewardStats

log = logging.getLogger(__name__)

UNKNOWN_CHECK, BAD_SPEC, UNAVAILABLE = "unknown_check", "bad_spec", "unavailable"

# name -> (check, {argument in the spec: the check's parameter}, options fixed for this format)
Mapping = dict[str, tuple[Callable[..., bool], dict[str, str], dict[str, Any]]]

OPEN_INSTRUCT: Mapping = {
    "verify_keywords": (C.keywords_present, {"keyword_list": "keywords"}, {}),
    "verify_keyword_frequency": (C.keyword_count, {"word": "word", "N": "n"}, {}),
    "validate_forbidden_words": (C.no_forbidden_words, {"forbidden_words": "words"}, {}),
    "verify_letter_frequency": (C.letter_count, {"letter": "letter", "N": "n"}, {}),
    "validate_response_language": (C.in_language, {"language": "language"}, {}),
    "verify_paragraph_count": (C.paragraph_count, {"N": "n"}, {"divider": "* * *"}),
    "validate_word_constraint": (C.word_count, {"N": "n", "quantifier": "relation"}, {}),
    "verify_sentence_constraint": (C.sentence_count, {"N": "n", "quantifier": "relation"}, {}),
    "validate_paragraphs": (C.nth_paragraph_first_word, {"N": "n", "i": "nth", "first_word": "first_word"}, {}),
    "verify_postscript": (C.has_postscript, {"postscript_marker": "marker"}, {}),
    "validate_placeholders": (C.placeholders, {"N": "n"}, {}),
    "verify_bullet_points": (C.bullet_count, {"N": "n"}, {}),
    "validate_title": (C.has_title, {}, {}),
    "validate_choice": (C.one_of, {"options": "options"}, {}),
    "validate_highlighted_sections": (C.highlighted, {"N": "n"}, {}),
    "validate_sections": (C.sections, {"N": "n", "section_splitter": "splitter"}, {}),
    "validate_json_format": (C.is_json, {}, {}),
    "validate_repeat_prompt": (C.repeats_prompt, {"original_prompt": "prompt"}, {}),
    "validate_two_responses": (C.two_responses, {}, {}),
    "validate_uppercase": (C.all_case, {}, {"upper": True}),
    "validate_lowercase": (C.all_case, {}, {"upper": False}),
    "validate_frequency_capital_words": (C.capital_words, {"N": "n", "quantifier": "relation"}, {}),
    "validate_end": (C.ends_with, {"end_phrase": "phrase"}, {}),
    "validate_quotation": (C.quoted, {}, {}),
    "validate_no_commas": (C.no_commas, {}, {}),
}

IFEVAL: Mapping = {
    "keywords:existence": (C.keywords_present, {"keywords": "keywords"}, {}),
    "keywords:frequency": (C.keyword_count, {"keyword": "word", "frequency": "n", "relation": "relation"},
                           {"whole_word": False}),
    "keywords:forbidden_words": (C.no_forbidden_words, {"forbidden_words": "words"}, {"whole_word": True}),
    "keywords:letter_frequency": (
        C.letter_count, {"letter": "letter", "let_frequency": "n", "let_relation": "relation"}, {"ignore_case": True}),
    "language:response_language": (C.in_language, {"language": "language"}, {}),
    "length_constraints:number_sentences": (C.sentence_count, {"num_sentences": "n", "relation": "relation"}, {}),
    "length_constraints:number_paragraphs": (C.paragraph_count, {"num_paragraphs": "n"}, {"divider": "***"}),
    "length_constraints:number_words": (C.word_count, {"num_words": "n", "relation": "relation"}, {}),
    "length_constraints:nth_paragraph_first_word": (
        C.nth_paragraph_first_word, {"num_paragraphs": "n", "nth_paragraph": "nth", "first_word": "first_word"}, {}),
    "detectable_content:number_placeholders": (C.placeholders, {"num_placeholders": "n"}, {}),
    "detectable_content:postscript": (C.has_postscript, {"postscript_marker": "marker"}, {}),
    "detectable_format:number_bullet_lists": (C.bullet_count, {"num_bullets": "n"}, {}),
    "detectable_format:constrained_response": (  # IFEval's fixed options (lm-eval's _CONSTRAINED_RESPONSE_OPTIONS)
        C.one_of, {}, {"options": ["My answer is yes.", "My answer is no.", "My answer is maybe."]}),
    "detectable_format:number_highlighted_sections": (C.highlighted, {"num_highlights": "n"}, {}),
    "detectable_format:multiple_sections": (C.sections, {"section_spliter": "splitter", "num_sections": "n"}, {}),
    "detectable_format:json_format": (C.is_json, {}, {"fences": True}),
    "detectable_format:title": (C.has_title, {}, {}),
    "combination:two_responses": (C.two_responses, {}, {}),
    "combination:repeat_prompt": (C.repeats_prompt, {"prompt_to_repeat": "prompt"}, {"ignore_case": True}),
    "startend:end_checker": (C.ends_with, {"end_phrase": "phrase"}, {"loose": True}),
    "startend:quotation": (C.quoted, {}, {}),
    "change_case:capital_word_frequency": (C.capital_words, {"capital_frequency": "n", "capital_relation": "relation"},
                                           {}),
    "change_case:english_capital": (C.all_case, {}, {"upper": True, "english": True}),
    "change_case:english_lowercase": (C.all_case, {}, {"upper": False, "english": True}),
    "punctuation:no_comma": (C.no_commas, {}, {}),
}

_warned: set[str] = set()
_warn_lock = threading.Lock()


class SpecError(ValueError):
    """A spec names a check this reward does not have (``kind`` unknown_check) or gives it bad arguments."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def parse_spec(value: Any) -> dict | None:
    """The IF spec in a column value (a dict, its JSON, or a one-item list of either), or None when the value
    is not one (a number, a LaTeX answer, a JSON object with neither ``func_name`` nor ``instruction_id_list``)."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        if not value.lstrip().startswith("{"):
            return None
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, dict):
        return None
    return value if {"func_name", "instruction_id_list", "instruction_id"} & value.keys() else None


def answer_text(completion: str) -> str:
    """The part of a completion that is checked: after its last ``</think>``, without ``<answer>`` tags."""
    text = completion.split("</think>")[-1]
    return text.replace("<answer>", "").replace("</answer>", "").strip()


def _options(value: Any) -> list[str]:
    """validate_choice's options as a list; a string that writes a list or tuple is read as one (a bare
    string would otherwise be iterated character by character)."""
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        return [str(o) for o in parsed] if isinstance(parsed, (list, tuple)) else [value]
    return [str(o) for o in value]


def run_check(table: Mapping, name: str, args: dict[str, Any] | None, text: str) -> bool:
    """Check ``text`` against ``table[name]`` with the spec's ``args`` (None values dropped). Raises SpecError."""
    if name not in table:
        raise SpecError(UNKNOWN_CHECK, f"unknown check {name!r}")
    check, rename, fixed = table[name]
    given = {k: v for k, v in (args or {}).items() if v is not None}
    unknown = sorted(set(given) - set(rename))
    if unknown:
        raise SpecError(BAD_SPEC, f"{name}: unexpected arguments {unknown}")
    call = {rename[k]: v for k, v in given.items()}
    if "options" in call:
        call["options"] = _options(call["options"])
    for key in ("keywords", "words"):  # one keyword written bare would be iterated letter by letter
        if isinstance(call.get(key), str):
            call[key] = [call[key]]
    params = inspect.signature(check).parameters
    missing = [p for p, spec in params.items() if p != "text" and spec.default is inspect.Parameter.empty
               and p not in call and p not in fixed]
    if missing:
        raise SpecError(BAD_SPEC, f"{name}: missing arguments {missing}")
    try:
        return bool(check(text, **call, **fixed))
    except C.Unavailable:
        raise
    except (TypeError, ValueError, AttributeError) as e:  # "N": "three", a relation it does not know, ...
        raise SpecError(BAD_SPEC, f"{name}: {e}") from None


def score(spec: dict, completion: str, partial: bool = False) -> float:
    """1.0 when ``completion`` follows the spec, else 0.0 (with ``partial``, an IFEval spec's fraction)."""
    text = answer_text(completion)
    if "func_name" in spec:
        args = {k: v for k, v in spec.items() if k != "func_name"}
        return float(run_check(OPEN_INSTRUCT, spec["func_name"], args, text))
    ids, kwargs = spec.get("instruction_id_list", spec.get("instruction_id")), spec.get("kwargs")
    if isinstance(ids, str):  # one instruction, written without the list
        ids, kwargs = [ids], [kwargs]
    ids = list(ids or [])
    kwargs = [{}] * len(ids) if kwargs is None else list(kwargs)
    if not ids or len(ids) != len(kwargs):
        raise SpecError(BAD_SPEC, f"instruction ids and kwargs do not pair up: {ids!r}, {len(kwargs)} kwargs")
    held = [run_check(IFEVAL, i, a, text) for i, a in zip(ids, kwargs)]
    return sum(held) / len(held) if partial else float(all(held))


def _count(stats: RewardStats | None, kind: str, detail: str) -> None:
    if stats is not None:
        stats.record("ifeval", kind)
    with _warn_lock:
        first = kind not in _warned
        _warned.add(kind)
    if first:  # once per kind and process: a bad spec repeats in every batch of its rows
        log.warning("reward 'ifeval': %s (%s); such rows score %s", detail, kind,
                    "None" if kind == UNAVAILABLE else 0)


@REWARDS.register("ifeval")
def ifeval(completions: list[str], *, column: str = "answer", partial: bool = False,
           stats: RewardStats | None = None, **kwargs: Any) -> list[float | None]:
    """Instruction following: 1.0 where the completion follows the IF constraint in ``column`` (open-instruct's
    ``func_name`` JSON or IFEval's ``instruction_id_list``; see the module docstring), None where that column
    holds no IF constraint (math rows), 0 where the constraint is unknown or malformed (counted)."""
    if column not in kwargs:
        raise ValueError(f"reward 'ifeval': the data has no column {column!r} (params.column)")
    out: list[float | None] = []
    for completion, value in zip(completions, kwargs[column], strict=True):
        spec = parse_spec(value)
        if spec is None:
            out.append(None)
            continue
        try:
            out.append(score(spec, completion, partial))
        except SpecError as e:
            _count(stats, e.kind, str(e))
            out.append(0.0)
        except C.Unavailable as e:
            _count(stats, UNAVAILABLE, str(e))
            out.append(None)
    return out


def _check_params(params: dict[str, Any]) -> None:
    if "column" in params and (not isinstance(params["column"], str) or not params["column"]):
        raise ValueError(f"reward 'ifeval': column must be a column name, got {params['column']!r}")
    if "partial" in params and not isinstance(params["partial"], bool):
        raise ValueError(f"reward 'ifeval': partial must be true or false, got {params['partial']!r}")


ifeval.check_params = _check_params  # builtin.check_params calls it after the generic checks
