"""A short QLoRA fine-tune: a Llama-architecture model, all-linear NF4 + LoRA through qlora_ext, a bundled text.

    python examples/finetune.py                  # GPU: bf16, 4 layers at width 2048; CPU: fp32, tiny, < 1 min
    python examples/finetune.py --steps 5        # smoke test
    python examples/finetune.py --backend bnb-peft --log-json runs/bnb.json   # same run through bitsandbytes + PEFT
    torchrun --nproc_per_node=2 examples/finetune.py --parallel fsdp     # FSDP2 over 2 GPUs (gloo on CPUs)
    torchrun --nproc_per_node=2 examples/finetune.py --parallel ddp      # DDP over 2 GPUs

The model is built from a transformers LlamaConfig with random weights (nothing is downloaded) and the text is
tokenized as raw UTF-8 bytes (vocabulary 256, no tokenizer files). Every linear layer of the decoder is frozen
as NF4 (bitsandbytes' format, double-quantized) and gets a LoRA adapter; only the adapters train. The base is
random, so the loss falls as the adapters learn the text's byte statistics; the point is the training loop and
its speed, not the model.

With --backend bnb-peft the same model, data order and adapter initialization run through bitsandbytes
Linear4bit + PEFT instead, so the two --log-json loss curves can be compared step by step.

With --parallel (under torchrun; NCCL on GPUs, gloo on CPUs) --batch is the global batch: every rank draws the
same batch and trains on its 1/N slice, so the losses are those of the one-process run. ddp wraps the model in
DistributedDataParallel (the adapters' gradients are all-reduced; the frozen NF4 storage is broadcast once, at
wrapping). fsdp calls fully_shard on every decoder layer and on the model: each rank holds 1/N of the NF4 storage
and of the adapters, and each layer all-gathers its storage as uint8 for its forward and backward; with bf16 the
adapters are fp32 master weights and MixedPrecisionPolicy computes in bf16 and reduces gradients in fp32.
--save writes the adapter in PEFT's format (the files of a one-process run) and the optimizer and data-order
state; --resume continues from such a checkpoint, in any of the three modes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

DATA = Path(__file__).resolve().parent / "data" / "lighthouse_almanac.txt"
# Per-device defaults: (layers, hidden, intermediate, heads, kv_heads, seq, batch, steps, lr).
# GPU: TinyLlama-1.1B's layer shapes (every K a multiple of 64, the fused kernels' fast path).
GPU_DEFAULTS = {"layers": 4, "hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4, "seq": 512,
                "batch": 8, "steps": 200, "lr": 2e-4}
CPU_DEFAULTS = {"layers": 2, "hidden": 128, "intermediate": 384, "heads": 4, "kv_heads": 2, "seq": 128,
                "batch": 8, "steps": 40, "lr": 2e-3}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--backend", default="qlora_ext", choices=["qlora_ext", "bnb-peft"])
    p.add_argument("--steps", type=int, help="optimizer steps (default: 200 on GPU, 40 on CPU)")
    p.add_argument("--batch", type=int, help="sequences per step (default: 8)")
    p.add_argument("--seq", type=int, help="bytes per sequence (default: 512 on GPU, 128 on CPU)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: 2e-4 on GPU, 2e-3 on CPU)")
    p.add_argument("--layers", type=int, help="decoder layers (default: 4 on GPU, 2 on CPU)")
    p.add_argument("--hidden", type=int, help="model width (default: 2048 on GPU, 128 on CPU)")
    p.add_argument("--intermediate", type=int, help="MLP width (default: Llama's 8/3 of --hidden, rounded to 64)")
    p.add_argument("--heads", type=int, help="attention heads (default: --hidden / 64)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads / 4)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default on CPU: 1; the tiny CPU model's "
                   "matrices are too small for threads to pay for their synchronization)")
    p.add_argument("--data", type=Path, default=DATA, help="a UTF-8 text file")
    p.add_argument("--log-json", type=Path, help="write the per-step losses and the summary here")
    p.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"],
                   help="data parallel over the processes torchrun starts: DistributedDataParallel, or FSDP2 "
                   "(fully_shard) sharding the NF4 storage and adapters")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing of every decoder layer")
    p.add_argument("--save", type=Path, help="at the end, write the adapter (PEFT format) and the trainer state here")
    p.add_argument("--save-every", type=int, help="also write a checkpoint to SAVE/step-N every N steps")
    p.add_argument("--resume", type=Path, help="continue from a checkpoint directory written by --save")
    return p.parse_args()


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the per-device defaults the user did not set."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    defaults = GPU_DEFAULTS if args.device.type == "cuda" else CPU_DEFAULTS
    given = {name for name in ("intermediate", "heads", "kv_heads") if getattr(args, name, None) is not None}
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.steps < 1 or args.batch < 1 or args.seq < 2:
        raise SystemExit("--steps and --batch must be >= 1, --seq >= 2")
    if args.backend != "qlora_ext" and (args.save or args.resume):
        raise SystemExit("--save and --resume checkpoint the qlora_ext backend only")
    if args.hidden != defaults["hidden"]:  # a custom width: keep the Llama proportions, except those given
        if "intermediate" not in given:
            args.intermediate = 64 * math.ceil(args.hidden * 8 / 3 / 64)
        if "heads" not in given:
            args.heads = max(1, args.hidden // 64)
        if "kv_heads" not in given:
            args.kv_heads = max(1, args.heads // 4)
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if args.device.type == "cuda" else "fp32")]
    return args


# ---- data: UTF-8 bytes, random windows -------------------------------------------------------------------------
def load_bytes(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
    split = int(0.9 * data.numel())
    return data[:split], data[split:]


def batches(data: torch.Tensor, batch: int, seq: int, generator: torch.Generator):
    """Endless random windows of seq bytes; the model shifts the labels itself."""
    while True:
        starts = torch.randint(0, data.numel() - seq, (batch,), generator=generator)
        yield torch.stack([data[s:s + seq] for s in starts.tolist()])


# ---- model -----------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seq, 128),
                         tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.requires_grad_(False)


def decoder_linears(model: nn.Module) -> list[str]:
    """The "all-linear" set: every nn.Linear except the output head."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.endswith("lm_head")]


