"""``tfadam.Adam`` as a torch optimizer: groups, closure, state_dict, schedulers,
GradScaler, sparse embeddings, hooks. Bitwise comparisons against the TF1
face, which the oracle suite proves equal to TensorFlow."""

import threading

import pytest
import torch
from tf_oracle import bits

import tfadam


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool((bits(a) == bits(b)).all())


def gradients(shape, steps, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype) for _ in range(steps)]


def test_is_a_torch_optimizer() -> None:
    assert issubclass(tfadam.Adam, torch.optim.Optimizer)


def test_param_groups_have_their_own_hyperparameters_and_accumulators() -> None:
    a, b = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(3, 2))
    opt = tfadam.Adam(
        [{"params": [a]}, {"params": [b], "lr": 0.05, "betas": (0.5, 0.9), "eps": 1e-3}],
        lr=0.01,
    )
    ref_a, ref_b = torch.ones(5), torch.ones(3, 2)
    tf1_a = tfadam.AdamOptimizer(0.01)
    tf1_b = tfadam.AdamOptimizer(0.05, 0.5, 0.9, 1e-3)
    for step, (ga, gb) in enumerate(zip(gradients(5, 6, 1), gradients((3, 2), 6, 2))):
        a.grad = ga
        b.grad = gb if step % 2 == 0 else None  # group 1 skips odd steps entirely
        opt.step()
        tf1_a.apply_gradients([(ga, ref_a)])
        if step % 2 == 0:
            tf1_b.apply_gradients([(gb, ref_b)])
    assert same(a.detach(), ref_a) and same(b.detach(), ref_b)
    group_a, group_b = opt.param_groups
    assert same(group_a["beta1_power"], tf1_a._get_beta_accumulators()[0])
    assert same(group_b["beta2_power"], tf1_b._get_beta_accumulators()[1])
    assert float(group_a["beta1_power"]) != float(group_b["beta1_power"])


