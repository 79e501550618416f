"""Block-wise 8- and 4-bit state (jstep.quantization) against references written here.

* The maps: a float64 transcription of the module docstring's formulas, by loops over decades
  (not jstep's helpers), against ``code_table``.
* ``quantize``/``dequantize``: a float64 NumPy block-wise quantizer (absmax per run of
  ``block_size`` row-major elements, nearest code by an exhaustive search of the table), and the
  documented 4-bit byte layout read back by hand.
* Stochastic rounding: the two neighbouring codes from the reference table, the mean over many
  keys within 6 binomial standard deviations.
* The optimizers: every state-dtype argument takes a format; each step's update equals the
  float32 optimizer's on the same (dequantized) state, each new state is within the map's
  resolution of the float32 one, and 20 steps stay within the accumulated resolution.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstep
from jstep.quantization import QuantizedArray, code_table

SIGMAS = 6.0  # a correct rounding misses 6 standard deviations with probability ~2e-9
F32_EPS = float(np.finfo(np.float32).eps)
MAPS = [(8, True), (8, False), (4, True), (4, False)]
MAP_IDS = ["8-signed", "8-unsigned", "4-signed", "4-unsigned"]


@functools.partial(jax.jit, static_argnames=("fmt", "signed"))
def quantize(x, fmt, signed=True, key=None):
    """`jstep.quantize` compiled once per shape (run eagerly, each of its operations compiles apart)."""
    return jstep.quantize(x, fmt, signed=signed, key=key)


dequantize = jax.jit(jstep.dequantize)


# ------------------------------------------------------------------------------ the maps


def reference_map(bits, signed):
    """The module docstring's maps in float64, sorted; n = bits - 1.

    signed, 8 bits: 0 twice and +-q, q over the top two decades linear, 10^-z (0.1 + 0.9 k / S_z)
      for z = 0, 1, k = 1 .. S_z, S_z = 2^(n-1-z); below them 2^(n-2) - 1 codes geometric,
      10^(-2 - (n - 3) j / (2^(n-2) - 2)), j = 0 .. 2^(n-2) - 2.
    signed, 4 bits: 0 twice and +-(0.1 + 0.15 k), k = 0 .. 6 (the top decade in equal steps).
    unsigned, 8 bits: 10^(-12 (255 - k) / 255), k = 0 .. 255 (1e-12 .. 1, no zero).
    unsigned, 4 bits: 16^(-(15 - k) / 15), k = 0 .. 15 (1/16 .. 1, no zero)."""
    n = bits - 1
    if not signed:
        if bits == 4:
            return np.array([16.0 ** (-(15 - k) / 15) for k in range(16)])
        return np.array([10.0 ** (-12 * (255 - k) / 255) for k in range(256)])
    if bits == 4:
        magnitudes = [0.0] + [(2 + 3 * k) / 20 for k in range(7)]  # 0.1 + 0.15 k, exact at k = 6
    else:
        magnitudes = [0.0]
        for z in (0, 1):
            steps = 2 ** (n - 1 - z)
            magnitudes += [10.0**-z * (0.1 + 0.9 * k / steps) for k in range(1, steps + 1)]
        count = 2 ** (n - 2) - 1
        magnitudes += [10.0 ** (-2 - (n - 3) * j / (count - 1)) if j else 1e-2 for j in range(count)]
    magnitudes = sorted(magnitudes)
    return np.array([-m for m in reversed(magnitudes)] + magnitudes)


def codes_of(bits, signed):
    """The reference table as the float32 values jstep stores, in float64."""
    return reference_map(bits, signed).astype(np.float32).astype(np.float64)


def worst_error(bits, signed, stochastic=False):
    """The largest |y - q(c)| over y in [0, 1] (times the block's scale: an element's error):
    half the widest step for round-to-nearest, the widest step for stochastic rounding; an
    unsigned map also stores y < its smallest code as that code."""
    table = reference_map(bits, signed)
    step = np.diff(table).max()
    error = step if stochastic else step / 2
    return max(error, 0.0 if signed else table[0])


def local_error(y, bits, signed):
    """The largest round-to-nearest error |y - q(c)| at each y = x / s in [-1, 1]: half the step
    between the two codes around y (either step where float32's rounding of y could put it on
    a code), or, under an unsigned map's smallest code, the distance up to it."""
    table = reference_map(bits, signed)
    y = np.asarray(y, np.float64)

    def half_step(v):
        i = np.clip(np.searchsorted(table, v, side="right"), 1, table.size - 1)
        return (table[i] - table[i - 1]) / 2

    fuzz = 4 * F32_EPS * np.abs(y)
    half = np.maximum(half_step(y - fuzz), half_step(y + fuzz))
    return np.where(y < table[0], table[0] - y, half)


@pytest.mark.parametrize(("bits", "signed"), MAPS, ids=MAP_IDS)
def test_code_table_is_the_docstring_map(bits, signed):
    table = code_table(bits, signed)
    reference = reference_map(bits, signed)
    assert table.dtype == np.float32 and table.shape == (2**bits,)
    np.testing.assert_array_equal(table, reference.astype(np.float32))
    assert np.all(np.diff(table) >= 0)
    assert table[-1] == 1.0
    if signed:
        np.testing.assert_array_equal(table, -table[::-1])
        assert table[0] == -1.0
        half = 2 ** (bits - 1)
        assert table[half - 1] == 0 and table[half] == 0  # 0 twice: the +0 and -0 patterns
        assert np.all(np.diff(table)[np.arange(table.size - 1) != half - 1] > 0)
        # the smallest nonzero magnitude: 1e-6 for 8 bits, 1e-1 for 4
        assert table[half + 1] == np.float32(1e-6 if bits == 8 else 0.1)
    else:
        assert np.all(np.diff(table) > 0) and table[0] > 0  # no zero
        assert table[0] == np.float32(1e-12 if bits == 8 else 1 / 16)


