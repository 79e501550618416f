"""jstep's optimizers in Flax NNX's training loops.

``nnx.Optimizer`` calls ``init`` on params wrapped in ``nnx.Param`` but ``update`` on pure
trees, and writes the new state back into its own Variables leaf by leaf; a functional NNX
loop (``nnx.split``, ``jax.grad``) calls both on wrapped trees. Both must take the steps that
the same optimizer takes on the pure params in a plain functional loop, for quantized state
(8 and 4 bits) and for `jstep.grouped`, eagerly and jitted, over several steps (a quantized
state used to fail at the second update of nnx.Optimizer, grouped at the first).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jstep
import jstep.optax

import harness

STEPS = 3
RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(8, 64)), jnp.float32)
Y = jnp.asarray(RNG.normal(size=(8, 128)), jnp.float32)
EIGHT, FOUR = jstep.blockwise(8), jstep.blockwise(4)

# The kernel (64 x 128 = 8192 elements) is at least the formats' min_size (4096) and is
# quantized; the bias (128) is not: each state below mixes both kinds of leaves.
OPTIMIZERS = {
    "adam": lambda: jstep.adam(1e-2),
    "adam 8-bit": lambda: jstep.adam(1e-2, mu_dtype=EIGHT, nu_dtype=EIGHT),
    "adam 4-bit": lambda: jstep.adam(1e-2, mu_dtype=FOUR, nu_dtype=FOUR),
    "momentum 8-bit": lambda: jstep.momentum(1e-2, accumulator_dtype=EIGHT),
    "rmsprop 8-bit": lambda: jstep.rmsprop(1e-2, accumulator_dtype=EIGHT),
    "grouped adam": lambda: jstep.grouped(jstep.adam(1e-2)),
    "grouped adam 8-bit": lambda: jstep.grouped(jstep.adam(1e-2, mu_dtype=EIGHT, nu_dtype=EIGHT)),
    "grouped adamw, masked": lambda: jstep.grouped(
        jstep.adamw(1e-2, weight_decay=0.1, mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params))
    ),
    "chain(clip, adamw 8-bit)": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), jstep.adamw(1e-2, weight_decay=0.1, mu_dtype=EIGHT, nu_dtype=EIGHT)
    ),
    "jstep.optax.adam 8-bit": lambda: jstep.optax.adam(1e-2, mu_dtype=EIGHT),
}


def new_model():
    return nnx.Linear(64, 128, rngs=nnx.Rngs(0))


def loss(model):
    return ((model(X) - Y) ** 2).mean()


def pure_loss(params, graphdef):
    return loss(nnx.merge(graphdef, params))


def plain_run(tx, jit):
    """The reference: `tx` on the pure params (no Variables), a plain functional loop."""
    graphdef, params = nnx.split(new_model(), nnx.Param)
    params = nnx.as_pure(params)
    state = tx.init(params)

    def step(params, state):
        grads = jax.grad(pure_loss)(params, graphdef)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step) if jit else step
    for _ in range(STEPS):
        params, state = step(params, state)
    return params


def as_arrays(params):
    return {name: np.asarray(value) for name, value in nnx.to_pure_dict(nnx.as_pure(params)).items()}


def assert_params_equal(got, want):
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx.jit"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_nnx_optimizer_takes_the_steps_of_the_plain_loop(name, jit):
    model = new_model()
    optimizer = nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)
    structure = jax.tree.structure(nnx.state(optimizer))

    def step(model, optimizer):
        optimizer.update(model, nnx.grad(loss)(model))

    step = nnx.jit(step) if jit else step
    for _ in range(STEPS):
        step(model, optimizer)
    # nnx.update wrote each state leaf back where it was: the quantized leaves are still
    # QuantizedArrays of their layouts (a layout lost is a structure changed).
    assert jax.tree.structure(nnx.state(optimizer)) == structure
    assert int(optimizer.step[...]) == STEPS
    want = as_arrays(plain_run(OPTIMIZERS[name](), jit))
    got = as_arrays(nnx.state(model, nnx.Param))
    assert not np.array_equal(got["kernel"], np.asarray(new_model().kernel[...])), "the steps moved the kernel"
    assert_params_equal(got, want)


@pytest.mark.parametrize(
    "name",
    ["adam", "adam 8-bit", "momentum 8-bit", "grouped adam 8-bit", "grouped adamw, masked", "jstep.optax.adam 8-bit"],
)
def test_a_functional_nnx_loop_on_wrapped_params_takes_the_same_steps(name):
    """``nnx.split`` params and ``jax.grad`` gradients keep their ``nnx.Param`` wrappers; so do
    the updates, and the state keeps the structure init gave it (a ``lax.scan`` carry)."""
    tx = OPTIMIZERS[name]()
    graphdef, params = nnx.split(new_model(), nnx.Param)
    state = tx.init(params)
    structure = jax.tree.structure(state)

    @jax.jit
    def step(params, state):
        grads = jax.grad(pure_loss)(params, graphdef)
        updates, state = tx.update(grads, state, params)
        assert jax.tree.structure(updates) == jax.tree.structure(params)
        return optax.apply_updates(params, updates), state

    for _ in range(STEPS):
        params, state = step(params, state)
    assert isinstance(params["kernel"], nnx.Param)
    assert jax.tree.structure(state) == structure
    assert_params_equal(as_arrays(params), as_arrays(plain_run(OPTIMIZERS[name](), jit=True)))


def test_wrapped_params_give_optax_state_for_float_leaves_and_bare_quantized_ones():
    """Float32 state keeps Optax's tree (each leaf in its param's Variable, as
    ``jax.tree.map`` over the params gives it); a quantized leaf is a bare QuantizedArray,
    which nnx.Optimizer keeps as its two arrays."""
    _, params = nnx.split(new_model(), nnx.Param)
    assert jax.tree.structure(jstep.optax.adam(1e-2).init(params)) == jax.tree.structure(optax.adam(1e-2).init(params))
    mu = jstep.adam(1e-2, mu_dtype=EIGHT).init(params).mu
    assert isinstance(mu["bias"], nnx.Param)
    assert isinstance(mu["kernel"], jstep.QuantizedArray)
    optimizer = nnx.Optimizer(new_model(), jstep.adam(1e-2, mu_dtype=EIGHT), wrt=nnx.Param)
    kernel_state = optimizer.opt_state.mu["kernel"]
    assert isinstance(kernel_state, jstep.QuantizedArray)
    assert all(isinstance(part, nnx.OptArray) for part in (kernel_state.codes, kernel_state.scale))


def flax_round_trip(saved, target, tmp_path):
    """flax.serialization keeps no NNX State: through pure dicts, as the NNX docs do it."""
    pure = harness.flax_round_trip(nnx.to_pure_dict(saved), nnx.to_pure_dict(target), tmp_path)
    nnx.replace_by_pure_dict(target, pure)
    return target


@pytest.mark.parametrize("round_trip", [flax_round_trip, harness.orbax_round_trip], ids=["flax", "orbax"])
def test_nnx_optimizer_quantized_state_resumes_from_a_checkpoint(round_trip, tmp_path):
    """nnx.state of the model and optimizer saved after a step and restored into a fresh pair
    (NNX's checkpointing recipe): the next steps are those of the run not interrupted."""

    def pair():
        model = new_model()
        return model, nnx.Optimizer(model, OPTIMIZERS["adam 8-bit"](), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        optimizer.update(model, nnx.grad(loss)(model))

    model, optimizer = pair()
    step(model, optimizer)
    model_again, optimizer_again = pair()
    restored = round_trip(nnx.state((model, optimizer)), nnx.state((model_again, optimizer_again)), tmp_path)
    nnx.update((model_again, optimizer_again), restored)
    assert isinstance(optimizer_again.opt_state.mu["kernel"], jstep.QuantizedArray)
    for _ in range(2):
        step(model, optimizer)
        step(model_again, optimizer_again)
    assert_params_equal(as_arrays(nnx.state(model_again, nnx.Param)), as_arrays(nnx.state(model, nnx.Param)))
