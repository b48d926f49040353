"""``python -m tfadam compare``: one gradient stream, three optimizers.

Feeds the same random gradients (scales 1e-4 .. 1e2) to tfadam,
``torch.optim.Adam(fused=True)`` and TensorFlow's ``tf.compat.v1.train.AdamOptimizer``
(when TensorFlow is importable), and reports after each step how far each
is from TF: the fraction of parameter elements whose bits differ and the
largest relative difference. Writes a PNG plot of it.

Example:
    >>> from tfadam.compare import run_comparison
    >>> rows = run_comparison(steps=3, size=1000, use_tf=False, progress=False)
    >>> [row.step for row in rows], rows[-1].reference
    ([1, 2, 3], 'tfadam')
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cli import (
    ArgumentParser,
    learning_rate,
    nonnegative_int,
    output_file,
    positive_int,
)
from .optimizer import Adam

TORCH = "torch.optim.Adam(fused=True)"  # the contender's label: what is run, as it is called


@dataclass(frozen=True)
class Deviation:
    """How one optimizer's parameters differ from the reference after a step."""

    differing: float  # fraction of elements whose bits differ
    max_relative: float  # max |x - ref| / max(|ref|, tiny)


@dataclass(frozen=True)
class Row:
    step: int
    reference: str  # "tensorflow", or "tfadam" when TF is absent
    deviations: dict[str, Deviation]


def _deviation(x: np.ndarray, reference: np.ndarray) -> Deviation:
    differing = float(np.mean(x.view(np.uint32) != reference.view(np.uint32)))
    scale = np.maximum(np.abs(reference), np.finfo(np.float32).tiny)
    relative = np.abs(x.astype(np.float64) - reference) / scale
    return Deviation(differing, float(np.nanmax(relative)) if relative.size else 0.0)


def _import_tensorflow():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError:
        return None
    return tf


def _progress(iterable, enabled: bool, total: int):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc="steps", unit="step", leave=False)


def run_comparison(
    steps: int = 200,
    size: int = 100_003,
    seed: int = 0,
    lr: float = 1e-3,
    use_tf: bool = True,
    progress: bool = True,
) -> list[Row]:
    """Run the three optimizers on one float32 gradient stream; a row per step."""
    tf = _import_tensorflow() if use_tf else None
    rng = np.random.default_rng(seed)
    theta0 = rng.standard_normal(size).astype(np.float32)
    scales = (10 ** rng.uniform(-4, 2, size)).astype(np.float32)

    ours = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    theirs = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    tfadam_opt = Adam([ours], lr=lr)
    torch_opt = torch.optim.Adam([theirs], lr=lr, fused=True)
    if tf is not None:
        tf_var = tf.Variable(theta0.copy())
        tf_opt = tf.compat.v1.train.AdamOptimizer(lr)

    rows = []
    for step in _progress(range(1, steps + 1), progress, steps):
        g = (rng.standard_normal(size).astype(np.float32) * scales).astype(np.float32)
        for param, opt in ((ours, tfadam_opt), (theirs, torch_opt)):
            param.grad = torch.from_numpy(g.copy())
            opt.step()
        results = {"tfadam": ours.detach().numpy(), TORCH: theirs.detach().numpy()}
        if tf is not None:
            tf_opt.apply_gradients([(tf.constant(g), tf_var)])
            reference_name, reference = "tensorflow", tf_var.numpy()
        else:
            reference_name, reference = "tfadam", results.pop("tfadam")
        deviations = {name: _deviation(x, reference) for name, x in results.items()}
        rows.append(Row(step, reference_name, deviations))
    return rows


def format_table(rows: list[Row], every: int) -> str:
    """A fixed-width table of every ``every``-th row (and the last)."""
    widths = {name: max(len(name) + 6, 9) for name in rows[0].deviations}  # "name diff%"
    header = f"{'step':>5}  " + "  ".join(
        f"{name + ' diff%':>{width}} {'max rel':>9}" for name, width in widths.items()
    )
    lines = [
        f"deviation from {rows[0].reference} (bits that differ, max relative difference)",
        header,
    ]
    for row in rows:
        if row.step % every and row is not rows[-1]:
            continue
        cells = "  ".join(
            f"{100 * d.differing:>{widths[name] - 1}.2f}% {d.max_relative:>9.2e}"
            for name, d in row.deviations.items()
        )
        lines.append(f"{row.step:>5}  {cells}")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> bool:
    """Write the deviation per step as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r.step for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name in rows[0].deviations:
        relative = [r.deviations[name].max_relative for r in rows]
        label = name if any(relative) else f"{name} (identical: 0, drawn at 1e-12)"
        top.plot(steps, [100 * r.deviations[name].differing for r in rows], label=name)
        bottom.plot(steps, [max(x, 1e-12) for x in relative], label=label)
    top.set_ylabel("elements differing (%)")
    top.set_title(f"Same gradients, deviation from {rows[0].reference}")
    top.legend()
    bottom.set_yscale("log")
    bottom.set_ylabel("max relative difference")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")  # PNG whatever the name's suffix
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, checked whole before any work starts (exit status 2 if bad)."""
    parser = ArgumentParser(prog="python -m tfadam compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=200, help="steps (>= 1)")
    parser.add_argument(
        "--size", type=positive_int, default=100_003, help="parameter elements (>= 1)"
    )
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (>= 0)")
    parser.add_argument("--lr", type=learning_rate, default=1e-3, help="learning rate (>= 0)")
    parser.add_argument(
        "--every", type=positive_int, default=20, help="print every N-th step (>= 1)"
    )
    parser.add_argument(
        "--out",
        type=output_file,
        default=None,
        help="PNG plot path (default: ./tfadam-compare.png)",
    )
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    parser.add_argument("--no-tf", action="store_true", help="skip TensorFlow even if installed")
    args = parser.parse_args(argv)
    if args.no_plot and args.out is not None:
        parser.error("--out and --no-plot contradict each other; drop one")
    if args.out is None and not args.no_plot:
        try:
            args.out = output_file("tfadam-compare.png")
        except argparse.ArgumentTypeError as error:
            parser.error(f"the default plot path: {error}; give --out PATH or --no-plot")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_tf = not args.no_tf
    if use_tf and _import_tensorflow() is None:
        print(
            f"TensorFlow was not found: comparing {TORCH} with tfadam instead "
            "(pip install tensorflow-cpu to compare against TF itself)."
        )
        use_tf = False
    rows = run_comparison(
        args.steps, args.size, args.seed, args.lr, use_tf, progress=sys.stderr.isatty()
    )
    print(format_table(rows, args.every))
    last = rows[-1].deviations
    if use_tf:
        verdict = "bit-identical to TensorFlow" if last["tfadam"].differing == 0 else "DIFFERENT"
        print(
            f"\ntfadam after {args.steps} steps: {verdict}; {TORCH}: "
            f"{100 * last[TORCH].differing:.1f}% of elements differ "
            f"(max relative {last[TORCH].max_relative:.2e})."
        )
    if not args.no_plot:
        if plot(rows, args.out):
            print(f"plot written to {args.out}")
        else:
            print("matplotlib is not installed: no plot (pip install matplotlib).")
    return 0
