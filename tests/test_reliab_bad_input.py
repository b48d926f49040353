"""Bad input, face by face: the right error, naming the culprit, and nothing changed.

Every case builds a warm optimizer (one step taken: slots and accumulators
exist, gradients are set), introduces one bad input — placed after good ones,
so a half-done call would show — snapshots the raw bytes of every tensor
(params, grads, slots, accumulators, global_step, group settings, counters),
makes the call, and checks the exception's exact type, its message, and that
no byte changed.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import warnings
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from reliab_support import differences, tf1_face_tensors, torch_face_tensors

import tfadam
from tfadam import IndexedSlices, NonFiniteGradientError, StateDictError

nan, inf = math.nan, math.inf

# -- worlds --------------------------------------------------------------------------------------


def torch_world(**options: Any) -> SimpleNamespace:
    """tfadam.Adam over an embedding (sparse grads, group 0) and a linear layer (group 1)."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(6, 3, sparse=True)
    lin = torch.nn.Linear(3, 2)
    opt = tfadam.Adam(
        [{"params": list(emb.parameters())}, {"params": list(lin.parameters()), "lr": 0.01}],
        lr=0.1,
        **options,
    )

    def backward() -> None:
        opt.zero_grad(set_to_none=True)
        lin(emb(torch.tensor([0, 2, 2, 5]))).square().sum().backward()

    backward()
    opt.step()
    backward()
    world = SimpleNamespace(emb=emb, lin=lin, opt=opt, others={})
    world.snapshot = lambda: {
        **torch_face_tensors(opt),
        **{k: v for name, o in world.others.items() for k, v in _prefixed(name, o).items()},
    }
    return world


def _prefixed(name: str, obj: Any) -> dict[str, Any]:
    from reliab_support import bits

    return {f"{name}.{k}": v for k, v in bits({"x": obj}).items()}


def tf1_world(**options: Any) -> SimpleNamespace:
    """tfadam.AdamOptimizer over a (4, 3), a (3,) and a (6, 2) variable (sparse grads)."""
    gen = torch.Generator().manual_seed(0)
    a, b, e = (torch.randn(s, generator=gen) for s in ((4, 3), (3,), (6, 2)))
    ga, gb = torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)
    ge = IndexedSlices(torch.randn(3, 2, generator=gen), torch.tensor([0, 2, 2]), (6, 2))
    step = torch.tensor(0)
    opt = tfadam.AdamOptimizer(0.1, **options)
    pairs = [(ga, a), (gb, b), (ge, e)]
    opt.apply_gradients(pairs, global_step=step)
    world = SimpleNamespace(opt=opt, pairs=pairs, a=a, b=b, e=e, step=step, others={}, extra={})

    def snapshot() -> dict[str, Any]:
        extra = {
            "a": a, "b": b, "e": e, "ga": ga, "gb": gb,
            "ge": (ge.values, ge.indices), "global_step": step, **world.extra,
        }  # fmt: skip
        found = tf1_face_tensors(opt, extra)
        for name, other in world.others.items():
            found.update({f"{name}.{k}": v for k, v in tf1_face_tensors(other, {}).items()})
        return found

    world.snapshot = snapshot
    world.apply = lambda bad: opt.apply_gradients(pairs + bad, global_step=step)
    return world


def keras_world(**options: Any) -> SimpleNamespace:
    """tfadam.keras.Adam over a (4, 3), a (3,) and a (6, 2) variable (sparse grads), built."""
    import tfadam.keras

    gen = torch.Generator().manual_seed(0)
    a, b, e = (torch.randn(s, generator=gen) for s in ((4, 3), (3,), (6, 2)))
    ga, gb = torch.randn(4, 3, generator=gen), torch.randn(3, generator=gen)
    ge = IndexedSlices(torch.randn(3, 2, generator=gen), torch.tensor([0, 2, 2]), (6, 2))
    opt = tfadam.keras.Adam(learning_rate=0.1, **options)
    opt.apply_gradients([(ga, a), (gb, b), (ge, e)])
    world = SimpleNamespace(opt=opt, a=a, b=b, e=e, extra={})

    def snapshot() -> dict[str, Any]:
        from reliab_support import bits

        state = {"a": a, "b": b, "e": e, "ga": ga, "gb": gb, "ge": (ge.values, ge.indices)}
        # Callables in extra are read at snapshot time (another optimizer's state).
        extra = {k: v() if callable(v) else v for k, v in world.extra.items()}
        state.update(extra, built=opt.built, variables=opt.variables)
        return {name: bits(value) for name, value in state.items()}

    world.snapshot = snapshot
    # The bad gradient goes to the last variable, after two good ones.
    world.apply = lambda bad_e: opt.apply_gradients([(ga, a), (gb, b), (bad_e, e)])
    return world


WORLDS = {"torch": torch_world, "tf1": tf1_world, "keras": keras_world}
CASES: list[Any] = []


def case(face: str, error: type[Exception], pattern: str, **options: Any) -> Callable:
    """Register ``setup(world) -> call``: ``call()`` must raise exactly ``error``."""

    def register(setup: Callable) -> Callable:
        name = setup.__name__.removeprefix(f"{face}_")
        CASES.append(pytest.param(face, setup, error, pattern, options, id=f"{face}-{name}"))
        return setup

    return register


# -- torch face: gradients -----------------------------------------------------------------------

G1W = r"param_groups\[1\]\['params'\]\[0\]"  # lin.weight


@case("torch", NonFiniteGradientError, rf"step\(\) #2: the gradient .* of {G1W} .*1 NaN.*\(1, 2\)",
      nonfinite="raise")  # fmt: skip
def torch_nan_gradient_raises(w):
    w.lin.weight.grad[1, 2] = nan
    return w.opt.step


@case("torch", NonFiniteGradientError, r"param_groups\[1\]\['params'\]\[1\] .*0 NaN, 1 Inf",
      nonfinite="raise")  # fmt: skip
def torch_inf_gradient_raises(w):
    w.lin.bias.grad[0] = -inf
    return w.opt.step


@case("torch", NonFiniteGradientError, r"sparse gradient .* of param_groups\[0\].*index \(5, 1\)",
      nonfinite="raise")  # fmt: skip
def torch_nan_sparse_gradient_raises(w):
    values = torch.ones(2, 3)
    values[1, 1] = nan
    w.emb.weight.grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 5]]), values, (6, 3), check_invariants=True
    )
    return w.opt.step


def _coo(indices: list[int], rows: int = 6) -> torch.Tensor:
    return torch.sparse_coo_tensor(
        torch.tensor([indices]), torch.ones(len(indices), 3), (rows, 3), check_invariants=False
    )


@case("torch", ValueError, r"param_groups\[0\].*index 6 is out of range .* 6 rows")
def torch_sparse_index_out_of_range(w):
    w.emb.weight.grad = _coo([1, 6])
    return w.opt.step


@case("torch", ValueError, r"param_groups\[0\].*index -1 is out of range")
def torch_sparse_index_negative(w):
    w.emb.weight.grad = _coo([-1, 2])
    return w.opt.step


@case("torch", ValueError, r"gradient of param_groups\[0\].*2 sparse dims.*to_dense")
def torch_sparse_two_sparse_dims(w):
    w.emb.weight.grad = torch.ones(6, 3).to_sparse(2)
    return w.opt.step


@case("torch", ValueError, r"param_groups\[1\]\['params'\]\[2\].*not a leaf")
def torch_non_leaf_parameter(w):
    leaf = torch.ones(2, requires_grad=True)
    non_leaf = leaf * 2
    non_leaf.retain_grad()
    non_leaf.sum().backward()
    w.opt.param_groups[1]["params"].append(non_leaf)
    w.others["non_leaf"] = non_leaf
    return w.opt.step


@case("torch", ValueError, r"param_groups\[1\]\['params'\]\[2\].*several elements in one memory")
def torch_expanded_parameter(w):
    shared = torch.zeros(1).expand(4)
    shared.grad = torch.ones(4)
    w.opt.param_groups[1]["params"].append(shared)
    w.others["shared"] = shared
    return w.opt.step


# -- torch face: hyperparameters -----------------------------------------------------------------


