"""Stochastic rounding and low-precision updates, against neighbours and sums computed independently.

The two neighbours of each value come from ml_dtypes' and NumPy's casts and ``nextafter``; the
expected means from float64 arithmetic. Statistical checks use fixed keys (so they are
deterministic) and bounds of 6 binomial standard deviations, which a correct rounding would
miss with probability about 2e-9 for any other key.
"""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import jstep

from harness import run_on_eight_devices

SIGMAS = 6.0
PAIRS = [(np.float32, ml_dtypes.bfloat16), (np.float32, np.float16), (np.float64, np.float32)]
PAIR_IDS = ["float32->bfloat16", "float32->float16", "float64->float32"]


@pytest.fixture(params=range(len(PAIRS)), ids=PAIR_IDS)
def pair(request):
    """(source, target) dtypes; float64 sources run with jax_enable_x64."""
    source, target = PAIRS[request.param]
    if source == np.float64:
        with jax.enable_x64(True):
            yield source, target
    else:
        yield source, target


def neighbours(x, target):
    """(lo, hi) in float64: the largest value of `target` <= x and the smallest >= x (NumPy/ml_dtypes)."""
    nearest = x.astype(target)
    with np.errstate(over="ignore"):  # the largest value's upper neighbour is inf
        up = np.nextafter(nearest, np.array(np.inf, target))
        down = np.nextafter(nearest, np.array(-np.inf, target))
    nearest64, x64 = nearest.astype(np.float64), x.astype(np.float64)
    lo = np.where(nearest64 <= x64, nearest64, down.astype(np.float64))
    hi = np.where(nearest64 >= x64, nearest64, up.astype(np.float64))
    return lo, hi


