"""grouped(): the same updates as the transformation it wraps, with far fewer state arrays.

What these tests prove:

- every jstep optimizer gives the updates it gives unwrapped (to float32 round-off, see
  RTOL), whether every leaf, some leaves or (the default on the harness tree) all leaves
  are packed;
- the packed state is one flat buffer per dtype (bf16 stays bf16), sized by that dtype's
  leaves, with scalar, zero-size and None leaves handled, and it costs no extra bytes;
- it composes with Optax's wrappers (chain, MultiSteps, inject_hyperparams, masked), with a
  donated jitted step and with vmap;
- it is an optax.GradientTransformationExtraArgs: extra keyword arguments of update reach
  the inner transformation (one that requires them, inside a chain, or a plain
  GradientTransformation that ignores them);
- init of jax.ShapeDtypeStruct params builds the state jax.eval_shape(init, params) describes,
  with the values init of concrete params gives (shardings: tests/test_sharding.py);
- bad max_leaf_size values and integer leaves are refused with messages that name them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstep

from harness import (
    OPTIMIZER_NAMES,
    STEPS,
    assert_close_runs,
    gradient_sequence,
    leaves64,
    optimizers,
    params_like,
    run,
    stack,
    tree_of,
)

DEFAULT = object()  # marks "leave max_leaf_size at its default"
MAX_LEAF_SIZES = [
    pytest.param(DEFAULT, id="default"),  # every leaf of the harness tree is grouped
    pytest.param(4, id="max4"),  # dense.b and the scalar grouped; dense.w and conv stay large
    pytest.param(None, id="all"),
]


def grouped_with(transformation, max_leaf_size):
    if max_leaf_size is DEFAULT:
        return jstep.grouped(transformation)
    return jstep.grouped(transformation, max_leaf_size=max_leaf_size)


# Not bitwise: XLA:CPU's rounding of an element depends on the length of the array that
# holds it and on the fusion (e.g. whether g*eta + gamma*v becomes an FMA). Plain jstep.adam
# already gives different bits for the same gradients stored as a (1,) or a (4,) array, jitted
# or not, and grouping changes exactly those lengths. Measured: at most 4e-7 (normwise per
# leaf) over 50 float32 steps, while a misplaced offset or a mixed-up leaf is off by O(1).
# A bf16 update may differ by one bf16 rounding (2^-8 relative).
RTOL = {"float32": 1e-6, "bfloat16": 2.0**-7}


def assert_close_trees(actual, expected):
    """Same tree structure, shapes and dtypes, and values equal up to RTOL."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert (a.shape, a.dtype) == (e.shape, e.dtype)
        if a.size:
            assert_close_runs([leaves64(a)], [leaves64(e)], RTOL[a.dtype.name])


def state_bytes(state):
    return sum(leaf.nbytes for leaf in jax.tree.leaves(state))


# ------------------------------------------------------------------------ same updates


@pytest.mark.parametrize("max_leaf_size", MAX_LEAF_SIZES)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_same_updates_as_unwrapped(name, max_leaf_size):
    grads = gradient_sequence(1, STEPS, np.float32)
    got, _ = run(grouped_with(optimizers()[name], max_leaf_size), grads, np.float32)
    expected, _ = run(optimizers()[name], grads, np.float32)
    assert_close_runs(got, expected, RTOL["float32"])


def test_large_leaves_keep_their_own_arrays():
    params = tree_of(lambda i, shape: jnp.ones(shape, jnp.float32))
    # dense.b has exactly 3 elements: at the limit, so it is grouped (with the scalar).
    mu = jstep.grouped(jstep.adam(1e-2), max_leaf_size=3).init(params).mu
    leaves = jax.tree.leaves(params)
    assert [m.shape for m in mu["large"]] == [p.shape for p in leaves if p.size > 3]
    assert mu["groups"]["float32"].shape == (sum(p.size for p in leaves if p.size <= 3),)


# ------------------------------------------------------------- mixed dtypes and layout

# float32 and bfloat16 leaves, a scalar, a zero-size leaf and a None: (shape, dtype) or None.
MIXED = {
    "w": ((4, 3), jnp.float32),
    "b": ((3,), jnp.bfloat16),
    "scale": ((), jnp.float32),
    "empty": ((0,), jnp.float32),
    "h": ((2, 2), jnp.bfloat16),
    "none": None,
}


def mixed_tree(make):
    return {key: None if spec is None else make(*spec) for key, spec in MIXED.items()}


