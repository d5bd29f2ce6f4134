"""QLoRA with a Hugging Face Trainer: qlora_ext on a Llama-architecture model, bitsandbytes' paged AdamW on a GPU.

    python examples/train_hf_trainer.py                    # GPU: bf16, paged 8-bit AdamW; CPU: tiny, fp32, AdamW
    python examples/train_hf_trainer.py --max-steps 3      # smoke test
    python examples/train_hf_trainer.py --optim paged_adamw_32bit --output-dir runs/adapter

The model is built from a transformers LlamaConfig with random weights (nothing is downloaded) and trained on the
bundled text, tokenized as raw UTF-8 bytes (vocabulary 256), as in examples/finetune.py. qlora_ext.apply turns
every linear layer of the decoder into a QLoRALinear (NF4 base, LoRA adapter) in place; the model keeps its class,
so the stock Trainer trains it unchanged. The adapter is saved in PEFT's format at the end; load it back with
qlora_ext.load_adapter(model, output_dir) or peft.PeftModel.from_pretrained on a bitsandbytes 4-bit model.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import qlora_ext

DATA = Path(__file__).resolve().parent / "data" / "lighthouse_almanac.txt"
# Model shapes per device. GPU: TinyLlama-1.1B's layer shapes (every K a multiple of 64, the fused kernels'
# fast path), 4 layers. CPU: small enough that a few steps take seconds.
GPU_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=32,
                 num_key_value_heads=4)
CPU_MODEL = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
GPU_TRAIN = dict(seq=512, batch=8, max_steps=200, lr=2e-4)
CPU_TRAIN = dict(seq=128, batch=8, max_steps=30, lr=2e-3)


class ByteWindows(torch.utils.data.Dataset):
    """The text as consecutive windows of `seq` bytes; the Trainer shuffles them, the model shifts the labels."""

    def __init__(self, path: Path, seq: int):
        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
        self.windows = data[: data.numel() // seq * seq].view(-1, seq)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def build_model(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialized Llama with qlora_ext's all-linear QLoRA applied (r=16, alpha=32, dropout 0.05)."""
    config = LlamaConfig(vocab_size=256, max_position_embeddings=1024, tie_word_embeddings=False, use_cache=False,
                         **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    qlora_ext.apply(model, r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    # The adapters are created in the base's dtype. Keep them in fp32, as PEFT does for a bf16/fp16 base
    # (autocast_adapter_dtype): bf16 has 8 bits of mantissa, so small optimizer updates would round away.
    # QLoRALinear casts them to the activations' dtype in its forward, so the kernels still see bf16.
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def default_optim(device: torch.device) -> str:
    """bitsandbytes' paged optimizers keep their state in CUDA unified memory (cudaMallocManaged), which the driver
    pages out to CPU RAM when the GPU runs short and back when a step needs it, so a memory spike (a long batch)
    slows a step down instead of running out of memory. Without CUDA there is nothing to page (bitsandbytes would
    only warn and fall back), so the CPU uses plain torch AdamW. bitsandbytes pages only state tensors of at least
    1e5 elements, which at r=16 means a layer with a dimension of 6,250 or more: this example's GPU model (widths
    2048 and 5632) keeps its small state in device memory, and paging pays off on larger models."""
    if device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None:
        return "paged_adamw_8bit"
    return "adamw_torch"


def make_trainer(model: torch.nn.Module, dataset: torch.utils.data.Dataset, output_dir: str, *, max_steps: int,
                 batch: int, lr: float, optim: str, device: torch.device, seed: int = 0,
                 logging_steps: int = 10) -> Trainer:
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        optim=optim,
        # bf16 autocast, as a bf16 GPU run uses it: the weights are bf16 already, and ops on autocast's fp32 list
        # (softmax, norms, losses) still run in fp32.
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        logging_steps=logging_steps,
        report_to=[],
        save_strategy="no",
        seed=seed,
    )
    return Trainer(model=model, args=args, train_dataset=dataset)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: 200 on GPU, 30 on CPU)")
    p.add_argument("--optim", choices=["adamw_torch", "paged_adamw_8bit", "paged_adamw_32bit"],
                   help="default: paged_adamw_8bit on CUDA with bitsandbytes installed, else adamw_torch")
    p.add_argument("--output-dir", help="where the adapter is written (default: a new temporary directory)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        shape, train, dtype = GPU_MODEL, GPU_TRAIN, torch.bfloat16
    else:
        # The tiny CPU model's matrices are too small for threads to pay for their synchronization.
        torch.set_num_threads(1)
        shape, train, dtype = CPU_MODEL, CPU_TRAIN, torch.float32
    max_steps = args.max_steps or train["max_steps"]
    optim = args.optim or default_optim(device)
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="qlora_ext-trainer-")

    model = build_model(shape, dtype, device, args.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"device {device}, {shape['num_hidden_layers']} layers at width {shape['hidden_size']}, "
          f"{trainable:,} trainable parameters, optimizer {optim}")

    trainer = make_trainer(model, ByteWindows(DATA, train["seq"]), output_dir, max_steps=max_steps,
                           batch=train["batch"], lr=train["lr"], optim=optim, device=device, seed=args.seed,
                           logging_steps=max(1, max_steps // 10))
    result = trainer.train()
    print(f"mean training loss {result.training_loss:.3f} over {max_steps} steps "
          f"(uniform bytes: {math.log(256):.3f})")

    qlora_ext.save_adapter(model, output_dir)
    print(f"adapter saved to {output_dir}")


if __name__ == "__main__":
    main()