for _name, _key, _value, _pattern in [
    ("lr_negative", "lr", -0.1, r"param_groups\[1\] lr=-0\.1.*>= 0"),
    ("lr_nan", "lr", nan, r"param_groups\[1\] lr=nan"),
    ("lr_inf", "lr", inf, r"param_groups\[1\] lr=inf"),
    ("eps_negative", "eps", -1e-8, r"param_groups\[1\] epsilon=-9\.99.*e-09.*>= 0"),
    ("eps_nan", "eps", nan, r"param_groups\[1\] epsilon=nan"),
    ("beta1_one", "betas", (1.0, 0.999), r"param_groups\[1\] beta1=1\.0.*\[0, 1\)"),
    ("beta1_rounds_to_one", "betas", (0.99999999, 0.999), r"beta1=1\.0.*\[0, 1\)"),
    ("beta2_negative", "betas", (0.9, -0.5), r"param_groups\[1\] beta2=-0\.5"),
    ("beta2_above_one", "betas", (0.9, 1.5), r"param_groups\[1\] beta2=1\.5"),
    ("betas_not_a_pair", "betas", (0.9,), r"param_groups\[1\] betas must be a pair"),
    ("lr_tensor_not_scalar", "lr", torch.ones(2), r"param_groups\[1\] lr must be a scalar"),
    ("lr_on_meta_device", "lr", torch.tensor(0.1, device="meta"), r"lr is a .* on meta"),
]:

    def _setup(w, key=_key, value=_value):
        w.opt.param_groups[1][key] = value
        return w.opt.step

    _setup.__name__ = _name
    case("torch", TypeError if _name == "lr_on_meta_device" else ValueError, _pattern)(_setup)


@case("torch", ValueError, r"param_groups\[1\] lr: its callable .* raised ZeroDivisionError")
def torch_lr_callable_raises(w):
    w.opt.param_groups[1]["lr"] = lambda: 1 / 0
    return w.opt.step


@case("torch", ValueError, r"param_groups\[1\] epsilon must be a scalar .*shape \(3,\)")
def torch_eps_callable_returns_vector(w):
    w.opt.param_groups[1]["eps"] = lambda: torch.full((3,), 1e-8)
    return w.opt.step


@case("torch", TypeError, r"param_groups\[1\] beta1 must be a number.*str")
def torch_beta1_callable_returns_string(w):
    w.opt.param_groups[1]["betas"] = (lambda: "0.9", 0.999)
    return w.opt.step


# -- torch face: state edited in place -----------------------------------------------------------


@case("torch", ValueError, rf"{G1W} .*slot 'm' has shape \(3, 2\).*mismatched state_dict")
def torch_state_slot_wrong_shape(w):
    w.opt.state[w.lin.weight]["m"] = torch.zeros(3, 2)
    return w.opt.step


@case("torch", TypeError, rf"{G1W}: its optimizer slot 'v' is a list")
def torch_state_slot_not_a_tensor(w):
    w.opt.state[w.lin.weight]["v"] = [0.0] * 6
    return w.opt.step


@case(
    "torch", TypeError, r"param_groups\[1\] beta1 is torch.float32 but beta1_power is torch.float64"
)
def torch_accumulator_float64(w):
    # float64 is the accumulators' dtype for a NumPy float64 β, not for a Python float.
    w.opt.param_groups[1]["beta1_power"] = torch.tensor(0.81, dtype=torch.float64)
    return w.opt.step


@case("torch", ValueError, r"param_groups\[1\] beta1_power is a torch.int32 tensor")
def torch_accumulator_int32(w):
    w.opt.param_groups[1]["beta1_power"] = torch.tensor(0, dtype=torch.int32)
    return w.opt.step


@case("torch", ValueError, r"param_groups\[1\] beta2_power is on the meta device")
def torch_accumulator_meta(w):
    w.opt.param_groups[1]["beta2_power"] = torch.tensor(0.9, device="meta")
    return w.opt.step


@case("torch", ValueError, r"param_groups\[1\] beta1_power is nan")
def torch_accumulator_nan(w):
    w.opt.param_groups[1]["beta1_power"] = torch.tensor(nan)
    return w.opt.step


@case("torch", ValueError, r"param_groups\[1\] beta2_power is an inference tensor")
def torch_accumulator_inference(w):
    with torch.inference_mode():
        w.opt.param_groups[1]["beta2_power"] = torch.tensor(0.9)
    return w.opt.step


# -- torch face: load_state_dict -----------------------------------------------------------------


def _load(w, edit: Callable[[dict], Any]) -> Callable[[], None]:
    """Load a deep copy of the optimizer's own state_dict, after ``edit`` changed it in place."""
    state = copy.deepcopy(w.opt.state_dict())
    edit(state)
    return lambda: w.opt.load_state_dict(state)


@case("torch", StateDictError, rf"slot 'v' of {G1W} has shape \(2, 2\).*another model")
def torch_load_slot_wrong_shape(w):
    return _load(w, lambda s: s["state"][1].__setitem__("v", torch.zeros(2, 2)))


@case("torch", StateDictError, rf"state of {G1W} has \['m'\] but lacks \['v'\]")
def torch_load_slot_missing(w):
    return _load(w, lambda s: s["state"][1].pop("v"))


@case(
    "torch", StateDictError, r"unknown slots \['exp_avg', 'exp_avg_sq', 'step'\].*torch.optim.Adam"
)
def torch_load_torch_adam_slots(w):
    def edit(s):
        s["state"][1] = {"exp_avg": torch.zeros(2, 3), "exp_avg_sq": torch.zeros(2, 3),
                         "step": torch.tensor(1.0)}  # fmt: skip

    return _load(w, edit)


@case("torch", StateDictError, rf"slot 'm' of {G1W} is a str")
def torch_load_slot_not_a_tensor(w):
    return _load(w, lambda s: s["state"][1].__setitem__("m", "zeros"))


@case("torch", StateDictError, r"state of param_groups\[1\]\['params'\]\[1\] is a list")
def torch_load_state_entry_not_a_dict(w):
    return _load(w, lambda s: s["state"].__setitem__(2, [1, 2]))


@case("torch", StateDictError, r"param_groups\[1\]: beta1 is torch.float32 but beta1_power is")
def torch_load_accumulator_float64(w):
    return _load(
        w, lambda s: s["param_groups"][1].__setitem__("beta1_power", torch.tensor(0.81).double())
    )


@case(
    "torch",
    StateDictError,
    r"param_groups\[1\] beta1_power is a torch.float32 tensor of shape \(2,\)",
)
def torch_load_accumulator_not_scalar(w):
    two = torch.tensor([0.81, 0.9])
    return _load(w, lambda s: s["param_groups"][1].__setitem__("beta1_power", two))


@case("torch", StateDictError, rf"state of {G1W} has slots but its group has no beta1_power")
def torch_load_accumulators_missing(w):
    def edit(s):
        del s["param_groups"][1]["beta1_power"], s["param_groups"][1]["beta2_power"]

    return _load(w, edit)


@case("torch", StateDictError, r"param_groups\[1\] beta2_power is 1\.5, outside \[0, 1\)")
def torch_load_accumulator_out_of_range(w):
    return _load(w, lambda s: s["param_groups"][1].__setitem__("beta2_power", torch.tensor(1.5)))


@case("torch", StateDictError, r"\(2 group\(s\) of sizes \[1, 2\]; the state_dict has 1 group")
def torch_load_group_count(w):
    return _load(w, lambda s: s["param_groups"].pop())


@case("torch", StateDictError, r"sizes \[1, 2\]; the state_dict has 2 group\(s\) of sizes \[1, 3\]")
def torch_load_group_size(w):
    return _load(w, lambda s: s["param_groups"][1]["params"].append(3))


@case("torch", StateDictError, r"an entry for 7, which is not a parameter of this optimizer")
def torch_load_state_for_unknown_parameter(w):
    return _load(w, lambda s: s["state"].__setitem__(7, {"m": torch.zeros(1)}))


@case("torch", StateDictError, r"param_groups\[1\].*lr=nan makes the Adam update undefined")
def torch_load_lr_nan(w):
    return _load(w, lambda s: s["param_groups"][1].__setitem__("lr", nan))


@case("torch", StateDictError, r"param_groups\[0\]: sparse='sometimes'")
def torch_load_bad_option(w):
    return _load(w, lambda s: s["param_groups"][0].__setitem__("sparse", "sometimes"))


@case("torch", StateDictError, r"param_groups\[0\] lacks \['nesterov', 'sparse', 'numerics'\]")
def torch_load_other_optimizer(w):
    other = torch.optim.Adam([{"params": [w.emb.weight]}, {"params": list(w.lin.parameters())}])
    return lambda: w.opt.load_state_dict(other.state_dict())


@case("torch", StateDictError, r"the state_dict has no readable param_groups \(list\)")
def torch_load_not_a_mapping(w):
    state = [copy.deepcopy(w.opt.state_dict())]
    return lambda: w.opt.load_state_dict(state)


# -- TF1 face ------------------------------------------------------------------------------------

V3 = r"variable #3 \(shape \(4, 3\), torch.float32\)"


@case("tf1", ValueError, r"No variables provided")
def tf1_no_variables(w):
    return lambda: w.opt.apply_gradients([])


