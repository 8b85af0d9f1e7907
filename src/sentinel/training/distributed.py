"""Several trainer processes on one policy: the process group, FSDP2 sharding, the split of a
step's work, and checkpoints that any world size reads.

`torchrun --nproc-per-node N` starts N trainers; each holds a shard of the weights, gradients
and optimizer state (FSDP2 `fully_shard`: each decoder layer, the embeddings with the head and
final norm, then the root). Every rank sees the whole batch and trains its share of it
(`share`): FSDP gathers a unit's weights on every forward and reduce-scatters its gradients on
every backward, collectives all ranks must enter alike, so a rank with less work runs a
zero-weight copy instead of nothing. The gradients are SUMMED across ranks: the batch
builder's weights already encode the aggregation over the whole step (`Sample.weight`).

A world of one without torchrun has no process group and no sharding: the trainer as before.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard

T = TypeVar("T")

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
CPU = torch.device("cpu")
Figures = dict[str, float]
Call = tuple[str, tuple[Any, ...]]  # a Policy method's name and positional arguments
STOP = "stop"


@dataclass(frozen=True)
class World:
    """This process's place among the trainers."""

    rank: int = 0
    size: int = 1
    device: torch.device = CPU

    @property
    def sharded(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The rank that writes checkpoints and adapters."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> World:
        """From torchrun's RANK, WORLD_SIZE and LOCAL_RANK (absent: a world of one), joining
        the process group when there is more than one: NCCL on GPUs, gloo on CPUs."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        where = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(where)
        if size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return cls(rank, size, where)

    def sum(self, figures: Figures) -> Figures:
        """Each figure summed over the ranks (a loss, a token count): every rank then reports
        the step's global figures."""
        if not self.sharded:
            return figures
        values = torch.tensor(list(figures.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(figures, values.tolist(), strict=True))

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier()

    def announce(self, call: Call) -> None:
        """Rank 0 tells the other ranks the collective call it is about to make."""
        if self.sharded:
            dist.broadcast_object_list([call], src=0)

    def receive(self) -> Call:
        """The call rank 0 announced next (a follower's wait)."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        name, args = box[0]
        return str(name), tuple(args)


def share(items: Sequence[T], rank: int, size: int) -> list[tuple[T, bool]]:
    """This rank's items (round-robin), each with whether it is real: a rank with fewer gets
    copies of the first to run as padding (with zero weight: FSDP's collectives need the same
    number of passes on every rank). Nothing for no items."""
    if not items:
        return []
    own = [(item, True) for item in items[rank::size]]
    rounds = -(-len(items) // size)
    return own + [(items[0], False)] * (rounds - len(own))


def shard(model: torch.nn.Module, world: World) -> None:
    """FSDP2 over `world`: each decoder layer, then the embeddings, final norm and head as one
    unit (they may tie), then the root. Units stay gathered from forward to backward
    (`reshard_after_forward=False`): a shared prefix's keys and values leave a layer outside
    its output, where FSDP's hook that gathers it again for backward never fires."""
    mesh = init_device_mesh(world.device.type, (world.size,))
    base = causal_lm(model)
    for layer in base.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=False)
    outer = [base.model.embed_tokens, base.model.norm, base.get_output_embeddings()]
    fully_shard(outer, mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    for unit in units(model):
        # Summed, never averaged: gloo has neither AVG nor PREMUL_SUM, and the loss weights
        # already divide by the step's tokens (or sequences).
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    # FSDP picks its root on the first forward; the trainer then calls the model's parts
    # directly (the layers for a shared prefix, the head on loss positions only).
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=world.device))
    release(model)


def units(model: torch.nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def release(model: torch.nn.Module) -> None:
    """Free the gathered weights (before an optimizer step: they would be stale after it)."""
    for unit in units(model):
        unit.reshard()


def causal_lm(model: torch.nn.Module) -> Any:
    """The causal LM under a peft wrapper (its `.model` and `.lm_head`)."""
    unwrapped: Any = model
    return unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped


def full_weights(model: torch.nn.Module, trainable: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded weights by name, on CPU, on rank 0 (others: empty); a collective."""
    state: dict[str, Any] = dict(get_model_state_dict(model, options=FULL))
    if trainable:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    return state


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Full weights by name (some of them) into the model, sharded as it is."""
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, dict[str, Any](state), options=options)


def full_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, unsharded, on CPU: any world size
    reads it (rank 0's; others get an empty one). A collective when sharded."""
    return dict(get_optimizer_state_dict(model, optimizer, options=FULL))


def load_optimizer(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """An optimizer state from `optimizer.state_dict()` (by index) or `full_optimizer`."""
    if not by_name(state):
        optimizer.load_state_dict(state)
        return
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, state, options=options)


def by_name(state: dict[str, Any]) -> bool:
    groups = state.get("param_groups") or [{}]
    return any(isinstance(p, str) for p in groups[0].get("params", []))


def full_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, unsharded (a collective when sharded): for tests."""
    grads: dict[str, torch.Tensor] = {}
    for name, parameter in model.named_parameters():
        grad: Any = parameter.grad
        if grad is not None:
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).cpu()
    return grads