def grid_values(target, source, rng, count=20000):
    """Values of `source` that exercise `target`'s whole range: log-uniform magnitudes from below its
    smallest subnormal to its largest value, both signs, exact grid values, 0, and the extremes."""
    info = ml_dtypes.finfo(target)
    low = np.log2(float(info.smallest_subnormal)) - 4
    high = np.log2(float(info.max))
    magnitudes = 2.0 ** rng.uniform(low, high, count)
    signs = rng.choice([-1.0, 1.0], count)
    on_grid = (signs * magnitudes).astype(target).astype(np.float64)[: count // 10]
    extremes = [0.0, float(info.max), -float(info.max), float(info.smallest_subnormal), float(info.smallest_normal)]
    values = np.concatenate([signs * magnitudes, on_grid, extremes]).astype(source)
    return values[np.abs(values.astype(np.float64)) <= float(info.max)]


def rounded(x, target, key):
    return np.asarray(jstep.stochastic_round(jnp.asarray(x), jnp.dtype(target), key)).astype(np.float64)


# -------------------------------------------------------------------------- the neighbours


def test_only_the_two_neighbours_ever_appear(pair):
    source, target = pair
    x = grid_values(target, source, np.random.default_rng(0))
    lo, hi = neighbours(x, target)
    x64 = x.astype(np.float64)
    for seed in range(3):
        got = rounded(x, target, jax.random.key(seed))
        assert np.all((got == lo) | (got == hi)), x[(got != lo) & (got != hi)][:5]
        on_grid = lo == hi
        np.testing.assert_array_equal(got[on_grid], x64[on_grid])  # exact values are not rounded
        assert np.all(np.signbit(got[x64 != 0]) == np.signbit(x64[x64 != 0]))


def test_both_neighbours_are_used_across_the_range(pair):
    """Values strictly between two neighbours go each way somewhere (it is not a fixed rounding)."""
    source, target = pair
    x = grid_values(target, source, np.random.default_rng(1))
    lo, hi = neighbours(x, target)
    between = lo != hi
    got = rounded(x, target, jax.random.key(7))[between]
    nearest = x[between].astype(target).astype(np.float64)
    assert 0.2 < np.mean(got == hi[between]) < 0.8
    assert 0.1 < np.mean(got != nearest) < 0.5  # rounds away from the nearest value, often


def cases(target, source):
    """(x, lo, hi) cases across the range: x = lo + p (hi - lo) for several lo and fractions p."""
    info = ml_dtypes.finfo(target)
    dropped = ml_dtypes.finfo(source).nmant - info.nmant  # bits below target's last bit, normal range
    tiny, normal, big = (float(v) for v in (info.smallest_subnormal, info.smallest_normal, info.max))
    lows = [1.0, -3.0, 1e-3, tiny * 5, -normal * 1.5, big / 3]
    fractions = [2.0**-dropped, 0.25, 0.5, 0.8125, 1 - 2.0**-dropped]
    out = []
    for low in lows:
        lo = np.float64(np.array(low).astype(target))
        hi = np.float64(np.nextafter(np.array(lo, target), np.array(np.copysign(np.inf, lo), target)))
        for p in fractions:
            x = np.array(lo + p * (hi - lo)).astype(source)
            out.append((x, lo, hi))
    return out


def test_unbiased_within_six_binomial_sigmas(pair):
    """N copies of x: the number rounded away from lo is Binomial(N, p), p = (x - lo)/(hi - lo)."""
    source, target = pair
    n = 1 << 15
    for index, (x, lo, hi) in enumerate(cases(target, source)):
        p = (np.float64(x) - lo) / (hi - lo)
        assert 0 < p < 1
        got = rounded(np.full(n, x, source), target, jax.random.key(100 + index))
        assert np.all((got == lo) | (got == hi))
        away = np.sum(got == hi)
        sigma = np.sqrt(n * p * (1 - p))
        assert abs(away - n * p) <= SIGMAS * sigma + 1, (x, lo, hi, p, away / n)
        # The mean, in the units of the value: E[round(x)] = x.
        assert abs(np.mean(got) - np.float64(x)) <= (SIGMAS * sigma + 1) / n * abs(hi - lo)


# Every pair that rounds: a source of more mantissa bits than its target.
ALL_PAIRS = [
    (np.float64, np.float32),
    (np.float64, np.float16),
    (np.float64, ml_dtypes.bfloat16),
    (np.float64, ml_dtypes.float8_e4m3fn),
    (np.float32, ml_dtypes.bfloat16),
    (np.float32, np.float16),
    (np.float32, ml_dtypes.float8_e4m3fn),
    (np.float32, ml_dtypes.float8_e5m2),
    (np.float16, ml_dtypes.bfloat16),
    (np.float16, ml_dtypes.float8_e4m3fn),
    (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn),
    (ml_dtypes.bfloat16, ml_dtypes.float8_e5m2),
]
PROBABILITY_SAMPLES = 1 << 20
PROBABILITY_SIGMAS = 5.0


def probability_cases(source, target):
    """(x, lo, hi) with x = lo + p (hi - lo) exactly in `source`, for p in 1/8, 1/2, 3/4 and lo
    across the range both dtypes hold: 1, -3, a negative normal value near the smallest, a
    subnormal of `target`, and a third of the largest value (cases `source` cannot hold exactly,
    such as bfloat16's subnormals for a float16 source, are left out)."""
    info, source_info = ml_dtypes.finfo(target), ml_dtypes.finfo(source)
    tiny = float(info.smallest_subnormal)
    normal = max(float(info.smallest_normal), float(source_info.smallest_normal))
    big = min(float(info.max), float(source_info.max))
    out = []
    for low in (1.0, -3.0, -normal * 1.5, tiny * 5, big / 3):
        lo = np.float64(np.array(low).astype(target))
        # Towards the largest value of lo's sign (float8_e4m3fn has no infinity).
        hi = np.float64(np.nextafter(np.array(lo, target), np.array(np.copysign(float(info.max), lo), target)))
        for p in (0.125, 0.5, 0.75):
            x = lo + p * (hi - lo)
            with np.errstate(over="ignore"):  # float16 cannot hold bfloat16's subnormals
                exact = np.float64(np.array(x).astype(source)) == x
            if exact:
                out.append((x, lo, hi))
    return out


@pytest.mark.parametrize(
    ("source", "target"), ALL_PAIRS, ids=[f"{np.dtype(s).name}->{np.dtype(t).name}" for s, t in ALL_PAIRS]
)
def test_rounding_probability_is_right_within_half_a_percent(source, target):
    """P(round(x) = hi) = p = (x - lo)/(hi - lo), to 0.005, for every pair of dtypes that rounds.

    Each case rounds N = 2^20 copies of x; the count rounded up is Binomial(N, p) for a correct
    rounding, with sigma = sqrt(N p (1 - p)) <= 2^9. The bound is 5 sigma (with fixed keys the
    test is deterministic; for another key a correct rounding would exceed it with probability
    6e-7 per case). A bias delta in the probability moves the count by N delta, which is
    delta sqrt(N) / sqrt(p (1 - p)) >= 2 delta 2^10 sigma: for delta = 0.005, at least 10.2
    sigma, so a biased rounding stays inside the bound only if its own noise is 5.2 sigma
    below its mean (probability 1e-7). A relative bias of 0.5% (p -> 1.005 p) moves every case
    the same way: the pooled count over the K cases, sum (count - N p) / sqrt(sum N p (1 - p)),
    is off by 0.005 sqrt(N) sum p / sqrt(sum p (1 - p)) >= 8 sigma here, against the same 5.
    """
    cases = probability_cases(source, target)
    assert len(cases) >= 9
    x = np.array([case[0] for case in cases])
    lo, hi = (np.array([case[i] for case in cases]) for i in (1, 2))
    p = (x - lo) / (hi - lo)
    with jax.enable_x64(source == np.float64):

        @jax.jit
        def counts_up(x, lo, hi, key):
            copies = jnp.broadcast_to(x[:, None], (x.shape[0], PROBABILITY_SAMPLES))
            # Compared as bit patterns: XLA:CPU flushes subnormal operands of a float comparison to 0.
            bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(target).itemsize]
            got, lo, hi = (
                jax.lax.bitcast_convert_type(v, bits)
                for v in (jstep.stochastic_round(copies, jnp.dtype(target), key), lo[:, None], hi[:, None])
            )
            up = got == hi
            return jnp.sum(up, axis=1), jnp.all(up | (got == lo))

        index = ALL_PAIRS.index((source, target))
        up, only_neighbours = counts_up(
            jnp.asarray(x, source), jnp.asarray(lo, target), jnp.asarray(hi, target), jax.random.key(1000 + index)
        )
    up = np.asarray(up, np.float64)
    assert bool(only_neighbours)
    n = PROBABILITY_SAMPLES
    sigma = np.sqrt(n * p * (1 - p))
    z = (up - n * p) / sigma
    assert np.all(np.abs(z) <= PROBABILITY_SIGMAS), list(zip(x, p, up / n, z, strict=True))
    pooled = np.sum(up - n * p) / np.sqrt(np.sum(sigma**2))
    assert abs(pooled) <= PROBABILITY_SIGMAS, pooled


def test_neighbouring_elements_round_independently():
    """At p = 1/2, the pairs (element i, element i+1) come out up-up a quarter of the time."""
    n = 1 << 16
    x = np.full(n, 1.0 + 2.0**-8, np.float32)  # halfway between bfloat16's 1 and 1 + 2^-7
    up = rounded(x, ml_dtypes.bfloat16, jax.random.key(3)) > 1
    for lag in (1, 2, 256):
        both = np.sum(up[:-lag] & up[lag:])
        pairs = n - lag
        assert abs(both - pairs / 4) <= SIGMAS * np.sqrt(pairs * 3 / 16)