def test_signed_map_is_linear_over_two_decades_then_geometric():
    """8 bits: 64 equal steps over (0.1, 1], 32 over (0.01, 0.1], then 31 codes from 1e-2 to
    1e-6 each 10^(4/30) = 1.36 times the one below; the unsigned 8-bit map: each code
    10^(12/255) = 1.115 times the one below, from 1e-12 to 1."""
    magnitudes = code_table(8, True)[128:].astype(np.float64)
    top = magnitudes[magnitudes > 0.1 * 1.0001]
    middle = magnitudes[(magnitudes > 0.01 * 1.0001) & (magnitudes <= 0.1 * 1.0001)]
    assert top.size == 64 and middle.size == 32
    np.testing.assert_allclose(np.diff(top), 0.9 / 64, rtol=1e-5)
    np.testing.assert_allclose(np.diff(middle), 0.09 / 32, rtol=1e-4)
    low = magnitudes[(magnitudes > 0) & (magnitudes <= 0.01 * 1.0001)]
    assert low.size == 31 and low[0] == np.float32(1e-6) and low[-1] == np.float32(1e-2)
    np.testing.assert_allclose(low[1:] / low[:-1], 10 ** (4 / 30), rtol=1e-5)
    unsigned = code_table(8, False).astype(np.float64)
    np.testing.assert_allclose(unsigned[1:] / unsigned[:-1], 10 ** (12 / 255), rtol=1e-5)


def test_four_bit_maps_bound_an_m_too_large_over_a_v_too_small():
    """The module docstring's 4-bit argument: v's smallest code 1/16 keeps sqrt(v) above a quarter
    of its block's largest; above it, stochastic rounding stores v at most 16^(1/15) = 1.20 times
    too small (between two neighbours), and an m of at least 0.25 of its block's largest at most
    1.6 times too large (0.4 / 0.25). Their product bounds how much larger than float32's one
    store can make a step: 1.6 sqrt(1.2) = 1.76, where a 4-bit dynamic exponent over k / 16
    (m's codes 0.1 and 0.325, v's 1/16 and 2/16) reaches 3.25 sqrt(2) = 4.6."""
    m = code_table(4, True)[8:].astype(np.float64)
    v = code_table(4, False).astype(np.float64)
    assert v[0] == np.float32(1 / 16) and v[-1] == 1.0
    v_too_small = (v[1:] / v[:-1]).max()
    m_from_quarter = m[m >= 0.25]
    m_too_large = max((m_from_quarter[1:] / m_from_quarter[:-1]).max(), m_from_quarter[0] / 0.25)
    np.testing.assert_allclose([v_too_small, m_too_large], [16 ** (1 / 15), 1.6], rtol=1e-6)
    assert m_too_large * np.sqrt(v_too_small) <= 1.76


# ------------------------------------------------------------------------ quantization


def reference_blocks(x, block_size):
    """x in row-major order as (blocks, block_size) in float64, the last block padded with 0."""
    flat = np.asarray(x, np.float64).reshape(-1)
    return np.pad(flat, (0, -flat.size % block_size)).reshape(-1, block_size)


def packed_axis(shape):
    """The documented 4-bit packing axis: the last axis of even length, else the last of the
    longest (padded)."""
    for axis in reversed(range(len(shape))):
        if shape[axis] % 2 == 0:
            return axis
    longest = max(shape, default=1)
    return max((axis for axis in range(len(shape)) if shape[axis] == longest), default=0)


def unpacked_codes(q):
    """The code of each element, read from ``q.codes`` by the documented layout: 8 bits one byte
    per element; 4 bits element 2j of the packed axis in the low nibble of byte j, 2j + 1 in the
    high nibble."""
    codes = np.asarray(q.codes).astype(np.int64)
    if q.layout.bits == 8:
        return codes.reshape(q.shape)
    axis = packed_axis(q.shape)
    pairs = np.stack([codes & 0x0F, codes >> 4], axis=axis + 1)
    pairs = pairs.reshape(*codes.shape[:axis], 2 * codes.shape[axis], *codes.shape[axis + 1 :])
    return np.take(pairs, np.arange(q.shape[axis] if q.shape else 1), axis=axis).reshape(q.shape)


def heavy_tailed(shape, seed, signed=True):
    """Values over eight decades, some exact zeros, one block maximum of a known size."""
    rng = np.random.default_rng(seed)
    size = math.prod(shape)
    x = 10.0 ** rng.uniform(-8, 0.5, size) * (rng.choice([-1.0, 1.0], size) if signed else 1.0)
    x[rng.random(size) < 0.05] = 0.0
    return x.reshape(shape).astype(np.float32)


