"""The process group from the torchrun environment, and FSDP2 applied to a built model.

Parallelism lives apart from the model, as in torchtitan: `init_distributed` joins the group, `parallelize`
applies activation checkpointing (`apply_ac`) and sharding (`apply_fsdp`); `wmtp.models` imports nothing from
torch.distributed. With `devices.distributed.enabled: false` the `Dist` is one process and every collective
here returns its input, so the single-process trainer runs exactly as before.

A dead rank fails the others rather than hanging them: torchrun's agent stops a group's workers when one exits;
across nodes gloo raises as soon as a peer's connection closes and every collective is bounded by
`devices.distributed.timeout_s`, after which NCCL's watchdog tears the process down (PyTorch's default
TORCH_NCCL_ASYNC_ERROR_HANDLING=3). The operator then restarts the whole group from the latest checkpoint.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from wmtp.config import ConfigError, Devices, DistributedSettings
from wmtp.models import MTPModel, find_decoder_layers

log = logging.getLogger(__name__)

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Dist:
    """This process's place in the group; with `enabled` False, one process and no-op collectives."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any: ranks agree on decisions one of them made alone."""
        if not self.enabled:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks, in one collective (gloo has no AVG, hence SUM / world)."""
        if not self.enabled:
            return values
        keys = sorted(values)
        stacked = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return dict(zip(keys, (stacked / self.world_size).tolist(), strict=True))

    def new_group(self) -> Any:
        """A gloo group of every rank, for collectives off the training thread (checkpoint saves), or None."""
        return dist.new_group(backend="gloo") if self.enabled else None


def under_torchrun() -> bool:
    """Whether torchrun started this process: it sets every one of TORCHRUN_ENV for its workers."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def close_process_group() -> None:
    """Leave the group, if this process joined one, on every way out of a run, failures included. It does not free
    gloo's threads (torch's caches still hold the group): a worker then ends without finalization
    (`wmtp.cli.end_worker`)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(settings: DistributedSettings, device: torch.device) -> Dist:
    """Join the process group torchrun describes (`env://`), or a single-process Dist when disabled."""
    if not settings.enabled:
        return Dist(device)
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ConfigError(
            f"devices.distributed.enabled is true but {', '.join(missing)} is not set: launch with "
            "`torchrun --nproc-per-node N -m wmtp train ...`, or set devices.distributed.enabled: false"
        )
    rank, world_size, local_rank = (int(os.environ[name]) for name in TORCHRUN_ENV[:3])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = settings.backend if settings.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(
        backend,
        init_method="env://",
        timeout=datetime.timedelta(seconds=settings.timeout_s),
        # Binding the device eagerly creates NCCL communicators now, not inside the first collective.
        device_id=device if device.type == "cuda" else None,
    )
    if rank != 0:
        # Only rank 0 narrates; warnings and errors still come from every rank.
        logging.getLogger("wmtp").setLevel(max(logging.WARNING, logging.getLogger("wmtp").getEffectiveLevel()))
    log.info("process group backend=%s world_size=%d timeout_s=%d", backend, world_size, settings.timeout_s)
    return Dist(device, rank, world_size, local_rank, enabled=True)


def apply_ac(model: MTPModel) -> None:
    """Recompute each decoder layer's and extra head's activations in backward instead of keeping them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    # The wrapper keeps state-dict keys unchanged, so checkpoints do not depend on this option.
    for blocks in (find_decoder_layers(model.base.base_model), model.extra_heads):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)