def test_same_key_same_result_and_keys_differ():
    x = jnp.linspace(1.0, 2.0, 4097, dtype=jnp.float32)
    a = jstep.stochastic_round(x, jnp.bfloat16, jax.random.key(0))
    b = jax.jit(jstep.stochastic_round, static_argnums=1)(x, jnp.bfloat16, jax.random.key(0))
    c = jstep.stochastic_round(x, jnp.bfloat16, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert np.mean(np.asarray(a, np.float32) != np.asarray(c, np.float32)) > 0.2
    raw = jstep.stochastic_round(x, jnp.bfloat16, jax.random.PRNGKey(0))  # a raw key works too
    assert raw.dtype == jnp.bfloat16 and raw.shape == x.shape


@pytest.mark.parametrize("target", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_non_finite_and_out_of_range_values_are_cast_as_usual(target):
    info = jnp.finfo(target)
    big = float(info.max)
    # The midpoint between the largest value and the next power of two (a tie: the cast gives inf),
    # and NaNs whose payload is in bits bfloat16 drops.
    halfway = 65520.0 if target == jnp.float16 else float(np.array(0x7F7F8000, np.uint32).view(np.float32))
    low_nans = list(np.array([0x7F800001, 0xFFFFFFFF], np.uint32).view(np.float32))
    x = np.array(
        [np.inf, -np.inf, np.nan, -np.nan, big, -big, big * 1.003, -big * 1.003, 3.4e38, halfway, -halfway, 0.0, -0.0],
        np.float32,
    )
    x = np.concatenate([x, np.array(low_nans, np.float32)])
    got = np.asarray(jstep.stochastic_round(jnp.asarray(x), target, jax.random.key(0))).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # the casts of inf and NaN are what is compared
        want = x.astype(ml_dtypes.bfloat16 if target == jnp.bfloat16 else np.float16).astype(np.float64)
    np.testing.assert_array_equal(got, want)  # NaN == NaN here, and the signs of zero ...
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # ... checked separately


def test_a_cast_that_cannot_round_is_the_plain_cast():
    x = jnp.asarray(np.random.default_rng(2).normal(size=100), jnp.bfloat16)
    for target in (jnp.bfloat16, jnp.float32):
        got = jstep.stochastic_round(x, target, jax.random.key(0))
        assert got.dtype == target
        np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(x, np.float64))


def test_any_shape_and_vmap_over_keys():
    x = jnp.full((3, 1, 5, 7), 1.0 + 2.0**-9, jnp.float32)
    assert jstep.stochastic_round(x, jnp.bfloat16, jax.random.key(0)).shape == (3, 1, 5, 7)
    assert jstep.stochastic_round(jnp.float32(1.25), jnp.bfloat16, jax.random.key(0)) == 1.25
    keys = jax.random.split(jax.random.key(0), 64)
    batched = jax.vmap(lambda k: jstep.stochastic_round(x[0, 0, 0, 0], jnp.bfloat16, k))(keys)
    assert 0 < int(jnp.sum(batched > 1)) < 64  # each key draws its own bits


# --------------------------------------------------------------------- the two failures


def test_bfloat16_average_decays_like_float32_where_round_to_nearest_is_stuck():
    """C_t = 0.999 C_{t-1} + 0.001 * 0 from C_0 = 1 (v after its peak, gradients now 0), 2000 steps.

    float64: 0.999^t. Round-to-nearest bfloat16: 0.999 C rounds back to C = 1 forever. Stochastic:
    each step is unbiased, so E[C_t] = 0.999^t; each rounding adds a variance of at most
    ulp^2/4 <= (2^-7 C)^2/4 <= 2^-16 (C <= 1), so the mean over n elements has a standard
    deviation of at most sqrt(T 2^-16 / n).
    """
    steps, n, gamma = 2000, 1 << 14, 0.999
    zeros = jnp.zeros(n, jnp.float32)

    @jax.jit
    def run(key):
        def step(carry, t):
            nearest, stochastic, single = carry
            new = jstep.running_average_update(
                (nearest, stochastic.astype(jnp.float32), single), (zeros, zeros, zeros), gamma
            )
            # running_average_update keeps each average's dtype: nearest stays bfloat16 (rounded
            # to nearest), the stochastic one is formed in float32 and rounded here.
            rounded = jstep.stochastic_round(new[1], jnp.bfloat16, jax.random.fold_in(key, t))
            return (new[0], rounded, new[2]), (jnp.mean(rounded.astype(jnp.float32)), new[2][0])

        start = (jnp.ones(n, jnp.bfloat16), jnp.ones(n, jnp.bfloat16), jnp.ones(n, jnp.float32))
        return jax.lax.scan(step, start, jnp.arange(steps))

    (nearest, _, _), (means, single) = run(jax.random.key(0))
    exact = gamma ** np.arange(1, steps + 1)
    assert np.all(np.asarray(nearest, np.float32) == 1.0)  # stuck
    np.testing.assert_allclose(single, exact, rtol=1e-4)  # float32 decays
    bound = SIGMAS * np.sqrt(np.arange(1, steps + 1) * 2.0**-16 / n)
    assert np.all(np.abs(np.asarray(means, np.float64) - exact) <= bound)
    assert exact[-1] < 0.14  # it did have to fall from 1


def test_small_steps_accumulate_with_a_key_and_vanish_without():
    """W = 1 in bfloat16 plus 1e-4 per step (a twentieth of an ulp), 1000 steps: float64 says 1.1."""
    steps, n, step_size = 1000, 1 << 12, 1e-4
    params = {"w": jnp.ones(n, jnp.bfloat16), "f32": jnp.ones(n, jnp.float32)}
    updates = jax.tree.map(lambda p: jnp.full(p.shape, step_size, p.dtype), params)

    @jax.jit
    def run(key):
        def step(carry, t):
            nearest, stochastic = carry
            return (
                jstep.apply_updates(nearest, updates),
                jstep.apply_updates(stochastic, updates, key=jax.random.fold_in(key, t)),
            ), None

        return jax.lax.scan(step, (params, params), jnp.arange(steps))[0]

    nearest, stochastic = run(jax.random.key(0))
    expected = 1 + steps * np.float64(np.float32(step_size))
    assert np.all(np.asarray(nearest["w"], np.float32) == 1.0)  # every step lost
    # ulp <= 2^-7 on [1, 2): variance per step <= 2^-16, per element after T steps <= T 2^-16.
    mean = np.mean(np.asarray(stochastic["w"], np.float64))
    assert abs(mean - expected) <= SIGMAS * np.sqrt(steps * 2.0**-16 / n)
    # float32 params are not touched by the key: the same bits as Optax's sum.
    reference = params["f32"]
    for _ in range(steps):
        reference = optax.apply_updates(reference, updates["f32"])
    np.testing.assert_array_equal(stochastic["f32"], reference)
    np.testing.assert_array_equal(nearest["f32"], reference)


# --------------------------------------------------------------------------- apply_updates


def test_apply_updates_matches_optax_for_float32_and_rounds_the_float32_sum_otherwise():
    rng = np.random.default_rng(4)
    params = {
        "f32": jnp.asarray(rng.normal(size=(7, 3)), jnp.float32),
        "bf16": jnp.asarray(rng.normal(size=300), jnp.bfloat16),
        "none": None,
    }
    updates = {
        "f32": jnp.asarray(rng.normal(size=(7, 3)) * 1e-3, jnp.float32),
        "bf16": jnp.asarray(rng.normal(size=300) * 1e-3, jnp.bfloat16),
        "none": None,
    }
    plain = jstep.apply_updates(params, updates)
    keyed = jstep.apply_updates(params, updates, key=jax.random.key(0))
    expected = optax.apply_updates(params, updates)
    assert plain["none"] is None and keyed["none"] is None
    np.testing.assert_array_equal(plain["f32"], expected["f32"])
    np.testing.assert_array_equal(keyed["f32"], expected["f32"])
    # bfloat16: the sum formed in float32, then rounded to nearest (no key) or to a neighbour (key).
    total = np.asarray(params["bf16"], np.float32) + np.asarray(updates["bf16"], np.float32)
    np.testing.assert_array_equal(np.asarray(plain["bf16"]), total.astype(ml_dtypes.bfloat16))
    lo, hi = neighbours(total, ml_dtypes.bfloat16)
    got = np.asarray(keyed["bf16"], np.float64)
    assert keyed["bf16"].dtype == jnp.bfloat16 and np.all((got == lo) | (got == hi))
    assert np.any(got != np.asarray(plain["bf16"], np.float64))


def test_apply_updates_rounds_float16_params_stochastically():
    """float16 params, W = 1 + u with u a tenth of float16's ulp at 1 (2^-10): round-to-nearest
    keeps 1; with a key each element becomes 1 + 2^-10 with probability p = u / 2^-10 (computed in
    float64 from the float32 sum), so the count of those is Binomial(N, p), within 5 sigma."""
    n = 1 << 16
    params = {"w": jnp.ones(n, jnp.float16), "b": jnp.full(n, -2.0, jnp.float16)}
    updates = {"w": jnp.full(n, 1e-4, jnp.float32), "b": jnp.full(n, -3e-4, jnp.float32)}
    nearest = jstep.apply_updates(params, updates)
    keyed = jstep.apply_updates(params, updates, key=jax.random.key(11))
    for name in params:
        assert nearest[name].dtype == keyed[name].dtype == jnp.float16
        start = np.asarray(params[name], np.float64)
        np.testing.assert_array_equal(np.asarray(nearest[name], np.float64), start)  # the step is lost
        total = np.asarray(params[name], np.float32) + np.asarray(updates[name], np.float32)
        lo, hi = neighbours(total, np.float16)
        p = (total.astype(np.float64) - lo) / (hi - lo)  # one value: every element is the same
        got = np.asarray(keyed[name], np.float64)
        assert np.all((got == lo) | (got == hi))
        away = np.sum(got == hi)
        assert 0.05 < p[0] < 0.95  # strictly between the neighbours
        assert abs(away - n * p[0]) <= 5 * np.sqrt(n * p[0] * (1 - p[0])), (name, away / n, p[0])


def test_apply_updates_gives_each_leaf_its_own_bits():
    """Leaves of one shape and value round independently: each element rounds up with p = 1/4, so
    two leaves differ at 2 p (1 - p) = 3/8 of the elements (within 5 standard deviations); leaf
    0 draws the bits `stochastic_round` draws with the same key."""
    n = 1000
    x = jnp.full(n, 1.0, jnp.bfloat16)
    u = jnp.full(n, 2.0**-9, jnp.float32)  # a quarter of the way from 1 to the next bfloat16, 1 + 2^-7
    out = jstep.apply_updates([x, x, x], [u, u, u], key=jax.random.key(0))
    first, second, third = (np.asarray(leaf, np.float32) for leaf in out)
    differ = 2 * 0.25 * 0.75
    for a, b in ((first, second), (first, third), (second, third)):
        assert abs(np.mean(a != b) - differ) <= 5 * np.sqrt(differ * (1 - differ) / n)
    single = jstep.stochastic_round(x.astype(jnp.float32) + u, jnp.bfloat16, jax.random.key(0))
    np.testing.assert_array_equal(first, np.asarray(single, np.float32))


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((jnp.ones(3), jnp.int8, jax.random.key(0)), "dtype must be a real floating dtype"),
        ((jnp.ones(3), jnp.complex64, jax.random.key(0)), "dtype must be a real floating dtype"),
        ((jnp.ones(3), "not a dtype", jax.random.key(0)), "dtype must be a floating dtype"),
        ((jnp.arange(3), jnp.bfloat16, jax.random.key(0)), "x's dtype must be a real floating dtype, got int32"),
        ((jnp.ones(3, jnp.complex64), jnp.bfloat16, jax.random.key(0)), "got complex64"),
        ((jnp.ones(3), jnp.bfloat16, 0), "key must be a JAX random key such as jax.random.key(0), got int 0"),
        ((jnp.ones(3), jnp.bfloat16, jnp.zeros(2)), "got an array of dtype float32 and shape (2,)"),
        ((jnp.ones(3), jnp.bfloat16, jax.random.split(jax.random.key(0), 3)), "a batch of keys of shape (3,)"),
    ],
)
def test_bad_input_raises_a_clear_type_error(args, message):
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        jstep.stochastic_round(*args)


