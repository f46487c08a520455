"""posttrain: post-training and continual learning of language models, with a forgetting report per stage.

`posttrain.run`, `posttrain.stage`, `posttrain.Run` and `posttrain.Report` are the Python API (posttrain.api),
imported on first use (PEP 562) so that `import posttrain` and `posttrain --help` load no torch or trl.
"""
__version__ = "0.1.0"

_API = ("run", "stage", "Run", "Report")


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module("posttrain.api"), name)
    raise AttributeError(f"module 'posttrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
