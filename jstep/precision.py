"""Low precision: stochastic rounding, and adding updates to low-precision parameters.

Two things go wrong when the notes' running averages (B.0.1.1) and the weights themselves are
stored in bfloat16 (8 significant bits) with round-to-nearest:

* The average stops moving. ``C_t = gamma C_{t-1} + (1 - gamma) c_t`` with gamma = 0.999 asks
  for a change of 0.1% of C per step, less than half a bfloat16 ulp (2^-9 = 0.2% of C at
  best), so ``gamma C_{t-1}`` rounds back to C_{t-1}: Adam's v cannot decay from its peak.
* Small steps vanish. ``W_t = W_{t-1} - eta d_t`` is lost entirely when |eta d_t| is under half
  an ulp of W_{t-1}, however many steps ask for it.

Stochastic rounding stores a value x that lies between two neighbours lo < x < hi of the narrow
grid as hi with probability (x - lo) / (hi - lo) and as lo otherwise, so that

    E[round(x)] = lo + (hi - lo) (x - lo) / (hi - lo) = x.

Each stored value is then off by less than one ulp, but the errors average out instead of
piling up on one side: a 0.1% decay happens on 1 step in 4 to 8 (an ulp is 0.4% to 0.8% of C),
a step of a tenth of an ulp on 1 in 10, and the sums and averages of the notes are right in
expectation.

Many leaves. A network is hundreds of small arrays, and a jitted step compiles one kernel for
each array it writes. XLA:CPU compiles a kernel once for all leaves whose kernels are the same
program, so the per-leaf part of the random bits must reach a kernel as data, not as a
constant written into it: a key (or a slice of a table of keys) per leaf made every leaf's
kernel a different program, and compiling 300 small leaves took 13 to 21 times as long as
round-to-nearest. Here a key is drawn into four seed words once for the whole tree, and leaf i
gets a `LeafSeed`: those words and the leaf's tag, four constant words that XLA keeps as a
buffer of their own; its kernel xors the two (`leaf_bits`). The per-leaf work is a jitted
function of the leaf and its `LeafSeed` (`_stochastic_cast`), so that it is also traced once per
shape and dtype. What remains (about 3.4 times round-to-nearest's compile time there,
`benchmarks/low_precision_scale.py`) is XLA's passes over the few dozen operations each
rounded leaf adds to the program. Other per-leaf work that draws random bits (quantization,
say) runs the same way: ``leaf_seeds(key, tree)``, then a function of (leaf, seed) that calls
`leaf_bits` (or keys its own hash with ``seed.words ^ seed.tag``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jstep import _core, quantization

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def _is_none(leaf: Any) -> bool:
    return leaf is None


def _is_seed_or_none(leaf: Any) -> bool:
    """A leaf of a tree of `leaf_seeds` (a `LeafSeed` is itself a pytree, for jit)."""
    return leaf is None or isinstance(leaf, LeafSeed)


# ---------------------------------------------------------------------------- validation


def _floating_dtype(name: str, dtype: Any) -> jnp.dtype:
    """`dtype` as a real floating dtype, or a TypeError naming `name` and what is allowed."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a floating dtype such as jnp.bfloat16, got {dtype!r}") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(
            f"{name} must be a real floating dtype, got {resolved}; stochastic rounding works between "
            "bfloat16, float16, float32 and float64"
        )
    return resolved


def _check_key(key: Any) -> None:
    """Raise TypeError unless `key` is one JAX random key (typed, or a raw uint32 key)."""
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if jnp.shape(key) != ():
            raise TypeError(
                f"key must be a single random key, got a batch of keys of shape {jnp.shape(key)}; "
                "split it and call once per key, or jax.vmap over the keys"
            )
        return
    if dtype == jnp.uint32 and jnp.shape(key) == _raw_key_shape():
        return
    shown = (
        f"an array of dtype {dtype} and shape {jnp.shape(key)}"
        if dtype is not None
        else f"{type(key).__name__} {key!r}"
    )
    raise TypeError(f"key must be a JAX random key such as jax.random.key(0), got {shown}")


def _raw_key_shape() -> tuple[int, ...]:
    """The shape of a raw ``jax.random.PRNGKey`` under the default implementation ((2,) for threefry)."""
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape


def _is_exact_cast(source: jnp.dtype, target: jnp.dtype) -> bool:
    """True when `target` holds every finite value of `source` (so a cast never rounds)."""
    s, t = jnp.finfo(source), jnp.finfo(target)
    smallest = lambda f: f.minexp - f.nmant  # log2 of the smallest subnormal  # noqa: E731
    return t.nmant >= s.nmant and t.maxexp >= s.maxexp and smallest(t) <= smallest(s)