def test_apply_updates_leaves_a_param_without_update_as_it_is():
    """A None update (a frozen part of an Equinox model) keeps its param, as eqx.apply_updates
    does, with and without a key; the other leaves step as usual."""
    params = {"w": jnp.ones(3, jnp.bfloat16), "frozen": jnp.full(3, 2.0, jnp.bfloat16), "static": None}
    updates = {"w": jnp.full(3, 0.5), "frozen": None, "static": None}
    for key in (None, jax.random.key(0)):
        new = jstep.apply_updates(params, updates, key=key)
        assert new["frozen"] is params["frozen"] and new["static"] is None
        np.testing.assert_array_equal(new["w"], jnp.full(3, 1.5, jnp.bfloat16))


def test_apply_updates_bad_key():
    with pytest.raises(TypeError, match="key must be a JAX random key"):
        jstep.apply_updates({"w": jnp.ones(2, jnp.bfloat16)}, {"w": jnp.ones(2)}, key=3)


# ------------------------------------------------------------------- optimizer state dtypes

BF16 = jnp.dtype(jnp.bfloat16)
PARAMS = {"dense": {"w": jnp.ones((5, 3)), "b": jnp.ones(3)}, "conv": [jnp.ones((2, 3, 2))], "scale": jnp.ones(())}
PARAM_COUNT = 15 + 3 + 12 + 1

