"""Item 10 (and issue 20, item 5 for `posttrain eval`): untrusted inputs. Pickle weights (`.bin`, `.pt`) are refused unless the stage sets
`allow_pickle: true`; a model's own code (`auto_map`) is refused unless it sets `trust_remote_code: true`;
both messages say how to opt in, and nothing of the model is loaded or run before the refusal.

The models are built here from the world base: a copy saved as pickle (`pytorch_model.bin`), and a copy whose
config names a modeling file that leaves a marker file behind when Python imports it.
"""
import json
import os
import shutil

import pytest

from posttrain.models import ModelError, load_model, load_tokenizer
from tests.reliability.conftest import cli_here, error_lines

MODELING = '''
open({marker!r}, "w").close()  # proof that this file ran
from transformers import LlamaConfig, LlamaForCausalLM


class XConfig(LlamaConfig):
    model_type = "xllama"


class XForCausalLM(LlamaForCausalLM):
    config_class = XConfig
'''


@pytest.fixture(scope="module")
def pickle_model(world, tmp_path_factory):
    import torch
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("pickle") / "model"
    shutil.copytree(world / "base", out)
    weights = out / "model.safetensors"
    torch.save(load_file(weights), out / "pytorch_model.bin")  # what older checkpoints on the hub hold
    weights.unlink()
    return out


@pytest.fixture
def remote_code_model(world, tmp_path):
    out = tmp_path / "custom"
    shutil.copytree(world / "base", out)
    marker = tmp_path / "modeling_x.ran"
    (out / "modeling_x.py").write_text(MODELING.format(marker=str(marker)))
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="xllama", auto_map={"AutoConfig": "modeling_x.XConfig",
                                                 "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (out / "config.json").write_text(json.dumps(config))
    return out, marker


def _stage(capsys, model, run_dir) -> tuple[int, list[str]]:
    """`posttrain stage sft` from `model`, in this process: (exit code, its `error:` lines)."""
    code, err = cli_here(capsys, "stage", "sft", "--run-dir", str(run_dir), "--set", "eval.enabled=false",
                         "--set", f"model={model}", "--set", "data=[{source: arithmetic, limit: 8}]",
                         "--set", "trainer.max_steps=1", "--set", "trainer.per_device_train_batch_size=4")
    return code, error_lines(err)


def test_pickle_weights_refused_with_how_to_opt_in(pickle_model, tmp_path, capsys):
    code, lines = _stage(capsys, pickle_model, tmp_path / "run")
    assert code == 2 and len(lines) == 1, lines
    assert "pytorch_model.bin" in lines[0] and "allow_pickle: true" in lines[0]
    assert not (tmp_path / "run" / "stages" / "01_sft").exists()


def test_pickle_weights_load_once_allowed(pickle_model, world):
    with pytest.raises(ModelError, match="allow_pickle: true"):
        load_model(str(pickle_model))
    model = load_model(str(pickle_model), allow_pickle=True)
    assert model.num_parameters() > 0


def test_remote_code_refused_with_how_to_opt_in(remote_code_model, tmp_path, capsys):
    folder, marker = remote_code_model
    code, lines = _stage(capsys, folder, tmp_path / "run")
    assert code == 2 and len(lines) == 1, lines
    assert "modeling_x.py" in lines[0] and "trust_remote_code: true" in lines[0]
    assert not marker.exists()  # the model's code never ran


def test_trust_remote_code_is_off_unless_set(remote_code_model):
    import posttrain.stages  # noqa: F401
    from posttrain.registry import STAGES

    assert all(STAGES.get(kind).config.model_fields["trust_remote_code"].default is False for kind in STAGES.names())
    assert all(STAGES.get(kind).config.model_fields["allow_pickle"].default is False for kind in STAGES.names())
    folder, marker = remote_code_model
    for load in (load_tokenizer, load_model):
        with pytest.raises(ModelError, match="trust_remote_code: true"):
            load(str(folder))
    assert not marker.exists()
    model = load_model(str(folder), trust_remote_code=True)  # opted in: the model's own class is used
    assert type(model).__name__ == "XForCausalLM" and marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "remote_code"])
def test_base_eval_does_not_load_an_untrusted_model_first(kind, pickle_model, remote_code_model, tmp_path,
                                                          monkeypatch):
    """With evals on, the pipeline evaluates the input model before the first stage: the refusal must come first."""
    import evals.run_report
    import posttrain.stages  # noqa: F401
    from posttrain.config import load_pipeline
    from posttrain.pipeline import run_pipeline

    class Loaded(Exception):
        pass

    def evaluate_into_run(pipe, stage, folder, model_dir):
        raise Loaded(f"{folder}: evaluated {model_dir} before the stage refused it")

    monkeypatch.setattr(evals.run_report, "evaluate_into_run", evaluate_into_run)
    model = pickle_model if kind == "pickle" else remote_code_model[0]
    cfg = load_pipeline(None, data={"eval": {"limit": 1}, "stages": [{"kind": "sft", "model": str(model)}]})
    with pytest.raises(ModelError, match="allow_pickle: true" if kind == "pickle" else "trust_remote_code: true"):
        run_pipeline(cfg, tmp_path / "run", lambda m: None)  # Loaded (the eval ran first) fails the test


# ---- a model_type transformers has: its auto_map is set aside, transformers' class loads it ----------------------

