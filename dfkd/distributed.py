"""Data-parallel training on several processes, as `torchrun` starts them (gloo on the CPU, NCCL on GPUs).

Three ways of splitting the work, each chosen so that the result does not hang on the process count:
- The loops that train one model (the teacher, the student) split each batch. Every rank runs the
  same loop on the same random stream, so every rank draws the same global batch, and trains on its
  `share` of it; DistributedDataParallel averages the gradients. N processes so compute the
  gradient one process computes (up to the order of float sums) and take the same steps; only a
  model with batch norm differs, its statistics being taken over each share.
- The fixed transfer sets (ZSKD impressions, DeepInversion batches) are split by batch: each rank
  optimises its own batches, each batch on a random stream of its own, and every rank gathers all.
- The generators (DAFL's, DFAD's, Fast-DFKD's rounds) train like a model on shares of each batch of
  latent vectors; a loss over the whole batch (DAFL's class balance, Fast-DFKD's batch-norm
  statistics) is taken over all ranks' shares (`batch_mean`, `channel_moments`), and Fast-DFKD's
  pool gathers every share. The generators' own batch norm takes its statistics over each share,
  so N processes train a generator close to, not the same as, one process's.
Whatever the split, only rank 0 writes files, logs and shows progress.
"""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as functional_collectives
from torch.nn.parallel import DistributedDataParallel


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process is the one that writes (rank 0, or the only process)."""
    return rank() == 0


def launched() -> bool:
    """Whether this process was started by torchrun as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> torch.device:
    """Join the process group of the torchrun that started this process, if one did; return the
    device this process trains on (its own GPU on a GPU machine)."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def share(batch: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a batch every rank holds: contiguous, as equal as the batch allows."""
    return batch.tensor_split(world_size())[rank()] if world_size() > 1 else batch


def data_parallel(model: nn.Module) -> nn.Module:
    """`model` wrapped to average its gradients over the ranks (it starts from rank 0's weights);
    `model` itself with one process. The unwrapped model is the one to save."""
    return DistributedDataParallel(model) if world_size() > 1 else model


def batch_mean(rows: torch.Tensor) -> torch.Tensor:
    """The mean over the whole batch of rows that the ranks hold a share each of, the same on every
    rank, and differentiable: each rank's gradient flows back into its own rows. (The backward pass
    sums the ranks' gradients, which DistributedDataParallel's average of them divides back.)"""
    if world_size() == 1:
        return rows.mean(dim=0)
    # The functional collective, not dist.all_reduce: autograd differentiates it (torch.distributed.nn's
    # is deprecated for it).
    total = functional_collectives.all_reduce(rows.sum(dim=0), "sum", dist.group.WORLD)
    count = torch.tensor(float(len(rows)), device=rows.device)
    dist.all_reduce(count)
    return total / count


def channel_moments(features: torch.Tensor, over_ranks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and (biased) variance of `features` over every axis but the channels
    (dim 1): of this rank's rows, or `over_ranks`, of the whole batch the ranks hold shares of."""
    if not over_ranks or world_size() == 1:
        dims = [0, *range(2, features.ndim)]
        return features.mean(dim=dims), features.var(dim=dims, unbiased=False)
    per_row = features.flatten(2) if features.ndim > 2 else features.unsqueeze(2)
    mean = batch_mean(per_row.mean(dim=2))
    return mean, batch_mean(per_row.square().mean(dim=2)) - mean.square()


def average(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the ranks (a figure to log, measured on each rank's share)."""
    if world_size() == 1:
        return values
    values = values.detach().clone()
    dist.all_reduce(values)
    return values / world_size()


def average_losses(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each of the named scalar `losses` averaged over the ranks, in one exchange: checked for NaN
    afterwards, the same on every rank, they stop all ranks at the same step."""
    return dict(zip(losses, average(torch.stack(list(losses.values())).float())))


def gather_rows(rows: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `rows` (tensors alike but for their first dimension, which may differ), in rank
    order, on every rank."""
    if world_size() == 1:
        return [rows]
    # NCCL moves GPU tensors only; gloo, CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor(len(rows), device=device))
    padded = torch.zeros(int(max(counts)), *rows.shape[1:], dtype=rows.dtype, device=device)
    padded[: len(rows)] = rows
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return [part[: int(count)].to(rows.device) for part, count in zip(gathered, counts)]
