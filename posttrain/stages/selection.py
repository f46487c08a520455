"""Which parameters a trainable stage trains: `trainable:` (all, HFT, patterns) and LoRA, recorded in the stage's
trainable.json. `posttrain.hft` decides the mask; this module adds what needs the stage: peft's LoRA config
(also for the MoE experts that `all-linear` misses in transformers 5), the adapter count, and the warnings.
"""
from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_serializer

from posttrain.schema import ConfigError, Strict
from posttrain.hft import apply_trainable, frozen_slices, lora_targets, write_trainable_json
from posttrain.hft_layouts import is_expert_tensor, router_names
from posttrain.ranks import is_main
from posttrain.stages.base import StageContext


class LoraSpec(Strict):
    """LoRA via peft (Hu et al. 2021). The stage writes the adapter and a merged HF folder as model/.

    `target_parameters` (peft's): parameters adapted directly, for the routed experts of an MoE model, which
    transformers stores as 3-D tensors that no `target_modules` entry reaches. None: the expert tensors when
    `target_modules` is `all-linear`, none otherwise; [] adapts no expert.
    """

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    target_parameters: list[str] | None = None
    use_dora: bool = Field(False, description="DoRA (Liu et al. 2024): train magnitude and direction apart")
    quantize: Literal["4bit", "8bit"] | None = Field(
        None, description="QLoRA (Dettmers et al. 2023): the frozen base in 4 or 8 bits; bitsandbytes, CUDA only")

    @field_validator("quantize")
    @classmethod
    def _quantize_needs_cuda(cls, v: str | None) -> str | None:
        """Refused at load, before any eval: bitsandbytes' kernels need a CUDA GPU."""
        if v is None:
            return v
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"{v} (QLoRA) needs a CUDA GPU for bitsandbytes; this machine has none")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(f"{v} (QLoRA) needs bitsandbytes: pip install bitsandbytes")
        return v

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict:
        # Left out at their defaults, so that adding them changed no finished LoRA stage's config hash.
        out = handler(self)
        for key in ("use_dora", "quantize"):
            if not out.get(key):
                out.pop(key, None)
        return out


def select_parameters(model: Any, stage: Any, ctx: StageContext):
    """Apply `trainable:` (HFT / patterns) and LoRA; returns (model, peft_config or None, summary).

    The summary (also written as the stage's trainable.json, and whose "trained" the stages log as
    `trained_params`) says what the stage really trains; its warnings are logged. Without LoRA it is
    `apply_trainable`'s. With LoRA only the adapters train (TRL wraps the model with `peft_config`; peft
    freezes every base weight), so "trained" counts adapter elements, "frozen" every base element,
    "parameters" marks every base parameter false, "blocks" (base shares) is dropped, and "lora" = {"r",
    "alpha", "modules", "parameters" (adapted through peft's target_parameters: MoE experts, routers),
    "adapter_params"}.
    model/ is the merged model, so the adapted weights differ from the input's although they did not train.
    """
    summary = apply_trainable(model, stage.trainable, ctx.index)
    peft_config = None
    if stage.lora is not None:
        guard = frozen_slices(model)
        if guard:  # peft freezes every base weight: HFT's partial masks have nothing left to guard
            guard.remove()
        peft_config = lora_config(model, stage, summary["parameters"], summary["warnings"])
        modules, parameters, adapter_params = lora_adapters(model, peft_config)
        summary.pop("blocks")
        summary.update(
            trained=adapter_params,
            frozen=summary["trained"] + summary["frozen"],
            parameters=dict.fromkeys(summary["parameters"], False),
            lora={"r": stage.lora.r, "alpha": stage.lora.alpha, "modules": modules, "parameters": parameters,
                  "adapter_params": adapter_params},
        )

    if is_main():  # under accelerate launch every rank selects the same parameters; one writes them down
        for warning in summary["warnings"]:
            ctx.log(f"warning: {warning}")
        write_trainable_json(summary, ctx.work_dir / "trainable.json")
    return model, peft_config, summary


_NO_DROPOUT = ("lora.dropout: peft adapts the routed experts (peft's target_parameters) without dropout; set "
               "lora.dropout: 0")
_NO_DORA = ("lora.use_dora: peft adapts the routed experts (peft's target_parameters) without DoRA; set "
            "lora.target_parameters: [] to leave them out, or lora.use_dora: false")