CASES = [  # (shape, bits, block_size)
    ((1000,), 8, 256),  # 1-D, last block partial
    ((3, 100), 8, 64),  # last axis not a multiple of the block
    ((5, 7), 4, 16),  # odd last axis: packed to 4 bytes per row
    ((2, 3, 9), 4, 128),  # smaller than one block, odd last axis
    ((33, 3), 4, 16),  # every axis odd: paired along the longest, the first
    ((), 8, 256),  # 0-d
    ((), 4, 128),
    ((10,), 8, 256),  # smaller than a block
    ((257,), 4, 32),
    ((6, 128), 8, 64),  # blocks within the last axis: scales shaped (6, 2)
    ((4, 3, 256), 4, 128),  # and (4, 3, 2)
    ((3, 3, 32, 32), 8, 256),  # blocks within the last two axes: (3, 3, 4)
    ((4, 6, 64), 4, 128),  # and (4, 3)
]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize(("shape", "bits", "block_size"), CASES, ids=[f"{c[0]}-{c[1]}bit-B{c[2]}" for c in CASES])
def test_quantize_is_nearest_code_of_block_absmax(shape, bits, block_size, signed):
    x = heavy_tailed(shape, seed=len(shape) + bits + block_size, signed=signed)
    q = quantize(jnp.asarray(x), jstep.blockwise(bits, block_size), signed=signed)

    blocks = reference_blocks(x, block_size)
    scale = np.abs(blocks).max(axis=1)
    # One scale per block, keeping the value's axes before the last axis a from which on its
    # elements hold whole blocks: (*shape[:a], prod(shape[a:]) / block_size); else flat.
    whole = [a for a in range(len(shape)) if math.prod(shape[a:]) % block_size == 0]
    a = max(whole, default=None)
    assert q.scale.shape == ((blocks.shape[0],) if a is None else (*shape[:a], math.prod(shape[a:]) // block_size))
    np.testing.assert_array_equal(np.asarray(q.scale).reshape(-1), scale.astype(np.float32))
    assert q.scale.dtype == jnp.float32

    table = codes_of(bits, signed)
    y = blocks / np.where(scale > 0, scale, 1)[:, None]
    best = np.abs(y[..., None] - table).min(axis=-1)  # the nearest code's distance
    code = unpacked_codes(q)
    assert code.min() >= 0 and code.max() < 2**bits
    chosen = table[reference_blocks(code, block_size).astype(np.int64)]
    distance = np.abs(y - chosen)
    # Ties may go either way: the chosen code is as near as the nearest, up to float32's
    # rounding of y = x / s and of the codes.
    slack = 2 * F32_EPS * (np.abs(y) + np.abs(chosen))
    real = np.arange(blocks.size).reshape(blocks.shape) < x.size
    assert np.all((distance <= best + slack)[real])

    values = dequantize(q)
    assert values.dtype == jnp.float32 and values.shape == shape
    expected = (chosen * scale[:, None]).reshape(-1)[: x.size].reshape(shape)
    np.testing.assert_allclose(np.asarray(values), expected, rtol=F32_EPS, atol=0)

    assert q.shape == shape and q.size == x.size
    assert q.layout == jstep.quantization.Layout(shape, bits, block_size, signed)
    axis = packed_axis(shape)
    rest = math.prod(shape) // shape[axis] if shape else 1
    code_bytes = x.size if bits == 8 else rest * -(-(shape[axis] if shape else 1) // 2)
    assert q.codes.dtype == jnp.uint8 and q.codes.size == code_bytes
    assert q.nbytes == code_bytes + 4 * -(-x.size // block_size)


def test_four_bit_bytes_hold_element_2j_low_and_2j_plus_1_high():
    table = code_table(4, True)
    codes = np.array(
        [[15, 3, 8, 0, 12], [1, 14, 6, 9, 15], [6, 2, 15, 5, 11]]
    )  # 15 is +1: every block's scale 1; 8 is +0 (7, -0, comes back as +0)
    # Every axis odd: paired along the last, padded to 6.
    x = jnp.asarray(table[codes])
    q = quantize(x, jstep.blockwise(4, 8), signed=True)
    assert q.codes.shape == (3, 3)
    got = np.asarray(q.codes).astype(np.int64)
    np.testing.assert_array_equal(got[:, :2], codes[:, 0:4:2] | codes[:, 1:4:2] << 4)
    np.testing.assert_array_equal(got[:, 2] & 0x0F, codes[:, 4])
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(x))
    # The last axis odd, the first even: paired along the first (rows 2j and 2j + 1), the last kept.
    x = jnp.asarray(table[codes[:2]])
    q = quantize(x, jstep.blockwise(4, 8), signed=True)
    assert q.codes.shape == (1, 5)
    np.testing.assert_array_equal(np.asarray(q.codes).astype(np.int64)[0], codes[0] | codes[1] << 4)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(x))
    # Axes of length 1 after it (a (4, 1) kernel): paired along the first, rows 2j and 2j + 1.
    column = codes[:, :4].reshape(3 * 4)[:8].reshape(8, 1)
    x = jnp.asarray(table[column])
    q = quantize(x, jstep.blockwise(4, 8), signed=True)
    assert q.codes.shape == (4, 1)
    np.testing.assert_array_equal(np.asarray(q.codes).astype(np.int64), column[0::2] | column[1::2] << 4)
    np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(x))


def test_eight_bit_codes_index_the_table_in_the_value_shape():
    table = code_table(8, False)
    codes = np.array([[255, 0, 17, 128], [254, 1, 255, 3]])  # 255 is 1: each block's scale 2
    q = quantize(jnp.asarray(2.0 * table[codes]), jstep.blockwise(8, 4), signed=False)
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.scale), [[2.0], [2.0]])  # one block per row, shaped by rows


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_narrow_inputs_quantize_as_their_float32_values(dtype):
    x = jnp.asarray(heavy_tailed((3, 50), seed=7)).astype(dtype)
    fmt = jstep.blockwise(8, 32)
    q, wide = quantize(x, fmt), quantize(x.astype(jnp.float32), fmt)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(wide.codes))
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(wide.scale))
    assert q.scale.dtype == jnp.float32 and dequantize(q).dtype == jnp.float32


