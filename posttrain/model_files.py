"""Check a model folder's files before `posttrain eval` hands it to lm-eval: the stages' refusals and the reads
that would otherwise end in a traceback deep in transformers or lm-eval, each as one line (ModelError, exit 2).

* The opt-ins, as the stages apply them (`models.check_weights`, `models.check_remote_code`), with eval's flags
  (`--allow-pickle`, `--trust-remote-code`) in the message.
* What the stages check of an input model (`model_check.check_model`): config.json, every safetensors header
  and size (a bad header, a file cut short), the shard index, a NaN/Inf scan.
* The folder's other `*.json` files parse (tokenizer, generation config).
* The chat template renders a one-message chat with transformers' own renderer, in Jinja's sandbox, as lm-eval
  will (a template error, or an attribute access the sandbox stops).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from posttrain.model_check import check_model
from posttrain.models import ModelError, check_remote_code, check_weights


def check_folder_files(model: str, *, allow_pickle: bool, trust_remote_code: bool,
                       log: Callable[[str], None] = print) -> None:
    """Refuse (ModelError, one line naming the file) what eval must not or cannot load; a hub name is checked
    where the hub cache holds it, else left to transformers."""
    check_weights(model, allow_pickle, opt_in="pass --allow-pickle")  # as a stage would, with eval's flag
    # A folder whose auto_map names a class transformers has loads with transformers' (logged, as for a stage).
    check_remote_code(model, trust_remote_code, log, opt_in="pass --trust-remote-code if you trust it")
    check_model(model, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, log=log)
    folder = Path(model)
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.json")):
        try:
            json.loads(file.read_bytes())
        except (ValueError, OSError) as e:
            raise ModelError(f"{file}: not valid JSON: {str(e).splitlines()[0]}") from None
    check_chat_template(folder)


def chat_template(folder: Path) -> str | None:
    """The folder's default chat template, from the files transformers saves one in, or None."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(errors="replace")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            value = json.loads((folder / name).read_bytes()).get("chat_template")
            if isinstance(value, list):  # named templates: transformers uses "default"
                value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}.get("default")
            if isinstance(value, str):
                return value
    return None


def check_chat_template(folder: Path) -> None:
    """Render the folder's chat template on a one-message chat, as lm-eval will (transformers' renderer, in
    Jinja's sandbox), so that a template that fails says so in one line before lm-eval starts."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    template = chat_template(folder)
    if template is None:
        return
    try:
        render_jinja_template([[{"role": "user", "content": "1 + 1"}]], chat_template=template,
                              add_generation_prompt=True)
    except jinja2.TemplateError as e:  # a syntax error, or what the sandbox stopped (SecurityError)
        why = str(e).splitlines()[0] if str(e) else ""
        raise ModelError(f"{folder}: its chat template fails on a one-message chat: {type(e).__name__}: {why}") \
            from None