def test_mixed_dtypes_one_buffer_per_dtype_and_same_updates():
    rng = np.random.default_rng(2)
    params = mixed_tree(jnp.ones)
    grads = [mixed_tree(lambda shape, dtype: jnp.asarray(rng.normal(size=shape), dtype)) for _ in range(5)]
    opt, plain = jstep.grouped(jstep.adam(1e-2)), jstep.adam(1e-2)
    state, plain_state = opt.init(params), plain.init(params)

    for moment in (state.mu, state.nu):
        assert moment["large"] == ()
        assert sorted(moment["groups"]) == ["bfloat16", "float32"]
        for dtype_name, buffer in moment["groups"].items():
            leaves = [p for p in jax.tree.leaves(params) if p.dtype.name == dtype_name]
            assert buffer.dtype.name == dtype_name
            assert buffer.shape == (sum(p.size for p in leaves),)

    update, plain_update = jax.jit(opt.update), jax.jit(plain.update)
    for g in grads:
        updates, state = update(g, state, params)
        expected, plain_state = plain_update(g, plain_state, params)
        assert jax.tree.map(lambda u: (u.shape, u.dtype), updates) == jax.tree.map(lambda p: (p.shape, p.dtype), params)
        assert_close_trees(updates, expected)


def test_gradients_of_another_dtype_than_the_params():
    """float32 gradients of bfloat16 params (mixed-precision training): grouped by the params'
    dtypes as at init, each update in its gradient's dtype, as the plain optimizer gives."""
    rng = np.random.default_rng(3)
    params = mixed_tree(jnp.ones)
    grads = mixed_tree(lambda shape, dtype: jnp.asarray(rng.normal(size=shape), jnp.float32))
    opt, plain = jstep.grouped(jstep.adam(1e-2)), jstep.adam(1e-2)
    updates, state = jax.jit(opt.update)(grads, opt.init(params), params)
    expected, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    assert sorted(state.mu["groups"]) == ["bfloat16", "float32"]
    assert_close_trees(updates, expected)


@pytest.mark.parametrize("max_leaf_size", MAX_LEAF_SIZES)
def test_adam_state_bytes_are_twice_the_params_plus_count(max_leaf_size):
    params = tree_of(lambda i, shape: jnp.ones(shape, jnp.float32))
    state = grouped_with(jstep.adam(1e-2), max_leaf_size).init(params)
    assert state_bytes(state) == 2 * state_bytes(params) + 4  # m, v and the int32 count


def test_bf16_moments_halve_the_state_bytes():
    params = tree_of(lambda i, shape: jnp.ones(shape, jnp.float32))
    state = jstep.grouped(jstep.adam(1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)).init(params)
    assert state_bytes(state) == state_bytes(params) + 4


def test_state_of_many_small_leaves_is_three_arrays():
    params = {f"layer{i}": jnp.ones((8,), jnp.float32) for i in range(100)}
    state = jstep.grouped(jstep.adam(1e-3)).init(params)
    assert len(jax.tree.leaves(state)) == 3  # count, m, v
    assert state.mu["groups"]["float32"].shape == (800,)
    assert len(jax.tree.leaves(jstep.adam(1e-3).init(params))) == 201


# ----------------------------------------------------------------------- composition


def clipped(opt):
    return optax.chain(optax.clip_by_global_norm(1.0), opt)


def accumulated(opt):
    return optax.MultiSteps(opt, every_k_schedule=2)


def injected():
    return optax.inject_hyperparams(jstep.adam)(learning_rate=1e-2)


@pytest.mark.parametrize(
    ("wrapped", "plain"),
    [
        pytest.param(lambda: clipped(jstep.grouped(jstep.adam(1e-2))), lambda: clipped(jstep.adam(1e-2)), id="chain"),
        pytest.param(
            lambda: accumulated(jstep.grouped(jstep.adam(1e-2))), lambda: accumulated(jstep.adam(1e-2)), id="multisteps"
        ),
        pytest.param(lambda: jstep.grouped(injected()), injected, id="inject_hyperparams"),
    ],
)
def test_inside_optax_wrappers(wrapped, plain):
    grads = gradient_sequence(3, STEPS, np.float32)
    got, _ = run(wrapped(), grads, np.float32)
    expected, _ = run(plain(), grads, np.float32)
    assert_close_runs(got, expected, RTOL["float32"])


def test_injected_hyperparams_stay_reachable():
    params = params_like(gradient_sequence(4, 1, np.float32), np.float32)
    state = jstep.grouped(injected()).init(params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)