# --------------------------------------------------------------------------- random bits


def _mix32(h: Any) -> Any:
    """A 32-bit avalanche mixer (Wellons' "lowbias32"): each output bit depends on every input bit.

    Of a uint32 JAX array, or of a NumPy one (the leaves' tags, computed when the step is traced)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major index, modulo 2^32, as uint32 (works on sharded arrays)."""
    position = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = lax.broadcasted_iota(jnp.uint32, shape, axis)
        position = position + index * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return position


def _seed_words(key: jax.Array) -> jax.Array:
    """The four uint32 words a key's bits are hashed with, drawn from `key` by ``jax.random.bits``."""
    return jax.random.bits(key, (4,), jnp.uint32)


class LeafSeed(NamedTuple):
    """What one leaf's random bits are drawn from: its key's seed words and the leaf's tag.

    `words` are the four words `_seed_words` draws from the key, once for a whole tree; `tag`
    is leaf i's four constant words (`_tag`), a NumPy array, so that a jitted function of the
    leaf and its seed is one program for every leaf of a shape and dtype.
    """

    words: jax.Array
    tag: np.ndarray


def _tag(index: int) -> np.ndarray:
    """Leaf `index`'s tag: ``mix32(4 index + k)`` for k < 4, four words no other leaf's tag has (a
    bijection of distinct numbers, below 2^30 leaves). Not a run like 4i, 4i + 1, ...: XLA would
    write that as i and an iota, and the constant i would be back inside every leaf's kernel."""
    with np.errstate(over="ignore"):  # the mixer multiplies modulo 2^32
        return _mix32(np.uint32(4 * index % 2**32) + np.arange(4, dtype=np.uint32))


def leaf_seeds(key: jax.Array | None, tree: Any) -> Any:
    """`tree` with leaf i replaced by its `LeafSeed` (None counts as a leaf, in flattening order),
    or by None everywhere when `key` is None. The key is drawn from once, for every leaf."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_none)
    if key is None or not leaves:
        return jax.tree.unflatten(treedef, [None] * len(leaves))
    words = _seed_words(key)
    return jax.tree.unflatten(treedef, [LeafSeed(words, _tag(i)) for i in range(len(leaves))])


def _hashed_bits(seed: jax.Array, shape: tuple[int, ...], words: int) -> tuple[jax.Array, ...]:
    """`words` (<= 2) arrays of uniform uint32 bits of `shape`: mix32(position * (seed[2w] | 1) + seed[2w+1])."""
    position = _positions(tuple(shape))
    return tuple(_mix32(position * (seed[2 * w] | 1) + seed[2 * w + 1]) for w in range(words))


def _leaf_words(seed: LeafSeed) -> jax.Array:
    """The leaf's own four seed words, ``seed.words ^ seed.tag`` (what `_hashed_bits` is keyed with)."""
    return seed.words ^ seed.tag


def leaf_bits(seed: LeafSeed, shape: tuple[int, ...], words: int = 1) -> tuple[jax.Array, ...]:
    """`words` (1 or 2) arrays of uniform uint32 bits of `shape` for the leaf of `seed`.

    The leaf's seed words are ``s = seed.words ^ seed.tag``: uniform, since the key's words
    are, and different for every leaf, since the tags are; each element's bits are
    ``mix32(position * (s[2w] | 1) + s[2w + 1])`` (see `random_bits`). One xor per leaf: every
    operation a leaf adds is compiled once per leaf of the step.
    """
    return _hashed_bits(_leaf_words(seed), shape, words)


def random_bits(key: jax.Array, shape: tuple[int, ...], words: int = 1) -> tuple[jax.Array, ...]:
    """`words` (1 or 2) arrays of independent uniform uint32 bits of `shape`, from `key`.

    ``jax.random.bits`` draws four 32-bit seed words from `key`, xored with the tag of leaf 0
    into the words s (`leaf_bits`); each element's bits are then
    ``mix32(position * (s[2w] | 1) + s[2w + 1])``: a keyed odd multiple of the element's
    index (a bijection) through an avalanche mixer. That costs a few integer operations per
    element, where threefry for every element costs about nine times a copy of the array on a
    CPU (measured), too much for a step that is otherwise memory-bound. Stochastic rounding
    needs only that each element's bits are uniform and unrelated to its value and to its
    neighbours' bits, which the mixer gives. Elements 2^32 positions apart share their bits.

    Positions are global under a sharded ``jit`` (a split array gets the bits it would get on
    one device). Inside ``shard_map`` each device sees its own block and numbers it from 0, so
    blocks of a split array would share bits: fold the device's ``jax.lax.axis_index`` into the
    key there (replicated arrays need nothing: each device computes the same values).
    """
    return leaf_bits(LeafSeed(_seed_words(key), _tag(0)), shape, words)