@case("tf1", ValueError, r"No gradients provided for any variable: variable #0 .*variable #2")
def tf1_all_gradients_none(w):
    return lambda: w.opt.apply_gradients([(None, v) for _, v in w.pairs], global_step=w.step)


@case("tf1", TypeError, r"variable #3 \(ndarray\) is a ndarray, not a torch tensor")
def tf1_variable_not_a_tensor(w):
    return lambda: w.apply([(torch.ones(3), torch.ones(3).numpy())])


@case("tf1", ValueError, r"variable #3 .* is not a leaf tensor.*nn.Parameter")
def tf1_variable_not_a_leaf(w):
    var = torch.ones(3, requires_grad=True) * 2
    w.extra["var"] = var
    return lambda: w.apply([(torch.ones(3), var)])


@case("tf1", TypeError, r"variable #3 .*torch.int64.* is not a floating variable")
def tf1_variable_integer(w):
    var = torch.zeros(3, dtype=torch.int64)
    w.extra["var"] = var
    return lambda: w.apply([(torch.ones(3, dtype=torch.int64), var)])


@case("tf1", ValueError, r"variable #3 .* several elements in one memory location.*clone")
def tf1_variable_expanded(w):
    var = torch.zeros(1).expand(4, 3)
    w.extra["var"] = var
    return lambda: w.apply([(torch.ones(4, 3), var)])


@case("tf1", ValueError, r"variable #3 .* is an inference tensor")
def tf1_variable_inference_tensor(w):
    with torch.inference_mode():
        var = torch.zeros(4, 3)
    w.extra["var"] = var
    return lambda: w.apply([(torch.ones(4, 3), var)])


@case("tf1", ValueError, r"variable #3 .* is a lazily negated view .*resolve_neg\(\)")
def tf1_variable_negated_view(w):
    var = torch._neg_view(torch.zeros(4, 3))
    w.extra["var"] = var
    return lambda: w.apply([(torch.ones(4, 3), var)])


@case("tf1", ValueError, r"variable #3 .* is an efficient zero tensor .*zeros_like")
def tf1_variable_efficient_zero_tensor(w):
    var = torch._efficientzerotensor(4, 3)  # (its data pointer is null: it was written)
    w.extra["var"] = var
    return lambda: w.apply([(torch.ones(4, 3), var)])


@case("tf1", ValueError, r"variable #3 .* is on the meta device: it has no values to update")
def tf1_variable_on_meta_device(w):
    return lambda: w.apply([(torch.ones(4, 3), torch.zeros(4, 3, device="meta"))])


def _tf1_var(w) -> torch.Tensor:
    var = torch.arange(12.0).reshape(4, 3)
    w.extra["var"] = var
    return var


@case("tf1", ValueError, rf"gradient of {V3} has shape \(3, 4\).*Shapes must be equal")
def tf1_gradient_wrong_shape(w):
    var = _tf1_var(w)
    return lambda: w.apply([(torch.ones(3, 4), var)])


@case("tf1", TypeError, rf"gradient of {V3} is torch.float64 .*\.to\(torch.float32\)")
def tf1_gradient_wrong_dtype(w):
    var = _tf1_var(w)
    return lambda: w.apply([(torch.ones(4, 3, dtype=torch.float64), var)])


@case("tf1", ValueError, rf"gradient of {V3} is on meta but the variable is on cpu.*\.to\('cpu'\)")
def tf1_gradient_on_meta_device(w):
    var = _tf1_var(w)
    return lambda: w.apply([(torch.ones(4, 3, device="meta"), var)])


@case("tf1", TypeError, rf"gradient of {V3} is a list; expected a tensor")
def tf1_gradient_not_a_tensor(w):
    var = _tf1_var(w)
    return lambda: w.apply([([[1.0] * 3] * 4, var)])


@case("tf1", TypeError, rf"gradient of {V3} has layout torch.sparse_csr")
def tf1_gradient_csr_layout(w):
    var = _tf1_var(w)
    return lambda: w.apply([(torch.ones(4, 3).to_sparse_csr(), var)])


def _slices(values: torch.Tensor, indices: Any, shape: Any = (4, 3)) -> IndexedSlices:
    return IndexedSlices(values, indices if isinstance(indices, torch.Tensor) else
                         torch.tensor(indices), shape)  # fmt: skip


@case("tf1", ValueError, rf"{V3}: sparse gradient index 4 is out of range .* 4 rows.*0\.\.3")
def tf1_sparse_index_out_of_range(w):
    var = _tf1_var(w)
    return lambda: w.apply([(_slices(torch.ones(2, 3), [0, 4]), var)])


@case("tf1", ValueError, rf"{V3}: sparse gradient index -2 is out of range")
def tf1_sparse_index_negative(w):
    var = _tf1_var(w)
    return lambda: w.apply([(_slices(torch.ones(2, 3), [-2, 1]), var)])


@case("tf1", TypeError, rf"sparse gradient of {V3}: indices are torch.float32.*integer")
def tf1_sparse_indices_float(w):
    var = _tf1_var(w)
    return lambda: w.apply([(_slices(torch.ones(2, 3), torch.tensor([0.0, 1.0])), var)])


@case("tf1", ValueError, rf"sparse gradient of {V3}: indices must be 1-D, got shape \(2, 1\)")
def tf1_sparse_indices_2d(w):
    var = _tf1_var(w)
    return lambda: w.apply([(_slices(torch.ones(2, 3), [[0], [1]]), var)])


@case("tf1", ValueError, rf"sparse gradient of {V3}: indices are on the meta device")
def tf1_sparse_indices_on_meta(w):
    indices = torch.tensor([0, 1], device="meta")
    var = _tf1_var(w)
    return lambda: w.apply([(_slices(torch.ones(2, 3), indices), var)])


@case("tf1", ValueError, rf"sparse gradient of {V3} has dense_shape \(5, 3\) but the variable")
def tf1_sparse_dense_shape_disagrees(w):
    var = _tf1_var(w)
    return lambda: w.apply([(_slices(torch.ones(2, 3), [0, 1], (5, 3)), var)])


@case("tf1", ValueError, rf"sparse gradient of {V3}: values have shape \(2, 2\), expected \(2, 3\)")
def tf1_sparse_values_wrong_shape(w):
    var = _tf1_var(w)
    return lambda: w.apply([(_slices(torch.ones(2, 2), [0, 1]), var)])


@case("tf1", TypeError, rf"sparse gradient values of {V3} is torch.float16")
def tf1_sparse_values_wrong_dtype(w):
    var = _tf1_var(w)
    return lambda: w.apply([(_slices(torch.ones(2, 3).half(), [0, 1]), var)])


@case("tf1", ValueError, r"variable #3 \(shape \(\), .* is 0-dim; a sparse \(row\) gradient")
def tf1_sparse_gradient_of_scalar(w):
    var = torch.tensor(1.0)
    w.extra["var"] = var
    return lambda: w.apply([(_slices(torch.ones(1), [0], ()), var)])


@case("tf1", NonFiniteGradientError,
      rf"apply_gradients #1 \(global_step 1\): the gradient .* of {V3} has 2 non-finite.*1 Inf",
      nonfinite="raise")  # fmt: skip
def tf1_nan_gradient_raises(w):
    grad = torch.ones(4, 3)
    grad[2, 0], grad[3, 1] = nan, inf
    var = _tf1_var(w)
    return lambda: w.apply([(grad, var)])


@case("tf1", NonFiniteGradientError, rf"sparse gradient .* of {V3} .*first at index \(3, 2\)",
      nonfinite="raise")  # fmt: skip
def tf1_inf_sparse_gradient_raises(w):
    values = torch.ones(2, 3)
    values[1, 2] = -inf
    var = _tf1_var(w)
    return lambda: w.apply([(_slices(values, [1, 3]), var)])


@case("tf1", TypeError, r"global_step must be an integer 0-dim tensor.*got tensor\(1\.\)")
def tf1_global_step_float(w):
    return lambda: w.opt.apply_gradients(w.pairs, global_step=torch.tensor(1.0))


@case("tf1", TypeError, r"global_step must be an integer 0-dim tensor")
def tf1_global_step_not_scalar(w):
    return lambda: w.opt.apply_gradients(w.pairs, global_step=torch.tensor([1]))


@case("tf1", ValueError, r"global_step is an inference tensor")
def tf1_global_step_inference_tensor(w):
    with torch.inference_mode():
        step = torch.tensor(5)
    w.extra["step"] = step
    return lambda: w.opt.apply_gradients(w.pairs, global_step=step)


@case("tf1", ValueError, r"variable #3 .* appears twice in grads_and_vars \(also as variable #0")
def tf1_same_variable_twice(w):
    return lambda: w.apply([(torch.ones(4, 3), w.a)])


@case("tf1", TypeError, r"grads_and_vars\[3\] must be a \(gradient, variable\) pair; got Tensor")
def tf1_not_a_pair(w):
    return lambda: w.apply([torch.ones(3)])


