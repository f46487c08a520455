"""YAML for configs: PyYAML's safe loader, with a size cap and an alias cap, so a hostile file fails in one line.

A ten-level alias bomb under `trainer.extra` is a few hundred bytes; PyYAML builds it cheaply (an alias shares
its object), but whatever walks the result (validation, deep copies, hashes, dumps) expands it: it grew to 5.5 GB
before failing. A 100 MB file parsed for minutes. So the file is read only up to MAX_CONFIG_BYTES, and the node
graph is measured with every alias expanded before any Python object is built; anchors that merely repeat a
block (configs/pipelines/claims/merge_methods.yaml) stay far below the cap. libyaml, when PyYAML has it, refuses
nesting deeper than 1000 levels itself; the pure-Python loader's RecursionError is turned into the same refusal.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_CONFIG_BYTES = 1 << 20  # a pipeline is a few KB; a bigger file is the wrong file, or an attack
MAX_YAML_VALUES = 100_000  # values after aliases are expanded: a few anchors pass, a "billion laughs" does not


class YamlRefused(ValueError):
    """A YAML document over a cap, or not YAML; its message is one line naming where it came from."""


def read(path: Path) -> Any:
    """The document in the file at ``path``, read up to the cap and never further."""
    with open(path, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)  # the file may be huge, or still growing
    if len(raw) > MAX_CONFIG_BYTES:
        raise YamlRefused(f"{path}: over {MAX_CONFIG_BYTES >> 20} MB; a config is a few KB (is this the right file?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise YamlRefused(f"{path}: not UTF-8 text (byte {e.start}); is this a YAML file?") from None
    return load(text, str(path))


def load(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``, refusing a document whose aliases expand it past MAX_YAML_VALUES values, refer
    to themselves, or that nests too deep."""
    if len(text) > MAX_CONFIG_BYTES:
        raise YamlRefused(f"{where}: over {MAX_CONFIG_BYTES >> 20} MB of YAML")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml when installed: 1 MB in ~50 ms
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise YamlRefused(f"{where}:{at} invalid YAML: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise YamlRefused(f"{where}: YAML nested too deep") from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Count the values of the document with every alias expanded (iteratively, each node once)."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else \
            node.value if isinstance(node, yaml.SequenceNode) else []
        if finished:
            on_path.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise YamlRefused(f"{where}: line {node.start_mark.line + 1}: its aliases (*name) expand the YAML "
                                  f"past {MAX_YAML_VALUES} values; write the repeated parts out")
        elif id(node) in on_path:
            raise YamlRefused(f"{where}: line {node.start_mark.line + 1}: an alias refers to a value that holds it")
        elif id(node) not in sizes:
            on_path.add(id(node))
            stack.append((node, True))
            stack += [(c, False) for c in children if id(c) not in sizes]