# name -> (factory taking the state-dtype keywords, parameter-sized state arrays, step counters)
STATEFUL = {
    "running_average": (lambda **k: jstep.running_average(0.9, **k), 1, 1),
    "moving_average": (lambda **k: jstep.moving_average(0.9, debias=True, **k), 1, 1),
    "cumulative_average": (jstep.cumulative_average, 1, 1),
    "momentum": (lambda **k: jstep.momentum(0.05, 0.9, **k), 1, 1),
    "ema_momentum": (lambda **k: jstep.ema_momentum(0.5, 0.9, **k), 1, 1),
    "rmsprop": (lambda **k: jstep.rmsprop(0.01, 0.9, **k), 1, 1),
    "rmsprop_centered_momentum": (lambda **k: jstep.rmsprop(0.01, 0.9, centered=True, momentum=0.9, **k), 3, 2),
    "scale_by_rms": (lambda **k: jstep.scale_by_rms(0.9, **k), 1, 1),
    "adagrad": (lambda **k: jstep.adagrad(0.1, **k), 1, 1),
    "scale_by_rss": (jstep.scale_by_rss, 1, 1),
    "adadelta": (lambda **k: jstep.adadelta(1.0, 0.9, **k), 2, 1),
    "adam": (lambda **k: jstep.adam(0.01, **_adam_dtypes(k)), 2, 1),
    "adamw": (lambda **k: jstep.adamw(0.01, weight_decay=0.1, **_adam_dtypes(k)), 2, 1),
    "scale_by_adam": (lambda **k: jstep.scale_by_adam(**_adam_dtypes(k)), 2, 1),
}


def _adam_dtypes(keywords):
    """Adam keeps mu_dtype/nu_dtype: accumulator_dtype=d means both."""
    keywords = dict(keywords)
    dtype = keywords.pop("accumulator_dtype", None)
    return {"mu_dtype": dtype, "nu_dtype": dtype, **keywords}


def gradients(seed, steps, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), dtype), PARAMS) for _ in range(steps)]


@pytest.mark.parametrize("name", STATEFUL)
def test_state_is_stored_in_the_dtype_asked_for_with_exactly_its_bytes(name):
    make, arrays, counters = STATEFUL[name]
    opt = make(accumulator_dtype=jnp.bfloat16, rounding_seed=0)
    state = opt.init(PARAMS)
    _, state = jax.jit(opt.update)(gradients(0, 1)[0], state, PARAMS)
    leaves = jax.tree.leaves(state)
    floats = [leaf for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert {leaf.dtype for leaf in floats} == {BF16}
    assert sum(leaf.nbytes for leaf in leaves) == arrays * PARAM_COUNT * 2 + counters * 4
    wide = make()
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(wide.init(PARAMS))) == arrays * PARAM_COUNT * 4 + counters * 4


@pytest.mark.parametrize("name", STATEFUL)
def test_bfloat16_state_is_a_neighbour_of_the_float32_state(name):
    """The values, not only the dtypes: after one step from the zero state, each bfloat16 state
    value stored with `rounding_seed` is one of the two bfloat16 neighbours of the float32
    optimizer's state value (the same step unrounded), and both neighbours occur."""
    make, _, _ = STATEFUL[name]
    grads = gradients(5, 1)[0]
    narrow, wide = make(accumulator_dtype=jnp.bfloat16, rounding_seed=0), make()
    _, narrow_state = narrow.update(grads, narrow.init(PARAMS), PARAMS)
    _, wide_state = wide.update(grads, wide.init(PARAMS), PARAMS)
    pairs = [
        (np.asarray(x, np.float64).ravel(), np.asarray(y, np.float32).ravel())
        for x, y in zip(jax.tree.leaves(narrow_state), jax.tree.leaves(wide_state), strict=True)
        if x.dtype == BF16
    ]
    got, exact = (np.concatenate([pair[i] for pair in pairs]) for i in (0, 1))
    lo, hi = neighbours(exact, ml_dtypes.bfloat16)
    assert np.all((got == lo) | (got == hi)), (got, exact)
    between = lo != hi
    assert np.any(got[between] == lo[between]) and np.any(got[between] == hi[between])


def jitted_run(opt, state, grads, params=PARAMS):
    """Updates and final state of `opt` over `grads`, one jitted step per gradient."""
    update = jax.jit(opt.update)
    outputs = []
    for g in grads:
        updates, state = update(g, state, params)
        outputs.append(updates)
    return outputs, state