def _uniform(bits: tuple[jax.Array, ...], dtype: jnp.dtype) -> jax.Array:
    """A uniform in [0, 1) on the grid of 2^-23 (float32) or 2^-52 (float64, from two words)."""
    if dtype == jnp.float32:
        return (bits[0] >> 9).astype(dtype) * np.float32(2.0**-23)
    high, low = (b >> 6 for b in bits)  # 26 bits each
    return (high.astype(dtype) * 2.0**26 + low.astype(dtype)) * 2.0**-52


# ------------------------------------------------------------------------------ rounding


def _round_float32_to_bfloat16(x: jax.Array, bits: jax.Array) -> jax.Array:
    """The bit form: add 16 uniform random bits below bfloat16's last bit, then truncate.

    bfloat16 is float32 with the low 16 bits of the word cut off (same sign and exponent
    bits), and the words of floats of one sign are ordered like their magnitudes. For x with
    word w = q 2^16 + f (0 <= f < 2^16), lo = q 2^16 and hi = (q + 1) 2^16 are the words of
    the two neighbours (a carry into the exponent gives the next binade's first value, and
    subnormals are spaced like the first normal binade, so it holds there too), and
    w + r with r uniform in [0, 2^16) reaches hi exactly when r >= 2^16 - f: probability
    f / 2^16 = (x - lo) / (hi - lo). Exactly unbiased for every finite x in bfloat16's range.
    """
    word = lax.bitcast_convert_type(x, jnp.uint32)
    rounded = ((word + (bits >> 16)) >> 16).astype(jnp.uint16)
    # Finite and |x| <= bfloat16's largest value (0x7F7F0000); NaN, inf and beyond: a plain cast.
    in_range = (word & jnp.uint32(0x7FFFFFFF)) <= jnp.uint32(0x7F7F0000)
    nearest = lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return lax.bitcast_convert_type(jnp.where(in_range, rounded, nearest), jnp.bfloat16)


def _round_by_neighbours(x: jax.Array, dtype: jnp.dtype, bits: tuple[jax.Array, ...]) -> jax.Array:
    """The general form: count |x| in units of `dtype`'s spacing there, and round that count at random.

    In the binade [2^k, 2^(k+1)) of |x| the grid of `dtype` is spaced s = 2^(max(k, kmin) - m)
    (m mantissa bits, kmin the exponent of its smallest normal value), so lo = floor(|x|/s) s
    and hi = lo + s; q = |x|/s and its fraction f = q - floor(q) = (|x| - lo)/s are exact in the
    working dtype (float32, or float64 for a float64 x: scaling by a power of two). The result
    is floor(q) + 1 units with probability f: f is compared with a uniform on the grid of
    2^-23 (2^-52), so it is exactly unbiased wherever f lies on that grid: every |x| at or above
    `dtype`'s smallest subnormal (float32 -> float16: 13 to 23 bits dropped; float64 ->
    float32: 29 to 52). Below it the probability is off by less than 2^-23 (2^-52), a bias
    under that fraction of the smallest subnormal (and float32 subnormal inputs, which XLA
    flushes to zero in arithmetic, round to 0).

    A result in `dtype`'s subnormal range is assembled from its bits (its count of units),
    because XLA's CPU and GPU kernels flush subnormal results of a float conversion to zero.
    """
    work = _core.compute_dtype(x.dtype)
    info, work_info = jnp.finfo(dtype), jnp.finfo(work)
    x = x.astype(work)
    magnitude = abs(x)
    # The binade from the exponent bits, and s = 2^e and 1/s built from bits (exact, and much
    # cheaper on XLA:CPU than frexp/ldexp); e stays in the working dtype's normal range.
    word_type, bias = _UNSIGNED[work_info.dtype.itemsize], work_info.maxexp - 1
    binade = (lax.bitcast_convert_type(magnitude, word_type) >> work_info.nmant).astype(jnp.int32) - bias
    exponent = jnp.maximum(jnp.maximum(binade, info.minexp) - info.nmant, work_info.minexp)

    def power_of_two(e):
        return lax.bitcast_convert_type((e + bias).astype(word_type) << work_info.nmant, work)

    spacing = power_of_two(exponent)
    units = magnitude * power_of_two(-exponent)
    below = jnp.floor(units)
    count = below + (_uniform(bits, work) < units - below).astype(work)
    uint = _UNSIGNED[dtype.itemsize]
    value = count * spacing  # on dtype's grid: exact
    word = jnp.where(
        value < float(info.smallest_normal),
        count.astype(uint),  # subnormal: the bits are the count of smallest subnormals
        lax.bitcast_convert_type(value.astype(dtype), uint),
    )
    sign = jnp.where(jnp.signbit(x), uint(1 << (8 * dtype.itemsize - 1)), uint(0))
    in_range = jnp.isfinite(x) & (magnitude <= float(info.max))
    nearest = lax.bitcast_convert_type(x.astype(dtype), uint)
    return lax.bitcast_convert_type(jnp.where(in_range, word | sign, nearest), dtype)


