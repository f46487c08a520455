"""The `gpu` extra pins the one vLLM release that fits the project's pins and TRL's supported range.

vLLM pins torch exactly, and the vLLM paths import it in the trainer's own process (colocated rollouts,
lm-eval's vllm model, TRL's NCCL weight-sync client), so it cannot live in an environment of its own: its
requirements must agree with pyproject's pins. They were read from each wheel's metadata without downloading
it (`pip install vllm==X --no-deps --dry-run --report r.json`, 2026-12) and are recorded here; TRL's range is
read from the installed TRL. When a pin in pyproject moves, this test says whether the vLLM pin still fits.
"""
import importlib.metadata as md
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

# Requires-Dist of vLLM releases, for the packages pyproject pins (torchaudio, torchvision, flashinfer-python:
# not pinned by us, left to vLLM).
VLLM_REQUIRES = {
    "0.30.0": {"torch": "==2.13.0", "transformers": ">=5.10.4", "tokenizers": ">=0.21.1", "pydantic": ">=2.12.0"},
    "0.31.0": {"torch": "==2.13.0", "transformers": ">=5.10.4,<5.18.0", "tokenizers": ">=0.21.1"},
    "0.32.0": {"torch": "==2.13.0", "transformers": ">=5.16.1,<5.20.0", "tokenizers": ">=0.23.2"},
    "0.33.0": {"torch": "==2.14.0", "transformers": ">=5.16.1,<5.21.0", "tokenizers": ">=0.23.2"},
    "0.34.0": {"torch": "==2.14.0", "transformers": ">=5.16.1,<5.23.0", "tokenizers": ">=0.23.3"},
}
# trl/import_utils.py warns outside this range, and TRL's own `vllm` extra requires it.
TRL_VLLM = SpecifierSet(">=0.22.0,<=0.31.0")


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def _pins() -> dict[str, str]:
    """name -> version of every `name==version` dependency of the base install."""
    out = {}
    for line in _project()["dependencies"]:
        req = Requirement(line)
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            out[req.name] = exact[0]
    return out


def _fits(version: str, pins: dict[str, str]) -> list[str]:
    """Why vLLM `version` does not fit `pins` and TRL's range ([] when it does)."""
    why = [f"TRL supports {TRL_VLLM}"] if version not in TRL_VLLM else []
    return why + [f"{name}{spec} vs our {name}=={pins[name]}" for name, spec in VLLM_REQUIRES[version].items()
                  if name in pins and pins[name] not in SpecifierSet(spec)]


def test_gpu_extra_pins_the_newest_vllm_that_fits():
    gpu = [Requirement(r) for r in _project()["optional-dependencies"]["gpu"]]
    vllm = next(r for r in gpu if r.name == "vllm")
    pinned = [s.version for s in vllm.specifier if s.operator == "=="]
    assert pinned, f"the gpu extra must pin vllm exactly (pip backtracks through ~320 MB wheels), got {vllm}"
    pins = _pins()
    assert {"torch", "transformers", "tokenizers", "pydantic"} <= set(pins)
    assert _fits(pinned[0], pins) == []
    newer = [v for v in VLLM_REQUIRES if SpecifierSet(f">{pinned[0]}").contains(v)]
    assert newer and all(_fits(v, pins) for v in newer), {v: _fits(v, pins) for v in newer}


def test_recorded_trl_range_is_the_installed_trls():
    trl_extra = [Requirement(r) for r in md.requires("trl") or [] if r.startswith("vllm")]
    assert [r.specifier for r in trl_extra if r.marker and r.marker.evaluate({"extra": "vllm"})] == [TRL_VLLM]
    assert md.version("trl") == _pins()["trl"]
