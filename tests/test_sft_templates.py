"""SFT on chat data and the tokenizer's chat template: conversational prompt/completion rows, no template, and a
template without `{% generation %}` markers (refused before any model loads, naming the setting that fixes it)."""
import json

import pytest
import torch

import posttrain.stages  # noqa: F401
from posttrain.config import load_pipeline
from posttrain.data import DataError
from posttrain.pipeline import run_pipeline
from posttrain.stages.sft import check_chat_template
from tests.conftest import TINY_SPECIALS, load_tensors, make_tiny_llama, tiny_tokenizer

WORDS = TINY_SPECIALS + ["[", "]", "system", "user", "assistant", "What", "is", "2", "+", "3", "?", "5", "s"]
# The shape of most hub templates: roles and contents, nothing that tells TRL which tokens are the assistant's.
NO_MARKERS = "{% for m in messages %}[ {{ m['role'] }} ] {{ m['content'] }} <eot>{% endfor %}"
MARKED = ("{% for m in messages %}[ {{ m['role'] }} ] {% if m['role'] == 'assistant' %}{% generation %}"
          "{{ m['content'] }} <eot>{% endgeneration %}{% else %}{{ m['content'] }} <eot>{% endif %}{% endfor %}")
PROMPT = [{"role": "system", "content": "s"}, {"role": "user", "content": "What is 2 + 3 ?"}]
MESSAGES = PROMPT + [{"role": "assistant", "content": "5"}]


def _model(tmp_path, template):
    return make_tiny_llama(tmp_path / "m", WORDS, tokenizer=tiny_tokenizer(WORDS, template=template))


def _data(tmp_path, row, n=8):
    path = tmp_path / "d.jsonl"
    path.write_text((json.dumps(row) + "\n") * n)
    return path


def _run(tmp_path, model, data, **stage):
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [{
        "kind": "sft", "model": str(model), "data": [{"source": str(data)}],
        "trainer": {"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2}, **stage}]})
    run_pipeline(cfg, tmp_path / "r", lambda m: None)
    return tmp_path / "r" / "stages" / "01_sft" / "model"


@pytest.fixture
def no_model_load(monkeypatch):
    import posttrain.stages.sft as sft

    monkeypatch.setattr(sft, "load_model", lambda *a, **k: pytest.fail("a model loaded before the template check"))


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


def test_template_without_generation_markers_refused_naming_the_setting(tmp_path, no_model_load):
    model = _model(tmp_path, NO_MARKERS)
    with pytest.raises(DataError, match=r"generation %\} markers.*set assistant_only_loss: false to train on the whole"):
        _run(tmp_path, model, _data(tmp_path, {"messages": MESSAGES}))


def test_template_without_markers_trains_on_the_whole_conversation_when_asked(tmp_path):
    model = _model(tmp_path, NO_MARKERS)
    out = _run(tmp_path, model, _data(tmp_path, {"messages": MESSAGES}), assistant_only_loss=False)
    assert (out / "model.safetensors").is_file()


def test_check_chat_template_passes_what_trl_can_train():
    marked, plain = tiny_tokenizer(WORDS, template=MARKED), tiny_tokenizer(WORDS, template=NO_MARKERS)
    check_chat_template(marked, conversational=True, assistant_only=True)
    check_chat_template(plain, conversational=True, assistant_only=False)
    check_chat_template(tiny_tokenizer(WORDS), conversational=False, assistant_only=False)  # plain rows: no template
    # A template TRL ships a marked copy of (here Qwen2.5's) is patched by SFTTrainer, so it is not refused.
    from trl.chat_template_utils import qwen2_5_chat_template

    check_chat_template(tiny_tokenizer(WORDS, template=qwen2_5_chat_template), conversational=True, assistant_only=True)
    with pytest.raises(DataError, match="assistant_only_loss: false"):
        check_chat_template(plain, conversational=True, assistant_only=True)