def assert_same_rounding(updates, reference_updates, state, reference_state):
    """Two runs that use the same keys on values equal up to float32 round-off (another program's
    fusion and order): the bfloat16 states agree bit for bit wherever that round-off did not move
    a value across a rounding threshold, and everywhere within one bfloat16 ulp; the updates
    agree closely. A relative difference d crosses a threshold with probability about d / 2^-8
    per rounding (inject_hyperparams' 1 - b2, one float32 ulp off: d ~ 6e-5, 1.5% of v's
    roundings), so the states agree at >= 95% of the entries; with another seed about half of
    them differ."""
    assert jax.tree.structure(state) == jax.tree.structure(reference_state)
    narrow = [
        (np.asarray(x, np.float64), np.asarray(y, np.float64))
        for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(reference_state), strict=True)
        if x.dtype == BF16
    ]
    got, want = (np.concatenate([pair[i].ravel() for pair in narrow]) for i in (0, 1))
    assert np.mean(got == want) >= 0.95
    np.testing.assert_allclose(got, want, rtol=2.0**-7, atol=0)
    for x, y in zip(jax.tree.leaves(updates), jax.tree.leaves(reference_updates), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2.0**-6, atol=1e-6)


def assert_trees_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


@pytest.mark.parametrize(
    "name", ["adam", "rmsprop_centered_momentum", "adagrad", "adadelta", "momentum", "ema_momentum"]
)
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(name, tmp_path):
    """Keys come from (seed, count, leaf): a state saved to disk and loaded into a newly built
    optimizer rounds exactly as the run that never stopped."""
    import pickle

    make, _, _ = STATEFUL[name]
    grads = gradients(1, 8)
    opt = make(accumulator_dtype=jnp.bfloat16, rounding_seed=7)
    straight, final = jitted_run(opt, opt.init(PARAMS), grads)

    first, middle = jitted_run(opt, opt.init(PARAMS), grads[:4])
    (tmp_path / "state.pkl").write_bytes(pickle.dumps(jax.device_get(middle)))
    resumed_opt = make(accumulator_dtype=jnp.bfloat16, rounding_seed=7)
    loaded = jax.device_put(pickle.loads((tmp_path / "state.pkl").read_bytes()))
    second, resumed_final = jitted_run(resumed_opt, loaded, grads[4:])
    assert_trees_identical(first + second, straight)
    assert_trees_identical(resumed_final, final)

    # The seed matters, and without one the state is rounded to nearest: a different state.
    other = jitted_run(make(accumulator_dtype=jnp.bfloat16, rounding_seed=8), opt.init(PARAMS), grads)[1]
    nearest = jitted_run(make(accumulator_dtype=jnp.bfloat16), opt.init(PARAMS), grads)[1]
    for different in (other, nearest):
        assert any(
            np.any(np.asarray(x, np.float32) != np.asarray(y, np.float32))
            for x, y in zip(jax.tree.leaves(different), jax.tree.leaves(final), strict=True)
        )


def test_adam_bfloat16_v_decays_like_float32_where_round_to_nearest_is_stuck():
    """One gradient of 1, then zeros: v_t = 0.001 * 0.999^(t-1). With nu_dtype=bfloat16, round-to-
    nearest keeps v at its first value; rounding_seed lets its mean over the elements follow the
    float64 values within 6 sigma (each rounding's variance <= (2^-7 v_1)^2 / 4, as above)."""
    n, steps = 1 << 14, 1000
    params = jnp.zeros(n, jnp.float32)
    grads = jnp.concatenate([jnp.ones((1, n)), jnp.zeros((steps - 1, n))])

    def final_nu(opt):
        @jax.jit
        def run(grads):
            return jax.lax.scan(lambda s, g: (opt.update(g, s, params)[1], None), opt.init(params), grads)[0]

        return np.asarray(run(grads).nu, np.float64)

    nearest = final_nu(jstep.scale_by_adam(nu_dtype=jnp.bfloat16))
    stochastic = final_nu(jstep.scale_by_adam(nu_dtype=jnp.bfloat16, rounding_seed=0))
    single = final_nu(jstep.scale_by_adam())
    first = np.float64(np.float32(1 - 0.999))
    exact = first * 0.999 ** (steps - 1)
    np.testing.assert_allclose(single, exact, rtol=1e-4)
    assert np.all(nearest == np.float64(jnp.asarray(first, jnp.bfloat16).astype(jnp.float32)))  # stuck
    bound = SIGMAS * np.sqrt(steps * (2.0**-7 * 2 * first) ** 2 / 4 / n)  # v_1 in bfloat16 <= 2 * first
    assert abs(np.mean(stochastic) - exact) <= bound
    assert bound < 0.1 * exact


# -------------------------------------------------------------------------------- composition


def test_rounding_seed_composes_with_chain_and_multi_steps():
    """chain(scale(1/2), adam(seed)) is adam(seed) on halved gradients; MultiSteps(k=2) on repeated
    gradients is adam(seed) on each once: the same counts, so the same keys and the same roundings."""
    grads = gradients(2, 6)
    make = STATEFUL["adam"][0]
    alone = make(accumulator_dtype=jnp.bfloat16, rounding_seed=3)
    halved = [jax.tree.map(lambda g: g / 2, g) for g in grads]
    chained = optax.chain(optax.scale(0.5), make(accumulator_dtype=jnp.bfloat16, rounding_seed=3))
    reference, reference_state = jitted_run(alone, alone.init(PARAMS), halved)
    got, state = jitted_run(chained, chained.init(PARAMS), grads)
    assert_same_rounding(got, reference, state[1], reference_state)

    multi = optax.MultiSteps(make(accumulator_dtype=jnp.bfloat16, rounding_seed=3), every_k_schedule=2)
    doubled = [g for g in halved for _ in range(2)]
    got, state = jitted_run(multi, multi.init(PARAMS), doubled)
    assert_same_rounding(got[1::2], reference, state.inner_opt_state, reference_state)


def test_rounding_seed_composes_with_inject_hyperparams():
    """inject_hyperparams turns the seed into an int32 array in the state: the same keys, so the same
    roundings (its b1, b2 are float32 arrays, so 1 - b2 differs from the Python number's in the last bit)."""
    grads = gradients(3, 5)
    dtypes = {"mu_dtype": BF16, "nu_dtype": BF16}  # dtype objects, not callables (those would be schedules)
    injected = optax.inject_hyperparams(jstep.adam)(learning_rate=0.01, rounding_seed=4, **dtypes)
    state = injected.init(PARAMS)
    assert state.hyperparams["rounding_seed"].dtype == jnp.int32
    got, state = jitted_run(injected, state, grads)
    plain = jstep.adam(0.01, rounding_seed=4, **dtypes)
    want, want_state = jitted_run(plain, plain.init(PARAMS), grads)
    assert_same_rounding(got, want, state.inner_state, want_state)


