"""End-to-end QLoRA training step: a Llama-architecture model from a transformers LlamaConfig, random init.

Every implementation starts from the same bf16 model (same seed), then:
    bf16_peft  get_peft_model(model, LoraConfig(target_modules="all-linear", ...)) on the bf16 model
    bnb_peft   every nn.Linear of the decoder layers replaced by bitsandbytes Linear4bit (nf4, double quant,
               bf16 compute) quantized from the same weights -- what from_pretrained(quantization_config=
               BitsAndBytesConfig(...)) builds -- then the same get_peft_model
    ours       qlora_ext.apply(model, r=..., lora_alpha=..., target_modules="all-linear") when the package has
               it, else every such nn.Linear replaced by qlora_ext.QLoRALinear.from_linear(...)
"all-linear" = q/k/v/o and gate/up/down of every decoder layer (PEFT's definition: lm_head excluded).
A step = forward with labels (causal-LM loss) + backward + AdamW step + zero_grad; no gradient checkpointing.
The time of a step is host wall time around the synchronized step (Python overhead is part of what users pay).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

from . import _sweep
from ._impls import Unavailable, _bnb_linear4bit, _err

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(e2e: _sweep.E2ESweep):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=e2e.hidden,
        intermediate_size=e2e.intermediate,
        num_attention_heads=e2e.heads,
        num_key_value_heads=e2e.kv_heads,
        num_hidden_layers=e2e.layers,
        vocab_size=e2e.vocab,
        max_position_embeddings=max(8192, e2e.seq),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        use_cache=False,
    )


def _bf16_model(e2e: _sweep.E2ESweep, device):
    import torch
    from transformers import LlamaForCausalLM

    cfg = llama_config(e2e)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.requires_grad_(False)
    return model


def _replace_decoder_linears(model, make: Callable) -> int:
    """Replace every nn.Linear inside the decoder layers by make(linear); returns how many."""
    from torch import nn

    count = 0
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and name in DECODER_LINEARS:
                    setattr(parent, name, make(child))
                    count += 1
    return count


def _peft(model, e2e: _sweep.E2ESweep, adapter_dtype: str):
    import torch
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=e2e.r, lora_alpha=e2e.lora_alpha, lora_dropout=0.0, target_modules="all-linear", bias="none", task_type="CAUSAL_LM"
    )
    try:
        model = get_peft_model(model, cfg, autocast_adapter_dtype=adapter_dtype == "fp32")
    except TypeError:
        model = get_peft_model(model, cfg)
    want = torch.float32 if adapter_dtype == "fp32" else torch.bfloat16
    for p in model.parameters():
        if p.requires_grad and p.dtype != want:
            p.data = p.data.to(want)
    return model


def build(impl: str, e2e: _sweep.E2ESweep, device, adapter_dtype: str = "bf16"):
    """(model, notes). Raises Unavailable when the implementation's packages are missing."""
    import torch

    notes: list[str] = []
    if impl == "ours":
        try:
            import qlora_ext

            QLoRALinear = qlora_ext.QLoRALinear
        except (ImportError, AttributeError) as e:
            raise Unavailable(_err(e)) from e
    elif impl == "bnb_peft":
        try:
            import bitsandbytes  # noqa: F401
            import peft  # noqa: F401
        except ImportError as e:
            raise Unavailable(_err(e)) from e
    elif impl == "bf16_peft":
        try:
            import peft  # noqa: F401
        except ImportError as e:
            raise Unavailable(_err(e)) from e
    else:
        raise ValueError(f"unknown e2e impl {impl!r}")

    model = _bf16_model(e2e, device)
    if impl == "bf16_peft":
        model = _peft(model, e2e, adapter_dtype)
        notes.append(f"adapters {adapter_dtype}")
    elif impl == "bnb_peft":
        n = _replace_decoder_linears(model, lambda lin: _bnb_linear4bit(lin.weight.data))
        model = _peft(model, e2e, adapter_dtype)
        notes += [f"{n} decoder linears as bnb Linear4bit", f"adapters {adapter_dtype}"]
    else:
        apply = getattr(qlora_ext, "apply", None)
        if apply is not None:
            out = apply(model, r=e2e.r, lora_alpha=e2e.lora_alpha, target_modules="all-linear")
            model = out if isinstance(out, torch.nn.Module) else model
            notes.append("qlora_ext.apply(model, target_modules='all-linear')")
        else:
            n = _replace_decoder_linears(
                model, lambda lin: QLoRALinear.from_linear(lin, r=e2e.r, lora_alpha=e2e.lora_alpha, lora_dropout=0.0)
            )
            notes.append(f"{n} decoder linears replaced by QLoRALinear.from_linear (qlora_ext.apply absent)")
    model.train()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model, notes


def run(model, batch: int, e2e: _sweep.E2ESweep, timer: Callable) -> dict:
    """Time ``warmup_steps + timed_steps`` training steps at ``batch`` x ``e2e.seq`` tokens.
    ``timer(step, n_warmup, n_timed) -> [ms]``. Peak memory counts optimizer state, activations and logits
    on top of the built model."""
    import torch

    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(1000 + batch)
    ids = torch.randint(0, e2e.vocab, (batch, e2e.seq), generator=g, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError("the model has no trainable parameters (LoRA was not applied)")
    cuda = device.type == "cuda"  # the self-test runs this on the CPU with a tiny config
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    losses: list[float] = []

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    times = timer(step, e2e.warmup_steps, e2e.timed_steps)
    peak = None
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    first, last = float(losses[0]), float(losses[-1])
    for p in trainable:
        p.grad = None
    if not (torch.isfinite(torch.tensor([first, last])).all()):
        raise FloatingPointError(f"non-finite loss (first {first}, last {last})")
    return {
        "step_ms_all": times,
        "trainable_params": sum(p.numel() for p in trainable),
        "trainable_dtype": str(trainable[0].dtype).replace("torch.", ""),
        "peak_extra_MiB": peak,
        "loss_first": first,
        "loss_last": last,
    }
