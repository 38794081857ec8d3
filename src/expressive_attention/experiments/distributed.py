"""One run over several processes (torchrun, DistributedDataParallel): the pieces train_run needs.

Every rank draws the whole global batch from the run's seeded stream and keeps its own slice of it
(rows rank*b .. (rank+1)*b - 1, b = batch / world size), so the ranks together see exactly the batches
one process would, whatever the world size. The loss of a slice is its summed cross-entropy divided by
the number of scored tokens in the *global* batch, so the gradients DDP averages add up to the one-
process gradient (within float rounding). Sampling is cheap next to a training step for the synthetic
tasks; drawing the whole batch on every rank keeps the stream one stream.

    torchrun --nproc_per_node 2 -m expressive_attention.cli train --task pointer --task-params '{"T": 8}'
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets the env:// variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


@dataclass
class Shard:
    """This process's part of a data-parallel run."""

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def from_env(cls, device: str = "cpu") -> "Shard":
        """Join the process group torchrun set up: gloo on CPU, nccl on CUDA (one GPU per local rank)."""
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda' under torchrun, got {device!r}")
        local = int(os.environ["LOCAL_RANK"])
        if device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("device='cuda' but CUDA is not available")
            torch.cuda.set_device(local)
            dev = torch.device("cuda", local)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int) -> int:
        """Rows per rank; the global batch must split evenly."""
        if batch_size % self.world_size:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the world size {self.world_size}")
        return batch_size // self.world_size

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (B, ...) -> (B / world, ...), on this rank's device."""
        b = self.check_batch(t.shape[0])
        return t[self.rank * b:(self.rank + 1) * b].to(self.device)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (in place, returned)."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
