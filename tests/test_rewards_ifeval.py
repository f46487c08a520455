"""The `ifeval` reward: every check of both spec formats scores a right completion 1 and a wrong one 0; rows
without an IF spec score None (TRL leaves None out); unknown checks and bad specs score 0 and are counted."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from posttrain.rewards import RewardSpec, RewardStats, build_reward_funcs
from posttrain.rewards import ifeval as ifeval_mod

ESSAY = "The sea is wide. It is deep and blue! Who has seen its end?"
THREE = "First part.\n* * *\nSecond part.\n* * *\nThird part."

# open-instruct's format: (func_name, arguments, a completion that follows it, one that does not)
OPEN_INSTRUCT = [
    ("verify_keywords", {"keyword_list": ["sea", "Blue"]}, ESSAY, "The sky is blue."),
    ("verify_keyword_frequency", {"word": "sea", "N": 2}, "The sea, the Sea.", "The sea and seas."),
    ("validate_forbidden_words", {"forbidden_words": ["storm"]}, ESSAY, "A stormy sea."),
    ("verify_letter_frequency", {"letter": "a", "N": 3}, "A banana", "a banana"),  # case-sensitive: 3 vs 4
    ("validate_response_language", {"language": "de"}, "Das Meer ist heute sehr ruhig und wunderschön blau.",
     "The sea is very calm and beautifully blue today."),
    ("verify_paragraph_count", {"N": 3}, THREE, "First part.\n* * *\nSecond part."),
    ("validate_word_constraint", {"N": 5, "quantifier": "at most"}, "Short and sweet.", "This one has six words here."),
    ("verify_sentence_constraint", {"N": 3, "quantifier": "at least"}, ESSAY, "One sentence only."),
    ("validate_paragraphs", {"N": 2, "first_word": "then", "i": 2}, "It began.\n\nThen it ended.",
     "It began.\n\nAnd then it ended."),
    ("verify_postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. Bring a towel.", "Hello. No postscript."),
    ("validate_placeholders", {"N": 2}, "Dear [name], at [address].", "Dear [name]."),
    ("verify_bullet_points", {"N": 2}, "* one\n* two", "* one\n* two\n* three"),
    ("validate_title", {}, "<<Ode to the Sea>>\nWaves.", "Ode to the Sea\nWaves."),
    ("validate_choice", {"options": "('My answer is yes.', 'My answer is no.')"}, "My answer is no.", "Maybe."),
    ("validate_highlighted_sections", {"N": 2}, "*one* and **two**", "*one* only"),
    ("validate_sections", {"N": 2, "section_splitter": "Section"}, "Section 1\nA\nSECTION 2\nB", "Section 1\nA"),
    ("validate_json_format", {}, '{"a": 1}', "a: 1"),
    ("validate_repeat_prompt", {"original_prompt": "Write a poem."}, "Write a poem. Roses...", "Sure! Roses..."),
    ("validate_two_responses", {}, "Yes.\n******\nNo.", "Yes.\n******\nYes."),
    ("validate_uppercase", {}, "ALL CAPS HERE.", "Not all caps."),
    ("validate_lowercase", {}, "all lower here.", "Not all lower."),
    ("validate_frequency_capital_words", {"N": 2, "quantifier": "at least"}, "BIG and HUGE", "BIG and huge"),
    ("validate_end", {"end_phrase": "Any questions?"}, "Done. Any questions?\n", "Any questions? Done."),
    ("validate_quotation", {}, '"Quoted."', 'Quoted."'),
    ("validate_no_commas", {}, "No commas here.", "Commas, here."),
]

# IFEval / lm-eval's format: (instruction id, kwargs, right, wrong)
IFEVAL = [
    ("keywords:existence", {"keywords": ["sea"]}, ESSAY, "Sky."),
    ("keywords:frequency", {"keyword": "sea", "frequency": 2, "relation": "less than"}, "A sea.", "Sea and seas."),
    ("keywords:forbidden_words", {"forbidden_words": ["storm"]}, "A stormy sea.", "A storm at sea."),  # whole words
    ("keywords:letter_frequency", {"letter": "a", "let_frequency": 4, "let_relation": "at least"}, "A banana",
     "a bnn"),
    ("language:response_language", {"language": "en"}, "The sea is very calm and beautifully blue today.",
     "Das Meer ist heute sehr ruhig und wunderschön blau."),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "One.", ESSAY),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\nTwo.", THREE),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "one two three", "one two"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "hi"},
     '"Hi," she said.\n\nBye.', "Hello.\n\nBye."),
    ("detectable_content:number_placeholders", {"num_placeholders": 1}, "At [place].", "At home."),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\np. p. s. more", "Hi. P.S. more"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 1}, "- only one", "**bold**\ntext"),
    ("detectable_format:constrained_response", {}, "My answer is maybe.", "Perhaps."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "an *important* word", "no ** here"),
    ("detectable_format:multiple_sections", {"section_spliter": "Part", "num_sections": 2}, "PART 1 a PART 2 b",
     "PART 1 a"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', '{"a": 1'),
    ("detectable_format:title", {}, "<<Title>> text", "<< >> text"),
    ("combination:two_responses", {}, "A.\n******\nB.\n", "A.\n******\n******\nB."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say HI. hi!", "Hi! Say hi."),
    ("startend:end_checker", {"end_phrase": "The end."}, 'Story. the END."', "The end. Story."),
    ("startend:quotation", {}, ' "Quoted." ', '"'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"}, "ONE two",
     "ONE TWO"),
    ("change_case:english_capital", {}, "THE SEA IS VERY CALM AND BEAUTIFULLY BLUE TODAY.",
     "DAS MEER IST HEUTE SEHR RUHIG UND WUNDERSCHÖN BLAU."),
    ("change_case:english_lowercase", {}, "the sea is very calm and beautifully blue today.",
     "The sea is very calm and beautifully blue today."),
    ("punctuation:no_comma", {}, "No commas.", "A, b."),
]


def _score(answers: list, completions: list[str], **params) -> tuple[list, RewardStats]:
    stats = RewardStats()
    (func,), _ = build_reward_funcs([{"name": "ifeval", "params": params}], stats)
    return func(prompts=[None] * len(completions), completions=completions, answer=answers), stats


def test_every_check_of_both_formats_is_mapped():
    assert len(ifeval_mod.OPEN_INSTRUCT) == 25 and len(ifeval_mod.IFEVAL) == 25
    assert {c[0] for c in OPEN_INSTRUCT} == set(ifeval_mod.OPEN_INSTRUCT)
    assert {c[0] for c in IFEVAL} == set(ifeval_mod.IFEVAL)
    # one to one: the two formats name the same 25 checks
    assert {c for c, _, _ in ifeval_mod.OPEN_INSTRUCT.values()} == {c for c, _, _ in ifeval_mod.IFEVAL.values()}


@pytest.mark.parametrize("fmt", ["open_instruct", "ifeval"])
def test_right_completions_score_1_and_wrong_ones_0(fmt):
    cases = OPEN_INSTRUCT if fmt == "open_instruct" else IFEVAL
    answers, completions = [], []
    for name, args, right, wrong in cases:
        if fmt == "open_instruct":  # as the dataset stores it: a JSON string, every argument key, None unused
            spec = json.dumps({"func_name": name, "N": None, "quantifier": None, **args})
        else:
            spec = {"instruction_id_list": [name], "kwargs": [{"unused_by_this_one": None, **args}]}
        answers += [spec, spec]
        completions += [right, wrong]
    scores, stats = _score(answers, completions)
    got = {name: (scores[2 * i], scores[2 * i + 1]) for i, (name, *_rest) in enumerate(cases)}
    assert got == {name: (1.0, 0.0) for name, *_rest in cases}
    assert stats.count() == 0


def test_ifeval_format_needs_every_instruction_or_scores_the_fraction():
    spec = {"instruction_id_list": ["punctuation:no_comma", "startend:quotation"], "kwargs": [{}, {}]}
    completions = ['"No commas."', '"Commas, yes."', "Commas, no quotes."]
    assert _score([spec] * 3, completions)[0] == [1.0, 0.0, 0.0]
    assert _score([json.dumps(spec)] * 3, completions, partial=True)[0] == [1.0, 0.5, 0.0]


def test_thinking_is_not_checked():
    spec = json.dumps({"func_name": "validate_no_commas"})
    assert _score([spec] * 2, ["<think>a, b, c</think><answer>No commas.</answer>", "<think>ok</think>A, b."])[0] \
        == [1.0, 0.0]


def test_rows_without_an_if_spec_score_none():
    answers = ["72", "\\frac{1}{2}", "{not json", json.dumps({"answer": 3}), 12, None]
    assert _score(answers, ["72"] * len(answers))[0] == [None] * len(answers)


def test_unknown_checks_and_bad_specs_score_0_and_are_counted():
    answers = [json.dumps({"func_name": "verify_rhymes"}),                                   # unknown check
               {"instruction_id_list": ["detectable_format:haiku"], "kwargs": [{}]},         # unknown IFEval id
               json.dumps({"func_name": "verify_bullet_points"}),                            # N missing
               json.dumps({"func_name": "validate_word_constraint", "N": 3, "quantifier": "roughly"}),
               json.dumps({"func_name": "validate_no_commas", "N": 3}),                      # an argument it takes not
               {"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}]       # ids and kwargs unpaired
    scores, stats = _score(answers, ["fine"] * len(answers))
    assert scores == [0.0] * len(answers)
    assert stats.count("unknown_check", "ifeval") == 2 and stats.count("bad_spec", "ifeval") == 4


def test_the_spec_column_is_a_param():
    spec = json.dumps({"func_name": "validate_no_commas"})
    stats = RewardStats()
    (func,), _ = build_reward_funcs([{"name": "ifeval", "params": {"column": "constraint"}}], stats)
    scores = func(prompts=[None] * 2, completions=["ok", "o, k"], answer=["72", "72"], constraint=[spec] * 2)
    assert scores == [1.0, 0.0]
    assert func(prompts=[None], completions=["ok"], answer=[spec]) == [0.0]  # no such column: the batch fails,
    assert stats.count("exception", "ifeval") == 1                          # counted, as any reward failure


def test_language_checks_without_langdetect_score_none_and_are_counted(monkeypatch):
    monkeypatch.setattr(ifeval_mod.C, "langdetect", None)
    scores, stats = _score([json.dumps({"func_name": "validate_response_language", "language": "en"})], ["Hi."])
    assert scores == [None] and stats.count("unavailable", "ifeval") == 1


@pytest.mark.parametrize("params, says", [
    ({"column": ""}, "column must be a column name"),
    ({"partial": "yes"}, "partial must be true or false"),
    ({"colum": "x"}, "did you mean 'column'"),
])
def test_bad_params_are_one_line_errors(params, says):
    with pytest.raises(ValidationError) as e:
        RewardSpec(name="ifeval", params=params)
    msg = e.value.errors()[0]["msg"]
    assert says in msg and "\n" not in msg


def test_a_spec_column_the_data_lacks_is_refused_before_training():
    """GRPO and RLOO check the rewards' columns once the prompts are read: a missing ifeval column failed at
    every batch, one traceback per call."""
    from posttrain.data import DataError
    from posttrain.rewards import RewardSpec
    from posttrain.stages.grpo_support import check_reward_columns

    with pytest.raises(DataError, match=r"rewards: ifeval reads column 'answer', which the data does not have"):
        check_reward_columns([RewardSpec(name="ifeval")], ["prompt", "constraint"])
    check_reward_columns([RewardSpec(name="ifeval", params={"column": "constraint"}),
                          RewardSpec(name="numeric_match")], ["prompt", "constraint"])