@pytest.fixture
def phi3_as_released(tmp_path):
    """A tiny Phi-3 whose config.json names its own code (`auto_map`), as microsoft/Phi-3-mini-4k-instruct's
    does; the named modeling file leaves a marker behind if Python ever imports it."""
    from tests.tiny_archs import make_tiny

    out = make_tiny("phi3", tmp_path / "phi3")
    marker = tmp_path / "modeling_phi3.ran"
    (out / "modeling_phi3.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (out / "configuration_phi3.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_phi3.Phi3Config",
                          "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}
    (out / "config.json").write_text(json.dumps(config))
    return out, marker


def test_auto_map_of_a_model_type_transformers_has_loads_its_own_class(phi3_as_released, tmp_path, capsys):
    folder, marker = phi3_as_released
    code, err = cli_here(capsys, "stage", "sft", "--run-dir", str(tmp_path / "run"), "--set", "eval.enabled=false",
                         "--set", f"model={folder}", "--set", "data=[{source: arithmetic, limit: 4}]",
                         "--set", "trainer.max_steps=1", "--set", "trainer.per_device_train_batch_size=4")
    assert code == 0, err[-2000:]
    notes = [line for line in err.splitlines() if "its auto_map names" in line]
    assert len(notes) == 1 and "Phi3ForCausalLM for config.json" in notes[0], notes  # logged once, not per load
    assert not marker.exists()  # the folder's code never ran
    out = tmp_path / "run" / "stages" / "01_sft" / "model"
    assert "auto_map" not in json.loads((out / "config.json").read_text())  # the output carries no code to name
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)).__name__ == "Phi3ForCausalLM"


def test_tokenizer_auto_map_is_set_aside_only_for_a_tokenizer_class_transformers_has(phi3_as_released):
    folder, _ = phi3_as_released
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    path.write_text(json.dumps(config))  # tokenizer_class: the world's TokenizersBackend, transformers' own
    tok = load_tokenizer(str(folder))
    assert "auto_map" not in tok.init_kwargs  # so the stage's output tokenizer names no code either
    path.write_text(json.dumps({**config, "tokenizer_class": "XTokenizer"}))
    with pytest.raises(ModelError, match=r"tokenizer_config.json names the model's own code \(tokenization_x.py\)"):
        load_tokenizer(str(folder))


def test_posttrain_eval_follows_the_same_rule(phi3_as_released, remote_code_model, monkeypatch, capsys):
    import evals.runner

    seen = []
    monkeypatch.setattr(evals.runner, "evaluate_model", lambda model, **kw: seen.append(model) or {"scores": {}})
    code, err = cli_here(capsys, "eval", str(remote_code_model[0]))
    assert code == 2 and error_lines(err) == [
        f"error: {remote_code_model[0]}: config.json names the model's own code (modeling_x.py), which runs when "
        "loaded; pass --trust-remote-code if you trust it"]
    assert not seen and not remote_code_model[1].exists()
    code, err = cli_here(capsys, "eval", str(phi3_as_released[0]))
    assert code == 0 and seen == [str(phi3_as_released[0].resolve())] and "Phi3ForCausalLM" in err


# ---- posttrain eval: the stages' rules, eval's flags, and one line for every broken model folder -------------

def test_eval_refuses_remote_code_unless_trusted(remote_code_model, capsys, monkeypatch):
    import lm_eval

    folder, marker = remote_code_model
    code, err = cli_here(capsys, "eval", str(folder), "--limit", "1")
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert "modeling_x.py" in lines[0] and "pass --trust-remote-code" in lines[0]
    assert not marker.exists()  # the model's code never ran

    class Evaluated(Exception):
        pass

    def simple_evaluate(model, model_args, **kwargs):  # what lm-eval is handed, without running an eval
        raise Evaluated(model_args)

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    with pytest.raises(Evaluated) as handed:
        cli_here(capsys, "eval", str(folder), "--limit", "1", "--trust-remote-code")
    assert handed.value.args[0]["trust_remote_code"] is True


def _break(folder, how: str) -> str:
    """Break a copy of a model folder as `how` says; return the file the error must name."""
    weights = folder / "model.safetensors"
    if how == "bad-header":
        with open(weights, "r+b") as f:
            f.write((10 ** 12).to_bytes(8, "little"))  # a header length past the end of the file
        return "model.safetensors"
    if how == "truncated":
        os.truncate(weights, weights.stat().st_size // 2)  # a copy cut short
        return "model.safetensors"
    if how == "header-not-json":
        data = bytearray(weights.read_bytes())
        data[8:12] = b"\xff\xfe{["
        weights.write_bytes(bytes(data))
        return "model.safetensors"
    if how == "config-not-json":
        (folder / "config.json").write_text("{not json")
        return "config.json"
    # Jinja's sandbox (which transformers renders chat templates in) stops this template at render time.
    (folder / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    return "chat template"


@pytest.mark.parametrize("how", ["bad-header", "truncated", "header-not-json", "config-not-json",
                                 "template-escapes-sandbox"])
def test_eval_of_a_broken_model_folder_is_one_line(how, world, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(world / "base", folder)
    named = _break(folder, how)
    code, err = cli_here(capsys, "eval", str(folder), "--limit", "1", "--out", str(tmp_path / "eval.json"))
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert named in lines[0] and str(folder) in lines[0], lines[0]
    assert not (tmp_path / "eval.json").exists()
