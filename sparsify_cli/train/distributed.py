"""Training on several processes with PyTorch's own engine: torchrun + DDP or FSDP2 (`fully_shard`).

A run launched by torchrun (RANK/WORLD_SIZE in the environment) joins the process group here. The global batch
(train.batch_size sequences per optimizer step) is the same whatever the number of processes: every rank draws
the same global batch and takes its slice, then splits it into train.grad_accum micro-batches. So N processes
see exactly the tokens one process would, and the averaged gradients are the same up to summation order.

Checkpoints are "gathered safetensors": rank 0 writes full (unsharded) weights and optimizer moments in the
ordinary checkpoint layout, so a run saved with N processes resumes with any M, or on one process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sparsify_cli.errors import UserError

PARALLEL_CHOICES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def env_world() -> DistInfo:
    """What torchrun told this process (one process when launched directly)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def check_batch_split(batch_size: int, grad_accum: int, world: int) -> None:
    """Fail before any worker starts when the global batch cannot be split evenly."""
    if batch_size % (world * grad_accum):
        raise UserError(
            f"train.batch_size={batch_size} cannot be split over {world} process(es) × train.grad_accum={grad_accum}: "
            f"it must be a multiple of {world * grad_accum}"
        )


def init_distributed(device: torch.device) -> DistInfo:
    info = env_world()
    if not info.active or dist.is_initialized():
        return info
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise UserError("train.device is a GPU but this torch has no NCCL backend")
    if not dist.is_gloo_available() and backend == "gloo":
        raise UserError("this torch has no gloo backend: distributed training on CPU is not possible")
    if device.type == "cuda":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend)
    return info


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, mode: str, info: DistInfo, device: torch.device, bf16: bool) -> nn.Module:
    """DDP or FSDP2 around the model (the model itself when there is one process)."""
    if not info.active:
        return model
    if mode in ("auto", "ddp"):
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else info.local_rank] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.blocks:  # one all-gather per block: the unit that is in use at a time
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, max or min) when distributed; returns the tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _OPS[op]))
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def no_grad_sync(engine: nn.Module, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (DDP no_sync / FSDP2 equivalent)."""
    if sync or not (dist.is_initialized() and dist.get_world_size() > 1):
        yield
    elif hasattr(engine, "no_sync"):  # DDP
        with engine.no_sync():
            yield
    elif hasattr(engine, "set_requires_gradient_sync"):  # FSDP2
        engine.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            engine.set_requires_gradient_sync(True)
    else:
        yield


def _state_options(cpu_offload: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(weights, moments): full, unsharded and unwrapped (plain parameter names), on the CPU of rank 0.

    Collective: every rank calls it; ranks other than 0 get empty dicts (full state with CPU offload lands on
    rank 0 only). torch.distributed.checkpoint's state-dict functions handle a plain module, DDP and FSDP2 alike.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    weights = get_model_state_dict(model, options=_state_options(True))
    moments = get_optimizer_state_dict(model, optimizer, options=_state_options(True)).get("state", {})
    return weights, moments


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
               moments: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load full weights and optimizer moments into a (possibly wrapped or sharded) model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
    )

    set_model_state_dict(model, weights, options=_state_options(False))
    current = get_optimizer_state_dict(model, optimizer, options=_state_options(False))  # param groups by name
    current["state"] = moments
    set_optimizer_state_dict(model, optimizer, current, options=_state_options(False))