def stochastic_round(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
    """Round `x` to `dtype`, up or down at random so that the result is right on average.

    For x between the two neighbours lo < x < hi on `dtype`'s grid::

        round(x) = hi with probability (x - lo) / (hi - lo), else lo,  so  E[round(x)] = x.

    Values on the grid come back unchanged; every other value becomes one of its two
    neighbours, never anything else. Each element draws its own random bits from `key` (see
    `random_bits`), so the same `key` gives the same result.

    float32 -> bfloat16 uses the bit form (add 16 random bits below bfloat16's last bit and
    truncate; exact for every finite value, subnormals included, and cheap enough for an
    optimizer step). Other pairs (float32 -> float16, float64 -> float32, ...) pick between
    the two neighbours computed exactly; see `_round_by_neighbours` for the one corner (below
    the target's smallest subnormal) where its probability is off by at most 2^-23.

    Like an ordinary cast: NaN stays NaN, +-inf stays +-inf, and a finite x beyond `dtype`'s
    largest finite value (where no upper neighbour exists) is cast by round-to-nearest, so it
    becomes the largest value or inf exactly as ``x.astype(dtype)`` does. Where `dtype`
    holds every value of x's dtype (float32 -> float32, bfloat16 -> float32) the result is
    the exact cast and `key` is not used.

    Args:
      x: a real floating array (bfloat16, float16, float32 or float64), any shape.
      dtype: the real floating dtype to round to.
      key: one JAX random key, ``jax.random.key(seed)`` (or a raw ``jax.random.PRNGKey``).

    Returns:
      An array of `x`'s shape in `dtype`.

    Raises:
      TypeError: for an integer, complex or bool `x` or `dtype`, or a `key` that is not one
        random key.

    Example:
      1 + 2^-9 lies between bfloat16's 1 and 1 + 2^-7, a quarter of the way up. Round to
      nearest always gives 1; stochastic rounding gives 1 + 2^-7 a quarter of the time:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jstep
      >>> x = jnp.full(10_000, 1 + 2**-9, jnp.float32)
      >>> r = jstep.stochastic_round(x, jnp.bfloat16, jax.random.key(0))
      >>> print(jnp.unique(r).tolist())  # only the two neighbours
      [1.0, 1.0078125]
      >>> print(round(float(r.astype(jnp.float32).mean()), 3), float(x.astype(jnp.bfloat16).mean()))
      1.002 1.0
    """
    _floating_dtype("x's dtype", jnp.result_type(x))
    target = _floating_dtype("dtype", dtype)
    _check_key(key)
    return _stochastic_cast(jnp.asarray(x), target, LeafSeed(_seed_words(key), _tag(0)))


def _round_with_seed(x: jax.Array, dtype: jnp.dtype, seed: LeafSeed) -> jax.Array:
    """`stochastic_round` with the leaf's seed (`LeafSeed`) given instead of a key."""
    if _is_exact_cast(x.dtype, dtype):
        return x.astype(dtype)
    if x.dtype == jnp.float32 and dtype == jnp.bfloat16:
        return _round_float32_to_bfloat16(x, leaf_bits(seed, x.shape, 1)[0])
    words = 2 if _core.compute_dtype(x.dtype) == jnp.float64 else 1
    return _round_by_neighbours(x, dtype, leaf_bits(seed, x.shape, words))


# Jitted, so that leaves of one shape and dtype share one trace (and, their tags being data, one
# compiled kernel) inside a step over many leaves.
_stochastic_cast = functools.partial(jax.jit, static_argnums=1)(_round_with_seed)


# ------------------------------------------------------------------------------- updates


def _is_low_precision(dtype: Any) -> bool:
    """Floating and narrower than float32 (bfloat16, float16, float8): the dtypes rounded stochastically."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize < 4


def apply_updates(params: Any, updates: Any, *, key: jax.Array | None = None) -> Any:
    """W_t = W_{t-1} + u_t for every leaf, formed in at least float32, stored in W's dtype.

    Without `key` this is ``optax.apply_updates`` with the sum in at least float32 (Optax
    adds two bfloat16 arrays in bfloat16) and a round-to-nearest cast back. With `key`,
    the sum for each low-precision leaf (bfloat16, float16) is stored by stochastic rounding,
    leaf i of the flattened `params` with bits of its own drawn from `key` and i (leaf 0's
    are those of ``stochastic_round(sum, dtype, key)``; see `leaf_seeds`), so that steps
    smaller than half an ulp of W still move it on average (W_t is W_{t-1} + u_t in
    expectation). float32 and float64 leaves are untouched by the key: bit for bit
    ``optax.apply_updates``. Use a new key every step (e.g. ``jax.random.fold_in(key, step)``).

    Args:
      params: the tree of W_{t-1}; None leaves stay None (as in Optax).
      updates: the tree of u_t, shaped like `params`; a None update leaves its param as it is
        (a frozen part, as ``eqx.apply_updates`` does; ``optax.apply_updates`` raises).
      key: None, or one JAX random key.

    Returns:
      The tree of W_t, each leaf in its param's dtype.

    Example:
      A step of 0.001 is under half a bfloat16 ulp of 1 (2^-8): round to nearest loses it,
      stochastic rounding keeps it on average.

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jstep
      >>> w = jnp.ones(10_000, jnp.bfloat16)
      >>> u = jnp.full(10_000, 0.001, jnp.float32)
      >>> print(float(jstep.apply_updates(w, u).astype(jnp.float32).mean()))
      1.0
      >>> w_new = jstep.apply_updates(w, u, key=jax.random.key(0))
      >>> print(w_new.dtype, round(float(w_new.astype(jnp.float32).mean()), 4))
      bfloat16 1.001
    """
    if key is not None:
        _check_key(key)

    def add(seed, p, u):
        if p is None or u is None:
            return p
        p, u = jnp.asarray(p), jnp.asarray(u)
        total = p.astype(_core.compute_dtype(jnp.result_type(p, u))) + u
        if seed is None or not _is_low_precision(p.dtype):
            return total.astype(p.dtype)
        return _stochastic_cast(total, p.dtype, seed)

    return jax.tree.map(add, leaf_seeds(key, params), params, updates, is_leaf=_is_seed_or_none)


# -------------------------------------------------------------------- optimizer state


def step_keys(rounding_seed: Any, count: jax.Array, streams: int) -> tuple[jax.Array | None, ...]:
    """One key per state tree of a transformation at step `count`: key(seed) folded with count, then
    with the tree's number (m: 0, v: 1, ...); all None when `rounding_seed` is None.

    Nothing random is kept in the state: the keys are a function of the seed and the step count,
    so a run resumed from a saved state draws exactly the bits an uninterrupted one would.
    """
    if rounding_seed is None:
        return (None,) * streams
    key = jax.random.fold_in(jax.random.key(rounding_seed), count)
    return tuple(jax.random.fold_in(key, stream) for stream in range(streams))


def load(state: Any) -> Any:
    """A state tree as the values it stands for: each `jstep.QuantizedArray` leaf dequantized
    to float32, every other leaf as it is. Every jstep state that may be narrow is read here."""
    return quantization.values(state)


def advance(
    rule: Any, state: Any, *others: Any, key: jax.Array | None = None, nonnegative: bool | None = None
) -> tuple[Any, Any]:
    """A state's new values and the new state: ``values = jax.tree.map(rule, load(state), *others)``
    and ``store(values, state, key)``, the same numbers.

    `rule` maps a leaf's old value (float32 where quantized) and the matching leaves of `others`
    to its new value, element by element (``lambda m, g: b1 m + (1 - b1) g``, say). Each
    `jstep.QuantizedArray` leaf is read again for its new blocks' maxima and again for its new
    codes (see ``jstep.quantization._refresh``), so that the compiled step holds no float32 copy
    of it; every other leaf is stored as `store` stores it. `nonnegative`: True where the state
    holds averages of squares, whose quantized leaves must then be on the unsigned map, False
    where it holds values of either sign (the signed map), None: not checked (`check_maps`).
    """
    check_maps(state, nonnegative)
    values = jax.tree.map(rule, load(state), *others)

    def one(seed, value, old, *other):
        if value is not None and quantization.is_quantized(old) and quantization._explicit_sharding(old.codes) is None:
            words = None if seed is None else _leaf_words(seed)
            return _refreshed(rule, old, other, words)
        return _store_leaf(seed, value, old)

    return values, jax.tree.map(one, leaf_seeds(key, values), values, state, *others, is_leaf=_is_seed_or_none)


def _refresh_by(rule: Any, old: Any, others: tuple[Any, ...], words: jax.Array | None) -> Any:
    """``quantization._refresh(old, lambda decoded: rule(decoded, *others), words)``."""
    return quantization._refresh(old, lambda decoded: rule(decoded, *others), words)


# Keyed by `rule` (one per state tree and trace), so that a traced step traces the refresh once
# for all the leaves of a shape instead of once per leaf.
_refresh_by_in_trace = functools.partial(jax.jit, static_argnums=0)(_refresh_by)


def _refreshed(rule: Any, old: Any, others: tuple[Any, ...], words: jax.Array | None) -> Any:
    """`_refresh_by`: jitted while a step is traced; eagerly op by op, since the optimizers make
    their rule anew at every call, and a jit keyed by it would compile every leaf again at
    every eager step."""
    if isinstance(old.codes, jax.core.Tracer):
        return _refresh_by_in_trace(rule, old, others, words)
    return _refresh_by(rule, old, others, words)


def check_maps(state: Any, nonnegative: bool | None) -> None:
    """Raise ValueError where a `jstep.QuantizedArray` leaf of `state` is on another map than
    `init` builds for it: the unsigned map (no zero) for averages of squares (`nonnegative`
    True), the signed one for values of either sign (False); None checks nothing. A state
    converted by hand with `jstep.quantize`'s default ``signed=True`` would otherwise keep v on
    a map with 0, and a v stored as 0 divides its step by eps."""
    if nonnegative is None:
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(state, is_leaf=quantization.is_quantized)[0]:
        if quantization.is_quantized(leaf) and leaf.layout.signed == nonnegative:
            held, wanted, harm = (
                ("averages of squares", "unsigned", "its 0 would divide the step of a v stored as 0 by eps")
                if nonnegative
                else ("values of either sign", "signed", "it would store every negative value as its smallest code")
            )
            raise ValueError(
                f"quantized state leaf {jax.tree_util.keystr(path) or '<root>'} is on the "
                f"{'signed' if leaf.layout.signed else 'unsigned'} map, but this state holds {held}, which "
                f"init stores on the {wanted} map ({harm}); quantize it as init does: "
                f"jstep.quantize(x, fmt, signed={not nonnegative}), or signed=target.layout.signed for each "
                "leaf of the new optimizer's init tree"
            )


def store(values: Any, like: Any, key: jax.Array | None = None, *, nonnegative: bool | None = None) -> Any:
    """Each leaf of `values` stored in the dtype (or format) of the matching leaf of `like`.

    A leaf whose dtype is narrower than the value's (a bfloat16 average formed in float32) is
    stored by stochastic rounding when `key` is given (leaf i of the flattened tree with bits
    of its own from `key` and i, as in `apply_updates`), and by round-to-nearest otherwise;
    any other leaf is cast as usual. A `jstep.QuantizedArray` leaf of `like` is quantized
    again in its layout, with stochastic rounding between its codes from the same leaf's bits.
    Every jstep state that may be narrow is written through here. `nonnegative`: as in `advance`.
    """
    check_maps(like, nonnegative)
    return jax.tree.map(_store_leaf, leaf_seeds(key, values), values, like, is_leaf=_is_seed_or_none)


def _store_leaf(seed: Any, value: Any, old: Any) -> Any:
    """One leaf of `store`: `value` in the dtype or layout of `old`, by stochastic rounding with `seed`."""
    if value is None:  # a leaf left out, as in Equinox's eqx.partition: nothing stored
        return None
    if quantization.is_quantized(old):
        return quantization.encode(value, old.layout, None if seed is None else _leaf_words(seed))
    dtype = jnp.result_type(old)
    narrower = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < jnp.result_type(value).itemsize
    if seed is None or not narrower:
        return value.astype(dtype)
    return _stochastic_cast(value, dtype, seed)
