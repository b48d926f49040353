"""A small recommender trained with tfadam on sparse embedding gradients.

Rows of an ``nn.Embedding(sparse=True)`` table get sparse COO gradients.
``sparse="dense"`` applies them as TF1 does (every row's momentum decays, so a
row touched once keeps moving); ``sparse="lazy"`` touches only the rows looked
up, at a cost proportional to them.

    python examples/sparse_embedding.py [--mode lazy] [--steps 200]
"""

import argparse

import torch

import tfadam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["dense", "lazy"], default="dense")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    torch.manual_seed(0)
    users, items, dim = 5_000, 2_000, 16
    true_users, true_items = torch.randn(users, 4), torch.randn(items, 4)
    user_table = torch.nn.Embedding(users, dim, sparse=True)
    item_table = torch.nn.Embedding(items, dim, sparse=True)
    opt = tfadam.Adam(
        [*user_table.parameters(), *item_table.parameters()], lr=0.01, sparse=args.mode
    )
    for step in range(1, args.steps + 1):
        u, i = torch.randint(0, users, (512,)), torch.randint(0, items, (512,))
        rating = (true_users[u] * true_items[i]).sum(1)
        prediction = (user_table(u) * item_table(i)).sum(1)
        loss = torch.nn.functional.mse_loss(prediction, rating)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
