"""Block-wise quantization at its edges, against the float64 reference of quantization_reference.py:
blocks whose largest magnitude is near float32's largest, empty arrays, 4-bit codes packed along
an axis other than the last, arrays that do not match their layout, and blocks holding inf or NaN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
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

HUGE_SCALES = [2.0**126, 1e38, 2.0**127, float(np.finfo(np.float32).max)]


@pytest.mark.parametrize(("bits", "signed"), MAPS, ids=MAP_IDS)
def test_blocks_with_scales_up_to_float32_max_round_trip_as_the_reference(bits, signed):
    """1 / s is subnormal for s > 2^126: computed as x * (1 / s), such a block's y was 0."""
    block_size = 16
    scales = [1.0, *HUGE_SCALES, 1e-20]
    x = on_codes((len(scales) * block_size,), bits, signed, scales, block_size, seed=bits + signed)
    q = quantize(jnp.asarray(x), jstep.blockwise(bits, block_size), signed=signed)
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(scales, np.float32))
    expected = reference_values(x, bits, signed, block_size)
    np.testing.assert_allclose(np.asarray(dequantize(q), np.float64), expected, rtol=F32_EPS, atol=0)
    np.testing.assert_array_equal(np.asarray(dequantize(q))[::block_size], np.asarray(scales, np.float32))


def test_adagrad_accumulates_gradients_of_1e19_in_eight_and_four_bits():
    """G = sum g^2 reaches 3e38, still finite: its steps are float32 state's, -g / sqrt(G)."""
    params = jnp.zeros(256)
    grads = jnp.full(256, 1e19).at[1].set(1.0)
    expected = [-1.0, -(2**-0.5), -(3**-0.5)]
    for bits in (8, 4):
        opt = jstep.adagrad(1.0, accumulator_dtype=jstep.blockwise(bits, min_size=0))
        state = opt.init(params)
        for t in range(3):
            updates, state = opt.update(grads, state, params)
            np.testing.assert_allclose(float(updates[0]), expected[t], rtol=4 * F32_EPS)
