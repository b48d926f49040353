"""Train a small classifier with FSDP2 + tfadam.Adam, checkpointed with DCP.

Run it with torchrun (CPU and gloo here; see docs/scaling.md)::

    torchrun --standalone --nproc-per-node=2 examples/distributed_train.py \\
        --steps 40 --checkpoint-dir /tmp/tfadam-run

Every ``--checkpoint-every`` steps the model and optimizer state go to a
``torch.distributed.checkpoint`` directory, each rank writing its own shards;
a later run with the same ``--checkpoint-dir`` resumes from the newest one,
on this or another number of processes, and ends bit for bit where an
uninterrupted run ends: compare the ``fingerprint`` lines.

Each step's global batch is made of ``MICRO_BATCHES`` micro-batches, dealt out
to the ranks; a rank scales its micro-batches' losses so that FSDP2's
gradient average is their mean. With power-of-two scales that mean comes out
bitwise the same for 1 or 2 processes, which is what lets a run change its
world size and still agree with an uninterrupted one.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import tfadam
from tfadam.distributed import init_state

FEATURES, HIDDEN, CLASSES = 16, 64, 4
MICRO_BATCHES, MICRO_BATCH_SIZE = 2, 32


class Classifier(nn.Module):
    """A three-layer MLP over ``FEATURES`` inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, CLASSES)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.gelu(layer(x))
        return self.layers[-1](x)


def micro_batch(step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed class centres; a pure function of (step, index),
    so a resumed run needs no data-loader state."""
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1 + step * MICRO_BATCHES + index)
    labels = torch.randint(0, CLASSES, (MICRO_BATCH_SIZE,), generator=generator)
    x = centres[labels] + 1.5 * torch.randn(MICRO_BATCH_SIZE, FEATURES, generator=generator)
    return x, labels


def checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (DCP writes .metadata last)."""
    return sorted(p.parent for p in directory.glob("step-*/.metadata"))


def fingerprint(model: nn.Module) -> str:
    """A hash of the full parameters' bytes; the same on every rank."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        digest.update(name.encode())
        digest.update(full.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="train until this step")
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if MICRO_BATCHES % world_size:
        raise SystemExit(f"run on a divisor of {MICRO_BATCHES} processes, not {world_size}")

    torch.manual_seed(0)
    model = Classifier()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = tfadam.Adam(model.parameters(), lr=args.lr)
    # Before anything asks DCP for the optimizer's state: otherwise DCP creates
    # it with a zero-lr step, which advances the beta-power accumulators.
    init_state(optimizer)

    start = 0
    if saved := checkpoints(args.checkpoint_dir):
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state, "step": 0}
        dcp.load(state, checkpoint_id=saved[-1])
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
        start = state["step"]
        if rank == 0:
            print(f"resumed from {saved[-1]} on {world_size} process(es)", flush=True)

    for step in range(start, args.steps):
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for index in range(rank, MICRO_BATCHES, world_size):
            x, labels = micro_batch(step, index)
            # FSDP2 divides the summed gradient by world_size; this scale makes
            # the result the mean over all micro-batches.
            loss = F.cross_entropy(model(x), labels) * (world_size / MICRO_BATCHES)
            loss.backward()
            total += loss.detach()
        optimizer.step()
        dist.all_reduce(total)
        done = step + 1
        if rank == 0 and (done % 10 == 0 or done == args.steps):
            print(f"step {done:4d}  loss {total.item() / world_size:.4f}", flush=True)
        if done % args.checkpoint_every == 0 or done == args.steps:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optimizer": optimizer_state, "step": done}
            dcp.save(state, checkpoint_id=args.checkpoint_dir / f"step-{done:06d}")

    digest = fingerprint(model)
    if rank == 0:
        print(f"fingerprint {digest} at step {args.steps}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Gloo's worker threads may still free tensors a moment after the last
    # collective; if the interpreter is shutting down by then, the process
    # aborts (SIGABRT, pytorch issue 190489), now and then on a busy CPU. All
    # is saved and printed, so leave without that shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