def build_mesh(dist_: Dist, shard: bool) -> DeviceMesh:
    """1-D mesh to shard over every rank (FSDP); with `shard` False, a (world, 1) mesh that replicates
    parameters and averages gradients (HSDP with shards of one: data parallel through the same code)."""
    if shard:
        return init_device_mesh(dist_.device.type, (dist_.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(dist_.device.type, (dist_.world_size, 1), mesh_dim_names=("replicate", "shard"))


def _layers(module: nn.Module) -> list[nn.Module]:
    try:
        return list(find_decoder_layers(module))
    except ValueError:  # no layer stack: a value head, say
        return []


def apply_fsdp(
    model: MTPModel,
    mesh: DeviceMesh,
    mixed_precision: MixedPrecisionPolicy,
    offload: OffloadPolicy,
    trainable: list[nn.Module],
    frozen: list[nn.Module],
) -> None:
    """FSDP2 on every decoder layer and extra head, then on the MTP model as the root; the algorithm's
    `trainable` (value head) and `frozen` (reference, reward) models become roots of their own, layer by layer.

    The root keeps the embeddings, final norm and lm_head, and FSDP leaves a root's parameters gathered from
    forward to the end of backward: that is what lets the loss call `model.unembed` outside `forward`, and
    again when the per-head checkpoint recomputes it in backward. Every trainable parameter becomes a DTensor,
    as clipping the global gradient norm needs.
    """
    shard = {"mesh": mesh, "mp_policy": mixed_precision, "offload_policy": offload}
    for block in [*find_decoder_layers(model.base.base_model), *model.extra_heads]:
        fully_shard(block, **shard)
    fully_shard(model, **shard)
    for module in trainable:
        fully_shard(module, **shard)
    for module in frozen:
        for layer in _layers(module):
            fully_shard(layer, **shard)
        # Forward-only: without a backward to release it, a root would hold its gathered weights for good.
        fully_shard(module, reshard_after_forward=True, **shard)


def is_empty(module: nn.Module) -> bool:
    """Built by `wmtp.models.empty_weights`: parameters on the meta device, waiting for `load_weights`."""
    return any(p.is_meta for p in module.parameters())


def load_weights(module: nn.Module, read: Callable[[], dict[str, torch.Tensor]], dist_: Dist) -> None:
    """Fill an empty (meta) module, sharded or not, with the weights `read` returns on rank 0 alone: every other
    rank receives them tensor by tensor and keeps its own shard, so no rank but 0 ever holds the whole model.
    Buffers keep the values the module computed when it was built (rotary tables are not in the files)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    buffers = {name: buffer.detach().clone() for name, buffer in module.named_buffers()}
    module.to_empty(device=dist_.device)  # each rank allocates its shard; tied parameters stay one
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])
    full = read() if dist_.is_main else {}
    if not dist_.enabled:
        module.load_state_dict(full)
        return
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(module, full, options=options)


def check_same_weights(modules: list[nn.Module], dist_: Dist) -> None:
    """Raise unless every rank holds the same initial weights. fully_shard keeps each rank's own copy of its
    shard (and, replicating, its own replica) without a broadcast, so ranks that built their models differently
    would train a silent mixture. Same files and seed give the same weights; this proves it, in one collective."""
    named = [(f"{type(m).__name__}.{name}", p) for m in modules for name, p in m.named_parameters()]
    if not named:
        return
    sums = torch.stack([p.detach().sum(dtype=torch.float64) for _, p in named]).to(dist_.device)
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = [name for (name, _), lo, hi in zip(named, low.tolist(), high.tolist(), strict=True) if lo != hi]
    if differ:
        raise RuntimeError(f"ranks start from different weights in {', '.join(differ[:5])}; check seeds and files")


def parallelize(
    model: MTPModel, trainable: list[nn.Module], frozen: list[nn.Module], devices: Devices, dist_: Dist
) -> None:
    """Activation checkpointing if configured, then FSDP (or plain data parallel) when distributed; in place.

    Call before building the optimizer: sharding replaces the parameters with DTensors.
    """
    if devices.fsdp.activation_checkpointing:
        apply_ac(model)
    if not dist_.enabled:
        return
    # Models built empty get their weights from rank 0 later (load_weights): the same on every rank by design.
    check_same_weights([m for m in (model, *trainable) if not is_empty(m)], dist_)
    bf16 = devices.mixed_precision == "bf16" and dist_.device.type == "cuda"
    # bf16 compute and all-gathers, fp32 gradient reduction; CPU keeps fp32 throughout.
    mixed_precision = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )
    # On a CPU device the shards live in host memory already (and FSDP's offload policy wants an accelerator).
    offload = CPUOffloadPolicy() if devices.fsdp.cpu_offload and dist_.device.type != "cpu" else OffloadPolicy()
    mesh = build_mesh(dist_, shard=devices.fsdp.enabled)
    apply_fsdp(model, mesh, mixed_precision, offload, trainable, frozen)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a collective), or the tensor itself."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def gather_full_state_dict(model: nn.Module) -> dict[str, Any]:
    """The unsharded state dict on rank 0's CPU (empty on the other ranks); a collective when sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