def adapter_init(name: str, r: int, k: int, seed: int) -> torch.Tensor:
    """lora_A as PEFT initialises it (Kaiming-uniform, a=sqrt(5)), but from a per-layer seed, so both backends
    start from identical adapters. lora_B starts at zero in both, so the layer starts equal to its base."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)) * 7919 + len(name))
    bound = 1.0 / math.sqrt(k)  # kaiming_uniform_(a=sqrt(5)) on an [r, k] matrix
    return (torch.rand(r, k, generator=g, dtype=torch.float32) * 2 - 1) * bound


def attach_qlora_ext(model: nn.Module, args: argparse.Namespace) -> tuple[nn.Module, int]:
    """All-linear QLoRA through qlora_ext, in place. Returns (model to call, number of QLoRA layers)."""
    import qlora_ext

    names = decoder_linears(model)
    apply = getattr(qlora_ext, "apply", None)  # model surgery, qlora_ext/peft_compat.py
    if apply is not None:
        apply(model, r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
              target_modules="all-linear")
    else:  # the layer API directly
        for name in names:
            parent, _, child = name.rpartition(".")
            linear = model.get_submodule(name)
            setattr(model.get_submodule(parent), child,
                    qlora_ext.QLoRALinear.from_linear(linear, r=args.r, lora_alpha=args.lora_alpha,
                                                      lora_dropout=args.lora_dropout))
    model.requires_grad_(False)
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, qlora_ext.QLoRALinear), f"{name} was not converted"
        with torch.no_grad():
            layer.lora_A.copy_(adapter_init(name, args.r, layer.in_features, args.seed))
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
    return model, len(names)


def attach_bnb_peft(model: nn.Module, args: argparse.Namespace) -> tuple[nn.Module, int]:
    """The same through bitsandbytes Linear4bit + PEFT (the path users take today)."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    names = decoder_linears(model)
    for name in names:  # what from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant)) builds
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=args.dtype, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        setattr(model.get_submodule(parent), child, q.to(args.device))
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                             target_modules="all-linear"))
    for name in names:
        weight = model.base_model.model.get_submodule(name).lora_A["default"].weight
        with torch.no_grad():
            weight.copy_(adapter_init(name, args.r, weight.shape[1], args.seed))
    return model, len(names)


# ---- parallel training -----------------------------------------------------------------------------------------
TRAINER_STATE = "trainer_state.pt"