def test_quantized_array_is_a_jittable_pytree_of_two_arrays():
    q = quantize(jnp.asarray(heavy_tailed((4, 33), seed=3)), jstep.blockwise(4, 64))
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 2
    again = jax.jit(lambda q: q)(q)
    assert again.layout == q.layout and isinstance(again, QuantizedArray)
    np.testing.assert_array_equal(np.asarray(dequantize(again)), np.asarray(dequantize(q)))
    assert jax.tree.unflatten(treedef, leaves).layout == q.layout


def test_zero_block_has_scale_zero_and_the_code_of_zero():
    """A block of zeros: scale 0, codes of 0 (signed) or of the smallest code (unsigned), not of 0 / 0."""
    for signed in (True, False):
        q = quantize(jnp.zeros((2, 8)), jstep.blockwise(8, 4), signed=signed)
        np.testing.assert_array_equal(np.asarray(q.scale), np.zeros((2, 2)))  # two blocks per row
        np.testing.assert_array_equal(np.asarray(dequantize(q)), np.zeros((2, 8)))
        nearest_to_zero = np.abs(code_table(8, signed)).min()
        np.testing.assert_array_equal(code_table(8, signed)[np.asarray(q.codes)], nearest_to_zero)


# ------------------------------------------------------------------- stochastic rounding

KEYS = 4096
ELEMENTS = 256  # one block: 255 values between codes and its maximum


def draws_of(x, fmt, signed, keys):
    """dequantize(quantize(x, key=k)) for each key, stacked (float64)."""
    every = jax.jit(jax.vmap(lambda k: jstep.dequantize(jstep.quantize(x, fmt, signed=signed, key=k))))
    return np.asarray(every(keys), np.float64)


def pooled_sigmas(draws, x, low, high):
    """How many standard deviations the mean error over all elements and draws is from 0.

    Each draw of an element between codes lo < hi is lo + (hi - lo) B with B ~ Bernoulli(p),
    p = (x - lo) / (hi - lo) when unbiased: (draw - x) / (hi - lo) has mean 0 and variance
    p (1 - p). Summed over M elements and averaged over K draws its variance is
    sum p (1 - p) / K, so a correct rounding stays within 6 of its standard deviations."""
    gap = high - low
    p = (x - low) / gap
    z = ((draws.mean(axis=0) - x) / gap).sum()
    return abs(z) / math.sqrt((p * (1 - p)).sum() / draws.shape[0])


def between_codes(bits, signed, seed, scale=3.0, fraction=None):
    """(x, y, low, high): ELEMENTS values strictly between neighbouring codes, times `scale`, in one block
    whose maximum is `scale` (element 0). `fraction` places every value that far from its lower code."""
    rng = np.random.default_rng(seed)
    table = codes_of(bits, signed)
    positive = table[table > 0] if signed else table
    index = rng.integers(0, positive.size - 1, ELEMENTS)
    low, high = positive[index], positive[index + 1]
    p = rng.uniform(0.05, 0.95, ELEMENTS) if fraction is None else np.full(ELEMENTS, fraction)
    y = low + p * (high - low)
    if signed and fraction is None:  # negative values between the negative codes
        sign = rng.choice([-1.0, 1.0], ELEMENTS)
        y, low, high = sign * y, np.where(sign > 0, low, -high), np.where(sign > 0, high, -low)
    y[0], low[0], high[0] = 1.0, 1.0, 1.0
    x = (y * scale).astype(np.float32)
    y = x.astype(np.float64) / scale
    return x, y, low, high


@pytest.mark.parametrize(("bits", "signed"), MAPS, ids=MAP_IDS)
def test_stochastic_rounding_is_unbiased_between_the_two_neighbours(bits, signed):
    scale = 3.0
    x, y, low, high = between_codes(bits, signed, seed=bits + signed, scale=scale)
    fmt = jstep.blockwise(bits, ELEMENTS)
    keys = jax.random.split(jax.random.key(11), KEYS)
    draws = draws_of(jnp.asarray(x), fmt, signed, keys) / scale  # in units of the scale

    lo32 = (low * scale).astype(np.float32).astype(np.float64) / scale  # the stored s q(c), in units of s
    hi32 = (high * scale).astype(np.float32).astype(np.float64) / scale
    assert np.all((draws == lo32) | (draws == hi32)), "a draw outside the two neighbouring codes"

    # Per element: |mean - y| within 6 binomial standard deviations (hi - lo) sqrt(p (1 - p) / K),
    # plus float32's rounding of x and of s q(c).
    inner = slice(1, None)
    gap = high[inner] - low[inner]
    p = (y[inner] - low[inner]) / gap
    bound = SIGMAS * gap * np.sqrt(p * (1 - p) / KEYS) + 4 * F32_EPS * np.abs(y[inner])
    assert np.all(np.abs(draws[:, inner].mean(axis=0) - y[inner]) <= bound)
    assert pooled_sigmas(draws[:, inner], y[inner], low[inner], high[inner]) < SIGMAS
    # both neighbours appear where neither is unlikely
    both = ((draws[:, inner] == lo32[inner]).any(0)) & ((draws[:, inner] == hi32[inner]).any(0))
    assert np.all(both[(p > 0.02) & (p < 0.98)])


