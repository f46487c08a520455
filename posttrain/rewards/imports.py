"""Which modules next to a user reward file it imports, found from its import statements (never by running it):
the config check refuses a missing one at load, and a sandboxed call is sent the sources of those it needs
(the sandbox user may not be able to read the folder itself)."""
from __future__ import annotations

import ast
import os


def read_source(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def imported_names(tree: ast.Module, top_level: bool = False) -> list[str]:
    """The top package of each absolute import in ``tree`` (``a`` for ``import a.b``); ``top_level``: only
    the module's own statements, none in a ``def``, ``if`` or ``try``."""
    names = []
    for node in tree.body if top_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name.partition(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.partition(".")[0])
    return list(dict.fromkeys(names))


def sibling_imports(path: str) -> dict[str, str]:
    """``{name: file}`` of the ``name.py`` files next to ``path`` that it imports, and that those import:
    what a sandboxed call gets of its folder. Found from import statements (``importlib.import_module`` is
    not followed); a package next to it is not served."""
    found, todo = {}, [path]
    while todo:
        try:
            names = imported_names(ast.parse(read_source(todo.pop())))
        except (SyntaxError, ValueError):
            continue  # the child fails on it the same way, and that is counted
        for name in names:
            file = os.path.join(os.path.dirname(path), name + ".py")
            if name not in found and os.path.isfile(file):
                found[name] = file
                todo.append(file)
    return found