def _other(w, **hyper: Any) -> tfadam.AdamOptimizer:
    other = tfadam.AdamOptimizer(**hyper)
    w.others["other"] = other
    return other


for _name, _hyper, _error, _pattern in [
    ("beta2_one", {"beta2": 1.0}, ValueError, r"hyperparameter beta2=1\.0 .* in \[0, 1\)"),
    ("beta1_negative", {"beta1": -0.1}, ValueError, r"hyperparameter beta1=-0\.1"),
    ("lr_nan_tensor", {"learning_rate": torch.tensor(nan)}, ValueError, r"lr=nan"),
    ("epsilon_negative", {"epsilon": -1.0}, ValueError, r"epsilon=-1\.0 .* >= 0"),
    ("lr_string", {"learning_rate": "0.1"}, TypeError, r"lr must be a number.*str '0\.1'"),
    ("lr_bool", {"learning_rate": True}, TypeError, r"lr must be a number.*bool True"),
    ("lr_complex_tensor", {"learning_rate": torch.tensor(1j)}, TypeError, r"lr is a torch.complex"),
    ("epsilon_callable_vector", {"epsilon": lambda: torch.ones(2)}, ValueError,
     r"epsilon must be a scalar .*shape \(2,\)"),
    ("beta1_callable_raises", {"beta1": lambda: {}["beta1"]}, ValueError,
     r"beta1: its callable .* raised KeyError"),
]:  # fmt: skip

    def _setup(w, hyper=_hyper):
        other = _other(w, **hyper)
        return lambda: other.apply_gradients(w.pairs, global_step=w.step)

    _setup.__name__ = _name
    case("tf1", _error, _pattern)(_setup)


@case(
    "tf1",
    ValueError,
    r"variable #0 .*slot 'v' has shape \(3,\).*mismatched state_dict or checkpoint",
)
def tf1_restore_mismatched_slot(w):
    slots = {w.a: {"m": torch.zeros(4, 3), "v": torch.zeros(3)}}
    return lambda: w.opt.restore(0.5, 0.5, slots)


# -- Keras face ----------------------------------------------------------------------------------

KV = r"variable #2 \(shape \(6, 2\), torch.float32\)"


@case("keras", ValueError, rf"gradient of {KV} has shape \(2, 6\)")
def keras_gradient_wrong_shape(w):
    return lambda: w.apply(torch.ones(2, 6))


@case("keras", TypeError, rf"gradient of {KV} is torch.float64")
def keras_gradient_wrong_dtype(w):
    return lambda: w.apply(torch.ones(6, 2, dtype=torch.float64))


@case("keras", ValueError, rf"gradient of {KV} is on meta but the variable is on cpu")
def keras_gradient_on_meta_device(w):
    return lambda: w.apply(torch.ones(6, 2, device="meta"))


@case("keras", ValueError, rf"{KV}: sparse gradient index 6 is out of range .* 6 rows")
def keras_sparse_index_out_of_range(w):
    return lambda: w.apply(_slices(torch.ones(2, 2), [0, 6], (6, 2)))


@case("keras", ValueError, rf"{KV}: sparse gradient index -1 is out of range")
def keras_sparse_index_negative(w):
    return lambda: w.apply(_slices(torch.ones(2, 2), [-1, 0], (6, 2)))


@case("keras", TypeError, rf"sparse gradient of {KV}: indices are torch.float64")
def keras_sparse_indices_float(w):
    return lambda: w.apply(_slices(torch.ones(2, 2), torch.tensor([0.0, 1.0]).double(), (6, 2)))


@case("keras", ValueError, rf"sparse gradient of {KV} has dense_shape \(7, 2\)")
def keras_sparse_dense_shape_disagrees(w):
    return lambda: w.apply(_slices(torch.ones(2, 2), [0, 1], (7, 2)))


@case("keras", ValueError, r"No gradients provided for any variable")
def keras_all_gradients_none(w):
    return lambda: w.opt.apply_gradients([(None, w.a), (None, w.b), (None, w.e)])


@case("keras", ValueError, r"Unknown variable: variable #1 .*recreate a new optimizer")
def keras_unknown_variable(w):
    var = torch.zeros(2)
    w.extra["var"] = var
    return lambda: w.opt.apply_gradients([(torch.ones(3), w.b), (torch.ones(2), var)])


@case("keras", TypeError, r"variable #1 \(ndarray\) is not a torch tensor")
def keras_variable_not_a_tensor(w):
    return lambda: w.opt.apply_gradients(
        [(torch.ones(3), w.b), (torch.ones(3), torch.ones(3).numpy())]
    )


@case("keras", ValueError, r"Optimizer variable #2 has shape \(4, 3\) not compatible .* \(3, 4\)")
def keras_set_weights_wrong_shape(w):
    weights = [t.clone() for t in w.opt.variables]
    weights[2] = torch.zeros(3, 4)
    weights[1] = torch.tensor(0.5)  # would be written first if the check came late
    return lambda: w.opt.set_weights(weights)


@case("keras", ValueError, r"set_weights\(\) got 2 arrays for 8 optimizer variables")
def keras_set_weights_wrong_count(w):
    return lambda: w.opt.set_weights([torch.tensor(0), torch.tensor(0.5)])


@case("keras", TypeError, r"global_clipnorm needs every gradient in one dtype")
def keras_global_clipnorm_mixed_dtypes(w):
    import tfadam.keras

    other = tfadam.keras.Adam(global_clipnorm=1.0)
    wide = torch.zeros(3, dtype=torch.float64)
    w.extra.update(wide=wide, other=lambda: (other.built, other.variables))
    return lambda: other.apply_gradients([(torch.ones(4, 3), w.a), (torch.ones(3).double(), wide)])


# Typed hyperparameters (NumPy scalars, 0-dim arrays and tensors) are Keras'
# bits now; what Keras cannot use either, set after construction, is refused
# at the next apply call before anything moves.
for _name, _key, _value, _error, _pattern in [
    ("keras_beta_1_vector", "beta_1", lambda: torch.tensor([0.9, 0.8]).numpy(), ValueError,
     r"Argument `beta_1` must be a scalar \(0-dim\).*shape \(2,\)"),
    ("keras_epsilon_string", "epsilon", lambda: "1e-7", TypeError,
     r"Argument `epsilon` must be a real number.*str"),
    ("keras_weight_decay_integer_array", "weight_decay", lambda: torch.tensor(1).numpy(),
     TypeError, r"Argument `weight_decay` must be a floating value.*int64"),
    ("keras_beta_2_meta_tensor", "beta_2", lambda: torch.tensor(0.9, device="meta"), ValueError,
     r"Argument `beta_2` is a tensor on the meta device"),
    ("keras_beta_1_callable", "beta_1", lambda: (lambda: 0.9), ValueError,
     r"Argument `beta_1` must be a number.*callable"),
    # TF takes a tensor as it is: `g / scale` needs the gradient's dtype.
    ("keras_loss_scale_tensor_of_another_dtype", "loss_scale_factor",
     lambda: torch.tensor(2.0, dtype=torch.float64), TypeError,
     r"Argument `loss_scale_factor` is a torch.float64 tensor, but the gradient of variable #0"),
    # Keras' scale would be float64, which TF cannot add to float32.
    ("keras_global_clipnorm_numpy_wider", "global_clipnorm", lambda: torch.tensor(1.0).double().numpy(),
     TypeError, r"Argument `global_clipnorm` is torch.float64 and the gradients are torch.float32"),
]:  # fmt: skip

    def _setup(w, key=_key, make=_value):
        setattr(w.opt, key, make())
        good = torch.ones(6, 2)  # dense: Keras cannot unscale an IndexedSlices
        return lambda: w.apply(good)

    _setup.__name__ = _name
    case("keras", _error, _pattern)(_setup)


# -- issue 15: shared memory, strict options, meta devices, edited slots, accumulators -----------


@case("torch", ValueError, r"param_groups\[2\]\['params'\]\[0\] .* is on the meta device")
def torch_meta_parameter_in_a_later_group(w):
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    meta.grad = torch.ones(3, device="meta")
    w.opt.add_param_group({"params": [meta]})
    return w.opt.step


@case("torch", ValueError, r"param_groups\[2\]\['params'\]\[1\] shares memory with .*\[2\].*\[0\]")
def torch_overlapping_views_as_two_parameters(w):
    base = torch.zeros(6)
    first, second = base[:4], base[2:]
    first.grad, second.grad = torch.ones(4), torch.ones(4)
    w.opt.add_param_group({"params": [first, second]})
    w.others["base"] = base
    return w.opt.step