def setup_distributed(args: argparse.Namespace) -> tuple[int, int]:
    """(world size, rank). With --parallel, joins the process group torchrun describes (NCCL on GPUs, gloo on
    CPUs) and moves each rank to its own GPU."""
    import torch.distributed as dist

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if args.parallel == "none":
        if launched > 1:
            raise SystemExit(f"started as {launched} processes (torchrun): pass --parallel ddp or --parallel fsdp, "
                             f"or start one process")
        return 1, 0
    if args.backend != "qlora_ext":
        raise SystemExit("--parallel trains the qlora_ext backend only")
    if "LOCAL_RANK" not in os.environ:
        raise SystemExit(f"--parallel {args.parallel} runs under torchrun: "
                         f"torchrun --nproc_per_node=N examples/finetune.py --parallel {args.parallel} ...")
    cuda = args.device.type == "cuda"
    if cuda:
        args.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=args.device if cuda else None)
    world, rank = dist.get_world_size(), dist.get_rank()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} is the global batch; it must be a multiple of the {world} processes")
    return world, rank


def enable_checkpointing(model: nn.Module) -> None:
    # Non-reentrant: the embeddings are frozen, and the reentrant variant would need the hidden states to
    # require grad (enable_input_require_grads).
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def parallelize(model: nn.Module, args: argparse.Namespace, world: int) -> nn.Module:
    """The model to train: as it is, in DistributedDataParallel, or sharded by fully_shard."""
    import qlora_ext

    if args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # The NF4 storage are frozen parameters: broadcast once here, never reduced, never re-broadcast per step.
        return DistributedDataParallel(model, device_ids=[args.device.index] if args.device.type == "cuda" else None)
    if args.parallel != "fsdp":
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qlora_ext.distributed import set_storage_dtype, storage_dtype_for_fully_shard

    mesh = init_device_mesh(args.device.type, (world,))
    # The NF4 storage: uint8, or (torch releases whose fully_shard takes floating parameters only) the same bytes
    # as args.dtype elements; either way the policy below leaves it as it is.
    set_storage_dtype(model, storage_dtype_for_fully_shard(args.dtype))
    if args.dtype != torch.float32:
        # fp32 master adapters; every forward gets args.dtype copies and gradients are reduced in fp32.
        for layer in model.modules():
            if isinstance(layer, qlora_ext.QLoRALinear):
                layer.to(torch.float32)
        policy = MixedPrecisionPolicy(param_dtype=args.dtype, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in model.model.layers:  # one all-gather group per decoder layer
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: embeddings, final norm, head
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def mean_over_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return value.item()


def optimizer_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    import torch.distributed as dist
    # Keyed by parameter name and whole, so a checkpoint moves between one process, DDP and any number of ranks.
    return StateDictOptions(full_state_dict=True, cpu_offload=dist.is_initialized())


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, gen: torch.Generator,
                    rank: int) -> None:
    """The adapter in PEFT's format (qlora_ext.load_adapter and PEFT read it) plus what resuming needs: the
    optimizer state, the step and the data order. Every rank must call it."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from qlora_ext.distributed import save_adapter

    save_adapter(model, path)
    optimizer_state = get_optimizer_state_dict(unwrapped(model), opt, options=optimizer_state_options())
    if rank == 0:
        torch.save({"step": step, "optimizer": optimizer_state, "data_rng": gen.get_state()}, path / TRAINER_STATE)
    if dist.is_initialized():
        dist.barrier()


def load_trainer_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> int:
    """Restore the optimizer and the data order from a checkpoint; returns the step to continue from."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(unwrapped(model), opt, state["optimizer"], options=optimizer_state_options())
    gen.set_state(state["data_rng"])
    return int(state["step"])


# ---- training --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, args: argparse.Namespace, batches_n: int = 4, world: int = 1,
             rank: int = 0) -> float:
    model.eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    it = batches(data, args.batch, args.seq, g)
    local = args.batch // world
    total = 0.0
    for _ in range(batches_n):
        ids = next(it)[rank * local:(rank + 1) * local].to(args.device)
        total += mean_over_ranks(model(input_ids=ids, labels=ids).loss, world)
    model.train()
    return total / batches_n