def test_under_masked():
    mask = {"dense": {"w": True, "b": False}, "conv": [True], "scale": False}
    grads = gradient_sequence(5, STEPS, np.float32)
    got, _ = run(optax.masked(jstep.grouped(jstep.adam(1e-2)), mask), grads, np.float32)
    unmasked, _ = run(jstep.adam(1e-2), grads, np.float32)
    for step_got, step_unmasked, g in zip(got, unmasked, grads, strict=True):
        for a, u, g_leaf, masked_in in zip(step_got, step_unmasked, leaves64(g), jax.tree.leaves(mask), strict=True):
            if masked_in:
                assert_close_runs([[a]], [[u]], RTOL["float32"])
            else:
                np.testing.assert_array_equal(a, g_leaf)  # passed through untouched


# ------------------------------------------------ transformations that read the tree's structure

DECAY_MASKS = {
    "callable": lambda p: jax.tree.map(lambda x: x.ndim > 1, p),  # adamw's docstring: matrices only
    "dict": {"dense": {"w": True, "b": False}, "conv": True, "scale": False},  # a prefix of the tree
}


@pytest.mark.parametrize("max_leaf_size", MAX_LEAF_SIZES)
@pytest.mark.parametrize("mask", list(DECAY_MASKS))
def test_adamw_mask_decays_the_same_weights_as_unwrapped(mask, max_leaf_size):
    """The mask is resolved on the params' tree, not on the packed buffers (where ndim > 1
    held for no group and a dict did not apply): the updates are jstep.adamw's and
    optax.adamw's with the same mask, and differ from the unmasked ones."""
    grads = gradient_sequence(6, 20, np.float32)

    def adamw(module, mask):
        return module.adamw(1e-2, weight_decay=0.5, mask=mask)

    got, _ = run(grouped_with(adamw(jstep, DECAY_MASKS[mask]), max_leaf_size), grads, np.float32)
    plain, _ = run(adamw(jstep, DECAY_MASKS[mask]), grads, np.float32)
    theirs, _ = run(adamw(optax, DECAY_MASKS[mask]), grads, np.float32)
    everything, _ = run(adamw(jstep, None), grads, np.float32)
    assert_close_runs(got, plain, RTOL["float32"])
    # Jitted, where XLA compiles optax.adamw's step differently: within 1e-5 normwise per leaf
    # (measured 5.6e-6; eagerly the two agree within 4e-7, tests/test_adam.py).
    assert_close_runs(got, theirs, 1e-5)
    with pytest.raises(AssertionError):  # the mask leaves some weights undecayed
        assert_close_runs(got, everything, 0.01)


STRUCTURE_DEPENDENT = {
    "masked-dict": lambda: optax.masked(jstep.adam(1e-2), DECAY_MASKS["dict"]),
    "masked-callable": lambda: optax.masked(jstep.adam(1e-2), DECAY_MASKS["callable"]),
    "multi_transform": lambda: optax.multi_transform(
        {"matrix": jstep.adam(1e-2), "other": jstep.sgd(1e-2)},
        lambda p: jax.tree.map(lambda x: "matrix" if x.ndim > 1 else "other", p),
    ),
}


@pytest.mark.parametrize("name", list(STRUCTURE_DEPENDENT))
def test_a_transformation_that_reads_the_tree_structure_is_refused_with_the_fix(name):
    """optax.masked and optax.multi_transform inside grouped would see the packed tree; init
    says so and how to compose them (grouped inside: test_under_masked)."""
    params = params_like(gradient_sequence(7, 1, np.float32), np.float32)
    opt = jstep.grouped(STRUCTURE_DEPENDENT[name]())
    with pytest.raises(ValueError, match=r"depends on the params' tree structure.*Put grouped inside it"):
        opt.init(params)


# ------------------------------------------------------------ the tree check of plain optimizers


def _renamed(g):
    return {**g, "dense": {"weight": g["dense"]["w"], "b": g["dense"]["b"]}}


def _transposed(g):
    return {**g, "dense": {**g["dense"], "w": g["dense"]["w"].T}}


def _missing(g):
    return {key: value for key, value in g.items() if key != "scale"}


def _extra(g):
    return {**g, "extra": jnp.ones(2)}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("max_leaf_size", MAX_LEAF_SIZES)