@case(
    "torch", ValueError, r"param_groups\[2\]\['params'\]\[0\] shares memory with param_groups\[0\]"
)
def torch_parameter_is_a_view_of_another_groups_parameter(w):
    view = w.emb.weight.detach()[0]
    view.grad = torch.ones(3)
    w.opt.add_param_group({"params": [view]})
    return w.opt.step


@case("torch", ValueError, rf"slot 'v' of {G1W} shares memory with .*slot 'm' of {G1W}")
def torch_slot_m_is_slot_v(w):
    state = w.opt.state[w.lin.weight]
    state["v"] = state["m"]
    return w.opt.step


@case("torch", ValueError, rf"slot 'm' of {G1W} shares memory with {G1W}")
def torch_slot_is_the_parameter(w):
    w.opt.state[w.lin.weight]["m"] = w.lin.weight.detach()
    return w.opt.step


@case("torch", ValueError, r"slot 'm' of param_groups\[1\]\['params'\]\[1\] shares memory with .*")
def torch_slot_shared_between_parameters(w):
    # lin.weight (2, 3) and a (3,)-shaped bias would not fit: share the bias's own slot row.
    w.opt.state[w.lin.bias]["m"] = w.opt.state[w.lin.weight]["m"][0, :2]
    return w.opt.step


@case("torch", ValueError, r"the beta1_power of param_groups\[1\].*'s group shares memory with "
      r"the beta1_power of param_groups\[0\]")  # fmt: skip
def torch_two_groups_share_one_beta1_power(w):
    w.opt.param_groups[1]["beta1_power"] = w.opt.param_groups[0]["beta1_power"]
    return w.opt.step


@case(
    "torch",
    ValueError,
    r"the beta2_power of param_groups\[1\].* shares memory with the beta1_power",
)
def torch_beta1_power_is_beta2_power(w):
    w.opt.param_groups[1]["beta2_power"] = w.opt.param_groups[1]["beta1_power"]
    return w.opt.step


@case("torch", ValueError, rf"{G1W}: its optimizer slot 'v' has several elements in one memory")
def torch_slot_expanded(w):
    w.opt.state[w.lin.weight]["v"] = torch.zeros(1, 3).expand(2, 3)
    return w.opt.step


@case("torch", ValueError, rf"{G1W}: its optimizer slot 'm' is an inference tensor")
def torch_slot_inference_tensor(w):
    with torch.inference_mode():
        w.opt.state[w.lin.weight]["m"] = torch.zeros(2, 3)
    return w.opt.step


@case("torch", ValueError, rf"{G1W}: its optimizer slot 'v' is a lazily negated view")
def torch_slot_negated_view(w):
    w.opt.state[w.lin.weight]["v"] = torch._neg_view(torch.zeros(2, 3))
    return w.opt.step


@case("torch", ValueError, rf"{G1W}: its optimizer slot 'm' is an efficient zero tensor")
def torch_slot_efficient_zero_tensor(w):
    w.opt.state[w.lin.weight]["m"] = torch._efficientzerotensor(2, 3)
    return w.opt.step


@case(
    "torch", ValueError, rf"{G1W} .*has the slots \['m'\] but lacks \['v'\]: the state was edited"
)
def torch_slot_v_deleted(w):
    del w.opt.state[w.lin.weight]["v"]
    return w.opt.step


@case("torch", ValueError, r"param_groups\[0\].*has the slots \['v'\] but lacks \['m'\]")
def torch_slot_m_deleted_sparse(w):
    del w.opt.state[w.emb.weight]["m"]
    return w.opt.step


@case("torch", ValueError, rf"{G1W} .*lacks \['vhat'\]")
def torch_amsgrad_switched_on_after_steps(w):
    w.opt.param_groups[1]["amsgrad"] = True
    return w.opt.step


@case("torch", TypeError, rf"{G1W}: its optimizer state is a list")
def torch_state_entry_not_a_dict(w):
    w.opt.state[w.lin.weight] = [1, 2]
    return w.opt.step


@case("torch", ValueError, rf"{G1W} .*slot 'm' has shape \(2, 3\), torch.float32, on meta")
def torch_slot_on_meta(w):
    w.opt.state[w.lin.weight]["m"] = torch.zeros(2, 3, device="meta")
    return w.opt.step


@case("torch", ValueError, rf"{G1W} .*slot 'v' has shape \(2, 3\), torch.float64")
def torch_slot_float64(w):
    w.opt.state[w.lin.weight]["v"] = torch.zeros(2, 3, dtype=torch.float64)
    return w.opt.step


@case("torch", ValueError, rf"the gradient of {G1W} shares memory with .*slot 'm' of {G1W}")
def torch_gradient_is_a_slot(w):
    w.lin.weight.grad = w.opt.state[w.lin.weight]["m"]
    return w.opt.step


@case("torch", ValueError, r"the gradient of param_groups\[1\]\['params'\]\[1\] shares memory")
def torch_gradient_is_the_parameter(w):
    w.lin.bias.grad = w.lin.bias.detach()
    return w.opt.step


for _name, _key, _value, _error, _pattern in [
    ("amsgrad_string", "amsgrad", "False", TypeError, r"amsgrad='False' is a str; pass True or"),
    ("amsgrad_int", "amsgrad", 1, TypeError, r"amsgrad=1 is a int; pass True or False"),
    ("nesterov_string", "nesterov", "no", TypeError, r"nesterov='no' is a str; pass True"),
    ("nesterov_none", "nesterov", None, TypeError, r"nesterov=None is a NoneType"),
    ("sparse_unknown", "sparse", "sometimes", ValueError, r"sparse='sometimes': choose"),
    ("sparse_not_a_string", "sparse", 0, ValueError, r"sparse=0: choose 'dense'"),
    ("numerics_unknown", "numerics", "exact", ValueError, r"numerics='exact': choose"),
    ("numerics_list", "numerics", ["eager"], ValueError, r"numerics=\['eager'\]: choose"),
]:

    def _setup(w, key=_key, value=_value):
        w.opt.param_groups[1][key] = value
        return w.opt.step

    _setup.__name__ = f"group_{_name}"
    case("torch", _error, r"param_groups\[1\] " + _pattern)(_setup)


for _name, _value, _pattern in [
    ("inf", torch.tensor(inf), r"beta1_power is inf, outside \[0, 1\)"),
    ("negative", torch.tensor(-0.5), r"beta1_power is -0\.5, outside"),
    ("one", torch.tensor(1.0), r"beta1_power is 1\.0, outside"),
    ("vector", torch.tensor([0.5, 0.5]), r"beta1_power is a torch.float32 tensor of shape \(2,\)"),
    ("int_tensor", torch.tensor(0), r"beta1_power is a torch.int64 tensor"),
    ("python_float", 0.5, r"beta1_power is a float, not a tensor"),
]:

    def _setup(w, value=_value):
        w.opt.param_groups[1]["beta1_power"] = value
        return w.opt.step

    _setup.__name__ = f"accumulator_{_name}"
    case("torch", ValueError, r"param_groups\[1\] " + _pattern)(_setup)


# -- torch face: the constructor (issue 14) ------------------------------------------------------

for _name, _kwargs, _error, _pattern in [
    ("lr_negative", {"lr": -1.0}, ValueError, r"lr=-1\.0 makes the Adam update undefined"),
    ("lr_nan", {"lr": nan}, ValueError, r"lr=nan makes"),
    ("lr_vector", {"lr": torch.ones(2)}, ValueError, r"lr must be a scalar"),
    ("lr_string", {"lr": "0.1"}, TypeError, r"lr must be a number.*str '0\.1'"),
    ("beta1_one", {"betas": (1.0, 0.999)}, ValueError, r"beta1=1\.0 .*\[0, 1\)"),
    ("beta2_negative", {"betas": (0.9, -0.1)}, ValueError, r"beta2=-0\.1"),
    ("betas_triple", {"betas": (0.9, 0.99, 0.999)}, ValueError, r"betas must be a pair"),
    ("eps_negative", {"eps": -1e-8}, ValueError, r"epsilon=-9\.99.*e-09 .* >= 0"),
    ("amsgrad_string", {"amsgrad": "False"}, TypeError, r"amsgrad='False' is a str"),
    ("nesterov_string", {"nesterov": "no"}, TypeError, r"nesterov='no' is a str"),
    ("sparse_unknown", {"sparse": "sometimes"}, ValueError, r"sparse='sometimes'"),
    ("nonfinite_unknown", {"nonfinite": "ignore"}, ValueError, r"nonfinite='ignore'"),
    ("foreach", {"foreach": True}, TypeError, r"no foreach=.*fused C kernels on CPU"),
    ("fused", {"fused": True}, TypeError, r"no fused=.*no implementation to choose"),
    ("capturable", {"capturable": True}, TypeError, r"no capturable=.*CUDA graph"),
    ("differentiable", {"differentiable": True}, TypeError, r"no differentiable=.*no_grad"),
    ("maximize", {"maximize": True}, TypeError, r"no maximize=.*Negate the loss"),
    ("weight_decay", {"weight_decay": 0.01}, TypeError,
     r"no weight_decay=.*tfadam\.keras\.Adam\(weight_decay=\.\.\.\)"),
    ("decoupled_weight_decay", {"decoupled_weight_decay": True}, TypeError,
     r"no decoupled_weight_decay=.*tfadam\.keras\.Adam"),
    ("unknown_keyword", {"momentum": 0.9}, TypeError, r"unexpected keyword argument 'momentum'"),
]:  # fmt: skip

    def _setup(w, kwargs=_kwargs):
        return lambda: tfadam.Adam(w.lin.parameters(), **kwargs)

    _setup.__name__ = f"constructor_{_name}"
    case("torch", _error, _pattern)(_setup)


