"""Model surgery is all or nothing: apply() and load_adapter() either convert/load everything or leave the model
exactly as it was (same modules, same requires_grad flags, same tensors), with an error naming the layer and the
fix. Also: apply() runs once per model and refuses PEFT models, new layers keep the train/eval mode of what they
replace, and merge_and_unload keeps the model's dtype. CPU, tiny random-init transformers Llamas (no download).
"""
import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qlora_ext import QLoRALinear
from qlora_ext.peft_compat import apply, load_adapter, merge_and_unload, save_adapter

transformers = pytest.importorskip("transformers", reason="transformers not importable")

N_LAYERS = 2


def tiny_llama(seed=0):
    """k_proj/v_proj are [32, 64] (2 key-value heads of 16), every other projection at least [64, 64]."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      attention_bias=True)
    return transformers.LlamaForCausalLM(config)


def state_of(model):
    """Everything a failed surgery must leave as it was: which module object sits at each name, every parameter's
    requires_grad flag, every state_dict tensor (copied), train/eval modes and the recorded config."""
    return {
        "modules": {name: id(module) for name, module in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "tensors": {key: value.detach().clone() for key, value in model.state_dict().items()},
        "training": {name: module.training for name, module in model.named_modules()},
        "config": getattr(model, "qlora_ext_config", None),
    }


def assert_unchanged(model, before):
    after = state_of(model)
    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    assert after["config"] == before["config"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():  # bit for bit; a NaN planted by a test equals itself
        torch.testing.assert_close(after["tensors"][key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def token_ids():
    return torch.randint(0, 96, (2, 7))


# ---- apply ----------------------------------------------------------------------------------------------------
def test_apply_with_a_rank_too_large_for_one_layer_changes_nothing():
    model = tiny_llama()
    before = state_of(model)
    # r=48 fits q_proj [64, 64] (converted first) but not k_proj [32, 64].
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj: r=48 exceeds min\(n, k\)=32 of its "
                                         r"\[32, 64\] weight; use r <= 32 or leave the layer out \(exclude_modules="):
        apply(model, target_modules="all-linear", r=48)
    assert_unchanged(model, before)


def test_apply_with_a_nan_weight_in_a_later_layer_changes_nothing():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[N_LAYERS - 1].mlp.down_proj.weight[3, 5] = float("nan")
    before = state_of(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: the weight has 1 non-finite \(NaN/Inf\) "
                                         r"value\(s\).*reload or repair the checkpoint"):
        apply(model, target_modules="all-linear", r=4)
    assert_unchanged(model, before)


def test_apply_failing_while_converting_changes_nothing(monkeypatch):
    # An error only the conversion itself finds (here: injected into the last layer) must not leave the layers
    # converted before it in the model.
    model = tiny_llama()
    before = state_of(model)
    from_linear = QLoRALinear.from_linear.__func__
    targets = sum(isinstance(mod, torch.nn.Linear) for name, mod in model.named_modules() if name.startswith("model."))
    calls = []

    # The last target converted is the last decoder layer's down_proj. Count calls rather than compare weights:
    # on a machine with a GPU, apply quantizes a CUDA copy of each CPU linear, not the module itself.
    def failing(cls, linear, **options):
        calls.append(1)
        if len(calls) == targets:
            raise ValueError("cannot convert this one")
        return from_linear(cls, linear, **options)

    monkeypatch.setattr(QLoRALinear, "from_linear", classmethod(failing))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj: cannot convert this one; the model is "
                                         r"unchanged"):
        apply(model, target_modules="all-linear", r=4)
    assert_unchanged(model, before)


def test_apply_with_a_bad_option_changes_nothing():
    model = tiny_llama()
    before = state_of(model)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\), got 1.5"):
        apply(model, target_modules="all-linear", r=4, lora_dropout=1.5)
    with pytest.raises(ValueError, match=r"r \(the adapter rank\) must be a positive int, got True \(bool\)"):
        apply(model, target_modules="all-linear", r=True)
    assert_unchanged(model, before)


def test_apply_twice_is_refused_and_the_first_adapter_stays_whole(tmp_path):
    model = apply(tiny_llama(), target_modules=["q_proj"], r=4)
    before = state_of(model)
    # A second call with other targets would record only its own config, and save_adapter would then write a
    # file from which PEFT silently drops the first call's adapters.
    with pytest.raises(ValueError, match=r"already has 2 QLoRALinear layer\(s\).*Pass every target in one call"):
        apply(model, target_modules=["v_proj"], r=4)
    assert_unchanged(model, before)
    save_adapter(model, tmp_path)
    assert {key.split(".")[-3] for key in load_file(tmp_path / "adapter_model.safetensors")} == {"q_proj"}


def test_apply_refuses_a_peft_model():
    peft = pytest.importorskip("peft", reason="peft not importable")
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    before = state_of(peft_model)
    with pytest.raises(ValueError, match=r"apply: the PeftModel is a PEFT model; .*peft_model.unload\(\)"):
        apply(peft_model, target_modules="all-linear", r=4)
    assert_unchanged(peft_model, before)
    # PEFT's layers injected into a plain model (PEFT's inject_adapter_in_model, transformers' add_adapter).
    injected = peft.inject_adapter_in_model(peft.LoraConfig(r=4, target_modules=["v_proj"]), tiny_llama())
    before = state_of(injected)
    with pytest.raises(ValueError, match=r"holds PEFT adapter layers \(model\.layers\.0\.self_attn\.v_proj\)"):
        apply(injected, target_modules="all-linear", r=4)
    assert_unchanged(injected, before)
    assert torch.isfinite(peft_model(token_ids()).logits).all()  # still runs


def test_new_layers_keep_the_mode_of_what_they_replace():
    model = tiny_llama().train()
    model.model.layers[1].eval()
    apply(model, target_modules="all-linear", r=4)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, QLoRALinear)}
    assert len(layers) == 7 * N_LAYERS
    for name, layer in layers.items():
        assert layer.training == name.startswith("model.layers.0."), name
    merged = merge_and_unload(model)
    for name in layers:
        assert merged.get_submodule(name).training == name.startswith("model.layers.0."), name


# ---- load_adapter ---------------------------------------------------------------------------------------------
def saved_adapter(path, targets=("q_proj", "v_proj")):
    model = apply(tiny_llama(), target_modules=list(targets), r=4, lora_alpha=8)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator))
    save_adapter(model, path)
    return model


def rewrite_weights(path, edit):
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


LAST_B = f"base_model.model.model.layers.{N_LAYERS - 1}.self_attn.v_proj.lora_B.weight"


@pytest.mark.parametrize("defect, match", [
    (lambda t: t.update({LAST_B: torch.zeros(32, 5)}), r"wrong shape for this model: base_model\.model\.model\."
                                                       r"layers\.1\.self_attn\.v_proj\.lora_B\.weight is \(32, 5\), "
                                                       r"the model's \(32, 4\) \(1 in all\)"),
    (lambda t: t.pop(LAST_B), r"does not fit this model: missing \['base_model\.model\.model\.layers\.1\.self_attn"
                              r"\.v_proj\.lora_B\.weight'\]"),
    (lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)}),
     r"unexpected \['base_model\.model\.model\.layers\.0\.mlp\.up_proj\.lora_A\.weight'\]"),
], ids=["wrong-shape", "missing", "unexpected"])
@pytest.mark.parametrize("into", ["fresh-model", "applied-model"])
def test_load_adapter_checks_the_whole_file_before_changing_anything(defect, match, into, tmp_path):
    saved_adapter(tmp_path)
    rewrite_weights(tmp_path, defect)
    # A fresh model must not be quantized and converted for a file that does not fit; an applied one must not
    # have its first adapters overwritten before a later tensor turns out wrong.
    model = tiny_llama() if into == "fresh-model" else apply(tiny_llama(), target_modules=["q_proj", "v_proj"],
                                                              r=4, lora_alpha=8)
    before = state_of(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_load_adapter_into_a_fresh_model_loads_every_tensor(tmp_path):
    trained = saved_adapter(tmp_path)
    model = load_adapter(tiny_llama().eval(), tmp_path)
    for name, layer in model.named_modules():
        if isinstance(layer, QLoRALinear):
            source = trained.get_submodule(name)
            assert torch.equal(layer.lora_A, source.lora_A) and torch.equal(layer.lora_B, source.lora_B)
            assert not layer.training  # the mode of the layer it replaced
    ids = token_ids()
    torch.testing.assert_close(model(ids).logits, trained.eval()(ids).logits, rtol=0, atol=0)


def test_load_adapter_refuses_a_peft_model(tmp_path):
    peft = pytest.importorskip("peft", reason="peft not importable")
    saved_adapter(tmp_path)
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    before = state_of(peft_model)
    with pytest.raises(ValueError, match=r"load_adapter: the PeftModel is a PEFT model"):
        load_adapter(peft_model, tmp_path)
    assert_unchanged(peft_model, before)


# ---- merge_and_unload -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_and_unload_keeps_the_models_dtype(dtype):
    model = apply(tiny_llama().to(dtype), target_modules="all-linear", r=4)
    merged = merge_and_unload(model)
    linears = [module for module in merged.modules() if isinstance(module, nn.Linear)]
    assert len(linears) == 7 * N_LAYERS + 1  # the merged layers and the head
    assert {module.weight.dtype for module in linears} == {dtype}
    assert torch.isfinite(merged(token_ids()).logits).all()  # the next forward runs


def test_merge_and_unload_of_a_bare_layer_keeps_its_adapter_dtype():
    layer = QLoRALinear.from_linear(nn.Linear(64, 32), r=4)
    merged = merge_and_unload(copy.deepcopy(layer))
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    x = torch.randn(3, 64)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