def test_rounding_seed_composes_with_grouped():
    """grouped packs the small leaves, so its leaf numbers (and bits) differ from the plain run's; with
    bfloat16 moments its steps stay close to float32 Adam's, and it is deterministic."""
    grads = gradients(4, 6)
    make = STATEFUL["adam"][0]

    def grouped_run():
        opt = jstep.grouped(make(accumulator_dtype=jnp.bfloat16, rounding_seed=5))
        return jitted_run(opt, opt.init(PARAMS), grads)

    (got, state), (again, state_again) = grouped_run(), grouped_run()
    assert_trees_identical(got, again)
    assert_trees_identical(state, state_again)
    moments = [leaf for leaf in jax.tree.leaves(state) if leaf.dtype == BF16]
    assert moments and sum(leaf.size for leaf in moments) == 2 * PARAM_COUNT
    wide = make()
    want, _ = jitted_run(wide, wide.init(PARAMS), grads)
    for u, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        # Each update is about the learning rate (0.01) in size: agree to 2^-5 of it.
        np.testing.assert_allclose(np.asarray(u), np.asarray(w), rtol=2.0**-5, atol=0.01 * 2.0**-5)


# ----------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (
            0.5,
            TypeError,
            "rounding_seed must be an int (the seed of the stochastic rounding of narrow state) or None, got float 0.5",
        ),
        ("3", TypeError, "got str '3'"),
        (True, TypeError, "got bool True"),
        (jnp.float32(1.0), TypeError, "got an array of dtype float32"),
        (-1, ValueError, "rounding_seed must be in [0, 2^31), got -1"),
        (2**31, ValueError, "got 2147483648"),
    ],
)
@pytest.mark.parametrize("name", ["adam", "rmsprop", "adagrad", "adadelta", "momentum", "running_average"])
def test_bad_rounding_seed_fails_at_construction(name, value, error, message):
    with pytest.raises(error, match=re.escape(message)):
        STATEFUL[name][0](rounding_seed=value)


@pytest.mark.parametrize("name", ["adam", "rmsprop", "adagrad", "scale_by_rss", "adadelta", "momentum"])
def test_integer_state_dtype_fails_at_construction(name):
    with pytest.raises(
        TypeError,
        match=r"(accumulator|mu)_dtype must be None, a floating dtype such as jnp.bfloat16 or a format such as "
        r"jstep.blockwise\(8\), got int8",
    ):
        STATEFUL[name][0](accumulator_dtype=jnp.int8)


@pytest.mark.parametrize(
    "make",
    [
        lambda: jstep.momentum(0.1, accumulator_dtype=jnp.bfloat16),
        lambda: jstep.adam(0.1, mu_dtype=jnp.float32),
        lambda: jstep.adamw(0.1, mu_dtype=jnp.bfloat16),
        lambda: jstep.ema_momentum(0.1, accumulator_dtype=jnp.float32),
        lambda: jstep.rmsprop(0.1, centered=True, accumulator_dtype=jnp.float32),
    ],
    ids=["momentum", "adam", "adamw", "ema_momentum", "rmsprop_centered"],
)
def test_real_state_dtype_for_complex_params_fails_at_the_first_update(make):
    """init builds the state dtype asked for, as Optax's does; the update that would drop the
    imaginary part (Optax keeps only the real part, silently) raises instead."""
    opt = make()
    params = {"w": jnp.ones(3, jnp.complex64)}
    state = opt.init(params)
    assert all(leaf.dtype != jnp.complex64 for leaf in jax.tree.leaves(state) if leaf.ndim)
    with pytest.raises(TypeError, match=r"\['w'\] is complex64, but the state that holds it is (bfloat16|float32)"):
        opt.update({"w": jnp.full(3, 1 + 1j, jnp.complex64)}, state, params)


def test_the_readme_low_precision_example_runs_and_trains():
    import pathlib

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Low precision") :]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    namespace: dict = {}
    exec(compile(code, "README.md (Low precision)", "exec"), namespace)
    params = namespace["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {BF16}
    assert float(namespace["loss"](params, namespace["x"], namespace["y"])) < 1e-2  # from 169 at zero
    np.testing.assert_allclose(np.asarray(params["w"], np.float32), np.arange(8.0), atol=0.05)


# ------------------------------------------------------------------------------ sharded


SHARDED_SCRIPT = r"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jstep

assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("d",))
split = NamedSharding(mesh, P("d"))
rng = np.random.default_rng(0)
params = {"w": rng.normal(size=(64, 33)), "b": rng.normal(size=64)}
params = jax.tree.map(lambda p: jnp.asarray(p, jnp.bfloat16), params)
grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.bfloat16), params) for _ in range(4)]
opt = jstep.adam(0.01, rounding_seed=3)

def step(p, s, g, t):
    u, s = opt.update(g, s, p)
    return jstep.apply_updates(p, u, key=jax.random.fold_in(jax.random.key(9), t)), s

def run(params, grads, step):
    state = opt.init(params)
    for t, g in enumerate(grads):
        params, state = step(params, state, g, t)
    return params, state