def main() -> None:
    args = resolve(parse_args())
    world, rank = setup_distributed(args)
    log = print if rank == 0 else (lambda *a, **k: None)
    train, val = load_bytes(args.data)
    dev = args.device
    log(f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), dtype "
        f"{str(args.dtype).removeprefix('torch.')}, backend {args.backend}")
    log(f"data {args.data.name}: {train.numel():,} train / {val.numel():,} val bytes")

    model = build_model(args)
    attach = attach_qlora_ext if args.backend == "qlora_ext" else attach_bnb_peft
    model, n_layers = attach(model, args)
    if args.resume:
        import qlora_ext
        qlora_ext.load_adapter(model, args.resume)  # before wrapping: DDP and fully_shard take it from here
    if args.grad_ckpt:
        enable_checkpointing(model)
    model = parallelize(model, args, world)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)  # whole sizes: a sharded parameter counts its whole shape
    log(f"model: {args.layers} layers, width {args.hidden}, {n_layers} QLoRA linears at r={args.r}; "
        f"{n_trainable:,} trainable parameters")
    nf4 = None
    if args.parallel != "none":
        import torch.distributed as dist

        from qlora_ext.distributed import nf4_bytes
        local_bytes, whole_bytes = nf4_bytes(model)
        per_rank = [None] * world
        dist.all_gather_object(per_rank, local_bytes)
        nf4 = {"nf4_bytes_per_rank": per_rank, "nf4_bytes_whole": whole_bytes}
        log(f"parallel {args.parallel} over {world} processes ({dist.get_backend()}), {args.batch // world} "
            f"sequences each; NF4 storage per rank: {local_bytes / 2**20:.2f} of {whole_bytes / 2**20:.2f} MiB")

    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    start = load_trainer_state(args.resume, model, opt, gen) if args.resume else 0
    if start >= args.steps:
        raise SystemExit(f"--resume {args.resume} is at step {start}, not before --steps {args.steps}")
    stream = batches(train, args.batch, args.seq, gen)
    local = args.batch // world
    tokens_per_step = args.batch * args.seq
    warmup = min(3, max(0, args.steps - start - 1))  # first steps include kernel selection / allocator growth
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    losses, t_steady = [], None
    model.train()
    bar = tqdm(range(start, args.steps), desc="fine-tune", unit="step", disable=rank != 0)
    for step in bar:
        if step - start == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t_steady = time.perf_counter()
        ids = next(stream)[rank * local:(rank + 1) * local].to(dev, non_blocking=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mean_over_ranks(loss, world))  # syncs, so the wall time below is real time
        done = step - start
        if done >= warmup and done > 0:
            elapsed = time.perf_counter() - t_steady
            rate = (done - warmup + 1) * tokens_per_step / elapsed if elapsed > 0 else float("nan")
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}")
        else:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if args.save and args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_checkpoint(args.save / f"step-{step + 1}", model, opt, step + 1, gen, rank)
    bar.close()

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    steady_steps = args.steps - start - warmup
    elapsed = time.perf_counter() - t_steady if t_steady is not None else float("nan")
    tok_s = steady_steps * tokens_per_step / elapsed if steady_steps > 0 and elapsed > 0 else float("nan")
    val_loss = evaluate(model, val, args, world=world, rank=rank)
    tail = losses[-min(10, len(losses)):]
    summary = {
        "backend": args.backend, "device": str(dev), "dtype": str(args.dtype).removeprefix("torch."),
        "layers": args.layers, "hidden": args.hidden, "r": args.r, "batch": args.batch, "seq": args.seq,
        "steps": args.steps, "first_loss": losses[0], "final_loss": sum(tail) / len(tail), "val_loss": val_loss,
        "tokens_per_s": tok_s,
        "peak_mem_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None,
    }
    if args.parallel != "none":
        import torch.distributed as dist
        peak = [None] * world
        dist.all_gather_object(peak, summary["peak_mem_mib"])
        summary.update({"parallel": args.parallel, "world_size": world, "peak_mem_mib_per_rank": peak, **nf4})
    if start:
        summary["first_step"] = start
    log(f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} (mean of last {len(tail)} steps), "
        f"val loss {val_loss:.3f} (uniform bytes: {math.log(256):.3f})")
    log(f"throughput {tok_s:,.0f} tokens/s over {steady_steps} steps after {warmup} warm-up"
        + (f", peak memory {summary['peak_mem_mib']:,.0f} MiB" if dev.type == "cuda" else ""))
    if args.save:
        save_checkpoint(args.save, model, opt, args.steps, gen, rank)
        log(f"wrote {args.save} (adapter in PEFT's format, {TRAINER_STATE})")
    if args.log_json and rank == 0:
        args.log_json.parent.mkdir(parents=True, exist_ok=True)
        args.log_json.write_text(json.dumps({**summary, "losses": losses}, indent=1))
        print(f"wrote {args.log_json}")
    if args.parallel != "none":
        import torch.distributed as dist
        dist.barrier()  # every rank is done (rank 0's files included) before any tears its connections down
        dist.destroy_process_group()
        # torch 2.14's gloo backend can still be releasing a collective on a worker thread while the interpreter
        # shuts down, which aborts the process ("terminate called without an active exception", exit -6) after
        # all work is done and written. Skip interpreter teardown once the outputs are flushed.
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
