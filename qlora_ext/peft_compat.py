"""Fit qlora_ext into a transformers + PEFT + bitsandbytes workflow.

- apply(model, config): swap the target linear layers of a model for QLoRALinear, in place (the model keeps its
  class, so Trainer, generate() and checkpointing keep working). `config` is a peft.LoraConfig, a dict with its
  fields (e.g. a loaded adapter_config.json), or None with the fields as keyword arguments; PEFT's defaults and
  target matching rules apply.
- save_adapter / load_adapter: PEFT's on-disk format (adapter_config.json + adapter_model.safetensors with PEFT's
  key names), so PeftModel.from_pretrained loads our adapters and we load PEFT's.
- lora_plus_param_groups: LoRA+ optimizer parameter groups (lr of B = ratio × lr of A), grouped as PEFT does.
- merge_and_unload: fold s·B·A into the base and return plain nn.Linear layers (or NF4 again, with the error
  that requantization added reported).
"""
from __future__ import annotations

import json
import numbers
import os
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .init import method_from_peft
from .nf4 import NF4Weight, quantize_nf4
from .nn import QLoRALinear

__all__ = ["LoraSpec", "apply", "save_adapter", "load_adapter", "lora_plus_param_groups", "merge_and_unload"]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# PeftModel wraps the model as base_model (a LoraModel) whose .model is the user's model; PEFT drops the adapter
# name from keys on disk, so a key is this prefix + our module path + ".lora_A.weight".
_PEFT_PREFIX = "base_model.model."
_BIAS_MODES = ("none", "all", "lora_only")
# LoraConfig features qlora_ext does not implement, with the value that means "off" (PEFT's default). A config
# that turns one on is refused rather than silently trained as plain LoRA; saved configs spell them out as off.
_UNSUPPORTED_OFF = {
    "use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
    "modules_to_save": None, "layers_to_transform": None, "layer_replication": None, "target_parameters": None,
    "trainable_token_indices": None,
}
# Below this many layers, quantizing is quick enough that a progress bar is noise.
_PROGRESS_MIN_LAYERS = 32


@dataclass
class LoraSpec:
    """The LoraConfig fields qlora_ext honours, with PEFT's names and defaults."""
    r: int = 8
    lora_alpha: float = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None


_SPEC_FIELDS = tuple(f.name for f in fields(LoraSpec))


def _field(config: Any, name: str, default: Any) -> Any:
    value = config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)
    return getattr(value, "value", value)  # PEFT's PeftType/TaskType are str enums; keep the plain string


def _module_list(value: Any) -> Any:
    """Module lists sorted (PEFT keeps them as sets, so order carries no meaning); regex strings as they are."""
    return sorted(value) if isinstance(value, (list, set, tuple)) else value