def lora_config(model: Any, stage: Any, mask: dict[str, Any], warnings: list[str]):
    """peft's LoraConfig for `stage.lora`, adding to `warnings`.

    With a `trainable:` mode other than `all`, the targets are the modules and expert tensors holding a part
    it selects (`posttrain.hft.lora_targets`); its other choices (norms, embeddings, lm_head, router) do not
    apply. On an MoE model `all-linear` also adapts what transformers 5 no longer stores as nn.Linear: the
    routed experts' 3-D tensors and the routers (`moe_linear_parameters`, peft's `target_parameters`), which
    peft does with no dropout: a dropout is refused there in one line.
    """
    from peft import LoraConfig

    spec = stage.lora
    targets: Any = spec.target_modules
    parameters = spec.target_parameters
    if stage.trainable.mode != "all":
        targets, parameters = lora_targets(mask)
        if not targets and not parameters:
            raise ConfigError("trainable: selects no attention or MLP module to put LoRA adapters on")
        split = [n for n, on in mask.items() if isinstance(on, dict)]
        if split:
            warnings.append(f"lora with trainable mode {stage.trainable.mode!r}: {len(split)} fused or expert tensors "
                            f"(e.g. {split[0]}) carry one adapter over all their parts, not only the selected ones")
    elif parameters is None:
        moe = moe_linear_parameters(model)
        parameters = moe if targets == "all-linear" else []
        if moe and not parameters:
            warnings.append(f"lora: the routed experts ({moe[0]}, ...) are not adapted: lora.target_modules reaches "
                            "modules only; list them in lora.target_parameters")
    if parameters and spec.dropout:
        raise ConfigError(_NO_DROPOUT)
    if parameters and spec.use_dora:
        raise ConfigError(_NO_DORA)
    # A reward model (sequence classifier) is SEQ_CLS: peft then trains its new score head whole
    # (modules_to_save) beside the adapters, and merge_and_unload keeps the trained head.
    task = "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                      target_parameters=parameters or None, use_dora=spec.use_dora, task_type=task)


def quantization_config(spec: Any) -> Any:
    """transformers' BitsAndBytesConfig for `lora.quantize` (None without it): 4-bit as QLoRA trains (Dettmers
    et al. 2023: NF4, double quantization, bf16 compute), or LLM.int8() for 8-bit. TRL prepares the quantized
    model for training (peft's prepare_model_for_kbit_training) when it wraps it with the LoRA config."""
    if spec is None or spec.quantize is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if spec.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def moe_linear_parameters(model: Any) -> list[str]:
    """The linear maps of MoE blocks that are no nn.Linear in transformers 5, which `all-linear` misses: the
    routed experts' 3-D tensors and the routers' weights (peft adds both itself for Mixtral-style model
    types only, for compatibility with their transformers-4 checkpoints; this makes every MoE model alike)."""
    import torch

    names = [n for n, _ in model.named_parameters()]
    routers = {n for n in router_names(names)  # Qwen2-MoE's shared_expert_gate is an nn.Linear: all-linear has it
               if not isinstance(model.get_submodule(n.rsplit(".", 1)[0]), torch.nn.Linear)}
    return sorted(n for n in names if is_expert_tensor(n) or n in routers)


def lora_adapters(model: Any, peft_config: Any) -> tuple[list[str], list[str], int]:
    """(module paths, adapted parameter names, element count) of the LoRA adapters the trainer's
    `get_peft_model` will add to `model`.

    peft itself decides, on an empty copy of the model built on the meta device (no memory, no weights), so
    `all-linear`, suffix matching and each layer type's adapter shapes are peft's own. The config is copied
    because peft rewrites `all-linear` into module names in place; fork_rng keeps torch's generator where it
    was, so that the trainer's adapter initialisation draws the same numbers as without this count.
    """
    import copy

    import torch
    from peft import get_peft_model
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        try:
            shell = get_peft_model(type(model)(model.config), copy.deepcopy(peft_config))
        except ValueError as err:  # e.g. dropout on experts peft's compatibility layer adds itself (Mixtral)
            raise ConfigError(_NO_DROPOUT if "lora_dropout" in str(err)
                              else f"lora: peft refuses the targets: {err}") from None
    count = sum(p.numel() for n, p in shell.named_parameters() if ".lora_" in n)
    modules: set[str] = set()
    parameters: set[str] = set()
    for name, layer in shell.named_modules():
        plain = re.sub(r"\.base_layer(?=\.|$)", "", name.removeprefix("base_model.model."))
        if isinstance(layer, ParamWrapper):  # nested, one per parameter of the same module
            parameters.add(f"{plain}.{layer.parameter_name}")
        elif isinstance(layer, LoraLayer):
            modules.add(plain)
    return sorted(modules), sorted(parameters), count
