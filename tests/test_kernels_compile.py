"""``torch.compile`` of a training step that calls ``opt.step()``.

``tfadam.Adam.step`` is ``tfadam.eager.eager_only`` (dynamo sees it
``torch.compiler.disable``d: its kernels are C called through ctypes, which
dynamo cannot trace), so inside a compiled function the step is a graph break
and runs eagerly. Compiled forward/backward code may
round differently from eager code, so the test records the gradients the
compiled step produced and replays them through an eager optimizer: the
parameters must come out bit-identical.
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import assert_same_bits

import tfadam
from tfadam import compat


def model_and_params() -> tuple[torch.nn.Module, torch.nn.Embedding, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    embedding = torch.nn.Embedding(50, 8, sparse=True)
    return model, embedding, [*model.parameters(), *embedding.parameters()]


INDUCTOR = pytest.param(
    "inductor",
    marks=pytest.mark.skipif(
        not compat.INDUCTOR_COMPILES_SPARSE_EMBEDDING,
        reason=f"torch {torch.__version__}'s inductor cannot lower a sparse embedding",
    ),
)


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_compiled_training_step_updates_like_eager(backend: str) -> None:
    torch._dynamo.reset()
    model, embedding, params = model_and_params()
    opt = tfadam.Adam(params, lr=0.01)
    recorded: list[list[torch.Tensor]] = []

    def train_step(ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = (model(embedding(ids)).squeeze(-1) - target).square().mean()
        loss.backward()
        recorded.append([p.grad.clone() for p in params])  # type: ignore[union-attr]
        opt.step()
        return loss.detach()

    step = torch.compile(train_step, backend=backend)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 50, (32,), generator=generator)
        step(ids, torch.randn(32, generator=generator))
    assert len(recorded) == 3 and recorded[0][-1].is_sparse  # the embedding's grad stayed sparse

    _, _, replay_params = model_and_params()
    replay = tfadam.Adam(replay_params, lr=0.01)
    for grads in recorded:
        for p, g in zip(replay_params, grads, strict=True):
            p.grad = g
        replay.step()
    for compiled_param, eager_param in zip(params, replay_params, strict=True):
        assert_same_bits(compiled_param.detach(), eager_param.detach())
        assert_same_bits(opt.state[compiled_param]["v"], replay.state[eager_param]["v"])


def test_the_step_is_one_graph_break() -> None:
    # dynamo stops once, at the step, and never traces its hooks or validation
    torch._dynamo.reset()
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    opt = tfadam.Adam([w], lr=0.1)

    def f(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        opt.step()
        return y + 1

    explanation = torch._dynamo.explain(f)(torch.ones(2))
    assert explanation.graph_break_count == 1, explanation.break_reasons
    assert "disable" in str(explanation.break_reasons[0].reason)