def _resolve_spec(config: Any, options: dict[str, Any]) -> LoraSpec:
    if config is None:
        unknown = sorted(set(options) - set(_SPEC_FIELDS))
        if unknown:
            raise TypeError(f"unknown LoRA option(s) {unknown}; known: {list(_SPEC_FIELDS)}")
        spec = LoraSpec(**options)
    else:
        if options:
            raise TypeError(f"pass either a config or LoRA keyword arguments, not both (got {sorted(options)})")
        peft_type = _field(config, "peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"qlora_ext implements LoRA adapters only, got peft_type={peft_type!r}")
        enabled = [name for name in _UNSUPPORTED_OFF if _field(config, name, None)]
        if enabled:
            raise ValueError(f"LoraConfig options {enabled} are not supported by qlora_ext")
        spec = LoraSpec(**{f.name: _field(config, f.name, f.default) for f in fields(LoraSpec)})
    spec = replace(spec, target_modules=_module_list(spec.target_modules),
                   exclude_modules=_module_list(spec.exclude_modules))
    if spec.bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {spec.bias!r}")
    # bool is an int subclass: r=True would silently become a rank-1 adapter.
    if isinstance(spec.r, bool) or not isinstance(spec.r, numbers.Integral) or spec.r < 1:
        raise ValueError(f"r (the adapter rank) must be a positive int, got {spec.r!r} ({type(spec.r).__name__})")
    if not 0.0 <= spec.lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be in [0, 1), got {spec.lora_dropout!r}")
    method_from_peft(spec.init_lora_weights)  # refuses unsupported inits before any layer is touched
    return replace(spec, r=int(spec.r))


def _matches(name: str, patterns: Union[list[str], str]) -> bool:
    """PEFT's rule: a string is a regex matched against the whole module name; a list entry matches the name
    itself or any name ending in "." + entry."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_all_linear(target_modules: Any) -> bool:
    return isinstance(target_modules, str) and target_modules.lower() == "all-linear"


def _default_targets(model: nn.Module) -> list[str]:
    """PEFT's per-architecture default when a config names no target_modules (e.g. q_proj, v_proj for Llama)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults
    except ImportError:
        defaults = {}
    if model_type not in defaults:
        raise ValueError(f"target_modules is required (no PEFT default for model_type={model_type!r}); "
                         f"pass e.g. target_modules='all-linear' or ['q_proj', 'v_proj']")
    return list(defaults[model_type])


def _find_targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    if _is_all_linear(spec.target_modules):
        # Like PEFT: every linear layer except the output head (adapting the vocabulary projection is costly
        # and rarely wanted).
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        targets = [name for name, module in model.named_modules()
                   if name and isinstance(module, nn.Linear) and module is not head]
    else:
        targets = [name for name, _ in model.named_modules() if name and _matches(name, spec.target_modules)]
    if spec.exclude_modules:
        targets = [name for name in targets if not _matches(name, spec.exclude_modules)]
    if not targets:
        raise ValueError(f"target_modules={spec.target_modules!r} (exclude_modules={spec.exclude_modules!r}) "
                         f"matched no module of {type(model).__name__}")
    return targets


def _bnb_linear4bit_class() -> Optional[type]:
    # A model holding bnb layers has imported bitsandbytes already; looking it up instead of importing keeps
    # apply() free of bnb's import cost and messages for users who do not have it.
    bnb = sys.modules.get("bitsandbytes")
    return bnb.nn.Linear4bit if bnb is not None else None


def _quantize_device(linear: nn.Linear, device: Optional[Union[str, torch.device]]) -> torch.device:
    if device is not None:
        return torch.device(device)
    if linear.weight.device.type == "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    return linear.weight.device


def _staged(linear: nn.Linear, device: torch.device) -> nn.Linear:
    """A stand-in for `linear` with copies of its parameters on `device`; `linear` itself is not moved. Moving it
    would move its Parameters in place, and a Parameter can be shared (an output head tied to the embeddings):
    the module that shares it would silently change device."""
    if linear.weight.device == device:
        return linear
    staged = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    staged.weight = nn.Parameter(linear.weight.detach().to(device), requires_grad=False)
    if linear.bias is not None:
        staged.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return staged


def _peft_layer_name(model: nn.Module) -> Optional[str]:
    """The qualified name of a PEFT adapter module inside `model` ("" for the model itself), or None."""
    peft = sys.modules.get("peft")  # a model holding PEFT modules has imported peft already
    if peft is None:
        return None
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
    wrappers = tuple(getattr(peft, cls, None) for cls in ("PeftModel", "PeftMixedModel"))
    for name, module in model.named_modules():
        if isinstance(module, (BaseTuner, BaseTunerLayer) + tuple(c for c in wrappers if c is not None)):
            return name
    return None


def _refuse_peft_model(model: nn.Module, caller: str) -> None:
    name = _peft_layer_name(model)
    if name is not None:
        where = "is a PEFT model" if name == "" else f"holds PEFT adapter layers ({name})"
        raise ValueError(f"{caller}: the {type(model).__name__} {where}; qlora_ext replaces PEFT's LoRA layers "
                         f"instead of wrapping them. Pass the base model: peft_model.unload() returns it without "
                         f"PEFT's layers, and qlora_ext.load_adapter(base_model, path) loads an adapter PEFT saved")


def _refuse_reapply(model: nn.Module) -> None:
    existing = list(_qlora_modules(model))
    if existing:
        first = existing[0] or "the model itself"
        raise ValueError(f"apply: the model already has {len(existing)} QLoRALinear layer(s) ({first}"
                         f"{', ...' if len(existing) > 1 else ''}); apply() runs once per model, since one adapter "
                         f"config describes all of them (what save_adapter writes and PEFT reads). Pass every target "
                         f"in one call (target_modules=[...]), load other adapter weights with load_adapter(), or "
                         f"start again from the base model")


def _layer_shape(name: str, module: nn.Module) -> tuple[int, int]:
    """(n, k) of a target that apply can convert; raises naming the layer and the fix otherwise."""
    linear4bit = _bnb_linear4bit_class()
    if linear4bit is not None and isinstance(module, linear4bit):
        quant_type = getattr(module.weight, "quant_type", None)
        if quant_type != "nf4":
            raise ValueError(f"{name}: bitsandbytes Linear4bit with quant_type={quant_type!r}; qlora_ext runs NF4 "
                             f"only (BitsAndBytesConfig(bnb_4bit_quant_type='nf4')), or leave the layer out "
                             f"(exclude_modules=[{name!r}])")
        if getattr(module.weight, "quant_state", None) is None:
            raise ValueError(f"{name}: the Linear4bit has no quant_state yet; move it to its device (which quantizes "
                             f"it) or load a quantized checkpoint before apply()")
        return module.out_features, module.in_features
    if type(module) is nn.Linear:
        return module.out_features, module.in_features
    raise TypeError(f"{name} is a {type(module).__name__}; qlora_ext replaces nn.Linear and bitsandbytes NF4 "
                    f"Linear4bit layers only: leave it out of target_modules (or exclude_modules=[{name!r}])")


def _check_targets(model: nn.Module, targets: list[str], spec: LoraSpec) -> None:
    """Everything apply can check without quantizing, for every target, before anything is converted."""
    for name in targets:
        module = model.get_submodule(name)
        n, k = _layer_shape(name, module)
        if spec.r > min(n, k):
            raise ValueError(f"{name}: r={spec.r} exceeds min(n, k)={min(n, k)} of its [{n}, {k}] weight; use "
                             f"r <= {min(n, k)} or leave the layer out (exclude_modules=[{name!r}])")
        if type(module) is nn.Linear:
            nonfinite = int((~torch.isfinite(module.weight.detach())).sum())
            if nonfinite:
                raise ValueError(f"{name}: the weight has {nonfinite} non-finite (NaN/Inf) value(s), which NF4 "
                                 f"cannot quantize; reload or repair the checkpoint, or leave the layer out "
                                 f"(exclude_modules=[{name!r}])")


def _to_qlora(name: str, module: nn.Module, spec: LoraSpec, freeze_A: bool,
              device: Optional[Union[str, torch.device]]) -> QLoRALinear:
    """A new QLoRALinear for `module` (checked by _layer_shape); `module` and the model are left as they are."""
    options = dict(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                   use_rslora=spec.use_rslora, init=method_from_peft(spec.init_lora_weights), freeze_A=freeze_A)
    linear4bit = _bnb_linear4bit_class()
    if linear4bit is not None and isinstance(module, linear4bit):
        layer = QLoRALinear.from_bnb(module, **options)  # the checkpoint's bytes as they are, no requantization
    else:
        # One layer at a time on the GPU: only one full-precision layer is ever there at once.
        layer = QLoRALinear.from_linear(_staged(module, _quantize_device(module, device)), **options)
        # Without an explicit device the layer goes back where it came from, so that apply() never leaves a
        # model split across devices (a forward would fail, and model.device would name only one of them).
        layer = layer if device is not None else layer.to(module.weight.device)
    return layer.train(module.training)  # a layer swapped into an eval-mode model must not start training


def _convert(model: nn.Module, targets: list[str], spec: LoraSpec, freeze_A: bool,
             device: Optional[Union[str, torch.device]], progress: Optional[bool]) -> dict[str, QLoRALinear]:
    """The new layers for `targets`, built without touching the model (so a failure leaves it as it was)."""
    show = progress if progress is not None else len(targets) >= _PROGRESS_MIN_LAYERS
    layers = {}
    for name in tqdm(targets, desc="qlora_ext: quantizing", unit="layer", disable=not show):
        try:
            layers[name] = _to_qlora(name, model.get_submodule(name), spec, freeze_A, device)
        except (ValueError, TypeError) as exc:
            if type(exc) not in (ValueError, TypeError):
                raise  # a subclass may not take a plain message
            raise type(exc)(f"{name}: {exc}; the model is unchanged (leave the layer out with "
                            f"exclude_modules=[{name!r}] if it cannot be converted)") from exc
    return layers


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _mark_trainable(model: nn.Module, bias: str, freeze_A: bool) -> None:
    """PEFT's mark_only_lora_as_trainable: everything frozen but the adapters and, per bias mode, biases."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, QLoRALinear):
            module.lora_A.requires_grad_(not freeze_A)
            module.lora_B.requires_grad_(True)
            if bias == "lora_only" and module.bias is not None:
                module.bias.requires_grad_(True)
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:  # PEFT selects by name, so this matches exactly the biases PEFT would train
                param.requires_grad_(True)


def _hf_quantized(model: nn.Module) -> bool:
    """Whether transformers quantized this model on load (BitsAndBytesConfig & co.) and marked it so."""
    return bool(getattr(model, "is_quantized", False)) and getattr(model, "hf_quantizer", None) is not None


def _float_stored_bnb_layers(model: nn.Module) -> list[str]:
    """bitsandbytes 4-bit layers whose packed codes are stored in a float dtype (bnb_4bit_quant_storage, as FSDP
    setups use): model.half() or .float() would convert those bytes as if they were numbers."""
    linear4bit = _bnb_linear4bit_class()
    if linear4bit is None:
        return []
    return [name for name, module in model.named_modules()
            if isinstance(module, linear4bit) and module.weight.is_floating_point()]


def _install(model: nn.Module, layers: dict[str, QLoRALinear], spec: LoraSpec, freeze_A: bool) -> None:
    """Swap the converted layers in, mark the trainable set, record the config. Nothing here can fail halfway."""
    for name, layer in layers.items():
        _set_submodule(model, name, layer)
    _mark_trainable(model, spec.bias, freeze_A)
    model.qlora_ext_config = spec
    if not _hf_quantized(model):
        return
    # transformers' Trainer refuses a model with is_quantized set unless a PEFT adapter is attached: a quantized
    # base with nothing to train. This one has trainable adapters now, so it is no longer that. The signal for an
    # attached PEFT adapter (_hf_peft_config_loaded) cannot be used: save_pretrained, and with it every Trainer
    # checkpoint, would then export the adapter through PEFT, which finds no PEFT layer and fails. Besides that
    # check, transformers reads is_quantized only to refuse .half()/.float(); a QLoRALinear survives those (its NF4
    # storage keeps its dtypes), and so does a bitsandbytes layer whose codes are stored as uint8. hf_quantizer and
    # quantization_method stay: .to(dtype) is still refused and save_pretrained still writes bitsandbytes' format.
    # merge_and_unload sets is_quantized again when it takes the adapters off.
    exposed = _float_stored_bnb_layers(model)
    if exposed:
        dtype = model.get_submodule(exposed[0]).weight.dtype
        warnings.warn(f"apply: {len(exposed)} bitsandbytes layer(s) left as they are ({exposed[0]}"
                      f"{', ...' if len(exposed) > 1 else ''}) store their 4-bit codes as {dtype} "
                      f"(bnb_4bit_quant_storage), which model.half()/.float() would corrupt; model.is_quantized stays "
                      f"set, so transformers keeps refusing those casts, and its Trainer refuses the model as purely "
                      f"quantized. Adapt those layers too (target_modules), or load the model with "
                      f"bnb_4bit_quant_storage=torch.uint8", stacklevel=3)
        return
    model.is_quantized = False
    model.qlora_ext_cleared_is_quantized = True


def apply(model: nn.Module, config: Any = None, *, freeze_A: bool = False,
          device: Optional[Union[str, torch.device]] = None, progress: Optional[bool] = None,
          **lora_options: Any) -> nn.Module:
    """Replace the target linear layers of `model` by QLoRALinear, in place, and return `model`.

    config: a peft.LoraConfig or a mapping of its fields; or None, with those fields as keyword arguments
        (r, lora_alpha, target_modules, exclude_modules, lora_dropout, bias, use_rslora, init_lora_weights,
        task_type, base_model_name_or_path; PEFT's defaults: r=8, lora_alpha=8). target_modules: a list
        (entries match a module name or its dotted suffix), a regex (matched against the whole name), or
        "all-linear" (every linear layer except the output head); None uses PEFT's default for the model type.
    freeze_A: LoRA-FA, lora_A stays at its initialization and only lora_B trains.
    device: where nn.Linear layers are quantized and their QLoRALinear lives. Default: each QLoRALinear stays
        on its layer's device, so the model is left on the device(s) it was on (move it with model.to()
        afterwards); a layer on the CPU is quantized on the current CUDA device when one is available (much
        faster, and layer by layer, so the full-precision model never has to fit on the GPU) and moved back.
        bitsandbytes Linear4bit layers are taken as they are (same bytes, same device).
    progress: show a tqdm bar; default: when more than a few dozen layers are converted.

    All or nothing: every target is checked (type, rank, finite weights) and converted before the first one is
    swapped in, so on an error the model is exactly as it was, and the error names the layer. (The original
    layers are therefore held until the end: peak memory is the model plus its NF4 copies, about a quarter more
    for a bf16 model.) apply() runs once per model, and refuses a PEFT model (pass its base model).

    Afterwards only lora_A/lora_B (lora_B only with freeze_A) and, per `bias` ("none" | "all" | "lora_only",
    as in PEFT), biases require grad; each new layer keeps the train/eval mode of the layer it replaces. The
    resolved config travels with the model for save_adapter(). A model transformers loaded quantized
    (BitsAndBytesConfig) is left in a state its Trainer accepts for fine-tuning.
    """
    spec, targets = _plan(model, config, lora_options, "apply")
    _install(model, _convert(model, targets, spec, freeze_A, device, progress), spec, freeze_A)
    return model


def _plan(model: nn.Module, config: Any, lora_options: dict[str, Any], caller: str) -> tuple[LoraSpec, list[str]]:
    """The resolved config and the checked targets of an apply(); raises before anything is changed."""
    spec = _resolve_spec(config, lora_options)
    _refuse_peft_model(model, caller)
    _refuse_reapply(model)
    if spec.target_modules is None:
        spec = replace(spec, target_modules=_default_targets(model))
    targets = _find_targets(model, spec)
    _check_targets(model, targets, spec)
    if _is_all_linear(spec.target_modules):
        # Like PEFT, record the layers "all-linear" resolved to, so a loader rebuilds exactly these.
        spec = replace(spec, target_modules=sorted(targets))
    return spec, targets


def _qlora_modules(model: nn.Module) -> dict[str, QLoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QLoRALinear)}


def _adapter_layout(model: nn.Module, adapted: Union[list[str], dict[str, Any]], bias: str) -> dict[str, str]:
    """PEFT's on-disk key → our parameter name, for every tensor an adapter file holds under this bias mode
    (PEFT saves lora_A/lora_B, plus the adapted layers' biases for "lora_only" or every bias for "all").
    `adapted` names the adapted layers; they need not be converted yet (load_adapter checks a file first)."""
    layout = {}
    for name in adapted:
        layout[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = f"{name}.lora_A"
        layout[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = f"{name}.lora_B"
    if bias == "none":
        return layout
    for name in dict(model.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        if owner in adapted:
            if leaf == "bias":
                layout[f"{_PEFT_PREFIX}{owner}.base_layer.bias"] = name  # PEFT's LoRA layer wraps the base layer
        elif bias == "all" and "bias" in name:
            layout[f"{_PEFT_PREFIX}{name}"] = name  # PEFT selects by name: exactly the biases PEFT would train
    return layout


def _adapter_params(model: nn.Module, bias: str) -> dict[str, nn.Parameter]:
    """PEFT's on-disk key → our parameter, for a converted model."""
    return {key: model.get_parameter(name)
            for key, name in _adapter_layout(model, _qlora_modules(model), bias).items()}


def _planned_shapes(model: nn.Module, targets: list[str], spec: LoraSpec) -> dict[str, tuple[int, ...]]:
    """PEFT's key → shape of every adapter tensor that apply(model, spec) would create, without converting."""
    shapes = {}
    for key, name in _adapter_layout(model, targets, spec.bias).items():
        owner, _, leaf = name.rpartition(".")
        if owner in targets and leaf in ("lora_A", "lora_B"):
            module = model.get_submodule(owner)
            shapes[key] = ((spec.r, module.in_features) if leaf == "lora_A" else (module.out_features, spec.r))
        else:
            shapes[key] = tuple(model.get_parameter(name).shape)
    return shapes


def _check_adapter_file(path: Any, shapes: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor of the file finds its parameter, with its shape, and vice versa; else one error naming all."""
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"load_adapter: {path} does not fit this model: missing {missing[:4]} "
                         f"({len(missing)} in all), unexpected {unexpected[:4]} ({len(unexpected)} in all); load "
                         f"it into the base model it was trained on, with the same target_modules and bias mode")
    wrong = [f"{key} is {tuple(tensors[key].shape)}, the model's {shape}"
             for key, shape in shapes.items() if tuple(tensors[key].shape) != shape]
    if wrong:
        raise ValueError(f"load_adapter: {path} has tensors of the wrong shape for this model: "
                         f"{'; '.join(wrong[:4])} ({len(wrong)} in all); the adapter was trained on another model or "
                         f"with another r")


def _peft_config_dict(spec: LoraSpec, model: nn.Module) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": spec.task_type,
        "base_model_name_or_path": spec.base_model_name_or_path or getattr(model, "name_or_path", None) or None,
        "r": spec.r,
        "lora_alpha": spec.lora_alpha,
        "lora_dropout": spec.lora_dropout,
        "target_modules": spec.target_modules,
        "exclude_modules": spec.exclude_modules,
        "bias": spec.bias,
        "use_rslora": spec.use_rslora,
        "init_lora_weights": spec.init_lora_weights,
        "inference_mode": True,  # PEFT's save_pretrained writes True as well
        **_UNSUPPORTED_OFF,
    }


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], config: Any = None) -> None:
    """Write the adapter of `model` to the directory `path` in PEFT's format.

    config: as for apply(); default: the config apply()/load_adapter() recorded on the model.
    After PiSSA/OLoRA init our base is the residual w − s·B₀·A₀. The file keeps init_lora_weights="pissa"/"olora",
    and PEFT's from_pretrained then recomputes that residual from the base it is given before loading A and B:
    give it the original full-precision base (PEFT refuses PiSSA on a 4-bit base; OLoRA it redoes on the
    dequantized 4-bit base, as our from_bnb does).
    """
    spec = _resolve_spec(config, {}) if config is not None else getattr(model, "qlora_ext_config", None)
    if spec is None:
        raise ValueError("save_adapter: the model carries no adapter config (it was not made by qlora_ext.apply "
                         "or load_adapter); pass config=")
    params = _adapter_params(model, spec.bias)
    if not params:
        raise ValueError("save_adapter: the model has no QLoRALinear layer")
    os.makedirs(path, exist_ok=True)
    save_file({key: param.detach().contiguous().cpu() for key, param in params.items()},
              os.path.join(path, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(_peft_config_dict(spec, model), f, indent=2, sort_keys=True)


def load_adapter(model: nn.Module, path: Union[str, os.PathLike], *,
                 device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Load a PEFT LoRA adapter directory (ours or PEFT's) into `model` and return `model`.

    A model without QLoRALinear layers is converted as apply(model, <the file's config>, device=device) would; a
    converted one must match the file's r, lora_alpha and use_rslora. Every adapter tensor must find its
    parameter, with its shape, and vice versa. All or nothing: the files are read and checked against the model
    before it is converted or any tensor is written, so on an error the model is exactly as it was.
    """
    with open(os.path.join(path, ADAPTER_CONFIG_NAME), encoding="utf-8") as f:
        file_config = json.load(f)
    if file_config.get("init_lora_weights") is False:
        # PEFT's "leave the weights uninitialized" (common in its tests); the file supplies them anyway.
        file_config["init_lora_weights"] = True
    tensors = load_file(os.path.join(path, ADAPTER_WEIGHTS_NAME))
    layers = _qlora_modules(model)
    if layers:
        spec = _resolve_spec(file_config, {})
        for name, layer in layers.items():
            if (layer.r, layer.lora_alpha, layer.use_rslora) != (spec.r, spec.lora_alpha, spec.use_rslora):
                raise ValueError(f"load_adapter: {name} has r={layer.r}, lora_alpha={layer.lora_alpha}, "
                                 f"use_rslora={layer.use_rslora}; the adapter has r={spec.r}, "
                                 f"lora_alpha={spec.lora_alpha}, use_rslora={spec.use_rslora}")
        params = _adapter_params(model, spec.bias)
        _check_adapter_file(path, {key: tuple(param.shape) for key, param in params.items()}, tensors)
    else:
        spec, targets = _plan(model, file_config, {}, "load_adapter")
        _check_adapter_file(path, _planned_shapes(model, targets, spec), tensors)
        _install(model, _convert(model, targets, spec, False, device, None), spec, False)
        params = _adapter_params(model, spec.bias)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
    model.qlora_ext_config = spec
    return model


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0,
                           weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """LoRA+ (Hayou et al. 2024) optimizer parameter groups: lora_B learns `ratio` times faster than lora_A.

    Grouped as PEFT's create_loraplus_optimizer does: lora_A (and any other trainable matrix) at `lr`; lora_B at
    lr·ratio; trainable 1-D parameters (biases) at lr·ratio without weight decay. Empty groups are left out.
    Use as torch.optim.AdamW(lora_plus_param_groups(model, lr=2e-4)).
    """
    if not ratio > 0:
        raise ValueError(f"lora_plus_param_groups: ratio must be > 0, got {ratio!r}")
    group_a, group_b, group_b_no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim == 1:
            group_b_no_decay.append(param)
        elif name.rpartition(".")[2] == "lora_B":
            group_b.append(param)
        else:
            group_a.append(param)
    groups = [
        {"params": group_a, "lr": lr, "weight_decay": weight_decay},
        {"params": group_b, "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": group_b_no_decay, "lr": lr * ratio, "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("lora_plus_param_groups: the model has no trainable parameter")
    return groups


def _bnb_linear4bit(weight_nf4: NF4Weight, bias: Optional[torch.Tensor], dtype: torch.dtype) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("merge_and_unload(requantize=True) returns bitsandbytes Linear4bit layers; "
                          "install bitsandbytes or merge with requantize=False") from e
    packed, quant_state = weight_nf4.to_bnb()
    double_quant = weight_nf4.double_quant
    n, k = weight_nf4.shape
    # meta: the placeholder full-precision weight nn.Linear would allocate is replaced right away.
    layer = bnb.nn.Linear4bit(k, n, bias=bias is not None, compute_dtype=dtype, compress_statistics=double_quant,
                              quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=quant_state,
                                     blocksize=weight_nf4.blocksize, compress_statistics=double_quant,
                                     quant_type="nf4", module=layer, bnb_quantized=True)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return layer


def _merge_layer(layer: QLoRALinear, dtype: torch.dtype, requantize: bool) -> tuple[nn.Module, Optional[float]]:
    # The merged layer takes the train/eval mode of the layer it replaces, as apply's layers do.
    if not requantize:
        return layer.merge(dtype).requires_grad_(False).train(layer.training), None
    merged = layer.merge(torch.float32)
    w = merged.weight.detach()
    weight_nf4 = quantize_nf4(w.to(dtype), blocksize=layer.weight_nf4.blocksize,
                              double_quant=layer.weight_nf4.double_quant)
    error = (weight_nf4.dequantize(torch.float32).double() - w.double()).norm() / w.double().norm()
    return _bnb_linear4bit(weight_nf4, merged.bias, dtype).train(layer.training), error.item()


def _model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's own floating-point parameters (the first one outside its QLoRALinear layers, as
    transformers' model.dtype takes the first one): the dtype activations reach the merged layers in."""
    adapted = {id(p) for layer in _qlora_modules(model).values() for p in layer.parameters()}
    for param in model.parameters():
        if id(param) not in adapted and param.is_floating_point():
            return param.dtype
    return None


def merge_and_unload(model: nn.Module, dtype: Optional[torch.dtype] = None, requantize: bool = False,
                     progress: Optional[bool] = None) -> nn.Module:
    """Fold every adapter into its base and return the model with plain layers (in place where possible).

    dtype: of the merged layers; default: the model's, i.e. that of its other floating-point parameters (those
    outside the QLoRALinear layers), so that the next forward runs; a model of QLoRALinear layers only keeps
    each layer's adapter dtype.
    requantize=False: each QLoRALinear becomes an nn.Linear holding dequant(w) + s·lora_B·lora_A (summed in
    fp32, stored in `dtype`); no precision is lost beyond the cast, so this is the export to use.
    requantize=True: the merged weight is quantized to NF4 again (same blocksize and double quant) and held by a
    bitsandbytes Linear4bit. That adds rounding error: ‖dequant(nf4(w')) − w'‖/‖w'‖ of each layer is reported in
    a warning and kept in `model.qlora_ext_requantize_error` ({layer name: relative error}).
    The merged weights are frozen, like the rest of the model after apply().
    """
    names = list(_qlora_modules(model))
    model_dtype = dtype or _model_dtype(model)
    show = progress if progress is not None else len(names) >= _PROGRESS_MIN_LAYERS
    errors = {}
    for name in tqdm(names, desc="qlora_ext: merging", unit="layer", disable=not show):
        layer = model.get_submodule(name)
        merged, error = _merge_layer(layer, model_dtype or layer.lora_A.dtype, requantize)
        if name:
            _set_submodule(model, name, merged)
        else:  # the model is a single QLoRALinear
            model = merged
        if error is not None:
            errors[name] = error
    if hasattr(model, "qlora_ext_config"):
        del model.qlora_ext_config  # no adapter left to save
    if getattr(model, "qlora_ext_cleared_is_quantized", False):
        # Without adapters the model is a quantized base again (see _install) if it still holds bitsandbytes
        # layers: those apply did not target, or requantize=True. Merged to full precision, it no longer is.
        bnb = sys.modules.get("bitsandbytes")
        quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ()
        model.is_quantized = any(isinstance(module, quantized) for module in model.modules())
        del model.qlora_ext_cleared_is_quantized
    if requantize and errors:
        worst = max(errors, key=errors.get)
        warnings.warn(f"merge_and_unload: requantizing {len(errors)} merged layers to NF4 added a relative weight "
                      f"error of {sum(errors.values()) / len(errors):.3%} on average and {errors[worst]:.3%} at "
                      f"most ({worst or 'the model'}); merge with requantize=False for a lossless export",
                      stacklevel=2)
        model.qlora_ext_requantize_error = errors
    return model