one = run(params, grads, jax.jit(step))
place = lambda tree: jax.device_put(tree, split)
sharded = run(place(params), [place(g) for g in grads], jax.jit(step))
assert sharded[0]["w"].sharding.spec == P("d"), sharded[0]["w"].sharding
for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(sharded), strict=True):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
print("sharded jit: the single-device bits")
"""


def test_sharded_jit_rounds_exactly_as_one_device():
    """The random bits hash each element's global position, so params and state split over 8 (CPU)
    devices by a sharded jit get the single-device run's bits, leaf for leaf (a subprocess, so that
    the rest of the suite keeps its single device)."""
    assert "sharded jit: the single-device bits" in run_on_eight_devices(SHARDED_SCRIPT)


# ------------------------------------------------------ float16 params: squared-gradient state

FLOAT16_CASES = {
    "adam": lambda **dtype: jstep.adam(1e-3, **dtype),
    "adamw": lambda **dtype: jstep.adamw(1e-3, **dtype),
    "rmsprop": lambda **dtype: jstep.rmsprop(1e-3, **dtype),
    "adagrad": lambda **dtype: jstep.adagrad(1e-3, **dtype),
    # At lr = 1e-3 adadelta's step, lr * g = 1e-7, is itself a float16 subnormal (grid 6e-8);
    # at its own rate 1.0, and an eps small enough for its averages to matter, the underflow
    # of E[g^2] shows (before the rule: steps 0.37x float32's).
    "adadelta": lambda **dtype: jstep.adadelta(1.0, eps=1e-10, **dtype),
}
# The state each keeps of squared gradients (and the centered mean M, in G's precision).
SQUARED_STATE = {
    "adam": ("nu",),
    "adamw": ("nu",),
    "rmsprop": ("nu",),
    "adagrad": ("sum_of_squares",),
    "adadelta": ("e_g", "e_x"),
}


def constant_gradient_steps(opt, dtype, steps=1000):
    """The issue's run: params 1, g = 1e-4 at every step; each step's update, in float64."""
    params = jnp.ones(4, dtype)
    grads = jnp.full(4, 1e-4, dtype)

    def step(state, _):
        updates, state = opt.update(grads, state, params)
        return state, updates[0]

    final, updates = jax.jit(lambda s: jax.lax.scan(step, s, None, length=steps))(opt.init(params))
    return np.asarray(updates, np.float64), final


@pytest.mark.parametrize("name", list(FLOAT16_CASES))
def test_float16_params_keep_every_step_close_to_float32s(name):
    """float16's range cannot hold (1 - B2) g^2 for |g| < 8e-3: a float16 v (or G) underflows
    and the 1000th step was 25x the learning rate. The squared-gradient state of float16 params
    is float32 by default, and every step stays where float32's is."""
    make = FLOAT16_CASES[name]
    reference, _ = constant_gradient_steps(make(), jnp.float32)
    got, state = constant_gradient_steps(make(), jnp.float16)
    fields = dict(_state_fields(state))
    assert {field: fields[field].dtype for field in SQUARED_STATE[name]} == dict.fromkeys(
        SQUARED_STATE[name], jnp.float32
    )
    # Within 2x is the requirement; float16's rounding of the step and of m leaves 0.2% (measured).
    ratio = got / reference
    assert ratio.min() >= 1 / 1.01 and ratio.max() <= 1.01, (ratio.min(), ratio.max())


@pytest.mark.parametrize("name", list(FLOAT16_CASES))
def test_bfloat16_params_keep_bfloat16_state_and_steps_within_the_readmes_bound(name):
    """bfloat16 has float32's range, so the rule leaves its state bfloat16; by round-to-nearest
    (rounding_seed fixes the stuck average) its steps in the same run stay within the README's
    1.7x of float32's (measured 1.62x for adagrad, 1.48x for Adam)."""
    make = FLOAT16_CASES[name]
    reference, _ = constant_gradient_steps(make(), jnp.float32)
    got, state = constant_gradient_steps(make(), jnp.bfloat16)
    fields = dict(_state_fields(state))
    assert {fields[field].dtype for field in SQUARED_STATE[name]} == {jnp.dtype(jnp.bfloat16)}
    ratio = got / reference
    assert ratio.min() >= 1 / 1.7 and ratio.max() <= 1.7, (ratio.min(), ratio.max())


def _state_fields(state):
    """(field name, leaf) of every NamedTuple field in a (possibly chained) state."""
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return [(name, value) for name in state._fields for value in [getattr(state, name)]]
    return [pair for part in state for pair in _state_fields(part)]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: jstep.adam(1e-3), "nu"),
        (lambda: jstep.rmsprop(1e-3), "nu"),
        (lambda: jstep.adagrad(1e-3), "sum_of_squares"),
        (lambda: jstep.adadelta(1e-3), "e_g"),
        (lambda: jstep.adadelta(1e-3), "e_x"),
        (lambda: jstep.rmsprop(1e-3, centered=True), "nu"),
        (lambda: jstep.rmsprop(1e-3, centered=True), "mu"),  # M in G's precision: G - M^2 is the variance
    ],
    ids=["adam", "rmsprop", "adagrad", "adadelta-e_g", "adadelta-e_x", "centered-G", "centered-M"],
)
def test_float16_squared_gradient_state_is_float32_and_bfloat16_stays(make, field):
    """The rule: float32 squares for float16 params only; bfloat16 has float32's range and keeps
    its state bfloat16 (rounding_seed is for its rounding). m and a velocity keep the params' dtype."""
    for dtype, expected in ((jnp.float16, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.float32)):
        state = make().init({"w": jnp.ones(3, dtype)})
        assert getattr(state, field)["w"].dtype == expected
    assert jstep.adam(1e-3).init(jnp.ones(3, jnp.float16)).mu.dtype == jnp.float16


@pytest.mark.parametrize(
    ("name", "dtype_argument"),
    [("adam", "nu_dtype"), ("rmsprop", "accumulator_dtype"), ("adagrad", "accumulator_dtype")],
)
def test_an_explicit_float16_state_dtype_is_kept_as_given(name, dtype_argument):
    """nu_dtype=jnp.float16 does what it says: a float16 state, which underflows as the rule
    says it would (the 1000th step far above float32's)."""
    reference, _ = constant_gradient_steps(FLOAT16_CASES[name](), jnp.float32)
    got, state = constant_gradient_steps(FLOAT16_CASES[name](**{dtype_argument: jnp.float16}), jnp.float16)
    stored = [leaf for field, leaf in _state_fields(state) if field != "count"]
    assert {leaf.dtype for leaf in stored} == {jnp.dtype(jnp.float16)}
    assert got[-1] / reference[-1] > 2