@pytest.mark.parametrize("change", [_renamed, _transposed, _missing, _extra], ids=lambda f: f.__name__[1:])
def test_a_gradient_tree_unlike_the_params_gets_the_plain_optimizers_error(change, max_leaf_size, jit):
    """Without params, grouped checks the updates against the tree init packed (which the
    packed state remembers), with the plain optimizer's error, word for word."""
    grads = jax.tree.map(jnp.asarray, gradient_sequence(8, 1, np.float32)[0])
    params = jax.tree.map(jnp.ones_like, grads)
    bad = change(grads)
    errors = []
    for opt in (jstep.adam(1e-2), grouped_with(jstep.adam(1e-2), max_leaf_size)):
        update = jax.jit(opt.update) if jit else opt.update
        with pytest.raises(ValueError, match="updates") as error:
            update(bad, opt.init(params))
        errors.append(str(error.value))
    assert errors[1] == errors[0]


def test_params_unlike_the_state_are_refused_by_name():
    grads = jax.tree.map(jnp.asarray, gradient_sequence(9, 1, np.float32)[0])
    opt = jstep.grouped(jstep.adamw(1e-2))
    state = opt.init(jax.tree.map(jnp.ones_like, grads))
    with pytest.raises(ValueError, match=r"params leaf \['dense'\]\['w'\] has shape \(3, 5\)"):
        opt.update(grads, state, _transposed(grads))


def test_updates_unlike_the_params_of_a_stateless_transformation_are_refused_by_name():
    """sgd keeps no packed state to compare with; given params, the updates are checked
    against them (before: zip() argument 2 is longer than argument 1)."""
    grads = jax.tree.map(jnp.asarray, gradient_sequence(11, 1, np.float32)[0])
    opt = jstep.grouped(jstep.sgd(1e-2))
    params = jax.tree.map(jnp.ones_like, grads)
    with pytest.raises(ValueError, match=r"the updates tree does not match the params"):
        opt.update(_missing(grads), opt.init(params), params)


def test_a_state_restored_by_flax_serialization_steps_and_checks_as_before():
    """flax.serialization writes the packed parts as the dicts it always wrote; restored, the
    state steps exactly as the original and the next state checks the tree again."""
    serialization = pytest.importorskip("flax.serialization")
    grads = [jax.tree.map(jnp.asarray, g) for g in gradient_sequence(10, 3, np.float32)]
    params = jax.tree.map(jnp.ones_like, grads[0])
    opt = jstep.grouped(jstep.adam(1e-2), max_leaf_size=4)
    _, state = opt.update(grads[0], opt.init(params))
    restored = serialization.from_bytes(opt.init(params), serialization.to_bytes(state))
    update = jax.jit(opt.update)
    expected, _ = update(grads[1], state)
    got, next_state = update(grads[1], restored)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, e)
    with pytest.raises(ValueError, match="updates leaf"):
        opt.update(_transposed(grads[2]), next_state)


@pytest.mark.filterwarnings("error:Some donated buffers were not usable")
def test_donated_training_step():
    grads = gradient_sequence(6, STEPS, np.float32)

    def train(opt):
        def step(params, state, g):
            updates, state = opt.update(g, state, params)
            return optax.apply_updates(params, updates), state

        step = jax.jit(step, donate_argnums=(0, 1))
        params = params_like(grads, np.float32)
        state = opt.init(params)
        for g in grads:
            donated = params
            params, state = step(params, state, g)
            assert all(leaf.is_deleted() for leaf in jax.tree.leaves(donated))
        return params

    assert_close_trees(train(jstep.grouped(jstep.adam(1e-2))), train(jstep.adam(1e-2)))


def test_vmap_equals_per_example_runs():
    batch, steps = 3, 5
    # max_leaf_size=4 so that both the grouped and the large leaves are batched.
    opt = jstep.grouped(jstep.momentum(0.1, 0.9), max_leaf_size=4)
    per_example = [gradient_sequence(seed, steps, np.float32) for seed in range(batch)]
    params = stack([params_like(grads, np.float32) for grads in per_example])
    state = jax.vmap(opt.init)(params)
    update = jax.jit(jax.vmap(opt.update))
    batched = []
    for t in range(steps):
        updates, state = update(stack([grads[t] for grads in per_example]), state, params)
        batched.append(updates)

    for b, grads in enumerate(per_example):
        expected, _ = run(jstep.momentum(0.1, 0.9), grads, np.float32)
        got = [[leaf[b] for leaf in leaves64(updates)] for updates in batched]
        assert_close_runs(got, expected, RTOL["float32"])


