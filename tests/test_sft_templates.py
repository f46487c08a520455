"""SFT on chat data and the tokenizer's chat template: conversational prompt/completion rows, no template (refused
before any model loads), and a template without `{% generation %}` markers that TRL does not know (posttrain marks
the assistant tokens from the template; a row whose template rewrites an earlier turn is refused, naming the row
and the turn). Real templates: tests/test_chat_mask.py and tests/test_sft_qwen3.py."""
import json

import pytest
import torch

import posttrain.stages  # noqa: F401
from posttrain.config import load_pipeline
from posttrain.data import DataError
from posttrain.pipeline import run_pipeline
from posttrain.stages.sft import check_chat_template
from posttrain.world.tuning import world_trainer
from tests.conftest import TINY_SPECIALS, load_tensors, make_tiny_llama, tiny_tokenizer

WORDS = TINY_SPECIALS + ["[", "]", "system", "user", "assistant", "What", "is", "2", "+", "3", "?", "5", "s", "END",
                         "final"]
# The shape of most hub templates: roles and contents, nothing that tells TRL which tokens are the assistant's.
NO_MARKERS = "{% for m in messages %}[ {{ m['role'] }} ] {{ m['content'] }} <eot>{% endfor %}"
MARKED = ("{% for m in messages %}[ {{ m['role'] }} ] {% if m['role'] == 'assistant' %}{% generation %}"
          "{{ m['content'] }} <eot>{% endgeneration %}{% else %}{{ m['content'] }} <eot>{% endif %}{% endfor %}")
PROMPT = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 2 + 3 ?"}]
MESSAGES = PROMPT + [{"role": "assistant", "content": "5"}]
# Words only (the word-level test tokenizer splits "<eot>" into unknown pieces), with a generation prompt.
PLAIN = ("{% for m in messages %}[ {{ m['role'] }} ] {{ m['content'] }} END {% endfor %}"
         "{% if add_generation_prompt %}[ assistant ] {% endif %}")
# ... and one that writes the last assistant turn otherwise ("final 5 END") than an earlier one ("5 END").
REWRITES = PLAIN.replace("] {{ m['content'] }}",
                         "] {% if loop.last and m['role'] == 'assistant' %}final {% endif %}{{ m['content'] }}")


def _model(tmp_path, template):
    return make_tiny_llama(tmp_path / "m", WORDS, tokenizer=tiny_tokenizer(WORDS, template=template))


def _data(tmp_path, row, n=8):
    path = tmp_path / "d.jsonl"
    path.write_text((json.dumps(row) + "\n") * n)
    return path


def _run(tmp_path, model, data, **stage):
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [{
        "kind": "sft", "model": str(model), "data": [{"source": str(data)}],
        "trainer": world_trainer("sft", max_steps=2, per_device_train_batch_size=4, logging_steps=1, save_steps=2),
        **stage}]})
    run_pipeline(cfg, tmp_path / "r", lambda m: None)
    return tmp_path / "r" / "stages" / "01_sft" / "model"


@pytest.fixture
def no_model_load(monkeypatch):
    import posttrain.stages.trl_run as trl_run  # the shared TRL run loads every stage's model

    monkeypatch.setattr(trl_run, "load_model", lambda *a, **k: pytest.fail("a model loaded before the template check"))


def test_conversational_prompt_with_string_completion_trains(tmp_path):
    # Before: TRL's `prompt + completion` on a message list and a string raised TypeError after the model loaded.
    model = _model(tmp_path, NO_MARKERS)  # prompt/completion masking needs no markers
    out = _run(tmp_path, model, _data(tmp_path, {"prompt": PROMPT, "completion": "5"}))
    before, after = load_tensors(model), load_tensors(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_chat_rows_without_a_template_refused_before_the_model_loads(tmp_path, no_model_load):
    model = _model(tmp_path, None)
    with pytest.raises(DataError, match="conversational SFT rows need a tokenizer with a chat template; .*has none"):
        _run(tmp_path, model, _data(tmp_path, {"messages": MESSAGES}))
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        _run(tmp_path, model, _data(tmp_path, {"prompt": PROMPT, "completion": "5"}))


def test_template_without_markers_trains_on_assistant_tokens_only(tmp_path, monkeypatch):
    # Before: refused (exit 2, "need {% generation %} markers"). Now the masks come from the template itself.
    import trl

    seen = []

    class Recording(trl.SFTTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self.train_dataset)

    monkeypatch.setattr(trl, "SFTTrainer", Recording)
    model = _model(tmp_path, PLAIN)
    two_turns = MESSAGES + [{"role": "user", "content": "What is 2 + 3 ?"}, {"role": "assistant", "content": "5"}]
    out = _run(tmp_path, model, _data(tmp_path, {"messages": two_turns}))
    assert (out / "model.safetensors").is_file()
    row = seen[0][0]
    tok = tiny_tokenizer(WORDS)
    trained = [tok.convert_ids_to_tokens(t) for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert trained == ["5", "END", "5", "END"]  # both assistant turns and their end word, no header, no prompt
    assert tok.convert_ids_to_tokens(row["input_ids"]).count("assistant") == 2


def test_a_row_whose_template_rewrites_an_earlier_turn_is_refused_naming_row_and_turn(tmp_path, no_model_load):
    model = _model(tmp_path, REWRITES)
    data = tmp_path / "d.jsonl"
    two_turns = MESSAGES + [{"role": "user", "content": "What is 2 + 3 ?"}, {"role": "assistant", "content": "5"}]
    data.write_text(json.dumps({"messages": MESSAGES}) + "\n" + json.dumps({"messages": two_turns}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl row 2: messages\[2\]: the chat template writes this turn as "
                                        r"'final 5 END' .*set assistant_only_loss: false"):
        _run(tmp_path, model, data)


def test_template_without_markers_trains_on_the_whole_conversation_when_asked(tmp_path):
    model = _model(tmp_path, NO_MARKERS)
    out = _run(tmp_path, model, _data(tmp_path, {"messages": MESSAGES}), assistant_only_loss=False)
    assert (out / "model.safetensors").is_file()


def test_check_chat_template_leaves_to_trl_what_trl_can_mark():
    marked, plain = tiny_tokenizer(WORDS, template=MARKED), tiny_tokenizer(WORDS, template=NO_MARKERS)
    assert not check_chat_template(marked, conversational=True, assistant_only=True)
    assert not check_chat_template(plain, conversational=True, assistant_only=False)
    assert not check_chat_template(tiny_tokenizer(WORDS), conversational=False, assistant_only=False)  # no template
    # A template TRL ships a marked copy of (here Qwen2.5's) is patched by SFTTrainer: TRL marks it.
    from trl.chat_template_utils import qwen2_5_chat_template

    assert not check_chat_template(tiny_tokenizer(WORDS, template=qwen2_5_chat_template), True, True)
    assert check_chat_template(plain, conversational=True, assistant_only=True)  # any other: posttrain marks it
