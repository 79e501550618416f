"""Block-wise quantization at its edges, against the float64 reference of quantization_reference.py:
blocks whose largest magnitude is near float32's largest, empty arrays, 4-bit codes packed along
an axis other than the last, arrays that do not match their layout, and blocks holding inf or NaN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstep
from jstep.quantization import code_table

import quantization_reference as ref

F32_EPS = float(np.finfo(np.float32).eps)
MAPS = [(8, True), (8, False), (4, True), (4, False)]
MAP_IDS = ["8-signed", "8-unsigned", "4-signed", "4-unsigned"]


@functools.partial(jax.jit, static_argnames=("fmt", "signed"))
def quantize(x, fmt, signed=True):
    return jstep.quantize(x, fmt, signed=signed)


dequantize = jax.jit(jstep.dequantize)


def reference_values(x, bits, signed, block_size):
    """What one store keeps, in float64: each element the nearest code of x / s times s, by
    quantization_reference's exhaustive quantizer on jstep's table (0 once: it wants strictly
    increasing codes)."""
    return ref.quantize_dequantize(x, np.unique(code_table(bits, signed).astype(np.float64)), block_size)


def on_codes(shape, bits, signed, scales, block_size, seed):
    """Values s q(c) for random codes c, with each block's first element at code 1 (so that its
    scale is s): far from every midpoint between codes, so the nearest code is c itself."""
    rng = np.random.default_rng(seed)
    table = code_table(bits, signed).astype(np.float64)
    flat = table[rng.integers(0, table.size, int(np.prod(shape)))]
    flat[::block_size] = 1.0
    s = np.repeat(np.asarray(scales, np.float64), block_size)[: flat.size]
    return (flat * s).astype(np.float32).reshape(shape)


# ------------------------------------------------------------- scales near float32's largest

LARGEST_SCALE = 2.0**126  # beyond it 1 / s is subnormal, and flushed to 0 on a CPU
HUGE_SCALES = [2.0**126, 1e38, 2.0**127, float(np.finfo(np.float32).max)]


@pytest.mark.parametrize(("bits", "signed"), MAPS, ids=MAP_IDS)
def test_blocks_with_scales_up_to_float32_max_saturate_at_2_to_the_126(bits, signed):
    """A scale stops at 2^126: larger magnitudes saturate at +-2^126 and the rest of the block is
    stored against it, as the reference stores the clipped values. Computed as x * (1 / s),
    a block with s > 2^126 came back 0 (signed) or its smallest code (unsigned) throughout."""
    block_size = 16
    scales = [1.0, *HUGE_SCALES, 1e-20]
    x = on_codes((len(scales) * block_size,), bits, signed, scales, block_size, seed=bits + signed)
    q = quantize(jnp.asarray(x), jstep.blockwise(bits, block_size), signed=signed)
    np.testing.assert_array_equal(np.asarray(q.scale), np.minimum(scales, LARGEST_SCALE).astype(np.float32))
    clipped = np.clip(x.astype(np.float64), -LARGEST_SCALE, LARGEST_SCALE)
    expected = reference_values(clipped, bits, signed, block_size)
    np.testing.assert_allclose(np.asarray(dequantize(q), np.float64), expected, rtol=F32_EPS, atol=0)
    saturated = np.minimum(scales, LARGEST_SCALE).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(dequantize(q))[::block_size], saturated)


def test_adagrad_accumulates_gradients_of_1e19_in_eight_and_four_bits():
    """G = sum g^2 = 1e38 passes 2^126 at the first step and saturates there: each step is then
    -g / sqrt(2^126 + g^2) = -0.735 (float32 state's G of 2e38 and 3e38 give -0.707 and -0.577),
    a bounded error, where G stored as 0 or its smallest code made every step -1 (the
    accumulator never grew)."""
    params = jnp.zeros(256)
    grads = jnp.full(256, 1e19).at[1].set(1.0)
    expected = [-1.0, -1e19 / np.sqrt(1e38 + LARGEST_SCALE), -1e19 / np.sqrt(1e38 + LARGEST_SCALE)]
    for bits in (8, 4):
        opt = jstep.adagrad(1.0, accumulator_dtype=jstep.blockwise(bits, min_size=0))
        state = opt.init(params)
        for t in range(3):
            updates, state = opt.update(grads, state, params)
            np.testing.assert_allclose(float(updates[0]), expected[t], rtol=4 * F32_EPS)
        assert np.isfinite(np.asarray(updates)).all()


# ------------------------------------------------------------------------------ empty arrays

EMPTY_SHAPES = [(0,), (0, 5), (0, 4), (2, 0, 6), (3, 0), (1, 0, 3)]


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize(("bits", "signed"), MAPS, ids=MAP_IDS)
def test_empty_arrays_quantize_to_no_codes_and_no_scales(shape, bits, signed):
    q = quantize(jnp.zeros(shape), jstep.blockwise(bits), signed=signed)
    assert q.codes.size == 0 and q.scale.size == 0 and q.nbytes == 0
    values = dequantize(q)
    assert values.shape == shape and values.dtype == jnp.float32
    q = jstep.quantize(jnp.zeros(shape), jstep.blockwise(bits), signed=signed, key=jax.random.key(0))
    assert jstep.dequantize(q).shape == shape


@pytest.mark.parametrize("bits", [8, 4])
def test_optimizers_step_a_tree_with_an_empty_leaf_as_without_it(bits):
    """An empty leaf's update is empty, as optax.adam's; the other leaf's state and update are
    those of the same optimizer on a tree without it, bit for bit."""
    fmt = jstep.blockwise(bits, min_size=0)
    rng = np.random.default_rng(bits)
    w, g = (jnp.asarray(rng.normal(size=(8, 8)), jnp.float32) for _ in range(2))
    for make in (
        lambda: jstep.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt),
        lambda: jstep.momentum(1e-2, 0.9, accumulator_dtype=fmt),
    ):  # round to nearest: stochastic rounding keys each leaf by its position in the tree
        with_empty, alone = make(), make()
        params, grads = {"e": jnp.zeros((0, 5)), "w": w}, {"e": jnp.zeros((0, 5)), "w": g}
        state, state_alone = with_empty.init(params), alone.init({"w": w})
        for _ in range(2):
            updates, state = jax.jit(with_empty.update)(grads, state, params)
            expected, state_alone = jax.jit(alone.update)({"w": g}, state_alone, {"w": w})
            assert updates["e"].shape == (0, 5)
            np.testing.assert_array_equal(np.asarray(updates["w"]), np.asarray(expected["w"]))
    seeded = jstep.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt, rounding_seed=1)
    updates, _ = jax.jit(seeded.update)(grads, seeded.init(params), params)
    optax_updates, _ = optax.adam(1e-2).update(grads, optax.adam(1e-2).init(params), params)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, optax_updates)


# --------------------------------------------------------------- 4-bit codes, the packed axis


def adam_bytes_per_parameter(shape, bits):
    fmt = jstep.blockwise(bits)
    state = jstep.adam(1e-3, mu_dtype=fmt, nu_dtype=fmt).init(jnp.zeros(shape))
    quantized = [leaf for leaf in (state.mu, state.nu) if jstep.quantization.is_quantized(leaf)]
    assert len(quantized) == 2
    return sum(q.nbytes for q in quantized) / np.prod(shape)


@pytest.mark.parametrize(
    ("shape", "codes_shape"),
    [
        ((64, 128), (64, 64)),
        ((8192, 1), (4096, 1)),
        ((4096, 3), (2048, 3)),
        ((3, 3, 512, 1), (3, 3, 256, 1)),
        ((4097, 1), (2049, 1)),  # every axis odd: paired along the longest, padded by one row
        ((4097, 3), (2049, 3)),
        ((65, 65), (65, 33)),
    ],
    ids=str,
)
def test_four_bit_adam_state_takes_1_06_bytes_per_parameter_whatever_the_last_axis(shape, codes_shape):
    """The codes are paired along the last even axis (when every axis is odd, the longest,
    padded): half a byte per element, plus 4 / 128 per scale, for each of m and v (an (8192,
    1) kernel paired along its last axis took 2.06; a (4097, 1) one 2.06 and a (4097, 3) one
    1.40 before odd shapes were paired along their longest axis). Padding one row or column
    adds at most 1 / (2 * its length) per element, and a last block shorter than 128 one scale."""
    size = np.prod(shape)
    padding, scales = 1 / (2 * max(shape)), 4 * -(-size // 128) / size
    assert adam_bytes_per_parameter(shape, 4) <= 2 * (0.5 + padding + scales) + 1e-12  # 1.0625 when 128 divides
    q = quantize(jnp.zeros(shape), jstep.blockwise(4))
    assert q.codes.shape == codes_shape


ROUND_TRIP_SHAPES = [(6, 10), (8, 5), (4, 1), (1, 6), (5, 7), (3, 5, 1), (2, 3, 5), (1,), (7,), ()]


@pytest.mark.parametrize("shape", ROUND_TRIP_SHAPES, ids=str)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_four_bit_round_trip_is_the_reference_for_even_odd_and_length_one_axes(shape, signed):
    """Values on codes come back as the float64 reference's, whichever axis holds the pairs; and
    a flax.serialization round trip of the QuantizedArray restores its arrays exactly."""
    block_size = 8
    size = int(np.prod(shape))
    x = on_codes(shape, 4, signed, 10.0 ** np.arange(-(-size // block_size)), block_size, seed=size)
    q = quantize(jnp.asarray(x), jstep.blockwise(4, block_size), signed=signed)
    expected = reference_values(x, 4, signed, block_size)
    np.testing.assert_allclose(np.asarray(dequantize(q), np.float64), expected, rtol=F32_EPS, atol=0)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), x)
    serialization = pytest.importorskip("flax.serialization")
    blank = quantize(jnp.zeros(shape), jstep.blockwise(4, block_size), signed=signed)
    restored = serialization.from_bytes(blank, serialization.to_bytes(q))
    np.testing.assert_array_equal(np.asarray(restored.codes), np.asarray(q.codes))
    np.testing.assert_array_equal(np.asarray(dequantize(restored)), x)


# -------------------------------------------------------------- arrays that miss their layout


def test_arrays_that_do_not_match_the_layout_are_refused_at_trace_time():
    q = quantize(jnp.ones((64, 8)), jstep.blockwise(8, 64))
    for wrong in (q._replace(codes=q.codes[:8]), q._replace(scale=jnp.concatenate([q.scale, q.scale]))):
        with pytest.raises(ValueError, match=r"shape \(64, 8\).*codes of shape \(64, 8\) and scale of shape \(8,\)"):
            jstep.dequantize(wrong)
        with pytest.raises(ValueError, match=r"not supported split by jax\.shard_map"):
            jax.jit(jstep.dequantize)(wrong)
    opt = jstep.momentum(0.1, 0.9, accumulator_dtype=jstep.blockwise(4, min_size=0))
    params = jnp.ones((16, 3))
    state = opt.init(params)
    split = jax.tree.map(lambda x: x[:2] if x.ndim else x, state)  # what shard_map hands a shard
    with pytest.raises(ValueError, match=r"got codes \(2, 3\) and scale \(1,\)"):
        jax.jit(opt.update)(params, split, params)
    members = jnp.arange(96.0).reshape(2, 16, 3)
    batched = jax.vmap(lambda x: jstep.quantize(x, jstep.blockwise(4, 16)))(members)
    with pytest.raises(ValueError, match=r"got codes \(2, 8, 3\) and scale \(2, 3\).*jax\.vmap"):
        jstep.dequantize(batched)
    one = jstep.dequantize(jstep.quantize(members[1], jstep.blockwise(4, 16)))
    np.testing.assert_array_equal(np.asarray(jax.vmap(jstep.dequantize)(batched)[1]), np.asarray(one))


SHARD_MAP_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jstep

mesh = jax.make_mesh((8,), ("x",))
opt = jstep.momentum(1e-2, 0.9, accumulator_dtype=jstep.blockwise(8, min_size=0))
rng = np.random.default_rng(0)
w, g = (jnp.asarray(rng.normal(size=(64, 32)), jnp.float32) for _ in range(2))
with jax.set_mesh(mesh):
    w, g = (jax.device_put(a, NamedSharding(mesh, P("x"))) for a in (w, g))
    # init outside on the split params, the state handed to shard_map split as them
    state = opt.init(w)
    specs = jax.tree.map(lambda a: a.sharding.spec, state)
    step = jax.shard_map(opt.update, mesh=mesh, in_specs=(P("x"), specs, P("x")), out_specs=(P("x"), specs))
    try:
        jax.jit(step)(g, state, w)
        print("RESULT split in: no error")
    except ValueError as e:
        print("RESULT split in:", str(e).split(". Quantized")[0])
    # init and update inside: the state is each shard's own and steps; read outside, refused
    local = jax.eval_shape(opt.init, jax.ShapeDtypeStruct((8, 32), jnp.float32))
    spec = jax.tree.map(lambda a: P("x") if a.ndim else P(), local)
    state = jax.jit(jax.shard_map(opt.init, mesh=mesh, in_specs=P("x"), out_specs=spec))(w)
    step = jax.shard_map(opt.update, mesh=mesh, in_specs=(P("x"), spec, P("x")), out_specs=(P("x"), spec))
    updates, state = jax.jit(step)(g, state, w)
    print("RESULT inside:", float(jnp.max(jnp.abs(updates + 1e-2 * g))))
    velocity = jax.tree.leaves(state, is_leaf=jstep.quantization.is_quantized)[-1]
    try:
        jstep.dequantize(velocity)
        print("RESULT read outside: no error")
    except ValueError as e:
        print("RESULT read outside:", str(e).split(". Quantized")[0])
"""


def test_quantized_state_split_by_shard_map_is_refused_naming_the_shapes():
    """On 8 devices: a state split into shard_map, or made inside and read outside, raises the
    layout error (before: a reshape error, and 1/8 of the moment silently); made and stepped
    inside, the first step is -lr g, as float32 state's."""
    from harness import run_on_eight_devices

    lines = [
        line[len("RESULT ") :]
        for line in run_on_eight_devices(SHARD_MAP_SCRIPT).splitlines()
        if line.startswith("RESULT ")
    ]
    assert lines[0] == (
        "split in: a jstep.QuantizedArray of shape (64, 32) (8 bits, blocks of 256) needs codes of shape (64, 32) "
        "and scale of shape (8,), got codes (8, 32) and scale (1,)"
    )
    assert float(lines[1].split(": ")[1]) <= 1e-2 * F32_EPS * 8
    assert lines[2] == (
        "read outside: a jstep.QuantizedArray of shape (8, 32) (8 bits, blocks of 256) needs codes of shape (8, 32) "
        "and scale of shape (1,), got codes (64, 32) and scale (8,)"
    )


# ----------------------------------------------------------------------- infinities and NaN


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("key", [None, 0], ids=["nearest", "stochastic"])
def test_a_block_holding_inf_or_nan_stores_what_the_docstring_says(bits, key):
    """Block 0 holds -inf, block 1 +inf, block 2 NaN, block 3 only finite values: scales 2^126,
    2^126, NaN and the largest magnitude; an infinity comes back +-2^126 with its sign (the
    smallest code for -inf in an unsigned map) and the rest of its block as against s = 2^126
    (here 0, or the smallest code); a NaN block all NaN; the finite block as the reference."""
    fmt = jstep.blockwise(bits, 4)
    finite = [1.0, 0.0, -2.0]
    x = np.array([[-np.inf, *finite], [np.inf, *finite], [np.nan, *finite], [3.0, *finite]], np.float32)
    for signed in (True, False):
        random = None if key is None else jax.random.key(key)
        q = jstep.quantize(jnp.asarray(x), fmt, signed=signed, key=random)
        np.testing.assert_array_equal(
            np.asarray(q.scale), np.float32([[LARGEST_SCALE], [LARGEST_SCALE], [np.nan], [3.0]])
        )
        back = np.asarray(jstep.dequantize(q), np.float64)
        smallest = float(code_table(bits, signed)[0]) * LARGEST_SCALE
        assert back[0, 0] == (-LARGEST_SCALE if signed else smallest) and back[1, 0] == LARGEST_SCALE
        expected = reference_values(np.clip(x[:2].astype(np.float64), -LARGEST_SCALE, LARGEST_SCALE), bits, signed, 4)
        if key is None:
            np.testing.assert_allclose(back[:2], expected, rtol=F32_EPS, atol=0)
        assert np.isnan(back[2]).all()
        if key is None:
            np.testing.assert_allclose(back[3], reference_values(x[3], bits, signed, 4), rtol=F32_EPS, atol=0)
