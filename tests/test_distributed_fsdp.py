"""``tfadam.Adam`` on FSDP2 (DTensor parameters) and torch.distributed.checkpoint.

Two CPU processes (gloo) train a small ``fully_shard``-ed MLP whose layers
shard unevenly (7 rows as 4 + 3, 3 as 2 + 1, and a float64 layer of 1 row
that leaves rank 1 with empty shards). The test process replays the steps in
one process on the full averaged gradients and requires each rank's shard of
θ, m, v (and vhat) to be bitwise the matching rows of it, and every rank's
accumulators to equal its. A DCP checkpoint taken mid-run resumes bit-exactly
on two fresh processes and on one plain process (2 -> 1).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
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
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import tfadam
from tfadam.compat import FSDP2_RUNS_ON_CPU
from tfadam.distributed import init_state

pytestmark = pytest.mark.skipif(
    not FSDP2_RUNS_ON_CPU,
    reason=f"torch {torch.__version__}'s FSDP2 needs CUDA (torch.cpu.Stream has no record_event)",
)

STEPS = 4
RESUME_AT = 2  # the checkpoint holds the state before this step
LR = 0.01
BATCH = 6


class ShardedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 7)
        self.second = nn.Linear(7, 3)
        self.last = nn.Linear(3, 1, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.second(torch.tanh(self.first(x))))
        return self.last(h.double()).float()


def make_model(seed: int = 0) -> ShardedNet:
    torch.manual_seed(seed)
    return ShardedNet()


def shard(model: ShardedNet) -> ShardedNet:
    # One FSDP unit per layer: a unit's parameters must share a dtype.
    for layer in (model.first, model.second, model.last):
        fully_shard(layer)
    fully_shard(model)
    return model


def param_groups(model: ShardedNet) -> list[dict[str, Any]]:
    return [
        {"params": [*model.first.parameters(), *model.second.parameters()]},
        {"params": list(model.last.parameters()), "lr": 0.005, "betas": (0.85, 0.995)},
    ]


def make_optimizer(model: ShardedNet) -> tfadam.Adam:
    return tfadam.Adam(param_groups(model), lr=LR, amsgrad=True)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 5, generator=generator), torch.randn(BATCH, 1, generator=generator)


def loss_of(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (model(x) - target).square().mean()


def train(model: nn.Module, optimizer: tfadam.Adam, rank: int, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        loss_of(model, *batch(step, rank)).backward()
        optimizer.step()


def local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()


def snapshot(model: nn.Module, optimizer: tfadam.Adam) -> dict[str, Any]:
    """This process's part of θ and the slots, and the accumulators, copied."""
    names = {param: name for name, param in model.named_parameters()}
    return {
        "params": {name: local(p) for name, p in model.named_parameters()},
        "state": {
            names[p]: {k: local(t) for k, t in s.items()} for p, s in optimizer.state.items()
        },
        "accumulators": [
            [g["beta1_power"].clone(), g["beta2_power"].clone()] for g in optimizer.param_groups
        ],
    }


def layouts(model: nn.Module, optimizer: tfadam.Adam) -> dict[str, list[str]]:
    """Per parameter: the type and placements of the parameter and of each slot."""

    def layout(t: torch.Tensor) -> str:
        return f"{type(t).__name__} {tuple(t.placements)}" if isinstance(t, DTensor) else "plain"

    return {
        name: [layout(p)] + [layout(t) for t in optimizer.state[p].values()]
        for name, p in model.named_parameters()
    }


def checkpoint_state(
    model: nn.Module, optimizer: tfadam.Adam, options: StateDictOptions | None = None
) -> dict[str, Any]:
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optimizer_state}


def load_checkpoint(
    model: nn.Module, optimizer: tfadam.Adam, path: Path, options: StateDictOptions | None = None
) -> None:
    state = checkpoint_state(model, optimizer, options)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=options,
    )


FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def layout_errors(model: ShardedNet, optimizer: tfadam.Adam) -> list[str]:
    """The messages of steps given gradients laid out unlike their DTensor parameter."""
    weight = model.first.weight
    messages = []
    for grad in (
        torch.zeros(weight.shape),  # a plain tensor
        torch.sparse_coo_tensor([[0]], torch.zeros(1, 5), weight.shape),  # sparse
    ):
        optimizer.zero_grad(set_to_none=True)
        weight.grad = grad
        before = local(weight)
        try:
            optimizer.step()
        except (TypeError, ValueError) as error:
            messages.append(str(error))
        assert torch.equal(local(weight), before), "a failed step changed the parameter"
    optimizer.zero_grad(set_to_none=True)
    return messages


def train_worker(rank: int, world_size: int, tmp: Path, checkpoints: Path) -> None:
    model = shard(make_model())
    optimizer = make_optimizer(model)
    # Without init_state, this first get_state_dict would make DCP take a step
    # with lr=0 that advances the accumulators (the reference then disagrees).
    init_state(optimizer)
    dcp.save(checkpoint_state(model, optimizer), checkpoint_id=str(checkpoints / "step0"))
    train(model, optimizer, rank, range(RESUME_AT))
    dcp.save(checkpoint_state(model, optimizer), checkpoint_id=str(checkpoints / "nested"))
    dcp.save(checkpoint_state(model, optimizer, FLAT), checkpoint_id=str(checkpoints / "flat"))
    train(model, optimizer, rank, range(RESUME_AT, STEPS))
    results = snapshot(model, optimizer)
    results["layouts"] = layouts(model, optimizer)
    results["layout_errors"] = layout_errors(model, optimizer)
    save_rank(tmp, rank, results)


