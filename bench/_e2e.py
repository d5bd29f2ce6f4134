"""End-to-end QLoRA training step: a Llama-architecture model from transformers' LlamaConfig (Llama-3-8B width,
a few decoder layers, random init), LoRA r=16 on every linear layer of the decoder ("all-linear"), AdamW.

Every implementation starts from the same bf16 model (same seed), then:
    qlora_ext  qlora_ext.apply(model, r=16, lora_alpha=32, target_modules="all-linear")
    bnb_peft   every decoder nn.Linear replaced by a bitsandbytes Linear4bit quantized from the same weight (what
               from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant)) builds), then
               peft.get_peft_model(LoraConfig(target_modules="all-linear"))
    bf16_peft  the same get_peft_model on the bf16 model
A step = forward with labels (causal-LM loss) + backward + AdamW step + zero_grad; no gradient checkpointing.
"""

from __future__ import annotations

import dataclasses
import gc

from . import _impls
from ._impls import bnb_linear4bit
from ._sweep import LORA_ALPHA

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class E2E:
    layers: int = 4
    seq: int = 2048
    hidden: int = 4096  # Llama-3-8B width
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000  # Llama-2's vocabulary: keeps lm_head and the loss from dominating a 4-layer model
    r: int = 16
    warmup_steps: int = 3
    timed_steps: int = 7


def build(impl: str, cfg: E2E):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_attention_heads=cfg.heads,
                         num_key_value_heads=cfg.kv_heads, num_hidden_layers=cfg.layers, vocab_size=cfg.vocab,
                         max_position_embeddings=max(8192, cfg.seq), rms_norm_eps=1e-5, tie_word_embeddings=False,
                         attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(_impls.DEVICE):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    model.requires_grad_(False)
    if impl == "qlora_ext":
        import qlora_ext

        qlora_ext.apply(model, r=cfg.r, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear")
    else:
        from peft import LoraConfig, get_peft_model

        if impl == "bnb_peft":
            for layer in model.model.layers:
                for parent in list(layer.modules()):
                    for name, child in list(parent.named_children()):
                        if name in DECODER_LINEARS and isinstance(child, torch.nn.Linear):
                            setattr(parent, name, bnb_linear4bit(child.weight.data))
        lora = LoraConfig(r=cfg.r, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", bias="none",
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lora, autocast_adapter_dtype=False)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    gc.collect()
    torch.cuda.empty_cache()
    return model.train()


def step_fn(model, batch: int, cfg: E2E):
    """(step, stats): step() runs one synchronized training step and records its wall time (ms) and loss."""
    import time

    import torch

    g = torch.Generator(device=_impls.DEVICE).manual_seed(1000 + batch)
    ids = torch.randint(0, cfg.vocab, (batch, cfg.seq), generator=g, device=_impls.DEVICE)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise RuntimeError("the model has no trainable parameters (LoRA was not applied)")
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    stats = {"step_ms": [], "loss": [], "trainable_params": sum(p.numel() for p in trainable)}

    def step():
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        stats["step_ms"].append((time.perf_counter() - t0) * 1e3)
        stats["loss"].append(float(loss.detach()))

    return step, stats
