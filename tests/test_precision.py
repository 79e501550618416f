"""Stochastic rounding and low-precision updates, against neighbours and sums computed independently.

The two neighbours of each value come from ml_dtypes' and NumPy's casts and ``nextafter``; the
expected means from float64 arithmetic. Statistical checks use fixed keys (so they are
deterministic) and bounds of 6 binomial standard deviations, which a correct rounding would
miss with probability about 2e-9 for any other key.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import jstep

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
    x = np.array(
        [np.inf, -np.inf, np.nan, big, -big, big * 1.003, -big * 1.003, big * 1.01, 3.4e38, 0.0, -0.0],
        np.float32,
    )
    got = np.asarray(jstep.stochastic_round(jnp.asarray(x), target, jax.random.key(0))).astype(np.float64)
    with np.errstate(over="ignore"):
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


def test_apply_updates_gives_each_leaf_its_own_key():
    x = jnp.full(1000, 1.0, jnp.bfloat16)
    u = jnp.full(1000, 2.0**-9, jnp.float32)  # halfway between two bfloat16 values
    out = jstep.apply_updates([x, x], [u, u], key=jax.random.key(0))
    first, second = (np.asarray(leaf, np.float32) for leaf in out)
    assert 0.2 < np.mean(first != second) < 0.8
    single = jstep.stochastic_round(x.astype(jnp.float32) + u, jnp.bfloat16, jax.random.fold_in(jax.random.key(0), 0))
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


def test_apply_updates_bad_key():
    with pytest.raises(TypeError, match="key must be a JAX random key"):
        jstep.apply_updates({"w": jnp.ones(2, jnp.bfloat16)}, {"w": jnp.ones(2)}, key=3)
