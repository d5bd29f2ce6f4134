"""Training integration: the stock transformers Trainer and bitsandbytes' paged AdamW train a
model converted by qlora_ext.apply, and only the adapters move.

The models and data come from examples/train_hf_trainer.py (imported by path), so these tests also keep the example
working. The Trainer runs on the CPU everywhere (and on CUDA when there is a GPU); the bitsandbytes paged
optimizers need CUDA, since their state lives in CUDA unified memory, and skip with a reason without it.
"""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import qlora_ext
from conftest import requires_cuda

transformers = pytest.importorskip("transformers", reason="transformers not importable")
pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")


def _load_example():
    path = Path(__file__).resolve().parent.parent / "examples" / "train_hf_trainer.py"
    spec = importlib.util.spec_from_file_location("train_hf_trainer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()

# Every k a multiple of 64, as on the kernels' fast path.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# bitsandbytes pages only optimizer state tensors of at least 1e5 elements: at r=16, the MLP adapters of width
# 6400 (lora_A of down_proj [16, 6400], lora_B of gate/up_proj [6400, 16]) are the smallest that get paged.
PAGED = dict(hidden_size=256, intermediate_size=6400, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2)


def snapshot(model):
    """Copies of every state_dict tensor, the NF4 base (packed codes, absmax, ...) included."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_only_adapters_changed(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    adapters = sorted(key for key in before if key.rpartition(".")[2] in ("lora_A", "lora_B"))
    assert adapters, "the model has no adapter"
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable == adapters
    changed = sorted(key for key in before if not torch.equal(before[key], after[key]))
    assert changed == adapters


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_trainer_trains_only_the_adapters(device, tmp_path):
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = example.build_model(TINY, dtype, device)
    before = snapshot(model)
    trainer = example.make_trainer(model, example.ByteWindows(example.DATA, seq=32), str(tmp_path), max_steps=2,
                                   batch=2, lr=1e-3, optim=example.default_optim(device), device=device,
                                   logging_steps=1)
    result = trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2
    assert all(math.isfinite(loss) for loss in losses + [result.training_loss]), losses
    # Two steps: the first moves lora_B off zero, which gives lora_A a gradient in the second.
    assert_only_adapters_changed(model, before)


def test_example_script_saves_the_trained_adapter(tmp_path):
    threads = torch.get_num_threads()  # main() sets 1 thread on the CPU
    try:
        example.main(["--max-steps", "1", "--device", "cpu", "--output-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()

    model = example.build_model(example.CPU_MODEL, torch.float32, torch.device("cpu"))
    qlora_ext.load_adapter(model, tmp_path)
    # lora_B starts at zero, so a nonzero one is the trained adapter.
    assert all(layer.lora_B.abs().sum() > 0 for layer in model.modules() if isinstance(layer, qlora_ext.QLoRALinear))


def cuda_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not importable")
    from bitsandbytes.cextension import lib

    if not lib.compiled_with_cuda:
        pytest.skip("bitsandbytes loaded no CUDA library, so it has no paged optimizers here")
    return bnb


@requires_cuda
@pytest.mark.parametrize("optimizer", ["PagedAdamW", "PagedAdamW8bit"])
def test_bnb_paged_adamw_trains_the_adapters(optimizer):
    bnb = cuda_bitsandbytes()
    device = torch.device("cuda")
    model = example.build_model(PAGED, torch.bfloat16, device)
    ids = example.ByteWindows(example.DATA, seq=64).windows[:4].to(device)
    before = snapshot(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = getattr(bnb.optim, optimizer)(params, lr=1e-3, weight_decay=0.0)

    losses = []
    for _ in range(10):  # one fixed batch: the loss must fall (about 1.5 in 10 steps on the CPU reference)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())

    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0] - 0.5, losses
    states = [opt.state[p] for p in params]
    assert any(getattr(state["state1"], "is_paged", False) for state in states), "no optimizer state was paged"
    if optimizer == "PagedAdamW8bit":
        assert any(state["state1"].dtype == torch.uint8 for state in states), "no optimizer state is 8-bit"
    assert_only_adapters_changed(model, before)


# ---- a model transformers loaded in 4 bits ---------------------------------------------------------------------
# transformers' Trainer refuses a model it quantized on load (is_quantized) unless trainable adapters are attached,
# checked through PEFT (a PeftModel, or _hf_peft_config_loaded): "You cannot perform fine-tuning on purely quantized
# models". After qlora_ext.apply the adapters are attached, and the Trainer must accept the model.
def save_tiny_llama(path):
    config = transformers.LlamaConfig(vocab_size=256, max_position_embeddings=256, tie_word_embeddings=False,
                                      use_cache=False, **TINY)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def load_4bit(path, device, quantization=None):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not importable")
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantization = quantization or transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype)
    try:
        model = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=quantization,
                                                              device_map={"": str(device)}, dtype=compute_dtype)
    except (ImportError, RuntimeError, ValueError) as exc:  # a bitsandbytes build without this device's backend
        pytest.skip(f"bitsandbytes cannot load a 4-bit model on {device}: {exc}")
    layer = model.model.layers[0].self_attn.q_proj
    if not isinstance(layer, bnb.nn.Linear4bit) or getattr(layer.weight, "quant_state", None) is None:
        pytest.skip(f"bitsandbytes did not quantize the model on {device}")
    return model


def tiny_trainer(model, tmp_path, device):
    return example.make_trainer(model, example.ByteWindows(example.DATA, seq=32), str(tmp_path / "run"), max_steps=2,
                                batch=2, lr=1e-3, optim="adamw_torch", device=device, logging_steps=1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_trainer_accepts_a_4bit_transformers_model_after_apply(device, tmp_path):
    device = torch.device(device)
    save_tiny_llama(tmp_path / "base")
    model = load_4bit(tmp_path / "base", device)
    assert model.is_quantized
    with pytest.raises(ValueError, match="purely quantized"):  # the check this is about, as it stands
        tiny_trainer(model, tmp_path, device)

    qlora_ext.apply(model, r=4, lora_alpha=8, target_modules="all-linear")
    adapted = [module for module in model.modules() if isinstance(module, qlora_ext.QLoRALinear)]
    assert len(adapted) == 7 * TINY["num_hidden_layers"]  # every projection: none is left as a Linear4bit
    before = snapshot(model)
    trainer = tiny_trainer(model, tmp_path, device)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert_only_adapters_changed(model, before)
    # The rest of transformers' quantization state stays: .to(dtype) is still refused, as for any 4-bit model.
    assert model.hf_quantizer is not None
    with pytest.raises(ValueError, match="cannot cast a bitsandbytes model"):
        model.to(torch.float16)


def test_trainer_check_sees_adapters_on_a_quantized_model(tmp_path):
    # The state transformers leaves on a model it quantized on load, without a 4-bit load (bitsandbytes may lack a
    # CPU backend): is_quantized set, and a quantizer that allows training on top of the quantized weights.
    class StandInQuantizer:
        is_trainable = True
        is_qat_trainable = False

    device = torch.device("cpu")
    save_tiny_llama(tmp_path / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    model.is_quantized, model.hf_quantizer = True, StandInQuantizer()
    with pytest.raises(ValueError, match="purely quantized"):
        tiny_trainer(model, tmp_path, device)
    qlora_ext.apply(model, r=4, lora_alpha=8, target_modules="all-linear")
    before = snapshot(model)
    tiny_trainer(model, tmp_path, device).train()
    assert_only_adapters_changed(model, before)
    # Without its adapters, merged to full precision, the model holds no quantized layer any more.
    merged = qlora_ext.merge_and_unload(model)
    assert not merged.is_quantized


def test_merging_back_to_4bit_marks_the_model_quantized_again(tmp_path):
    device = torch.device("cpu")
    save_tiny_llama(tmp_path / "base")
    model = load_4bit(tmp_path / "base", device)
    qlora_ext.apply(model, r=4, lora_alpha=8, target_modules=["q_proj"])  # the other layers stay Linear4bit
    assert not model.is_quantized
    merged = qlora_ext.merge_and_unload(model)
    assert merged.is_quantized  # a quantized base with nothing trainable: the Trainer refuses it again
    with pytest.raises(ValueError, match="purely quantized"):
        tiny_trainer(merged, tmp_path, device)


def test_float_stored_4bit_layers_keep_the_cast_guard(tmp_path):
    # With bnb_4bit_quant_storage=bfloat16 (FSDP setups), a Linear4bit's codes are bf16-typed bytes that .half()
    # would convert as numbers; transformers' is_quantized guard against that must stay while such a layer is left.
    device = torch.device("cpu")
    save_tiny_llama(tmp_path / "base")
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.float32,
                                                   bnb_4bit_quant_storage=torch.bfloat16)
    partly = load_4bit(tmp_path / "base", device, quantization)
    with pytest.warns(UserWarning, match=r"store their 4-bit codes as torch.bfloat16.*is_quantized stays set"):
        qlora_ext.apply(partly, r=4, lora_alpha=8, target_modules=["q_proj"])
    assert partly.is_quantized
    with pytest.raises(ValueError, match=r"\.half\(\)` is not supported for quantized model"):
        partly.half()
    # Every 4-bit layer adapted (their codes now live in the layers' own uint8 storage): nothing left to guard.
    fully = qlora_ext.apply(load_4bit(tmp_path / "base", device, quantization), r=4, lora_alpha=8,
                            target_modules="all-linear")
    assert not fully.is_quantized
    tiny_trainer(fully, tmp_path, device)  # accepted