def test_round_to_nearest_fails_the_bias_check_that_stochastic_rounding_passes():
    """Every value 30% of a step above its lower code: nearest always rounds down (mean error
    -0.3 steps per element), stochastic rounding is right on average."""
    x, y, low, high = between_codes(8, True, seed=5, scale=1.0, fraction=0.3)
    fmt = jstep.blockwise(8, ELEMENTS)
    keys = jax.random.split(jax.random.key(2), 256)
    stochastic = draws_of(jnp.asarray(x), fmt, True, keys)[:, 1:]
    nearest = np.asarray(dequantize(quantize(jnp.asarray(x), fmt)), np.float64)[None, 1:]
    nearest = np.repeat(nearest, 256, axis=0)
    assert pooled_sigmas(stochastic, y[1:], low[1:], high[1:]) < SIGMAS
    assert pooled_sigmas(nearest, y[1:], low[1:], high[1:]) > 10 * SIGMAS


@pytest.mark.parametrize(("bits", "signed"), MAPS, ids=MAP_IDS)
def test_stochastic_rounding_keys(bits, signed):
    x = jnp.asarray(heavy_tailed((4, 40), seed=9, signed=signed))
    fmt = jstep.blockwise(bits, 32)
    key = jax.random.key(4)
    a = quantize(x, fmt, signed=signed, key=key)
    b = quantize(x, fmt, signed=signed, key=key)
    c = quantize(x, fmt, signed=signed, key=jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
    assert np.any(np.asarray(a.codes) != np.asarray(c.codes))
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(c.scale))

    # Values at codes (times a power of two, so y = x / s is the code exactly) come back exactly.
    table = code_table(bits, signed)
    exact = jnp.asarray(4.0 * table[np.arange(table.size)[::-1] % table.size])  # 1.0 first: s = 4
    for k in range(3):
        q = quantize(exact, jstep.blockwise(bits, table.size), signed=signed, key=jax.random.key(k))
        np.testing.assert_array_equal(np.asarray(dequantize(q)), np.asarray(exact))


def test_unsigned_values_under_the_smallest_code_are_stored_as_it():
    x = jnp.array([1.0, 0.0, 1e-14, 6e-13, 0.01], jnp.float32)
    for key in (None, jax.random.key(0), jax.random.key(1)):
        values = np.asarray(dequantize(quantize(x, jstep.blockwise(8), signed=False, key=key)))
        np.testing.assert_array_equal(values[1:4], np.float32(1e-12))
        assert values[0] == 1.0


# --------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bits", [3, 16, 0, True, 8.0, "8", None])
def test_blockwise_refuses_bits_other_than_4_or_8(bits):
    with pytest.raises(ValueError, match=re.escape(f"bits must be 4 or 8, got {bits!r}")):
        jstep.blockwise(bits)


@pytest.mark.parametrize(
    ("block_size", "error", "message"),
    [
        (0, ValueError, "block_size must be an int >= 1, got 0"),
        (-4, ValueError, "block_size must be an int >= 1, got -4"),
        (3, ValueError, "block_size must be a positive power of two (64, 128, 256, ...), got 3"),
        (96, ValueError, "block_size must be a positive power of two (64, 128, 256, ...), got 96"),
        (True, TypeError, "block_size must be an int, got bool True"),
        (64.0, TypeError, "block_size must be an int, got float 64.0"),
    ],
)
def test_blockwise_refuses_block_sizes_not_powers_of_two(block_size, error, message):
    with pytest.raises(error, match=re.escape(message)):
        jstep.blockwise(8, block_size)


@pytest.mark.parametrize(
    ("min_size", "error", "message"),
    [
        (-1, ValueError, "min_size must be an int >= 0, got -1"),
        (1.5, TypeError, "min_size must be an int, got float 1.5"),
        ("10", TypeError, "min_size must be an int, got str '10'"),
        (False, TypeError, "min_size must be an int, got bool False"),
    ],
)
def test_blockwise_refuses_bad_min_size(min_size, error, message):
    with pytest.raises(error, match=re.escape(message)):
        jstep.blockwise(8, min_size=min_size)


def test_blockwise_defaults_and_numpy_ints():
    assert jstep.blockwise() == jstep.blockwise(8, 256, min_size=4096)
    assert jstep.blockwise(4).block_size == 128
    assert jstep.blockwise(np.int64(4), np.int32(32), min_size=np.int16(0)) == jstep.blockwise(4, 32, min_size=0)
    assert hash(jstep.blockwise(8)) == hash(jstep.blockwise(8, 256))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.complex64, jnp.bool_])
def test_quantize_refuses_arrays_that_are_not_real_floats(dtype):
    message = f"x must be a real floating array to quantize, got dtype {jnp.dtype(dtype)}"
    with pytest.raises(TypeError, match=re.escape(message)):
        jstep.quantize(jnp.zeros(4, dtype), jstep.blockwise(8))


@pytest.mark.parametrize("fmt", [jnp.float32, 8, "blockwise", None])
def test_quantize_refuses_a_non_format(fmt):
    with pytest.raises(
        TypeError, match=re.escape(f"fmt must be a format from jstep.blockwise(bits, block_size), got {fmt!r}")
    ):
        jstep.quantize(jnp.ones(4), fmt)


@pytest.mark.parametrize("key", [3, jnp.array([1.0, 2.0]), jnp.zeros(3, jnp.uint32)], ids=["int", "float", "uint32x3"])
def test_quantize_refuses_a_bad_key(key):
    with pytest.raises(TypeError, match=r"key must be a JAX random key such as jax.random.key\(0\), got"):
        jstep.quantize(jnp.ones(4), jstep.blockwise(8), key=key)


def test_dequantize_refuses_a_plain_array():
    with pytest.raises(
        TypeError, match=re.escape("q must be a jstep.QuantizedArray (from jstep.quantize) or a tree holding them")
    ):
        jstep.dequantize(jnp.ones(4))


