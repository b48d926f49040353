"""A small training run that the crash tests kill with SIGKILL and restart.

    python reliab_crash_worker.py DIR STEPS EVERY [--stall-in-save K | --stall-in-step K]

Trains an embedding (sparse gradients, param group 0) and an MLP (group 1)
with ``tfadam.Adam`` for STEPS steps; the data of step ``s`` depends only on
``s``. Saves ``DIR/ckpt-<step>.tfadam`` every EVERY steps and ``DIR/final.tfadam``
at the end. On start it resumes from the newest checkpoint that loads,
skipping corrupt ones. Progress goes to stdout, one line per event:
``RESUMED k``, ``SKIPPED name``, ``SAVED k``, ``STALLED-IN-SAVE k``,
``STALLED-IN-STEP k``, ``DONE``.

The stall options freeze the process at a precise point so that the parent
can kill it there: ``--stall-in-save K`` in the middle of writing checkpoint
K's first large piece (the temporary file is torn, not yet renamed);
``--stall-in-step K`` in step K after group 0 was updated and before group 1
was (the model is half-stepped in memory).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import tfadam
from tfadam import engine


def build() -> tuple[torch.nn.ModuleDict, tfadam.Adam]:
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "emb": torch.nn.Embedding(50, 8, sparse=True),
            "body": torch.nn.Sequential(
                torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
            ),
        }
    )
    opt = tfadam.Adam(
        [{"params": model["emb"].parameters()}, {"params": model["body"].parameters()}],
        lr=1e-2,
    )
    return model, opt


def train_step(model: torch.nn.ModuleDict, opt: tfadam.Adam, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, 50, (64,), generator=gen)
    target = torch.randn(64, 1, generator=gen)
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model["body"](model["emb"](ids)), target).backward()
    opt.step()


def say(*words: object) -> None:
    print(*words, flush=True)


def stall(event: str, step: int) -> None:
    say(event, step)
    time.sleep(600)  # the parent kills us here


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("steps", type=int)
    parser.add_argument("every", type=int)
    parser.add_argument("--stall-in-save", type=int)
    parser.add_argument("--stall-in-step", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, opt = build()

    start = 0
    for path in sorted(args.directory.glob("ckpt-*.tfadam"), reverse=True):
        try:
            start = tfadam.load_checkpoint(path, model=model, optimizer=opt)["step"]
        except tfadam.CorruptCheckpointError:
            say("SKIPPED", path.name)
            continue
        say("RESUMED", start)
        break

    saving = [0]
    if args.stall_in_save:
        real_write = os.write

        def torn_write(descriptor: int, data: bytes) -> int:
            if saving[0] == args.stall_in_save and len(memoryview(data).cast("B")) > 1024:
                real_write(descriptor, bytes(memoryview(data)[: len(data) // 2]))
                stall("STALLED-IN-SAVE", saving[0])
            return real_write(descriptor, data)

        os.write = torn_write  # persist calls os.write at call time

    current = [0]
    if args.stall_in_step:
        real_execute = engine.execute

        def half_execute(plan, accumulators):
            result = real_execute(plan, accumulators)
            if current[0] == args.stall_in_step:  # group 0 is done, group 1 is not
                stall("STALLED-IN-STEP", current[0])
            return result

        engine.execute = half_execute  # the optimizer calls engine.execute at call time

    for step in range(start, args.steps):
        current[0] = step
        train_step(model, opt, step)
        if (step + 1) % args.every == 0:
            saving[0] = step + 1
            path = args.directory / f"ckpt-{step + 1:06d}.tfadam"
            tfadam.save_checkpoint(path, model=model, optimizer=opt, step=step + 1)
            saving[0] = 0
            say("SAVED", step + 1)
    tfadam.save_checkpoint(
        args.directory / "final.tfadam", model=model, optimizer=opt, step=args.steps
    )
    say("DONE")


if __name__ == "__main__":
    main()
