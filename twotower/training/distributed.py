"""Process-group setup and model wrapping for ``torchrun`` launches.

Strategies: ``fsdp`` shards parameters, gradients and optimizer state with FSDP2
(``torch.distributed.fsdp.fully_shard``), ``ddp`` replicates the model with
``DistributedDataParallel``. ``auto`` picks FSDP2 when CUDA is available and DDP otherwise.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from twotower.config import ATTENTION

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "fsdp", "ddp")


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the job (rank 0 of 1 when not launched by ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, strategy: str) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    ``device`` is "auto", "cpu" or "cuda"; with CUDA each process uses ``cuda:LOCAL_RANK``.
    The backend is NCCL on CUDA and gloo on CPU.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed strategy must be one of {STRATEGIES}, got {strategy!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size == 1:
        return DistributedContext(device=torch_device)

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=torch_device if use_cuda else None)
    if strategy == "auto":
        strategy = "fsdp" if use_cuda else "ddp"
    logger.info("rank %d of %d on %s, strategy %s", rank, world_size, torch_device, strategy)
    return DistributedContext(rank, world_size, local_rank, torch_device, strategy)


def shard_with_fsdp(objective: nn.Module, towers: list[nn.Module], device: torch.device) -> nn.Module:
    """Apply FSDP2 to ``objective`` (whose forward computes the loss) and to each layer of ``towers``.

    The objective functions call layer mixers directly and attention as ``project`` then
    ``attend`` rather than through ``NemotronHBlock.forward``, so each module that is *called*
    gets its own FSDP unit: the Mamba, MoE and MLP mixers, and each attention projection. The
    embeddings, norms, heads and time conditioning stay in the root unit, which is unsharded for
    the whole forward of ``objective``. Frozen towers are sharded the same way.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # FSDP2 warns when a wrapped mixer returns a view, because an in-place op on it would skip the
    # pre-backward hook. The towers and objectives add mixer outputs out of place (x = x + h).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for tower in towers:
        for layer in tower.layers:
            if layer.block_type == ATTENTION:
                for projection in (layer.mixer.q_proj, layer.mixer.k_proj, layer.mixer.v_proj, layer.mixer.o_proj):
                    fully_shard(projection, mesh=mesh)
            else:
                fully_shard(layer.mixer, mesh=mesh)
    fully_shard(objective, mesh=mesh)
    # Experts that receive no token on one rank have no gradient there; reduce-scatter zeros for
    # them so every rank joins the same collectives.
    objective.set_reduce_scatter_unused_params(True)
    return objective


def wrap_with_ddp(objective: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters: experts that receive no token in a micro-batch get no gradient.
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=device_ids, find_unused_parameters=True)


def all_reduce_mean(value: float, context: DistributedContext) -> float:
    if not context.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / context.world_size


def all_reduce_sum(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    if context.enabled:
        dist.all_reduce(tensor)
    return tensor


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        dist.barrier()


def shutdown(context: DistributedContext, synchronize: bool = True) -> None:
    """Tear down the process group; after a clean run all ranks meet at a barrier first.

    Without the barrier, a rank that exits early could abort with gloo work still pending on
    another rank ("terminate called without an active exception", seen once on a loaded CPU).
    After an error the barrier is skipped, since the other ranks may never reach it.
    """
    if context.enabled and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