@case("torch", ValueError, r"lr=-1\.0 makes the Adam update undefined")
def torch_add_param_group_lr_negative(w):
    extra = torch.nn.Parameter(torch.ones(2))
    w.others["extra"] = extra
    return lambda: w.opt.add_param_group({"params": [extra], "lr": -1.0})


@case("torch", TypeError, r"amsgrad='yes' is a str")
def torch_add_param_group_amsgrad_string(w):
    extra = torch.nn.Parameter(torch.ones(2))
    w.others["extra"] = extra
    return lambda: w.opt.add_param_group({"params": [extra], "amsgrad": "yes"})


# -- torch face: load_state_dict, issue 15 -------------------------------------------------------


@case("torch", StateDictError, r"param_groups\[1\]: nesterov='no' is a str")
def torch_load_nesterov_string(w):
    return _load(w, lambda s: s["param_groups"][1].__setitem__("nesterov", "no"))


@case("torch", StateDictError, r"param_groups\[0\]: amsgrad='False' is a str")
def torch_load_amsgrad_string(w):
    return _load(w, lambda s: s["param_groups"][0].__setitem__("amsgrad", "False"))


@case("torch", StateDictError, rf"slot 'v' of {G1W} shares memory with slot 'm' of {G1W}")
def torch_load_m_is_v(w):
    return _load(w, lambda s: s["state"][1].__setitem__("v", s["state"][1]["m"]))


@case(
    "torch", StateDictError, r"param_groups\[1\] beta1_power shares memory with param_groups\[0\]"
)
def torch_load_groups_share_beta1_power(w):
    def edit(s):
        s["param_groups"][1]["beta1_power"] = s["param_groups"][0]["beta1_power"]

    return _load(w, edit)


@case("torch", StateDictError, r"param_groups\[1\] beta2_power shares memory with .*beta1_power")
def torch_load_beta1_power_is_beta2_power(w):
    def edit(s):
        s["param_groups"][1]["beta2_power"] = s["param_groups"][1]["beta1_power"]

    return _load(w, edit)


@case("torch", StateDictError, rf"{G1W}: its optimizer slot 'm' has several elements in one")
def torch_load_slot_expanded(w):
    return _load(w, lambda s: s["state"][1].__setitem__("m", torch.zeros(1, 3).expand(2, 3)))


@case("torch", StateDictError, r"param_groups\[1\] beta1_power is nan, outside \[0, 1\)")
def torch_load_beta1_power_nan(w):
    return _load(w, lambda s: s["param_groups"][1].__setitem__("beta1_power", torch.tensor(nan)))


@case("torch", StateDictError, r"param_groups\[0\] beta2_power is -inf, outside \[0, 1\)")
def torch_load_beta2_power_minus_inf(w):
    return _load(w, lambda s: s["param_groups"][0].__setitem__("beta2_power", torch.tensor(-inf)))


@case("torch", StateDictError, r"param_groups\[1\] beta1_power is a float, not a tensor")
def torch_load_beta1_power_float(w):
    return _load(w, lambda s: s["param_groups"][1].__setitem__("beta1_power", 0.5))


@case("torch", StateDictError, r"param_groups\[1\]: amsgrad=True has no lazy sparse form")
def torch_load_amsgrad_lazy(w):
    def edit(s):
        s["param_groups"][1].update(amsgrad=True, sparse="lazy")

    return _load(w, edit)


@case("torch", StateDictError, r"state of param_groups\[0\].* lacks \['v'\]")
def torch_load_sparse_slot_missing(w):
    return _load(w, lambda s: s["state"][0].pop("v"))


# -- TF1 face, issue 15 --------------------------------------------------------------------------


@case("tf1", ValueError, r"variable #3 .* is on the meta device: it has no values")
def tf1_meta_variable_in_a_later_pair(w):
    return lambda: w.apply([(torch.ones(4, 3, device="meta"), torch.zeros(4, 3, device="meta"))])


@case("tf1", ValueError, r"variable #4 .* shares memory with variable #3")
def tf1_overlapping_views_as_two_variables(w):
    base = torch.zeros(6, 3)
    w.extra["base"] = base
    return lambda: w.apply([(torch.ones(4, 3), base[:4]), (torch.ones(4, 3), base[2:])])


@case("tf1", ValueError, r"variable #3 .* shares memory with variable #0")
def tf1_variable_is_a_view_of_another(w):
    return lambda: w.apply([(torch.ones(3, 3), w.a[1:])])


@case("tf1", ValueError, r"the gradient of variable #3 .* shares memory with variable #3")
def tf1_gradient_is_the_variable(w):
    var = _tf1_var(w)
    return lambda: w.apply([(var, var)])


@case("tf1", ValueError, r"the gradient of variable #0 .* shares memory with .*slot 'm'")
def tf1_gradient_is_a_slot(w):
    m = w.opt.get_slot(w.a, "m")
    return lambda: w.opt.apply_gradients([(m, w.a)], global_step=w.step)


@case("tf1", ValueError, rf"sparse gradient values of {V3} is on meta but the variable is on cpu")
def tf1_sparse_values_on_meta(w):
    var = _tf1_var(w)
    return lambda: w.apply([(_slices(torch.ones(2, 3, device="meta"), [0, 1]), var)])


@case("tf1", ValueError, rf"{V3}: sparse gradient index 9 is out of range")
def tf1_sparse_index_int32_out_of_range(w):
    var = _tf1_var(w)
    indices = torch.tensor([0, 9], dtype=torch.int32)
    return lambda: w.apply([(_slices(torch.ones(2, 3), indices), var)])


for _name, _b1, _b2, _error, _pattern in [
    ("above_one", 1.5, 2.0, ValueError, r"beta1_power is 1\.5, outside \[0, 1\)"),
    ("nan", nan, 0.5, ValueError, r"beta1_power is nan"),
    ("beta2_inf", 0.5, inf, ValueError, r"beta2_power is inf"),
    ("negative", -0.1, 0.5, ValueError, r"beta1_power is -0\.10"),
    ("nan_tensor", torch.tensor(nan), torch.tensor(0.5), ValueError, r"beta1_power is nan"),
    ("meta_tensor", torch.tensor(0.5, device="meta"), 0.5, ValueError,
     r"beta1_power is a tensor of shape \(\) on meta"),
    ("vector", torch.tensor([0.5, 0.5]), 0.5, ValueError, r"beta1_power is a tensor of shape \(2,\)"),
    ("string", "0.5", 0.5, TypeError, r"beta1_power is a str, not a number or tensor"),
    ("bool", True, 0.5, TypeError, r"beta1_power is a bool"),
]:  # fmt: skip

    def _setup(w, b1=_b1, b2=_b2):
        return lambda: w.opt.restore(b1, b2)

    _setup.__name__ = f"restore_{_name}"
    case("tf1", _error, _pattern)(_setup)


@case("tf1", ValueError, r"variable #0 .* has the slots \['m'\] but lacks \['v'\]")
def tf1_restore_slot_missing(w):
    return lambda: w.opt.restore(0.5, 0.5, {w.a: {"m": torch.zeros(4, 3)}})


@case("tf1", ValueError, r"variable #0 .*: slots \['m', 'v', 'vhat'\]; this optimizer keeps")
def tf1_restore_unknown_slot(w):
    slots = {w.a: {"m": torch.zeros(4, 3), "v": torch.zeros(4, 3), "vhat": torch.zeros(4, 3)}}
    return lambda: w.opt.restore(0.5, 0.5, slots)


@case("tf1", TypeError, r"variable #0 .*: its optimizer slot 'v' is a list")
def tf1_restore_slot_not_a_tensor(w):
    return lambda: w.opt.restore(0.5, 0.5, {w.a: {"m": torch.zeros(4, 3), "v": [0.0]}})


