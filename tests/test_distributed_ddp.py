"""``tfadam.Adam`` under DistributedDataParallel and ZeroRedundancyOptimizer.

Two CPU processes (gloo) train a small model with a sparse embedding and two
dense layers in three param groups; the test process replays the same steps
in a single process, feeding ``tfadam.Adam`` the gradients DDP averages, and
requires every rank's parameters, slots and accumulators to match it bit for
bit. One spawn serves both the DDP and the ZeRO checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from distributed_helpers import (
    WORLD_SIZE,
    assert_same,
    load_ranks,
    save_rank,
    single_thread,
    spawn,
    train_single_process,
)
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import tfadam

VOCAB, WIDTH, HIDDEN, TOKENS, BATCH = 40, 6, 12, 5, 8
STEPS = 4
RESUME_AT = 2  # ZeRO consolidates a checkpoint before this step
LR = 0.01


class SparseNet(nn.Module):
    """A bag-of-embeddings regressor: a sparse-gradient table, then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH, sparse=True)
        self.hidden = nn.Linear(WIDTH, HIDDEN)
        self.out = nn.Linear(HIDDEN, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embedding(ids).sum(1))))


def make_model() -> SparseNet:
    torch.manual_seed(0)
    return SparseNet()


def param_groups(model: SparseNet) -> list[dict[str, Any]]:
    # Three groups, so three pairs of accumulators. ZeRO puts the embedding (the
    # largest tensor) on rank 0 and everything else on rank 1, which leaves rank
    # 0 with empty shares of groups 1 and 2.
    return [
        {"params": [model.embedding.weight]},
        {"params": [model.hidden.weight, model.out.weight], "lr": 0.02, "amsgrad": True},
        {"params": [model.hidden.bias, model.out.bias], "betas": (0.8, 0.99), "nesterov": True},
    ]


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator)
    return ids, torch.randn(BATCH, 1, generator=generator)


