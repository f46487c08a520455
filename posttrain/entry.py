"""The `posttrain` command (and `python -m posttrain`): the config files the command line names pass yaml_caps
(size cap, alias bomb) before the CLI imports torch, trl and the stages, which takes seconds; so a wrong or
hostile file is refused at once, in the one line the CLI would print (issue 20: a bad config fails in seconds).
Everything else, a missing file included, is the CLI's to decide.
"""
from __future__ import annotations

import sys
from pathlib import Path

from posttrain import yaml_caps

_FILE_FLAGS = ("--config", "--from-mergekit")


def named_configs(argv: list[str]) -> list[str]:
    """The config paths in `argv`: `run <file>`, and the values of --config / --from-mergekit."""
    out = []
    words = [a for a in argv if not a.startswith("-")]
    if len(words) >= 2 and words[0] == "run":
        out.append(words[1])
    for i, arg in enumerate(argv):
        if arg in _FILE_FLAGS and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith(tuple(f"{f}=" for f in _FILE_FLAGS)):
            out.append(arg.split("=", 1)[1])
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in named_configs(argv):
        if Path(name).is_file():
            try:
                yaml_caps.read(Path(name))
            except yaml_caps.YamlRefused as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                return 2
    from posttrain.cli import main as cli_main

    return cli_main(argv)