def resume_worker(rank: int, world_size: int, tmp: Path, checkpoints: Path) -> None:
    # Another initialisation and no init_state: DCP's zero-lr step materialises
    # the state, and the load must overwrite all of it.
    model = shard(make_model(seed=1))
    optimizer = make_optimizer(model)
    load_checkpoint(model, optimizer, checkpoints / "flat", FLAT)
    train(model, optimizer, rank, range(RESUME_AT, STEPS))
    save_rank(tmp, rank, snapshot(model, optimizer))


def averaged_gradients(model: ShardedNet, step: int) -> dict[str, torch.Tensor]:
    """FSDP2's reduce-scatter result, unsharded: each rank's gradient halved, summed."""
    per_rank = []
    for rank in range(WORLD_SIZE):
        model.zero_grad(set_to_none=True)
        loss_of(model, *batch(step, rank)).backward()
        per_rank.append({name: p.grad / WORLD_SIZE for name, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return {name: per_rank[0][name] + per_rank[1][name] for name in per_rank[0]}


def shard_of(full: torch.Tensor, rank: int) -> torch.Tensor:
    """The rows of ``full`` that FSDP2's Shard(0) gives ``rank`` (torch.chunk's split)."""
    rows = math.ceil(full.shape[0] / WORLD_SIZE)
    start = min(rank * rows, full.shape[0])
    return full[start : start + rows]


def sharded(tree: Any, rank: int) -> Any:
    if isinstance(tree, dict):
        return {key: sharded(value, rank) for key, value in tree.items()}
    return shard_of(tree, rank)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fsdp")
    checkpoints = tmp / "checkpoints"
    spawn(train_worker, tmp / "train", checkpoints)
    spawn(resume_worker, tmp / "resume", checkpoints)
    with single_thread():
        model = make_model()
        optimizer = make_optimizer(model)
        grads = []
        for step in range(STEPS):
            grads.append(averaged_gradients(model, step))
            train_single_process(model, optimizer, range(step, step + 1), grads)
    return {
        "train": load_ranks(tmp / "train"),
        "resume": load_ranks(tmp / "resume"),
        "reference": snapshot(model, optimizer),
        "grads": grads,
        "checkpoints": checkpoints,
    }


def assert_shards_match(ranks: list[dict[str, Any]], reference: dict[str, Any], what: str) -> None:
    for rank, result in enumerate(ranks):
        for part in ("params", "state"):
            expected = sharded(reference[part], rank)
            assert_same(result[part], expected, f"{what}: rank {rank} {part}")
        assert_same(result["accumulators"], reference["accumulators"], f"{what}: rank {rank}")


def test_fsdp2_shards_equal_the_rows_of_one_process(runs):
    ranks = runs["train"]
    # The case under test: uneven shards, and empty ones on rank 1.
    assert ranks[0]["params"]["first.weight"].shape[0] == 4
    assert ranks[1]["params"]["first.weight"].shape[0] == 3
    assert ranks[1]["params"]["last.weight"].numel() == 0
    assert_shards_match(ranks, runs["reference"], f"FSDP2 after {STEPS} steps")


def test_fsdp2_slots_are_dtensors_laid_out_like_their_parameters(runs):
    for result in runs["train"]:
        for name, (param, *slots) in result["layouts"].items():
            assert param.startswith("DTensor"), name
            assert slots == [param] * 3, name  # m, v, vhat


def test_fsdp2_rejects_gradients_laid_out_unlike_the_parameter(runs):
    for result in runs["train"]:
        plain, sparse = result["layout_errors"]
        assert "param_groups[0]['params'][0]" in plain and "a plain tensor" in plain
        assert "is a DTensor and its gradient is sparse" in sparse


def test_dcp_resumes_on_two_fresh_processes(runs):
    assert_shards_match(runs["resume"], runs["reference"], "resumed on 2 processes")


def test_dcp_resumes_on_one_process(runs):
    with single_thread():
        model = make_model(seed=1)
        optimizer = make_optimizer(model)
        init_state(optimizer)
        load_checkpoint(model, optimizer, runs["checkpoints"] / "nested")
        train_single_process(model, optimizer, range(RESUME_AT, STEPS), runs["grads"])
    assert_same(snapshot(model, optimizer), runs["reference"], "resumed on 1 process")


def test_dcp_checkpoint_before_the_first_step_holds_the_initial_state(runs):
    model = make_model(seed=1)
    optimizer = make_optimizer(model)
    load_checkpoint(model, optimizer, runs["checkpoints"] / "step0")
    assert_same(dict(model.named_parameters()), dict(make_model().named_parameters()), "θ")
    for group, betas in zip(optimizer.param_groups, [(0.9, 0.999), (0.85, 0.995)], strict=True):
        expected = [torch.tensor(beta, dtype=torch.float32) for beta in betas]
        assert_same([group["beta1_power"], group["beta2_power"]], expected, "accumulators")
    for slots in optimizer.state.values():
        assert all(not t.any() for t in slots.values())


def test_init_state_keeps_dcp_from_advancing_the_accumulators():
    def run(before_first_step: Any) -> dict[str, Any]:
        model = make_model()
        optimizer = make_optimizer(model)
        before_first_step(model, optimizer)
        for step in range(2):
            optimizer.zero_grad()
            loss_of(model, *batch(step, 0)).backward()
            optimizer.step()
        return snapshot(model, optimizer)

    def init_then_get_state_dict(model: nn.Module, optimizer: tfadam.Adam) -> None:
        init_state(optimizer)
        get_optimizer_state_dict(model, optimizer)

    plain = run(lambda model, optimizer: None)
    assert_same(run(init_then_get_state_dict), plain, "init_state + get_optimizer_state_dict")
