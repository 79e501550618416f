"""The codes chosen by block-wise quantization, against a brute-force search of the code table,
and the compiled quantized Adam step's memory (no float32 copy of a state leaf)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstep
from jstep import quantization

MAPS = [(8, True), (8, False), (4, True), (4, False)]


def _edge_values(bits: int, signed: bool, rng: np.random.Generator) -> np.ndarray:
    """Codes, midpoints between neighbouring codes and the float32 values on either side of
    them, random values over the map's decades, 0, 1 and values below the smallest code."""
    table = quantization.code_table(bits, signed).astype(np.float64)
    midpoints = (table[:-1] + table[1:]) / 2
    random = np.concatenate([rng.uniform(-1, 1, 3000), 10.0 ** rng.uniform(-14, 0, 3000) * rng.choice([-1, 1], 3000)])
    y = np.concatenate([table, midpoints, random, [0.0, 1.0, -1.0, 1e-30, -1e-30]]).astype(np.float32)
    y = np.concatenate([y, np.nextafter(y, np.float32(2)), np.nextafter(y, np.float32(-2))])
    y = np.clip(y, -1, 1).astype(np.float32)
    return y if signed else np.abs(y)


@pytest.mark.parametrize(("bits", "signed"), MAPS)
def test_round_to_nearest_is_the_nearest_code(bits, signed):
    y = _edge_values(bits, signed, np.random.default_rng(bits + signed))
    codes = np.asarray(jax.jit(lambda v: quantization._codes(v, bits, signed, None))(jnp.asarray(y)))
    table = quantization.code_table(bits, signed).astype(np.float64)
    distance = np.abs(table[codes] - y.astype(np.float64))
    nearest = np.min(np.abs(table[None, :] - y.astype(np.float64)[:, None]), axis=1)
    assert np.array_equal(distance, nearest)  # ties either way; every other code is farther


@pytest.mark.parametrize(("bits", "signed"), MAPS)
def test_stochastic_rounding_picks_a_neighbour_with_the_unbiased_probability(bits, signed):
    rng = np.random.default_rng(7)
    table = quantization.code_table(bits, signed).astype(np.float64)
    low_end = table[0] if not signed else -1.0
    y = rng.uniform(low_end, 1, 6).astype(np.float32)
    draws = 40_000
    uniform = jax.random.uniform(jax.random.key(3), (y.size, draws))
    values = jnp.broadcast_to(jnp.asarray(y)[:, None], (y.size, draws))
    codes = np.asarray(jax.jit(lambda v, u: quantization._codes(v, bits, signed, u))(values, uniform))
    below = np.array([table[table <= v].max() for v in y.astype(np.float64)])
    above = np.array([table[table >= v].min() for v in y.astype(np.float64)])
    drawn = table[codes]
    assert ((drawn == below[:, None]) | (drawn == above[:, None])).all()
    gap = np.where(above > below, above - below, 1.0)
    # The mean of 40000 draws of a two-point distribution: within 5 standard errors (<= 0.0125 gaps).
    np.testing.assert_array_less(np.abs(drawn.mean(axis=1) - y) / gap, 5 * 0.5 / np.sqrt(draws))


@pytest.mark.parametrize("bits", [8, 4])
def test_the_compiled_adam_step_holds_no_float32_copy_of_a_state_leaf(bits):
    size = 1 << 16
    params = jnp.zeros(size)
    optimizer = jstep.adam(1e-3, mu_dtype=jstep.blockwise(bits), nu_dtype=jstep.blockwise(bits))

    def step(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, optimizer.init(params), params).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    assert analysis.temp_size_in_bytes < 4 * size  # a float32 copy of m or v is 4 * size bytes