# -------------------------------------------------- extra arguments and abstract init


def scale_by_value():
    """Multiply each gradient by the `value` keyword of update, which it requires."""

    def update(updates, state, params=None, *, value):
        return jax.tree.map(lambda g: g * value, updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def test_is_an_optax_gradient_transformation_extra_args():
    assert isinstance(jstep.grouped(optax.sgd(0.1)), optax.GradientTransformationExtraArgs)


def test_extra_arguments_reach_the_inner_transformation():
    rng = np.random.default_rng(7)
    params = mixed_tree(jnp.ones)
    grads = mixed_tree(lambda shape, dtype: jnp.asarray(rng.normal(size=shape), dtype))
    opt = jstep.grouped(scale_by_value(), max_leaf_size=4)  # w (12 values) stays large
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params, value=3.0)
    assert_close_trees(updates, jax.tree.map(lambda g: g * 3.0, grads))


def test_extra_arguments_reach_a_transformation_inside_a_chain():
    grads = gradient_sequence(8, 5, np.float32)

    def chained():
        return optax.chain(scale_by_value(), jstep.adam(1e-2))

    params = params_like(grads, np.float32)
    opt, plain = jstep.grouped(chained()), chained()
    state, plain_state = opt.init(params), plain.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params, value=0.5)
        expected, plain_state = plain.update(g, plain_state, params, value=0.5)
        assert_close_trees(updates, expected)


def test_extra_arguments_are_dropped_for_a_plain_gradient_transformation():
    def update(updates, state, params=None):  # takes no extra arguments
        return jax.tree.map(lambda g: -0.1 * g, updates), state

    plain = optax.GradientTransformation(lambda params: optax.EmptyState(), update)
    grads = jax.tree.map(jnp.asarray, gradient_sequence(9, 1, np.float32)[0])
    opt = jstep.grouped(plain)
    updates, _ = opt.update(grads, opt.init(grads), grads, value=0.5)
    assert_close_trees(updates, jax.tree.map(lambda g: -0.1 * g, grads))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: jstep.adam(1e-2), id="adam"),
        pytest.param(lambda: jstep.adagrad(0.1, initial_accumulator_value=0.25), id="adagrad"),
        pytest.param(lambda: optax.adam(1e-2), id="optax_adam"),
    ],
)
def test_abstract_init_is_the_state_eval_shape_describes(make):
    params = mixed_tree(jnp.ones)
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    opt = jstep.grouped(make(), max_leaf_size=4)  # grouped leaves and a large one
    built, described = opt.init(abstract), jax.eval_shape(opt.init, abstract)
    assert jax.tree.structure(built) == jax.tree.structure(described)
    for b, d in zip(jax.tree.leaves(built), jax.tree.leaves(described), strict=True):
        assert isinstance(b, jax.Array) and (b.shape, b.dtype) == (d.shape, d.dtype)
    for b, c in zip(jax.tree.leaves(built), jax.tree.leaves(opt.init(params)), strict=True):
        np.testing.assert_array_equal(b, c)  # the initial values of concrete params


# ----------------------------------------------------------------------------- errors


def test_a_negative_max_leaf_size_is_refused():
    with pytest.raises(ValueError, match="max_leaf_size"):
        jstep.grouped(jstep.adam(1e-2), max_leaf_size=-1)


@pytest.mark.parametrize("bad", [2.5, True, "big"])
def test_a_max_leaf_size_that_is_not_an_int_is_refused(bad):
    with pytest.raises(TypeError, match="max_leaf_size"):
        jstep.grouped(jstep.adam(1e-2), max_leaf_size=bad)


def test_integer_leaf_is_refused_at_init_by_path():
    params = {"w": jnp.ones((3,), jnp.float32), "step": jnp.zeros((), jnp.int32)}
    opt = jstep.grouped(jstep.adam(1e-2))
    with pytest.raises(TypeError, match=r"\['step'\].*dtype int32"):
        opt.init(params)


def test_update_of_params_grouped_otherwise_than_at_init_is_refused():
    params = {"w": jnp.ones((3,), jnp.float32), "b": jnp.ones((2,), jnp.float32)}
    opt = jstep.grouped(jstep.adam(1e-2))
    state = opt.init(params)
    other = {"w": params["w"], "b": params["b"].astype(jnp.bfloat16)}
    with pytest.raises(
        ValueError, match=r"init packed the params into the groups \['float32'\].*\['bfloat16', 'float32'\]"
    ):
        opt.update(other, state, other)