def test_dequantize_of_a_state_tree_reads_each_quantized_leaf_and_keeps_the_others():
    """What a user inspecting a checkpoint writes: jstep.dequantize(state), where the state
    holds quantized leaves, float32 leaves under min_size and a step count."""
    fmt = jstep.blockwise(8, 64)
    opt = jstep.adam(0.1, mu_dtype=fmt, nu_dtype=fmt)
    params = {"w": jnp.ones((64, 80)), "b": jnp.ones(80)}
    grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(0).normal(size=p.shape), jnp.float32), params)
    _, state = opt.update(grads, opt.init(params))
    got = jstep.dequantize(state)
    assert isinstance(got, type(state)) and int(got.count) == 1
    for field in ("mu", "nu"):
        quantized, small = getattr(state, field)["w"], getattr(state, field)["b"]
        assert jstep.quantization.is_quantized(quantized) and not jstep.quantization.is_quantized(small)
        np.testing.assert_array_equal(getattr(got, field)["w"], jstep.dequantize(quantized))
        assert getattr(got, field)["b"] is small


FORMAT = jstep.blockwise(8, 64, min_size=4)
FORMAT_TAKERS = [
    lambda: jstep.adam(1e-3, mu_dtype=FORMAT),
    lambda: jstep.adam(1e-3, nu_dtype=FORMAT),
    lambda: jstep.momentum(0.1, 0.9, accumulator_dtype=FORMAT),
    lambda: jstep.adagrad(0.1, accumulator_dtype=FORMAT),
    lambda: jstep.optax.sgd(0.1, 0.9, accumulator_dtype=FORMAT),
]


@pytest.mark.parametrize("make", FORMAT_TAKERS, ids=["adam-mu", "adam-nu", "momentum", "adagrad", "optax.sgd"])
def test_a_format_on_integer_or_complex_params_is_refused_naming_the_leaf(make):
    optimizer = make()
    with pytest.raises(TypeError, match=re.escape("leaf ['w'] of the tree given to init has dtype int32")):
        optimizer.init({"w": jnp.zeros(8, jnp.int32), "b": jnp.zeros(2)})
    message = (
        "leaf ['w'] of the params has dtype complex64, but a block-wise state format "
        "(jstep.blockwise(bits=8, block_size=64, min_size=4)) holds real values; give None or a floating "
        "dtype as the state dtype (mu_dtype, nu_dtype, accumulator_dtype) of complex params"
    )
    with pytest.raises(TypeError, match=re.escape(message)):
        optimizer.init({"b": jnp.zeros(2), "w": jnp.zeros(8, jnp.complex64)})  # "b" first, float32


# ----------------------------------------------------------------------------- optimizers

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 500, dtype=jnp.float32).reshape(20, 25), "b": jnp.zeros(12)}
MIN_SIZE = 256  # "w" (500 elements) is quantized, "b" stays float32
STEPS = 20
UNSIGNED_FIELDS = {"nu", "sum_of_squares", "e_g", "e_x"}  # averages of squares
OPTAX = {"optax.adam": optax.adam(1e-2), "optax.adamw": optax.adamw(1e-2), "optax.sgd": optax.sgd(0.1, 0.9)}


def gradients(steps=STEPS, seed=0):
    """A fixed sequence over four decades (independent of the params, so both runs see the same)."""
    rng = np.random.default_rng(seed)

    def one(shape):
        size = math.prod(shape)
        return (rng.standard_normal(size) * 10.0 ** rng.uniform(-4, 0, size)).reshape(shape).astype(np.float32)

    return [{"w": jnp.asarray(one((20, 25))), "b": jnp.asarray(one((12,)))} for _ in range(steps)]


OPTIMIZERS = {  # name: fmt -> optimizer, with fmt None for the float32 optimizer
    "adam": lambda f: jstep.adam(1e-2, mu_dtype=f, nu_dtype=f),
    "adamw": lambda f: jstep.adamw(1e-2, mu_dtype=f, nu_dtype=f),
    "scale_by_adam": lambda f: jstep.scale_by_adam(mu_dtype=f, nu_dtype=f),
    "momentum": lambda f: jstep.momentum(0.1, 0.9, accumulator_dtype=f),
    "ema_momentum": lambda f: jstep.ema_momentum(0.1, 0.9, accumulator_dtype=f),
    "rmsprop": lambda f: jstep.rmsprop(1e-2, accumulator_dtype=f),
    "rmsprop_centered_momentum": lambda f: jstep.rmsprop(1e-2, centered=True, momentum=0.9, accumulator_dtype=f),
    "scale_by_rms": lambda f: jstep.scale_by_rms(accumulator_dtype=f),
    "adagrad": lambda f: jstep.adagrad(0.1, accumulator_dtype=f),
    "scale_by_rss": lambda f: jstep.scale_by_rss(accumulator_dtype=f),
    "adadelta": lambda f: jstep.adadelta(accumulator_dtype=f),
    "running_average": lambda f: jstep.running_average(0.9, accumulator_dtype=f),
    "moving_average": lambda f: jstep.moving_average(0.9, debias=True, accumulator_dtype=f),
    "cumulative_average": lambda f: jstep.cumulative_average(accumulator_dtype=f),
    "optax.adam": lambda f: jstep.optax.adam(1e-2, mu_dtype=f),
    "optax.adamw": lambda f: jstep.optax.adamw(1e-2, mu_dtype=f),
    "optax.sgd": lambda f: jstep.optax.sgd(0.1, 0.9, accumulator_dtype=f),
}
FOUR_BIT = ["adam", "rmsprop_centered_momentum", "adadelta", "optax.sgd"]
OPTIMIZER_CASES = [(name, 8) for name in OPTIMIZERS] + [(name, 4) for name in FOUR_BIT]