def test_step_with_closure_returns_the_loss_and_steps() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = tfadam.Adam([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss) == 5.0
    reference = torch.tensor([1.0, 2.0])
    tfadam.AdamOptimizer(0.1).apply_gradients([(2 * torch.tensor([1.0, 2.0]), reference)])
    assert same(w.detach(), reference)


def test_zero_grad_sets_grads_to_none() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = tfadam.Adam([w])
    w.grad = torch.ones(2)
    opt.zero_grad()
    assert w.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_state_dict_saved_to_a_file_resumes_bit_exactly(tmp_path, dtype) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    model = model.to(dtype)
    twin = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    twin = twin.to(dtype)
    twin.load_state_dict(model.state_dict())
    data = [torch.randn(16, 7).to(dtype) for _ in range(10)]

    def train(net, opt, batches):
        for x in batches:
            opt.zero_grad()
            net(x).float().square().mean().backward()
            opt.step()

    uninterrupted = tfadam.Adam(twin.parameters(), lr=0.01, amsgrad=True)
    train(twin, uninterrupted, data)

    first = tfadam.Adam(model.parameters(), lr=0.01, amsgrad=True)
    train(model, first, data[:4])
    torch.save({"model": model.state_dict(), "optim": first.state_dict()}, tmp_path / "ckpt.pt")

    saved = torch.load(tmp_path / "ckpt.pt")
    resumed_model = torch.nn.Sequential(
        torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
    ).to(dtype)
    resumed_model.load_state_dict(saved["model"])
    resumed = tfadam.Adam(resumed_model.parameters(), lr=0.01, amsgrad=True)
    resumed.load_state_dict(saved["optim"])
    assert resumed.param_groups[0]["beta1_power"].dtype == torch.float32
    train(resumed_model, resumed, data[4:])
    for p, q in zip(resumed_model.parameters(), twin.parameters()):
        assert same(p.detach(), q.detach())
        for key in ("m", "v", "vhat"):
            assert same(resumed.state[p][key], uninterrupted.state[q][key])


def test_lr_scheduler_drives_the_learning_rate() -> None:
    w = torch.nn.Parameter(torch.ones(4))
    opt = tfadam.Adam([w], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    reference = torch.ones(4)
    schedule = [0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    clock = [0]
    tf1 = tfadam.AdamOptimizer(lambda: schedule[clock[0]])
    for step, g in enumerate(gradients(4, 6)):
        clock[0] = step
        w.grad = g
        opt.step()
        scheduler.step()
        tf1.apply_gradients([(g, reference)])
    assert same(w.detach(), reference)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_grad_scaler_unscales_and_skips_infinite_steps() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    opt = tfadam.Adam([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    reference, tf1 = torch.ones(3), tfadam.AdamOptimizer(0.1)
    for step, g in enumerate(gradients(3, 4)):
        opt.zero_grad()
        loss = (w * g).sum() * (float("inf") if step == 2 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step != 2:
            tf1.apply_gradients([(g, reference)])
    assert same(w.detach(), reference)


@pytest.mark.parametrize("mode", ["dense", "lazy"])
def test_sparse_embedding_trains(mode: str) -> None:
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(50, 8, sparse=True)
    head = torch.nn.Linear(8, 1)
    opt = tfadam.Adam([*embedding.parameters(), *head.parameters()], lr=0.05, sparse=mode)
    ids = torch.randint(0, 20, (64, 3))  # rows 20..49 never looked up
    target = ids.float().mean(1, keepdim=True) / 10
    before = embedding.weight.detach().clone()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (head(embedding(ids).mean(1)) - target).square().mean()
        loss.backward()
        assert embedding.weight.grad.is_sparse
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    untouched = embedding.weight.detach()[20:]
    if mode == "lazy":
        assert same(untouched, before[20:])
    else:  # TF1: dense-equivalent, but m = v = 0 on untouched rows, so they stay put
        assert same(untouched, before[20:])
        assert not same(embedding.weight.detach()[:20], before[:20])


def test_dense_mode_moves_rows_whose_momentum_is_nonzero() -> None:
    """TF1 is not lazy: a row touched once keeps moving on later steps."""
    w = torch.nn.Parameter(torch.zeros(4, 2))
    opt = tfadam.Adam([w], lr=0.1)
    w.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (4, 2))
    opt.step()
    after_first = w.detach().clone()
    w.grad = torch.sparse_coo_tensor([[3]], torch.ones(1, 2), (4, 2))
    opt.step()
    assert not same(w.detach()[1], after_first[1])
    lazy_w = torch.nn.Parameter(torch.zeros(4, 2))
    lazy = tfadam.Adam([lazy_w], lr=0.1, sparse="lazy")
    lazy_w.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (4, 2))
    lazy.step()
    row = lazy_w.detach()[1].clone()
    lazy_w.grad = torch.sparse_coo_tensor([[3]], torch.ones(1, 2), (4, 2))
    lazy.step()
    assert same(lazy_w.detach()[1], row)


def test_step_hooks_run() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = tfadam.Adam([w])
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    w.grad = torch.ones(2)
    opt.step()
    assert calls == ["pre", "post"]


def test_named_parameters_name_the_culprit() -> None:
    model = torch.nn.Linear(3, 2)
    opt = tfadam.Adam(model.named_parameters())
    model.weight.grad = torch.sparse_coo_tensor([[5]], torch.ones(1, 3), (2, 3))  # row 5 of 2
    model.bias.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"'weight'.*index 5 is out of range"):
        opt.step()


def test_concurrent_steps_on_separate_optimizers_are_independent() -> None:
    results = {}

    def train(index):
        w = torch.nn.Parameter(torch.ones(100))
        opt = tfadam.Adam([w], lr=0.01)
        for g in gradients(100, 20, seed=index):
            w.grad = g
            opt.step()
        results[index] = w.detach()

    threads = [threading.Thread(target=train, args=(i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert same(results[0], results[0]) and not same(results[0], results[1])
