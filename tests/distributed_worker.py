"""One process of tests/test_distributed.py's checks of QLoRALinear under fully_shard (FSDP2) and DDP.

    torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=PORT tests/distributed_worker.py OUT.json

CPU and gloo. Every rank runs the same checks in the same order (they communicate); rank 0 writes
{check name: "ok" or the failure} to OUT.json after each check. The first failure ends the run (the ranks'
collectives would no longer match).
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from qlora_ext import QLoRALinear
from qlora_ext.distributed import nf4_bytes, set_storage_dtype, storage_dtype_for_fully_shard
from qlora_ext.nf4 import NF4Storage

K = 96  # n·k not a multiple of the world size times a block: shards are uneven and padded


class Block(nn.Module):
    """x + down(relu(up(x))): two QLoRALinear layers, one without double quant (fp32 absmax as bytes)."""

    def __init__(self):
        super().__init__()
        self.up = QLoRALinear.from_linear(nn.Linear(K, 2 * K - 16), r=4)
        self.down = QLoRALinear.from_linear(nn.Linear(2 * K - 16, K), r=4, double_quant=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(Block(), Block())
    with torch.no_grad():  # lora_B = 0 would hide the adapter path
        for layer in model.modules():
            if isinstance(layer, QLoRALinear):
                layer.lora_B.normal_(0, 0.1)
    return model


def shard(model: nn.Module, policy: MixedPrecisionPolicy = MixedPrecisionPolicy()) -> nn.Module:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if all(storage.storage_dtype == torch.uint8 for storage in model.modules() if isinstance(storage, NF4Storage)):
        set_storage_dtype(model, storage_dtype_for_fully_shard(policy.param_dtype or torch.float32))
    for block in model:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def layers(model: nn.Module) -> dict[str, QLoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bitsandbytes-format keys of every (whole) QLoRALinear base."""
    return {key: value for key, value in model.state_dict().items() if ".weight" in key}


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Storage tensors compared as bytes (held as floats, their bytes include NaN patterns, which never compare
    equal as numbers)."""
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(6, 5, K, generator=torch.Generator().manual_seed(seed))


# ---- checks ----------------------------------------------------------------------------------------------------
def check_fsdp_shards_every_storage_tensor():
    model = shard(make_model())
    world = dist.get_world_size()
    for name, storage in ((n, m) for n, m in model.named_modules() if isinstance(m, NF4Storage)):
        for pname, param in storage.named_parameters():
            assert isinstance(param, DTensor) and param.dtype == storage.storage_dtype, (name, pname)
            rows = param.shape[0]
            chunk = -(-rows // world)  # dim-0 chunks as torch.chunk cuts them
            expected = max(0, min(chunk, rows - dist.get_rank() * chunk))
            assert param.to_local().shape[0] == expected, (name, pname, param.to_local().shape, expected)
    local, whole = nf4_bytes(model)
    totals = [None] * world
    dist.all_gather_object(totals, local)
    assert sum(totals) == whole, (totals, whole)


def check_fsdp_gathers_bytes_under_a_bf16_policy():
    model = shard(make_model(), MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    seen = {}

    def record(layer, args):
        seen[layer] = (type(layer.base.w_nf4).__name__, {n: p.dtype for n, p in layer.base.named_parameters()},
                       layer.lora_A.dtype)

    for layer in layers(model).values():
        layer.register_forward_pre_hook(record)
    model(inputs()).float().square().mean().backward()
    assert len(seen) == 4
    for kind, storage_dtypes, adapter_dtype in seen.values():
        # Inside forward: the whole storage (a plain tensor, not a shard), still bytes; the adapters in bf16.
        # (uint8, or where fully_shard takes floating parameters only the bytes as bf16 elements: never cast.)
        assert kind != "DTensor" and set(storage_dtypes.values()) == {storage_dtype_for_fully_shard(torch.bfloat16)}, \
            (kind, storage_dtypes)
        assert adapter_dtype == torch.bfloat16
    for layer in layers(model).values():
        assert layer.base.is_sharded  # resharded after forward and backward
        assert layer.lora_A.grad is not None and layer.lora_A.grad.dtype == torch.float32
        assert all(p.grad is None for p in layer.base.parameters())


def check_fsdp_forward_and_grads_match_one_process():
    reference = make_model()
    model = shard(copy.deepcopy(reference))
    x = inputs()
    rank, world = dist.get_rank(), dist.get_world_size()
    local = x.shape[0] // world
    model(x[rank * local:(rank + 1) * local]).square().mean().backward()
    reference(x).square().mean().backward()
    for name, layer in layers(model).items():
        ref = reference.get_submodule(name)
        for pname in ("lora_A", "lora_B"):
            grad = getattr(layer, pname).grad.full_tensor()
            expected = getattr(ref, pname).grad
            err = ((grad - expected).norm() / expected.norm()).item()
            assert err < 1e-5, (name, pname, err)


def check_fsdp_float_storage_under_a_bf16_policy():
    # The storage form of torch releases whose fully_shard takes floating parameters only (bytes as bf16 elements,
    # equal to the policy's param_dtype): checked on every torch, so that path is exercised where uint8 works too.
    reference = make_model()
    model = copy.deepcopy(reference)
    set_storage_dtype(model, torch.bfloat16)
    model = shard(model, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    for layer in layers(model).values():
        assert {p.dtype for p in layer.base.parameters()} == {torch.bfloat16}
    x = inputs()
    rank, world = dist.get_rank(), dist.get_world_size()
    local = x.shape[0] // world
    y = model(x[rank * local:(rank + 1) * local])
    with torch.no_grad():
        expected = reference.to(torch.bfloat16)(x[rank * local:(rank + 1) * local].bfloat16())
    assert torch.equal(y, expected), (y - expected).abs().max()


def check_sharded_weight_nf4_needs_unshard():
    reference = make_model()
    model = shard(copy.deepcopy(reference))
    layer = model[0].up
    try:
        layer.weight_nf4
    except RuntimeError as exc:
        assert "unshard" in str(exc) and "fully_shard" in str(exc), str(exc)
    else:
        raise AssertionError("weight_nf4 of a sharded layer did not raise")
    model[0].unshard()
    try:
        whole, expected = layer.weight_nf4, reference[0].up.weight_nf4
        for got, want in zip(whole.op_args(), expected.op_args()):
            assert torch.equal(got, want)
        assert torch.equal(layer.dequantize(), reference[0].up.dequantize())
    finally:
        model[0].reshard()
    assert layer.base.is_sharded


def check_sharded_state_dict_gathers_to_the_bnb_base():
    reference = make_model()
    model = shard(copy.deepcopy(reference))
    sd = model.state_dict()
    assert "0.up.base.w_nf4" in sd and isinstance(sd["0.up.base.w_nf4"], DTensor)
    assert "0.up.weight" not in sd  # bitsandbytes' keys need the whole tensors
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        fresh = make_model(seed=5)  # another base: the load must replace it
        fresh.load_state_dict(full, strict=True)
        got, want = base_state(fresh), base_state(reference)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
        x = inputs()
        assert torch.equal(fresh(x), reference(x))


def check_bnb_base_loads_into_a_sharded_model():
    model = shard(make_model())
    other = make_model(seed=3)
    bnb = base_state(other)
    result = model.load_state_dict(bnb, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    set_storage_dtype(other, next(iter(layers(model).values())).base.storage_dtype)  # compare like with like
    for name, layer in layers(model).items():
        want = layers(other)[name].base
        for pname, param in layer.base.named_parameters():
            assert same_bytes(param.full_tensor(), getattr(want, pname)), (name, pname)


def check_dcp_saves_and_loads_a_sharded_model():
    reference = make_model()
    model = shard(copy.deepcopy(reference))
    other = shard(make_model(seed=7))
    directory = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(directory)
    try:
        dcp.save(model.state_dict(), checkpoint_id=directory[0])
        state = other.state_dict()
        dcp.load(state, checkpoint_id=directory[0])
        other.load_state_dict(state)
    finally:
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(directory[0], ignore_errors=True)
    for name, layer in layers(other).items():
        for pname, param in layer.base.named_parameters():
            assert same_bytes(param.full_tensor(), getattr(layers(model)[name].base, pname).full_tensor()), pname
    x = inputs()
    rank, world = dist.get_rank(), dist.get_world_size()
    local = x.shape[0] // world
    assert torch.equal(other(x[rank * local:(rank + 1) * local]), model(x[rank * local:(rank + 1) * local]))


def check_ddp_broadcasts_the_base_once_and_reduces_only_adapters():
    rank = dist.get_rank()
    model = make_model(seed=rank)  # rank 1 starts from another base and other adapters
    reference = make_model(seed=0)
    assert not list(model.buffers())  # what broadcast_buffers=True broadcasts before every forward
    ddp = DistributedDataParallel(model)
    # Wrapping broadcast rank 0's parameters, the NF4 bytes included.
    for got, want in zip(base_state(model).values(), base_state(reference).values()):
        assert torch.equal(got, want)
    x = inputs()
    local = x.shape[0] // dist.get_world_size()
    ddp(x[rank * local:(rank + 1) * local]).square().mean().backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    gathered = [torch.empty_like(grads) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, grads)
    assert all(torch.equal(g, gathered[0]) for g in gathered)  # all-reduced
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    # Not per step: bytes changed on one rank after wrapping stay changed through the next forward.
    w_nf4 = model[0].up.base.w_nf4
    with torch.no_grad():
        if rank == 1:
            w_nf4[:8].fill_(0x77)
    ddp(x[:1]).sum().backward()
    assert bool((w_nf4[:8] == 0x77).all()) == (rank == 1)


CHECKS = [
    check_fsdp_shards_every_storage_tensor,
    check_fsdp_gathers_bytes_under_a_bf16_policy,
    check_fsdp_forward_and_grads_match_one_process,
    check_fsdp_float_storage_under_a_bf16_policy,
    check_sharded_weight_nf4_needs_unshard,
    check_sharded_state_dict_gathers_to_the_bnb_base,
    check_bnb_base_loads_into_a_sharded_model,
    check_dcp_saves_and_loads_a_sharded_model,
    check_ddp_broadcasts_the_base_once_and_reduces_only_adapters,
]


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    results = {}
    for check in CHECKS:
        try:
            check()
            status = "ok"
        except Exception:  # report which check failed and how, then stop: the ranks are out of step
            status = traceback.format_exc()
        statuses = [None] * dist.get_world_size()
        dist.all_gather_object(statuses, status)
        failed = [(r, s) for r, s in enumerate(statuses) if s != "ok"]
        results[check.__name__] = "ok" if not failed else "\n".join(f"rank {r}: {s}" for r, s in failed)
        if rank == 0:
            with open(out, "w", encoding="utf-8") as f:
                json.dump(results, f, indent=1)
        if failed:
            break
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalization: a gloo worker thread can still be releasing the tensors of a finished
    # collective, and taking the GIL while the interpreter finalizes aborts the process (after every check has
    # passed). Nothing is left to clean up.
    os._exit(0 if all(status == "ok" for status in results.values()) else 1)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