def field_of(path):
    """The state field a leaf belongs to (the last attribute on its path: mu, nu, trace, ...)."""
    return [entry.name for entry in path if isinstance(entry, jax.tree_util.GetAttrKey)][-1]


def state_arrays(state):
    """{(path, field): leaf} for the state's arrays and QuantizedArrays under a param's name."""
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, QuantizedArray))[0]
    return {
        (jax.tree_util.keystr(path), field_of(path), path[-1].key): leaf
        for path, leaf in flat
        if isinstance(path[-1], jax.tree_util.DictKey)
    }


def dequantized(state):
    return jax.tree.map(
        lambda x: dequantize(x) if isinstance(x, QuantizedArray) else x,
        state,
        is_leaf=lambda x: isinstance(x, QuantizedArray),
    )


def block_scales(q):
    """Each element's block scale, in the value's shape (float64)."""
    scales = np.repeat(np.asarray(q.scale, np.float64), q.layout.block_size)
    return scales[: q.size].reshape(q.shape)


@pytest.mark.parametrize(("name", "bits"), OPTIMIZER_CASES, ids=[f"{n}-{b}bit" for n, b in OPTIMIZER_CASES])
def test_every_state_dtype_takes_a_format_and_each_step_is_float32s_on_the_stored_state(name, bits):
    """Per step t, with S the quantized state before it:
    * the update is the float32 optimizer's update from dequantize(S): the arithmetic is float32
      on the dequantized values, so they agree to a few ulps (the two programs are compiled
      apart), and at step 1, from float32's own initial state, bit for bit (the update uses the
      new averages before they are stored);
    * each new quantized leaf is within round-to-nearest's error (half the step between the
      codes around each value, times the block's scale) of the float32 optimizer's new leaf, its scales are the block
      maxima of that leaf, and the leaves under min_size (float32) agree to a few ulps."""
    fmt = jstep.blockwise(bits, 64 if bits == 8 else 32, min_size=MIN_SIZE)
    quantized, full = OPTIMIZERS[name](fmt), OPTIMIZERS[name](None)
    state = quantized.init(PARAMS)
    reference_state = full.init(PARAMS)
    arrays, reference_arrays = state_arrays(state), state_arrays(reference_state)
    assert jax.tree.structure(dequantized(state)) == jax.tree.structure(reference_state)
    assert arrays.keys() == reference_arrays.keys() and arrays
    for (_, field, param), leaf in arrays.items():
        if param == "w" and not (name in OPTAX and field == "nu"):  # the aliases take mu_dtype only
            assert isinstance(leaf, QuantizedArray), field
            assert leaf.layout == jstep.quantization.Layout(
                (20, 25), bits, fmt.block_size, field not in UNSIGNED_FIELDS
            )
        else:
            assert not isinstance(leaf, QuantizedArray) and leaf.dtype == jnp.float32
            assert leaf.shape == PARAMS[param].shape
    if name in OPTAX:  # Optax's own state classes, QuantizedArray in place of arrays
        assert jax.tree.structure(dequantized(state)) == jax.tree.structure(OPTAX[name].init(PARAMS))

    step, reference_step = jax.jit(quantized.update), jax.jit(full.update)
    first, _ = reference_step(gradients(1)[0], reference_state, PARAMS)
    for t, g in enumerate(gradients()):
        updates, new_state = step(g, state, PARAMS)
        expected, expected_state = reference_step(g, dequantized(state), PARAMS)
        for leaf, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
            # the same float32 arithmetic, compiled apart: a few ulps of the largest update (XLA
            # fuses each differently; m = b1 m + (1 - b1) g can cancel to a value far below them)
            tolerance = 8 * F32_EPS * np.abs(np.asarray(want)).max()
            np.testing.assert_allclose(leaf, want, rtol=8 * F32_EPS, atol=tolerance, err_msg=f"step {t + 1}")
        if t == 0:
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), updates, first)
        reference_arrays = state_arrays(expected_state)
        for key, leaf in state_arrays(new_state).items():
            want = np.asarray(reference_arrays[key], np.float64)
            if not isinstance(leaf, QuantizedArray):
                np.testing.assert_allclose(np.asarray(leaf), want, rtol=8 * F32_EPS)
                continue
            absmax = np.abs(reference_blocks(want, leaf.layout.block_size)).max(1)
            np.testing.assert_allclose(np.asarray(leaf.scale), absmax, rtol=8 * F32_EPS)
            error = np.abs(np.asarray(dequantize(leaf), np.float64) - want)
            scales = block_scales(leaf)
            y = want / np.where(scales > 0, scales, 1)
            bound = (local_error(y, bits, leaf.layout.signed) + 10 * F32_EPS) * scales
            assert np.all(error <= bound), (t + 1, key, (error / np.maximum(bound, 1e-30)).max())
        state = new_state


def seeded_adam(fmt):
    return jstep.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt, rounding_seed=0)