@case("tf1", ValueError, r"variable #0 .*slot 'm' has shape \(4, 3\), torch.float32, on meta")
def tf1_restore_slot_on_meta(w):
    slots = {w.a: {"m": torch.zeros(4, 3, device="meta"), "v": torch.zeros(4, 3)}}
    return lambda: w.opt.restore(0.5, 0.5, slots)


@case("tf1", ValueError, r"^variable #0 \(shape \(4, 3\), .* is on the meta device")
def tf1_restore_meta_variable(w):
    var = torch.zeros(4, 3, device="meta")
    slots = {var: {"m": torch.zeros(4, 3, device="meta"), "v": torch.zeros(4, 3, device="meta")}}
    return lambda: w.opt.restore(0.5, 0.5, slots)


@case("tf1", ValueError, r"variable #1 .* shares memory with variable #0")
def tf1_restore_overlapping_variables(w):
    base = torch.zeros(6, 3)
    w.extra["base"] = base
    slots = {v: {"m": torch.zeros(4, 3), "v": torch.zeros(4, 3)} for v in (base[:4], base[2:])}
    return lambda: w.opt.restore(0.5, 0.5, slots)


@case(
    "tf1", ValueError, r"variable #0 .* shares memory with a variable this optimizer already holds"
)
def tf1_restore_variable_overlapping_a_known_one(w):
    view = w.a[1:]
    slots = {view: {"m": torch.zeros(3, 3), "v": torch.zeros(3, 3)}}
    return lambda: w.opt.restore(0.5, 0.5, slots)


@case("tf1", ValueError, r"slots without beta-power accumulators")
def tf1_import_state_slots_without_accumulators(w):
    state = {"beta1_power": None, "beta2_power": None,
             "slots": {w.a: {"m": torch.zeros(4, 3), "v": torch.zeros(4, 3)}}}  # fmt: skip
    return lambda: w.opt.import_state(state)


@case("tf1", ValueError, r"beta2_power is nan")
def tf1_import_state_nan_accumulator(w):
    state = w.opt.export_state()
    state["beta2_power"] = torch.tensor(nan)
    return lambda: w.opt.import_state(state)


for _name, _kwargs, _error, _pattern in [
    ("amsgrad_string", {"amsgrad": "False"}, TypeError, r"amsgrad='False' is a str"),
    ("nesterov_string", {"nesterov": "no"}, TypeError, r"nesterov='no' is a str"),
    ("nesterov_int", {"nesterov": 0}, TypeError, r"nesterov=0 is a int"),
    ("sparse_unknown", {"sparse": "never"}, ValueError, r"sparse='never'"),
    ("numerics_unknown", {"numerics": "fast"}, ValueError, r"numerics='fast'"),
    ("nonfinite_unknown", {"nonfinite": "warn"}, ValueError, r"nonfinite='warn'"),
    ("lazy_amsgrad", {"amsgrad": True, "sparse": "lazy"}, ValueError, r"no lazy sparse form"),
    ("empty_name", {"name": ""}, ValueError, r"Must specify the optimizer name"),
]:

    def _setup(w, kwargs=_kwargs):
        return lambda: tfadam.AdamOptimizer(**kwargs)

    _setup.__name__ = f"constructor_{_name}"
    case("tf1", _error, _pattern)(_setup)


# -- Keras face, issue 15 (its apply_gradients validates through engine.prepare) -----------------


def _fresh_keras(w) -> Any:
    import tfadam.keras

    other = tfadam.keras.Adam()
    w.extra["other"] = lambda: (other.built, other.variables)
    return other


@case("keras", ValueError, r"variable #1 .* is on the meta device: it has no values")
def keras_meta_variable_in_a_later_pair(w):
    other = _fresh_keras(w)
    meta = torch.zeros(3, device="meta")
    return lambda: other.apply_gradients([(torch.ones(4, 3), w.a), (torch.ones(3, device="meta"),
                                                                    meta)])  # fmt: skip


@case("keras", ValueError, r"variable #1 .* is an efficient zero tensor .*zeros_like")
def keras_efficient_zero_tensor_variable_in_a_later_pair(w):
    other = _fresh_keras(w)
    zero = torch._efficientzerotensor(3)
    w.extra["zero"] = zero
    return lambda: other.apply_gradients([(torch.ones(4, 3), w.a), (torch.ones(3), zero)])


@case("keras", ValueError, r"variable #1 .* is a lazily negated view .*resolve_neg\(\)")
def keras_negated_view_variable_in_a_later_pair(w):
    other = _fresh_keras(w)
    negated = torch._neg_view(torch.zeros(3))  # its values are its memory negated
    w.extra["negated"] = negated
    return lambda: other.apply_gradients([(torch.ones(4, 3), w.a), (torch.ones(3), negated)])


@case("keras", ValueError, r"variable #1 .* shares memory with variable #0")
def keras_overlapping_views_as_two_variables(w):
    other = _fresh_keras(w)
    base = torch.zeros(6, 2)
    w.extra["base"] = base
    return lambda: other.apply_gradients(
        [(torch.ones(4, 2), base[:4]), (torch.ones(4, 2), base[2:])]
    )


@case("keras", ValueError, r"variable #1 .* shares memory with variable #0")
def keras_variable_is_a_view_of_another(w):
    other = _fresh_keras(w)
    return lambda: other.apply_gradients([(torch.ones(4, 3), w.a), (torch.ones(3), w.a[1])])


@case("keras", ValueError, rf"the gradient of {KV} shares memory with {KV}")
def keras_gradient_is_the_variable(w):
    return lambda: w.apply(w.e)


@case("keras", ValueError, rf"the gradient of {KV} shares memory with optimizer slot")
def keras_gradient_is_a_slot(w):
    momentum = [t for t in w.opt.variables if t.shape == (6, 2)][0]
    return lambda: w.apply(momentum)


@case("keras", TypeError, rf"gradient of {KV} has layout torch.sparse_csr")
def keras_gradient_csr(w):
    return lambda: w.apply(torch.ones(6, 2).to_sparse_csr())


@case("keras", TypeError, rf"gradient of {KV} is a list")
def keras_gradient_not_a_tensor(w):
    return lambda: w.apply([[1.0, 1.0]] * 6)


@case("keras", ValueError, rf"sparse gradient of {KV}: values have shape \(2, 3\)")
def keras_sparse_values_wrong_shape(w):
    return lambda: w.apply(_slices(torch.ones(2, 3), [0, 1], (6, 2)))


@case("keras", ValueError, rf"sparse gradient of {KV}: indices must be 1-D")
def keras_sparse_indices_2d(w):
    return lambda: w.apply(_slices(torch.ones(2, 2), [[0], [1]], (6, 2)))


@case("keras", TypeError, rf"sparse gradient values of {KV} is torch.float16")
def keras_sparse_values_wrong_dtype(w):
    return lambda: w.apply(_slices(torch.ones(2, 2).half(), [0, 1], (6, 2)))


@case("keras", ValueError, rf"gradient of {KV}: .*2 sparse dims")
def keras_coo_two_sparse_dims(w):
    return lambda: w.apply(torch.ones(6, 2).to_sparse(2))


@case("keras", ValueError, rf"{KV}: sparse gradient index 6 is out of range")
def keras_coo_index_out_of_range(w):
    coo = torch.sparse_coo_tensor(torch.tensor([[0, 6]]), torch.ones(2, 2), (7, 2))
    return lambda: w.apply(torch.sparse_coo_tensor(coo._indices(), coo._values(), (6, 2),
                                                   check_invariants=False))  # fmt: skip


@case("keras", ValueError, r"variable #1 .* is on the meta device")
def keras_meta_variable_with_real_gradient(w):
    other = _fresh_keras(w)
    meta = torch.zeros(3, device="meta")
    return lambda: other.apply_gradients([(torch.ones(4, 3), w.a), (torch.ones(3), meta)])


# -- load_checkpoint: all or nothing for the model and the optimizer -----------------------------


def ckpt_world(kind: str = "torch") -> SimpleNamespace:
    """A two-layer model and its optimizer (tfadam.Adam or AdamOptimizer), one step taken."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    if kind == "torch":
        opt: Any = tfadam.Adam(model.parameters(), lr=0.1)
        model(torch.ones(2, 3)).square().sum().backward()
        opt.step()
    else:
        opt = tfadam.AdamOptimizer(0.1)
        opt.minimize(
            lambda: model(torch.ones(2, 3)).square().sum(), var_list=list(model.parameters())
        )
    directory = tempfile.mkdtemp()
    world = SimpleNamespace(model=model, opt=opt, kind=kind, path=os.path.join(directory, "c.ckpt"))

    def snapshot() -> dict[str, Any]:
        from reliab_support import bits

        found = {f"model.{k}": bits(v) for k, v in model.state_dict().items()}
        if kind == "torch":
            found.update(torch_face_tensors(opt))
        else:
            state = opt.export_state()
            found["accumulators"] = bits([state["beta1_power"], state["beta2_power"]])
            found["slots"] = bits([(bits(var), slots) for var, slots in state["slots"].items()])
        return found

    world.snapshot = snapshot
    return world


class _Saved:
    """Stands for a model or optimizer whose state_dict() is the given (crafted) state."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state