def loss_of(model: nn.Module, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (model(ids) - target).square().mean()


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Parameters, slots (by parameter name) and each group's accumulators, copied."""
    names = {param: name for name, param in model.named_parameters()}
    return {
        "params": {name: p.detach().clone() for name, p in model.named_parameters()},
        "state": {
            names[p]: {k: t.clone() for k, t in s.items()} for p, s in optimizer.state.items()
        },
        "accumulators": [
            [g["beta1_power"].clone(), g["beta2_power"].clone()] for g in optimizer.param_groups
        ],
    }


def ddp_and_zero_worker(rank: int, world_size: int, tmp: Path) -> None:
    results: dict[str, Any] = {}

    model = make_model()
    ddp = DistributedDataParallel(model)
    optimizer = tfadam.Adam(param_groups(model), lr=LR)
    results["ddp_grads"] = []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss_of(ddp, *batch(step, rank)).backward()
        results["ddp_grads"].append({name: p.grad.clone() for name, p in model.named_parameters()})
        optimizer.step()
    results["ddp"] = snapshot(model, optimizer)

    model = make_model()
    ddp = DistributedDataParallel(model)
    zero = ZeroRedundancyOptimizer(param_groups(model), optimizer_class=tfadam.Adam, lr=LR)
    results["zero_local_group_sizes"] = [len(g["params"]) for g in zero.optim.param_groups]
    for step in range(STEPS):
        if step == RESUME_AT:
            zero.consolidate_state_dict(to=0)
            if rank == 0:
                # Saved at once: the consolidated dict shares tensors with the live state.
                checkpoint = {"model": model.state_dict(), "optimizer": zero.state_dict()}
                torch.save(checkpoint, tmp / "zero_checkpoint.pt")
        zero.zero_grad(set_to_none=True)
        loss_of(ddp, *batch(step, rank)).backward()
        zero.step()
    zero.consolidate_state_dict(to=0)
    results["zero_params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        results["zero_final_state_dict"] = zero.state_dict()
    save_rank(tmp, rank, results)


def averaged_gradients(model: SparseNet, step: int) -> dict[str, torch.Tensor]:
    """The gradients DDP hands every rank at ``step``, computed in one process.

    DDP divides each rank's gradient by the world size and all-reduces the
    sum; with two ranks ``a/2 + b/2`` is exact in either order. Gloo reduces a
    sparse gradient by coalescing each rank's, adding them and coalescing the
    sum.
    """
    per_rank = []
    for rank in range(WORLD_SIZE):
        model.zero_grad(set_to_none=True)
        loss_of(model, *batch(step, rank)).backward()
        per_rank.append({name: p.grad / WORLD_SIZE for name, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    averaged = {}
    for name, first in per_rank[0].items():
        if first.is_sparse:
            total = first.coalesce()
            for grads in per_rank[1:]:
                total = total + grads[name].coalesce()
            averaged[name] = total.coalesce()
        else:
            total = first
            for grads in per_rank[1:]:
                total = total + grads[name]
            averaged[name] = total
    return averaged


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("ddp")
    spawn(ddp_and_zero_worker, tmp)
    with single_thread():
        model = make_model()
        optimizer = tfadam.Adam(param_groups(model), lr=LR)
        grads = []
        for step in range(STEPS):
            grads.append(averaged_gradients(model, step))
            train_single_process(model, optimizer, range(step, step + 1), grads)
        reference = snapshot(model, optimizer)
    return {"ranks": load_ranks(tmp), "grads": grads, "reference": reference, "tmp": tmp}


def test_ddp_averages_dense_and_sparse_gradients_as_the_reference_does(runs):
    for rank, result in enumerate(runs["ranks"]):
        assert result["ddp_grads"][0]["embedding.weight"].is_sparse
        assert_same(result["ddp_grads"], runs["grads"], f"rank {rank} DDP gradients")


def test_ddp_ranks_end_identical_and_equal_to_one_process(runs):
    reference = runs["reference"]
    first = runs["ranks"][0]["ddp"]
    for rank, result in enumerate(runs["ranks"]):
        assert_same(result["ddp"]["params"], first["params"], f"rank {rank} vs rank 0 params")
        assert_same(result["ddp"], reference, f"rank {rank} after {STEPS} DDP steps")


def test_zero_leaves_rank_0_with_empty_group_shares(runs):
    # The case the accumulators of empty groups exist for; if ZeRO partitions
    # differently some day, this test says so instead of passing vacuously.
    assert runs["ranks"][0]["zero_local_group_sizes"] == [1, 0, 0]
    assert runs["ranks"][1]["zero_local_group_sizes"] == [0, 2, 2]


def test_zero_matches_one_process(runs):
    reference = runs["reference"]
    for rank, result in enumerate(runs["ranks"]):
        assert_same(result["zero_params"], reference["params"], f"rank {rank} ZeRO params")
    consolidated = runs["ranks"][0]["zero_final_state_dict"]
    # A state_dict numbers the parameters in param-group order.
    model = make_model()
    name_of = {param: name for name, param in model.named_parameters()}
    names = [name_of[p] for group in param_groups(model) for p in group["params"]]
    state = {names[index]: slots for index, slots in consolidated["state"].items()}
    assert_same(state, reference["state"], "consolidated ZeRO state")
    accumulators = [[g["beta1_power"], g["beta2_power"]] for g in consolidated["param_groups"]]
    assert_same(accumulators, reference["accumulators"], "consolidated ZeRO accumulators")


def test_zero_consolidated_state_dict_resumes_in_one_process(runs):
    checkpoint = torch.load(runs["tmp"] / "zero_checkpoint.pt", weights_only=False)
    with single_thread():
        model = make_model()
        model.load_state_dict(checkpoint["model"])
        optimizer = tfadam.Adam(param_groups(model), lr=LR)
        optimizer.load_state_dict(checkpoint["optimizer"])
        train_single_process(model, optimizer, range(RESUME_AT, STEPS), runs["grads"])
    assert_same(snapshot(model, optimizer), runs["reference"], "resumed from ZeRO")


def test_an_empty_group_keeps_its_accumulators_in_step():
    # A ZeRO rank's empty share of a group must carry the group's accumulators.
    w = nn.Parameter(torch.ones(3))
    optimizer = tfadam.Adam([{"params": [w]}, {"params": [], "betas": (0.5, 0.25)}], lr=0.1)
    for _ in range(3):
        w.grad = torch.ones(3)
        optimizer.step()
    empty = optimizer.param_groups[1]
    assert (float(empty["beta1_power"]), float(empty["beta2_power"])) == (0.5**4, 0.25**4)