TRACKED = {  # case: (optimizer, bits, stochastic, {field: decay of that average (1 bounds any)})
    "adam-8bit": (OPTIMIZERS["adam"], 8, False, {"mu": 0.9, "nu": 0.999}),
    "adam-4bit": (OPTIMIZERS["adam"], 4, False, {"mu": 0.9, "nu": 0.999}),
    "adam-8bit-stochastic": (seeded_adam, 8, True, {"mu": 0.9, "nu": 0.999}),
    "momentum-8bit": (OPTIMIZERS["momentum"], 8, False, {"velocity": 0.9}),
    "momentum-4bit": (OPTIMIZERS["momentum"], 4, False, {"velocity": 0.9}),
    "adagrad-8bit": (OPTIMIZERS["adagrad"], 8, False, {"sum_of_squares": 1.0}),
    "cumulative_average-4bit": (OPTIMIZERS["cumulative_average"], 4, False, {"average": 1.0}),
}


@pytest.mark.parametrize("case", list(TRACKED))
def test_twenty_steps_track_float32_within_the_accumulated_resolution(case):
    """Over 20 steps the stored average A_t = Q(gamma A_{t-1} + new) differs from float32's by
    e_t = gamma e_{t-1} + r_t with |r_t| <= w s_t (w the map's worst error, s_t the block's scale
    that step): |e_t| <= sum_k gamma^k w s_(t-k), computed from the run's own scales. The signed
    map's w is 0.9 / 128 for 8 bits and 0.15 / 2 for 4; the unsigned maps' is 0.051 (8 bits) and
    (1 - 16^(-1/15)) / 2 = 0.084 (4 bits; both geometric, the widest step the top one);
    stochastic rounding's is a whole step."""
    make, bits, stochastic, decays = TRACKED[case]
    fmt = jstep.blockwise(bits, 64 if bits == 8 else 32, min_size=MIN_SIZE)
    quantized, full = make(fmt), make(None)
    step, reference_step = jax.jit(quantized.update), jax.jit(full.update)
    state, reference_state = quantized.init(PARAMS), full.init(PARAMS)
    bounds = {}
    for t, g in enumerate(gradients()):
        updates, state = step(g, state, PARAMS)
        reference_updates, reference_state = reference_step(g, reference_state, PARAMS)
        reference_arrays = state_arrays(reference_state)
        for key, leaf in state_arrays(state).items():
            if not isinstance(leaf, QuantizedArray):
                continue
            worst = worst_error(bits, leaf.layout.signed, stochastic=stochastic) + 2 * F32_EPS
            bounds[key] = decays[key[1]] * bounds.get(key, 0.0) + worst * block_scales(leaf)
            error = np.abs(np.asarray(dequantize(leaf), np.float64) - np.asarray(reference_arrays[key]))
            assert np.all(error <= bounds[key]), (t + 1, key)
            assert error.max() > 0  # the state is really quantized
        if case.startswith("momentum"):  # the update is -V: the same bound
            error = np.abs(np.asarray(updates["w"], np.float64) - np.asarray(reference_updates["w"]))
            assert np.all(error <= next(b for k, b in bounds.items() if k[1:] == ("velocity", "w"))), t + 1
    if case == "adam-8bit":  # the bound is not vacuous: under a tenth of the largest m
        mu = state_arrays(reference_state)
        key = next(k for k in mu if k[1:] == ("mu", "w"))
        assert bounds[key].max() < 0.1 * np.abs(np.asarray(mu[key])).max()


# ----------------------------------------------------------------------- README's figures


@pytest.mark.parametrize(("bits", "block_size"), [(8, 256), (4, 128), (8, 64)])
def test_bytes_per_parameter_are_codes_plus_four_per_block(bits, block_size):
    """blockwise(8): 1 + 4/256 bytes per element; blockwise(4): 1/2 + 4/128 (README); the issue's
    figures: Adam's two states <= 2.07 bytes per parameter in 8 bits, <= 1.07 in 4, one state <= 1.04."""
    shape = (4, 512)
    q = quantize(jnp.ones(shape), jstep.blockwise(bits, block_size))
    assert q.nbytes / q.size == bits / 8 + 4 / block_size
    fmt = jstep.blockwise(bits, block_size, min_size=q.size)
    state = jax.jit(jstep.adam(1e-3, mu_dtype=fmt, nu_dtype=fmt).init)(jnp.zeros(shape))
    assert isinstance(state, jstep.ScaleByAdamState)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state.mu) + jax.tree.leaves(state.nu))
    assert state_bytes / q.size == 2 * (bits / 8 + 4 / block_size)
    if block_size == jstep.blockwise(bits).block_size:  # the defaults
        assert state_bytes / q.size <= (2.07 if bits == 8 else 1.07)
        velocity = jax.jit(jstep.momentum(0.1, 0.9, accumulator_dtype=fmt).init)(jnp.zeros(shape)).velocity
        assert velocity.nbytes / q.size <= (1.04 if bits == 8 else 0.54)


def test_a_quantized_array_refuses_arithmetic_and_conversion_and_points_to_dequantize():
    """A NamedTuple would silently concatenate (q + x), repeat (q * 2) or become an object array;
    a QuantizedArray says what it holds and what gives the values."""
    q = jstep.quantize(jnp.linspace(-1.0, 1.0, 300), jstep.blockwise(8))
    for misuse in (
        lambda: q + 1,
        lambda: 1 + q,
        lambda: q * 2,
        lambda: 2 * q,
        lambda: q - q,
        lambda: q / 2,
        lambda: -q,
        lambda: np.asarray(q),
        lambda: jnp.asarray(q),
        lambda: jnp.sum(q),
    ):
        with pytest.raises(TypeError, match=r"jstep\.dequantize\(q\)"):
            misuse()
    assert len(q) == 3 and q.shape == (300,)  # still a NamedTuple of (codes, scale, layout)
    assert jnp.array_equal(jax.jit(jstep.dequantize)(q), jstep.dequantize(q))