def _checkpoint(w, edit_model: Callable[[dict], Any] = lambda s: None,
                edit_optimizer: Callable[[dict], Any] = lambda s: None) -> Callable[[], Any]:  # fmt: skip
    """Save the world's own state, edited, then return the call that loads it back."""
    model_state = copy.deepcopy(w.model.state_dict())
    if w.kind == "torch":
        optimizer_state = copy.deepcopy(w.opt.state_dict())
    else:
        tfadam.save_checkpoint(w.path, model=w.model, optimizer=w.opt)
        optimizer_state = tfadam.read_checkpoint(w.path)["optimizer"]
    edit_model(model_state)
    edit_optimizer(optimizer_state)
    tfadam.save_checkpoint(w.path, model=_Saved(model_state), optimizer=_Saved(optimizer_state))
    return lambda: tfadam.load_checkpoint(w.path, model=w.model, optimizer=w.opt)


def _meta(state: dict, key: str) -> None:
    state[key] = torch.empty(state[key].shape, device="meta")


for _kind in ("torch", "tf1"):
    _rows = [
        ("model_entry_on_meta", lambda w: _checkpoint(w, lambda s: _meta(s, "1.bias")),
         r"model entry '1.bias' is on the meta device in the checkpoint"),
        ("model_first_entry_on_meta", lambda w: _checkpoint(w, lambda s: _meta(s, "0.weight")),
         r"model entry '0.weight' is on the meta device"),
        ("model_entry_wrong_shape",
         lambda w: _checkpoint(w, lambda s: s.__setitem__("1.bias", torch.zeros(3))),
         r"model entry '1.bias' has shape \(3,\) in the checkpoint but \(2,\)"),
        ("model_entry_missing", lambda w: _checkpoint(w, lambda s: s.pop("1.bias")),
         r"missing keys \['1.bias'\]"),
        ("model_entry_complex",
         lambda w: _checkpoint(w, lambda s: s.__setitem__("1.bias", torch.zeros(2) + 1j)),
         r"model entry '1.bias' is torch.complex64 .*imaginary part"),
        ("model_entry_sparse",
         lambda w: _checkpoint(w, lambda s: s.__setitem__("1.bias", torch.ones(2).to_sparse())),
         r"model entry '1.bias' has layout torch.sparse_coo"),
    ]  # fmt: skip
    for _name, _setup, _pattern in _rows:
        _setup.__name__ = f"{_kind}_{_name}"
        case(f"ckpt-{_kind}", StateDictError, _pattern)(_setup)


def _torch_group(index: int, **changes: Any) -> Callable[[dict], None]:
    return lambda s: s["param_groups"][index].update(changes)


for _name, _edit, _pattern in [
    ("nesterov_string", _torch_group(0, nesterov="no"), r"nesterov='no' is a str"),
    ("amsgrad_string", _torch_group(0, amsgrad="False"), r"amsgrad='False' is a str"),
    ("beta1_power_nan", _torch_group(0, beta1_power=torch.tensor(nan)), r"beta1_power is nan"),
    ("beta2_power_above_one", _torch_group(0, beta2_power=torch.tensor(1.5)),
     r"beta2_power is 1\.5"),
    ("m_is_v", lambda s: s["state"][0].__setitem__("v", s["state"][0]["m"]),
     r"slot 'v' of .* shares memory with slot 'm'"),
    ("slot_missing", lambda s: s["state"][3].pop("m"), r"lacks \['m'\]"),
    ("slot_wrong_shape", lambda s: s["state"][3].__setitem__("v", torch.zeros(5)),
     r"slot 'v' of .* has shape \(5,\)"),
]:  # fmt: skip

    def _setup(w, edit=_edit):
        return _checkpoint(w, edit_optimizer=edit)

    _setup.__name__ = f"torch_optimizer_{_name}"
    case("ckpt-torch", StateDictError, _pattern)(_setup)


def _tf1_slots(name: str, slot: str, value: Callable[[torch.Tensor], Any]) -> Callable:
    return lambda s: s["slots"][name].__setitem__(slot, value(s["slots"][name][slot]))


for _name, _edit, _pattern in [
    ("beta1_power_nan", lambda s: s.__setitem__("beta1_power", torch.tensor(nan)),
     r"beta1_power is nan"),
    ("beta2_power_above_one", lambda s: s.__setitem__("beta2_power", torch.tensor(2.0)),
     r"beta2_power is 2\.0"),
    ("beta1_power_vector", lambda s: s.__setitem__("beta1_power", torch.ones(3) / 2),
     r"beta1_power is a tensor of shape \(3,\)"),
    ("slot_missing", lambda s: s["slots"]["0.bias"].pop("v"), r"lacks \['v'\]"),
    ("slot_wrong_shape", _tf1_slots("0.bias", "m", lambda t: torch.zeros(5)),
     r"slot 'm' of '0.bias' does not match the parameter's shape \(4,\)"),
    ("slot_on_meta", _tf1_slots("0.bias", "m", lambda t: torch.empty(4, device="meta")),
     r"slot 'm' of '0.bias' is on the meta device"),
    ("slot_not_a_tensor", _tf1_slots("0.bias", "m", lambda t: "zeros"),
     r"slot 'm' of '0.bias' does not match"),
    ("slots_for_unknown_parameter", lambda s: s["slots"].__setitem__("2.weight", {}),
     r"optimizer slots for '2.weight', not a parameter of the model"),
    ("unknown_slot", lambda s: s["slots"]["0.bias"].__setitem__("vhat", torch.zeros(4)),
     r"slots \['m', 'v', 'vhat'\]; this optimizer keeps \['m', 'v'\]"),
    ("not_from_adam_optimizer", lambda s: s.__setitem__("kind", "other"),
     r"not saved from a tfadam.AdamOptimizer"),
]:  # fmt: skip

    def _setup(w, edit=_edit):
        return _checkpoint(w, edit_optimizer=edit)

    _setup.__name__ = f"tf1_optimizer_{_name}"
    case("ckpt-tf1", StateDictError, _pattern)(_setup)


WORLDS["ckpt-torch"] = lambda **options: ckpt_world("torch", **options)
WORLDS["ckpt-tf1"] = lambda **options: ckpt_world("tf1", **options)


# -- the test ------------------------------------------------------------------------------------


@pytest.mark.parametrize("face, setup, error, pattern, options", CASES)
def test_bad_input_raises_and_changes_nothing(face, setup, error, pattern, options):
    world = WORLDS[face](**options)
    call = setup(world)
    before = world.snapshot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's sparse-invariant notice
        with pytest.raises(error, match=pattern) as raised:
            call()
    assert type(raised.value) is error, f"{type(raised.value).__name__}: {raised.value}"
    assert differences(before, world.snapshot()) == []


def test_matrix_is_large_enough():
    faces = [p.values[0] for p in CASES]
    assert len(CASES) >= 150 and all(faces.count(face) >= 10 for face in WORLDS)


def test_snapshot_sees_a_change():
    """The comparison is able to fail: one flipped sign bit of one slot is seen."""
    world = torch_world()
    before = world.snapshot()
    world.opt.state[world.lin.bias]["v"][0] *= -1.0  # v is 0 or positive: the sign bit flips
    assert differences(before, world.snapshot()) == ["group1.param1.v"]


@pytest.mark.parametrize("face", ["torch", "tf1", "keras"])
def test_a_good_call_still_works_after_a_bad_one(face):
    """A refused call leaves the optimizer usable: the next good call matches a clean twin."""
    bad, clean = WORLDS[face](), WORLDS[face]()
    if face == "torch":
        bad.lin.weight.grad = bad.lin.weight.grad.clone()
        saved, bad.opt.param_groups[1]["lr"] = bad.opt.param_groups[1]["lr"], nan
        with pytest.raises(ValueError):
            bad.opt.step()
        bad.opt.param_groups[1]["lr"] = saved
        bad.opt.step()
        clean.opt.step()
    elif face == "tf1":
        with pytest.raises(ValueError):
            bad.apply([(torch.ones(2), torch.zeros(3))])
        assert bad.opt.apply_gradients(bad.pairs, global_step=bad.step) == 1
        clean.opt.apply_gradients(clean.pairs, global_step=clean.step)
    else:
        with pytest.raises(ValueError):
            bad.apply(torch.ones(2))
        for world in (bad, clean):
            world.apply(torch.ones(6, 2))
    assert differences(clean.snapshot(), bad.snapshot()) == []
