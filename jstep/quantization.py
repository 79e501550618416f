"""Optimizer state in 8 and 4 bits: block-wise quantization of the notes' running averages.

Adam keeps two float32 averages per weight (B.0.1.4), m_t and v_t: 8 bytes of state for every
4 bytes of weights. Stored in 8 bits they take 2 bytes; in 4 bits, 1.

Block-wise absmax scaling
-------------------------
The elements of a leaf are cut into blocks of B consecutive elements in row-major order
(bitsandbytes' layout; B = 256 for 8 bits, 128 for 4). Each block keeps one float32 scale,
its largest magnitude s = max_i |x_i|, and each element keeps only the index c_i of the code
q(c_i) nearest to x_i / s in a table of 2^bits codes in [-1, 1]::

    x_i  ~  s * q(c_i),     |x_i / s| <= 1.

One outlier then costs the precision of its own block only, and the scale costs 4 / B bytes
per element (1.6% at B = 256). The table is where the precision goes.

The signed map (m_t, momentum's velocities, every average of g)
----------------------------------------------------------------
A uniform grid in [-1, 1] cannot hold the averages of the notes: within one block they span
many decades, and 2^8 equal steps round to 0 everything under s / 256. A dynamic exponent
(Dettmers 2016, the map of bitsandbytes' 8-bit optimizers) spends the codes on decades
instead: with n = bits - 1 bits after the sign, a run of z zeros and a 1 says that the
magnitude lies in the decade (0.1, 1] 10^-z, and the n - 1 - z bits that remain count
S_z = 2^(n-1-z) equal steps across it. jstep keeps that for the top two decades, where a
block's large values are and the absolute error is made::

    q = +-10^-z (0.1 + 0.9 k / S_z),    z = 0, 1,   k = 1 .. S_z

(8 bits: 64 codes in (0.1, 1], 1.4% apart near 1, and 32 in (0.01, 0.1]; 4 bits differ, see
"Four bits" below).
Below, the dynamic exponent has 16, 8, 4, 2 and 1 codes per decade, so neighbouring codes
are up to 10 times apart: a small m is stored up to 5 times too large, and with stochastic
rounding that is not rare but the price of being right on average. An m enters the step
relative to its own v, so what the small values need is relative precision, and the
remaining 2^(n-2) - 1 codes are spaced geometrically from 10^-2 down to the dynamic
exponent's smallest code, 10^-(n-1)::

    q = +-10^(-2 - (n - 3) j / (2^(n-2) - 2)),    j = 0 .. 2^(n-2) - 2

(8 bits: 31 codes from 1e-2 to 1e-6, each 1.36 times the one below), and 0. The map is
symmetric, with 127 magnitudes per sign (7 for 4 bits), 0 twice (the +0 and -0 patterns, as in
floats), and +-1: every y = x / s lies between two codes, which unbiased rounding needs
(bitsandbytes' map, whose codes are the midpoints of the steps, has +1 but not -1). On
heavy-tailed data its error is within a few percent of bitsandbytes' map
(``benchmarks/quantization.py``).

Second moments (v_t, every average of g^2) are never negative, and they must not contain 0.
The step is m_hat / (sqrt(v_hat) + eps): a v that rounds to 0 while m does not (a weight
whose gradients are 1e-6 beside one whose gradients are 1 in its block: v / s ~ 1e-12,
m / s ~ 1e-6) is divided by eps, and the step explodes (about 100 learning rates with
eps = 1e-8). A linear map (k / 255) rounds to 0 everything under s / 510, most of such a
block: that is how linearly quantized v blows up. A dynamic exponent is not enough either: its
lowest decades have one or two codes each, so a v there can be stored 3 to 5 times too small,
and the step of that weight about 2 times too large. Near the block's maximum a geometric map
is coarser than the dynamic exponent (its absolute error on squares of heavy-tailed data is
about 2.6 times bitsandbytes'), but that costs the step 3% at most, where coarse low decades
cost it a factor of 2.

v enters the step only through 1 / sqrt(v), so what it needs is the same *relative* precision
at every size, not fine steps near its maximum: a geometric map. m's signed map reaches down
to 10^-(n-1) = 1e-6 of its block's maximum, so v, which holds squares, needs twice as many
decades::

    unsigned, 8 bits:  q = 10^(-12 (255 - k) / 255),  k = 0 .. 255      (1e-12 .. 1)

each code 1.115 times the one below: round to nearest stores v within 5.6% (the step within
3%), and a v under 1e-12 s is stored as 1e-12 s, rounded up, so the step of such a weight can
only shrink. Since 1e-12 is the square of m's smallest nonzero code, a tiny m rounded up to that
code is still divided by at least its own size: |m| / sqrt(v) stays bounded by the block's own
values, never m / eps.

Four bits
---------
Sixteen codes cannot cover decades. Li et al. 2023 ("Memory efficient optimizers with 4-bit
states") use smaller blocks (128), so that fewer weights share a scale, and a second moment's
map without zero whose smallest code is 1/16 (torchao's k / 16, k = 1 .. 16); jstep keeps both
and chooses the codes for the step m_hat / (sqrt(v_hat) + eps). At 4 bits a code is a large
fraction of its value, and the errors multiply: an m stored a times too large over a v stored
b times too small makes the step a sqrt(b) times too large (a times sqrt(b)).

v's smallest code, 1/16, floors sqrt(v) at a quarter of the block's largest sqrt(v): a weight
whose v lies under s / 16 takes a smaller step than in float32, never a larger one. Above the
floor v needs relative precision, as for 8 bits, so the 16 codes are geometric::

    unsigned, 4 bits:  q = 16^(-(15 - k) / 15),  k = 0 .. 15      (1/16 .. 1)

each 16^(1/15) = 1.20 times the one below: even stochastic rounding stores v at most 1.2
times too small (the step 1.10 times too large), where k / 16 stores a v just under 2/16 as
1/16, 2 times too small (the step 1.41 times too large).

m's map follows from that floor. Where a weight's gradients keep one sign, m_hat / sqrt(v_hat)
is near 1 for every weight, so an m under 0.1 of its block's largest comes with a v under
0.01 of the largest, below the floor: its step is at most 0.1 / 0.25 = 0.4 of the block's
largest step whichever code stores it. The codes under 0.1 cannot make a step too large and
do little for the steps that matter, so all seven go to the top decade, where steps are made,
in equal steps of 0.15::

    signed, 4 bits:  q = +-(0.1 + 0.15 k),  k = 0 .. 6,  and 0

Neighbours are at most 1.6 times apart from 0.25 up (2.5 times between 0.1 and 0.25, under the
floor), so stochastic rounding stores an m above the floor at most 1.6 times too large, and one
store makes a step at most 1.6 sqrt(1.2) = 1.76 times its float32 size. The signed 8-bit rule
cut to 4 bits (codes 0.01, 0.055, 0.1, 0.325, 0.55, 0.775, 1) puts 0.1 and 0.325, 3.25 times
apart, side by side: with v in k / 16, 3.25 sqrt(2) = 4.6. Round to nearest stores |m| < 0.05 s
as 0 (the weight's average forgets its past gradients there, and its next step is made from
the new gradient's share alone); stochastic rounding stores it as 0 or 0.1 s,
unbiased. The map keeps 0 twice, +-1 and its symmetry. The codes random-walk over many steps of
stochastic rounding, so these bounds hold per store, not per run: on one block spanning six
decades (``benchmarks/quantized_accuracy.py``) the largest step is 2.5 learning rates where
float32's is 1.4 (with that cut and k / 16: 3.5).

Rounding
--------
Within any two neighbouring codes lo < hi, round to nearest takes the nearer; with a key the
code is hi with probability (|y| - lo) / (hi - lo) and lo otherwise, so that E[s q(c)] = x for
every x with |x| <= s (for the unsigned maps, x >= their smallest code times s; values below
are stored as that code), as `jstep.stochastic_round` does for narrow floats. The keys come
from the rounding seed, the step count and the leaf, so a resumed run draws the same bits as an
uninterrupted one. The two neighbours are found without a search of the table: the leading
bits of |y|'s float32 word (its exponent and the top bits of its fraction) number buckets
narrow enough that each holds at most one code, and a table per bucket gives the code below.

Very large values, infinities and NaN
-------------------------------------
A block's scale is its largest magnitude up to 2^126 (8.5e37), and stops there: XLA computes
x / s as x * (1 / s), and above 2^126 the reciprocal is subnormal, which CPUs flush to 0 (every
y of the block would be 0). Larger magnitudes, infinities included, saturate at +-2^126, as a
conversion to a narrow float saturates at its largest value: their y lies beyond +-1 and is
stored as the code +-1 (the smallest code for a negative value in an unsigned map), while every
other element of the block is stored as usual against s = 2^126. A block holding NaN has scale
NaN, and every element of it decodes as NaN. Stochastic rounding stores the same scales.

Arithmetic always runs in float32: a state is dequantized to float32, the notes' rule is
applied, and the result is quantized, one leaf at a time. The new value is needed three
times (for the step, for its blocks' maxima and for its codes) and the maxima must be known
before any code, so a compiled step either writes a float32 copy of the leaf to memory or
reads the codes more than once. jstep reads them three times (``jstep.precision.advance``):
the step then holds no float32 buffer of the state's size, only a copy of the codes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from jstep import precision

_DEFAULT_BLOCK = {8: 256, 4: 128}


# --------------------------------------------------------------------------------- formats


@dataclasses.dataclass(frozen=True)
class BlockwiseFormat:
    """A block-wise quantized state format (see `blockwise`): hashable, so it can be static."""

    bits: int
    block_size: int
    min_size: int

    def __repr__(self) -> str:
        return f"jstep.blockwise(bits={self.bits}, block_size={self.block_size}, min_size={self.min_size})"


def _check_count(name: str, value: Any, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if int(value) < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def blockwise(bits: int = 8, block_size: int | None = None, *, min_size: int = 4096) -> BlockwiseFormat:
    """A state format: store an optimizer's state in `bits` bits per element, block by block.

    Pass it wherever a state dtype goes (``mu_dtype``, ``nu_dtype``, ``accumulator_dtype``)::

        jstep.adam(1e-3, mu_dtype=jstep.blockwise(8), nu_dtype=jstep.blockwise(8))

    Each state leaf with at least `min_size` elements becomes a `QuantizedArray`: one code
    of `bits` bits per element and one float32 scale per block of `block_size` elements
    (1 + 4 / 256 bytes per element for 8 bits, 1/2 + 4 / 128 for 4). Smaller leaves (biases,
    norms) stay float32, as in bitsandbytes. First moments and velocities use the signed map
    (8 bits: a dynamic exponent, geometric below 1e-2; 4 bits: 0.1 + 0.15 k and 0), second
    moments an unsigned map without zero (geometric: 1e-12 .. 1 for 8 bits, 1/16 .. 1 for 4);
    the module's docstring derives them. The arithmetic
    of every step runs in float32.

    Args:
      bits: 8 or 4.
      block_size: elements per scale, a positive power of two (default 256 for 8 bits, 128
        for 4).
      min_size: leaves with fewer elements stay float32; an int >= 0 (0 quantizes every leaf).

    Sharded params: a state leaf's codes keep its param's sharding and its blocks never
    straddle two devices: the block size shrinks to the largest power of two that divides
    every run of consecutive (row-major) elements of a shard (a (64, 24) param split by rows
    over 8 devices, 192 elements each, gets blocks of 64). The scales keep the param's
    leading axes (`QuantizedArray`) and are split as the param, by rows, by columns or along a
    middle axis, so that its step moves no data between devices. A split leaf whose quantized
    state would take more bytes on a device than float32 state (blocks of 1 element on shards
    of an odd width, say) stays float32, as a small leaf does. The block size is chosen from the
    sharding `init` sees: on a mesh with explicit axes (``jax.make_mesh``'s default) the
    type carries it, eagerly and under ``jit``; on auto axes call ``init`` eagerly or on
    ``jax.ShapeDtypeStruct`` params with their sharding (under ``jit`` it is not known until
    XLA compiles, and the format's block size is used).

    Raises:
      ValueError, TypeError: for bits other than 4 or 8, a block size that is not a positive
        power of two, or a negative `min_size`.
    """
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, numbers.Integral) or int(bits) not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    bits = int(bits)
    if block_size is None:
        block_size = _DEFAULT_BLOCK[bits]
    block_size = _check_count("block_size", block_size, 1)
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a positive power of two (64, 128, 256, ...), got {block_size}")
    return BlockwiseFormat(bits, block_size, _check_count("min_size", min_size, 0))


class Layout(NamedTuple):
    """What a `QuantizedArray`'s arrays mean: the value's shape, its bits, block size and map."""

    shape: tuple[int, ...]
    bits: int
    block_size: int
    signed: bool


class QuantizedArray(NamedTuple):
    """An array stored block-wise in 8 or 4 bits: ``dequantize(q) ~ x``.

    A pytree whose children are two plain arrays (so it jits, donates, shards and
    checkpoints like any state) and whose `layout` is static:

    * ``codes``: uint8. 8 bits: one code per element, in the value's shape. 4 bits: two
      codes per byte along one axis, the value's last axis of even length (element 2j along
      it in the low half, 2j + 1 in the high half), that axis halved and the others the
      value's, so that the codes can be split as the value is; when every axis is odd, along
      the longest (the last of the longest), padded to even, which pads the fewest elements
      (a 0-d value: one byte). A (4096, 3) value's codes are (2048, 3), a (3, 3, 512, 1)
      value's (3, 3, 256, 1), a (5, 7) value's (5, 4), a (4097, 3) value's (2049, 3).
    * ``scale``: float32, one per block of ``layout.block_size`` consecutive elements in
      row-major order: the block's largest magnitude. The scales keep the value's leading
      axes: with a the last axis from which on the elements (runs of shape[a] x ... x
      shape[-1]) hold whole blocks, they are shaped ``(*shape[:a], run / block_size)``, so that
      they split as the value along those axes (a (4096, 768) value's in blocks of 256 are
      (4096, 3), a (3, 3, 64, 128) kernel's (3, 3, 32)). When the value's size is not a
      multiple of the block size, one per block, (blocks,), the last block padded.
    * ``layout``: the value's shape, the bits, the block size and whether the map is signed.
    """

    codes: jax.Array
    scale: jax.Array
    layout: Layout

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    @property
    def size(self) -> int:
        return math.prod(self.layout.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the codes and the scales."""
        return math.prod(jnp.shape(self.codes)) + 4 * math.prod(jnp.shape(self.scale))


def _not_an_array(q: QuantizedArray, *_: Any) -> Any:
    raise TypeError(
        "a jstep.QuantizedArray holds codes and scales, not values: use jstep.dequantize(q) for the "
        "float32 array it stands for"
    )


# As a NamedTuple it would concatenate (q + x), repeat (q * 2) or become an object array.
_ARITHMETIC = ("add", "radd", "sub", "rsub", "mul", "rmul", "truediv", "rtruediv", "matmul", "rmatmul", "neg")
for _name in (*_ARITHMETIC, "array", "jax_array"):  # jnp.asarray asks for __jax_array__ first
    setattr(QuantizedArray, f"__{_name}__", _not_an_array)


def _flatten_with_keys(q: QuantizedArray):
    return ((jax.tree_util.GetAttrKey("codes"), q.codes), (jax.tree_util.GetAttrKey("scale"), q.scale)), q.layout


def _unflatten(layout: Layout, children: Any) -> QuantizedArray:
    codes, scale = children
    return QuantizedArray(codes, scale, layout)


jax.tree_util.register_pytree_with_keys(QuantizedArray, _flatten_with_keys, _unflatten)


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, QuantizedArray)


# -------------------------------------------------------------------------------- the maps


def _magnitudes(bits: int, signed: bool) -> np.ndarray:
    """The map's magnitudes, ascending, in float64 (module docstring): the codes >= 0 of a
    signed map, 0 first; every code of an unsigned one."""
    if bits == 4:  # signed: 0 and the top decade in equal steps, (2 + 3 k) / 20; unsigned: 16^(-(15 - k) / 15)
        return np.concatenate([[0.0], np.arange(2, 21, 3) / 20]) if signed else 16.0 ** (-np.arange(15, -1, -1) / 15)
    n = bits - 1
    if signed:  # the top two decades: 10^-z (0.1 + 0.9 k / S_z), S_z = 2^(n-1-z); below: geometric
        linear = [10.0**-z * (0.1 + 0.9 * np.arange(1, 2 ** (n - 1 - z) + 1) / 2 ** (n - 1 - z)) for z in (0, 1)]
        count = 2 ** (n - 2) - 1
        geometric = 10.0 ** (-2 - (n - 3) * np.arange(count) / (count - 1))
        return np.sort(np.concatenate([[0.0], geometric, *linear]))
    return 10.0 ** (-12 * np.arange(255, -1, -1) / 255)


@functools.cache
def code_table(bits: int, signed: bool) -> np.ndarray:
    """The 2^bits codes q(c) of a map, sorted (code c means q(c) = table[c]), as float32.

    A signed map holds -m[::-1], then m (m its magnitudes, 0 first), so 0 appears twice.
    """
    magnitudes = _magnitudes(bits, signed)
    table = np.concatenate([-magnitudes[::-1], magnitudes]) if signed else magnitudes
    assert table.size == 2**bits
    return table.astype(np.float32)


class _Buckets(NamedTuple):
    """Tables that find a magnitude's codes without a search (see `_buckets`)."""

    shift: int  # key = (float32 bits of |y|) >> shift
    first: int  # the key of bucket 0
    nearest_below: np.ndarray  # per bucket: the nearest code's index at the bucket's lower end
    nearest_cut: np.ndarray  # per bucket: the midpoint between two codes inside it, or inf
    lower: np.ndarray  # per bucket: the index of the largest code <= the bucket's lower end
    next_code: np.ndarray  # per bucket: the code above `lower` when it lies inside the bucket, or inf
    magnitudes: np.ndarray  # the map's magnitudes, ascending (float32)


def _float_bits(x: Any) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.int32).astype(np.int64)


@functools.cache
def _buckets(bits: int, signed: bool) -> _Buckets:
    """Cut [0, 1] into buckets by the leading bits of a float32 (its exponent and the top
    `mantissa` bits of its fraction, so each bucket is 2^-mantissa of its value wide), with
    enough bits that no bucket holds two codes or two midpoints between codes: the nearest code
    of |y| is then its bucket's code at the lower end, or the next one when |y| is past the one
    midpoint inside; and the two codes around |y| are found the same way. Two or four table
    reads per element instead of a binary search of the codes."""
    table = code_table(bits, signed)
    magnitudes = table[table.size // 2 :] if signed else table
    midpoints = (magnitudes[:-1].astype(np.float64) + magnitudes[1:]) / 2  # exact: float32 sums fit
    cuts = midpoints.astype(np.float32)
    # The first float32 at or above each midpoint: |y| >= cut exactly when |y| >= the midpoint.
    cuts = np.where(cuts < midpoints, np.nextafter(cuts, np.float32(np.inf)), cuts)
    points = np.concatenate([magnitudes[magnitudes > 0], cuts[cuts > 0]])
    for mantissa in range(1, 24):
        shift = 23 - mantissa
        first = int(_float_bits(points.min() / 2) >> shift)  # bucket 0 also holds everything below
        keys = np.arange(first, int(_float_bits(1.0) >> shift) + 1)
        low = (keys << shift).astype(np.int32).view(np.float32)
        low[0] = 0.0
        high = ((keys + 1) << shift).astype(np.int32).view(np.float32)

        def inside(values, low=low, high=high):
            return (values[None, :] > low[:, None]) & (values[None, :] < high[:, None])

        if inside(cuts).sum(1).max() <= 1 and inside(magnitudes).sum(1).max() <= 1:
            break
    below = np.searchsorted(cuts, low, side="right")
    cut = np.where(inside(cuts).any(1), cuts[np.minimum(below, cuts.size - 1)], np.inf)
    lower = np.searchsorted(magnitudes, low, side="right") - 1
    above = np.minimum(lower + 1, magnitudes.size - 1)
    next_code = np.where((magnitudes[above] > low) & (magnitudes[above] < high), magnitudes[above], np.inf)
    return _Buckets(
        shift,
        first,
        below.astype(np.int32),
        cut.astype(np.float32),
        lower.astype(np.int32),
        next_code.astype(np.float32),
        magnitudes,
    )


@functools.cache
def _nearest_words(bits: int, signed: bool) -> np.ndarray:
    """Per bucket, one uint32 that gives the nearest code in a single table read (see `_codes`):
    (index << 24) + 2^24 - cut, where index is the nearest code at the bucket's lower end and
    cut the offset of the one midpoint inside the bucket from that end, in units of the float32
    word's last bit (2^shift, past every offset, when the bucket holds no midpoint). Adding the
    low `shift` bits of |y|'s word carries into bit 24 exactly when |y| >= the midpoint."""
    tables = _buckets(bits, signed)
    bucket_low = (np.arange(tables.lower.size, dtype=np.int64) + tables.first) << tables.shift
    inside = np.isfinite(tables.nearest_cut)
    cut = np.where(inside, _float_bits(np.where(inside, tables.nearest_cut, 0)) - bucket_low, 1 << tables.shift)
    # Bucket 0 (everything below the smallest code) holds no midpoint; |y| there reads low bits 0.
    assert not inside[0] and (cut >= 0).all() and (cut <= 1 << tables.shift).all() and bits <= 8
    return ((tables.nearest_below.astype(np.int64) << 24) + (1 << 24) - cut).astype(np.uint32)


def _read(table: np.ndarray, index: jax.Array) -> jax.Array:
    """``table[index]`` for indices that lie in [0, table.size) by construction: one gather, without
    the test and wrap of negative indices that indexing adds (operations compiled for every leaf).
    The values are placed as the indices, which JAX cannot infer for indices split over explicit
    mesh axes that it does not see (a ``vmap`` over an ensemble split one model per device)."""
    return (
        jnp.asarray(table)
        .at[index]
        .get(mode="promise_in_bounds", wrap_negative_indices=False, out_sharding=jax.typeof(index).sharding)
    )


def _codes(y: jax.Array, bits: int, signed: bool, uniform: jax.Array | None) -> jax.Array:
    """The code (int32) of each y = x / s in [-1, 1]: the nearest, or with `uniform` one of the
    two around y, the upper with probability (|y| - lo) / (hi - lo) (module docstring).

    Table reads (gathers) are the costly part of this on a CPU, so round to nearest reads one
    word per element (`_nearest_words`) and uses it once: XLA then reads it inside the fusion
    that computes y instead of writing the words out to memory first.
    """
    tables = _buckets(bits, signed)
    magnitudes = tables.magnitudes
    magnitude = jnp.clip(jnp.abs(y) if signed else y, magnitudes[0], 1.0)  # unsigned: y < 0 -> the smallest code
    word = lax.bitcast_convert_type(magnitude, jnp.uint32)
    raw_key = (word >> tables.shift).astype(jnp.int32) - tables.first
    key = jnp.clip(raw_key, 0, tables.lower.size - 1)
    if uniform is None:
        low_bits = jnp.where(raw_key > 0, word & jnp.uint32((1 << tables.shift) - 1), jnp.uint32(0))
        index = ((_read(_nearest_words(bits, signed), key) + low_bits) >> 24).astype(jnp.int32)
    else:
        index = _read(tables.lower, key)
        index = index + (magnitude >= _read(tables.next_code, key)).astype(jnp.int32)
        low = _read(magnitudes, index)
        high = _read(magnitudes, jnp.minimum(index + 1, magnitudes.size - 1))
        gap = high - low
        fraction = (magnitude - low) / jnp.where(gap > 0, gap, 1)
        index = index + (uniform < fraction).astype(jnp.int32)
    if not signed:
        return index
    half = 2 ** (bits - 1)
    return jnp.where(y < 0, half - 1 - index, half + index)


# ---------------------------------------------------------------------------- quantization


def _blocks(x: jax.Array, layout: Layout) -> jax.Array:
    """`x` (of ``layout.shape``) as its blocks, of shape ``(*_scale_shape(layout), block_size)``:
    its axes from `_blocked_axis` on cut into blocks (a reshape of those axes alone, which keeps
    a split of the axes before and of that axis), else all its elements in row-major order, the
    last block padded with zeros."""
    axis = _blocked_axis(layout)
    if axis is not None:  # merge the axes from `axis` on, then cut them (each a reshape JAX's sharding types allow)
        return x.reshape(*layout.shape[:axis], -1).reshape(*_scale_shape(layout), layout.block_size)
    flat = x.reshape(-1)
    padding = -flat.size % layout.block_size
    if padding:
        flat = jnp.pad(flat, (0, padding))
    return flat.reshape(-1, layout.block_size)


def _unblock(blocks: jax.Array, layout: Layout) -> jax.Array:
    """The inverse of `_blocks`: the value of ``layout.shape`` (its padding dropped)."""
    shape, axis = layout.shape, _blocked_axis(layout)
    if axis is not None:
        return blocks.reshape(*shape[:axis], -1).reshape(shape)
    return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)


def _packed_axis(shape: tuple[int, ...]) -> int:
    """The axis along which 4-bit codes are paired: the last of even length (0 included), else the
    last of the longest, whose padding to even adds the fewest elements (a 0-d value is one
    element along axis 0)."""
    even = [axis for axis, length in enumerate(shape) if length % 2 == 0]
    if even:
        return even[-1]
    return max(range(len(shape)), key=lambda axis: (shape[axis], axis), default=0)


def _pack(codes: jax.Array) -> jax.Array:
    """Two 4-bit codes per byte along `_packed_axis` (padded to even when every axis is odd):
    element 2j of that axis in the low half of byte j, 2j + 1 in the high half."""
    codes = codes.reshape(codes.shape or (1,))
    axis = _packed_axis(codes.shape)
    if codes.shape[axis] % 2:
        codes = jnp.pad(codes, [(0, 1 if a == axis else 0) for a in range(codes.ndim)])
    shape = codes.shape
    packed_shape = (*shape[:axis], shape[axis] // 2, *shape[axis + 1 :])
    if math.prod(shape[axis + 1 :]) == 1:  # each pair adjacent: one uint16 (2j its low byte), read once
        words = lax.bitcast_convert_type(codes.reshape(*shape[:axis], shape[axis] // 2, 2), jnp.uint16)
        return ((words & 0x0F) | ((words >> 4) & 0xF0)).astype(jnp.uint8).reshape(packed_shape)
    pairs = codes.reshape(*shape[:axis], shape[axis] // 2, 2, *shape[axis + 1 :])
    low, high = (lax.index_in_dim(pairs, h, axis + 1, keepdims=False) for h in (0, 1))
    return low | (high << jnp.uint8(4))


def _unpack(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The codes of `_pack`: element 2j + h along the packed axis is byte j shifted right by 4 h,
    its low 4 bits.

    Written per element (a broadcast of each byte to its two elements, a shift by 0 or 4), so
    that it fuses into the lookups that read it at the cost of a few integer operations.
    """
    axis = _packed_axis(shape)
    if shape and math.prod(shape[axis + 1 :]) == 1:  # as the pairs of the last axis
        packed = packed.reshape(packed.shape[: axis + 1])
    sizes = packed.shape
    pairs = jnp.broadcast_to(jnp.expand_dims(packed, axis + 1), (*sizes[: axis + 1], 2, *sizes[axis + 1 :]))
    shift = lax.broadcasted_iota(jnp.uint8, pairs.shape, axis + 1) * jnp.uint8(4)
    codes = ((pairs >> shift) & jnp.uint8(0x0F)).reshape(*sizes[:axis], 2 * sizes[axis], *sizes[axis + 1 :])
    return lax.slice_in_dim(codes, 0, shape[axis] if shape else 1, axis=axis).reshape(shape)


def _block_absmax(blocks: jax.Array) -> jax.Array:
    """min(max_i |x_i|, 2^126) of each block (the last axis) of `blocks` (NaN when it holds one, as ``jnp.max``).

    Two reductions: the largest float32 word of |x| (its sign bit cleared; the words of
    non-negative floats are ordered like their values, NaN above inf) over runs of at most 32
    elements, then the largest of those. XLA reads the values for the first one inside the
    fusion that computes them: a single reduction over more than 32 elements is rewritten by
    XLA:CPU into a windowed one that needs its input written to memory first, a float32 copy
    of the leaf.

    The scale stops at `_LARGEST_SCALE` (2^126, 8.5e37): XLA computes x / s as x * (1 / s), and
    above 2^126 the reciprocal is subnormal, which CPUs flush to 0. Larger magnitudes (and
    infinities) saturate there, at +-s, as a conversion to a narrow float saturates at its
    largest value.
    """
    *rows, size = blocks.shape
    run = min(size, 32)
    words = lax.bitcast_convert_type(blocks, jnp.int32) & jnp.int32(0x7FFFFFFF)
    largest = lax.bitcast_convert_type(jnp.max(words.reshape(*rows, size // run, run), axis=-1), jnp.float32)
    return jnp.max(jnp.minimum(largest, _LARGEST_SCALE), axis=-1)  # NaN stays NaN


_LARGEST_SCALE = np.float32(2.0**126)  # the largest s whose 1 / s is a normal float32


def _encode(x: jax.Array, layout: Layout, seed: jax.Array | None, scale: jax.Array | None = None) -> QuantizedArray:
    """Quantize `x` (any real dtype, computed in float32) to `layout`; stochastically with `seed`.

    `scale`: the blocks' maxima when already computed (`_refresh` computes them from another
    read of the state), else computed here.
    """
    blocks = _blocks(x.astype(jnp.float32), layout)
    if scale is None:
        scale = _block_absmax(blocks)
    y = blocks / jnp.where(scale > 0, scale, 1)[..., None]
    uniform = None
    if seed is not None:
        uniform = precision._uniform(precision._hashed_bits(seed, y.shape, 1), jnp.float32)
    codes = _unblock(_codes(y, layout.bits, layout.signed, uniform).astype(jnp.uint8), layout)
    if layout.bits == 4:
        codes = _pack(codes)
    return QuantizedArray(codes, scale, layout)


def _decode(q: QuantizedArray, read: int = 0) -> jax.Array:
    """s q(c) for each element, in float32.

    `read` numbers independent reads of the same state within one step (see `_refresh`): each
    looks its codes up in its own copy of the table (padded with `read` unused entries), so
    that XLA, which merges identical lookups and never repeats one in several fusions, reads
    the codes again in each fusion that needs the values instead of writing them to memory.
    """
    _check_arrays(q)
    layout = q.layout
    codes = _unpack(q.codes, layout.shape) if layout.bits == 4 else q.codes
    table = np.concatenate([code_table(layout.bits, layout.signed), np.zeros(read, np.float32)])
    values = _read(table, codes)
    return _unblock(_blocks(values, layout) * q.scale[..., None], layout)


def _check_arrays(q: QuantizedArray) -> None:
    """Raise at trace time if `q`'s codes and scales are not the shapes its layout says."""
    layout = q.layout
    codes, scale = _codes_shape(layout), _scale_shape(layout)
    if tuple(jnp.shape(q.codes)) == codes and tuple(jnp.shape(q.scale)) == scale:
        return
    raise ValueError(
        f"a jstep.QuantizedArray of shape {layout.shape} ({layout.bits} bits, blocks of {layout.block_size}) "
        f"needs codes of shape {codes} and scale of shape {scale}, got codes {tuple(jnp.shape(q.codes))} "
        f"and scale {tuple(jnp.shape(q.scale))}. Quantized state is not supported split by jax.shard_map: "
        "passed in split, each shard holds part of the arrays under the whole value's layout; initialised "
        "inside and returned split, the arrays of every shard stand under one shard's layout. Keep it inside "
        "(initialised and updated within the same shard_map, each shard's state its own), or pass it and the "
        "params in and out whole (PartitionSpec()), or split the params with jax.jit and NamedSharding instead, "
        "which splits the codes with them. (A state batched by jax.vmap fails the same way outside jax.vmap: "
        "read it inside, or member by member; so do arrays restored from a checkpoint of another layout.)"
    )


def _refresh(old: QuantizedArray, rule: Callable[[jax.Array], jax.Array], seed: jax.Array | None) -> QuantizedArray:
    """``rule(dequantize(old))`` quantized in `old`'s layout, for a `rule` that works element by element.

    The rule is applied to two more reads of `old` than the step's own (`_decode`'s `read` 1
    for the blocks' maxima, 2 for the codes). On a CPU that costs two table lookups per
    element but no float32 buffer: with one read, XLA writes the whole dequantized leaf to
    memory and reads it back for the new value, its maxima, its codes and the update, and
    copies the codes it still reads after the new codes overwrite them.
    """
    layout = old.layout
    scale = _block_absmax(_blocks(jnp.asarray(rule(_decode(old, 1)), jnp.float32), layout))
    return _encode(rule(_decode(old, 2)), layout, seed, scale)


def _check_real(name: str, x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a real floating array to quantize, got dtype {x.dtype}; block-wise formats hold "
            "real values (use a floating dtype or None as the state dtype of integer or complex params)"
        )
    return x


def _check_format(fmt: Any) -> BlockwiseFormat:
    if not isinstance(fmt, BlockwiseFormat):
        raise TypeError(f"fmt must be a format from jstep.blockwise(bits, block_size), got {fmt!r}")
    return fmt


def quantize(x: Any, fmt: BlockwiseFormat, *, signed: bool = True, key: jax.Array | None = None) -> QuantizedArray:
    """Store `x` block-wise in `fmt`: one code per element, one float32 scale per block.

    Every element is quantized, whatever ``fmt.min_size`` (which only tells the optimizers
    which leaves to leave in float32). Magnitudes above 2^126 (8.5e37), infinities included,
    saturate at +-2^126 and the rest of their block is stored against that scale; a block
    holding NaN comes back all NaN (the module's docstring, "Very large values, infinities and
    NaN").

    Args:
      x: a real floating array, any shape.
      fmt: a format, ``jstep.blockwise(bits, block_size)``.
      signed: True for values of either sign (the dynamic-exponent map of first moments),
        False for non-negative values (the map of second moments, without zero; a negative
        value is stored as its smallest code).
      key: None (round to nearest), or a JAX random key: round at random between the two
        neighbouring codes so that ``E[dequantize(quantize(x, fmt, key=k))] = x`` within the
        map's range.

    Returns:
      A `QuantizedArray`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jstep
      >>> x = jnp.array([2.0, -0.65, 0.02, 0.0, 0.3])  # 0.3 / 2 lies between two codes
      >>> q = jstep.quantize(x, jstep.blockwise(8))
      >>> print(q.codes.dtype, q.codes.shape, q.scale)
      uint8 (5,) [2.]
      >>> print(jstep.dequantize(q))
      [ 2.     -0.65    0.02    0.      0.3125]
    """
    fmt = _check_format(fmt)
    x = _check_real("x", x)
    signed = bool(signed)
    if key is not None:
        precision._check_key(key)
    layout = Layout(tuple(x.shape), fmt.bits, fmt.block_size, signed)
    return encode(x, layout, None if key is None else precision._seed_words(key))


def dequantize(q: Any) -> Any:
    """The float32 values a `QuantizedArray` stands for: s q(c) for each element.

    Given a tree instead (an optimizer state, say), the same tree with each `QuantizedArray`
    replaced by its values and every other leaf (the float32 state of leaves under
    ``min_size``, a step count) as it is.

    Example:
      >>> import jax.numpy as jnp
      >>> import jstep
      >>> fmt = jstep.blockwise(8)
      >>> state = jstep.adam(0.1, mu_dtype=fmt, nu_dtype=fmt).init({"w": jnp.ones((64, 64)), "b": jnp.ones(64)})
      >>> values = jstep.dequantize(state.mu)  # w's m quantized, b's (64 elements) float32
      >>> print(values["w"].dtype, values["w"].shape, values["b"].dtype)
      float32 (64, 64) float32
    """
    if isinstance(q, QuantizedArray):
        return decode(q)
    if isinstance(q, (jax.Array, np.ndarray, numbers.Number)):
        raise TypeError(
            f"q must be a jstep.QuantizedArray (from jstep.quantize) or a tree holding them (a state), "
            f"got {type(q).__name__}"
        )
    return values(q)


def values(tree: Any) -> Any:
    """`tree` with each `QuantizedArray` leaf dequantized to float32, every other leaf as it is."""
    return jax.tree.map(lambda leaf: decode(leaf) if is_quantized(leaf) else leaf, tree, is_leaf=is_quantized)


# ----------------------------------------------------------------------- optimizer state


def _shard_block_size(leaf: Any, block_size: int) -> int:
    """The largest power of two <= `block_size` that divides every row-major run of `leaf`'s
    shards, so that no block straddles two devices (`block_size` when the leaf is not split)."""
    sharding = _known_sharding(leaf) or _explicit_sharding(leaf)  # a tracer's, on explicit axes
    shape = tuple(jnp.shape(leaf))
    if sharding is None or not shape:
        return block_size
    try:
        shard = tuple(sharding.shard_shape(shape))
    except Exception:  # a sharding that cannot say (e.g. a tracer's): keep the format's
        return block_size
    split = [axis for axis in range(len(shape)) if shard[axis] < shape[axis]]
    if not split:
        return block_size
    run = math.prod(shard[split[-1] :])
    return min(block_size, run & -run)


def _known_sharding(leaf: Any) -> Any:
    """The sharding of a concrete array or of a ShapeDtypeStruct that carries one; None for a
    tracer (under ``jit`` on auto axes it is not known until XLA compiles) or a plain value."""
    if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) and not isinstance(leaf, jax.core.Tracer):
        return getattr(leaf, "sharding", None)
    return None


def _placements(sharding: Any, layout: Layout) -> tuple[Any, Any]:
    """Where the codes and the scales of a leaf of `layout` placed by `sharding` go: the codes as
    the param (when the shards divide their shape: always for 8 bits, whose codes are the
    param's shape); the scales split as the param's axes before `_blocked_axis` and that axis
    (`_scale_shape`), when no later axis is split and the shards divide them, every device's
    blocks then being its own; else replicated. None where `sharding` does not say (a device
    or an unknown layout)."""
    shape, axis = layout.shape, _blocked_axis(layout)
    if not isinstance(sharding, NamedSharding) or not shape:
        return None, None
    codes = _placed_as(sharding, _codes_shape(layout))  # None: a 4-bit packed axis, halved, the shards no longer divide
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    if axis is None or any(spec[axis + 1 :]):
        return codes, replicated
    scales = NamedSharding(sharding.mesh, PartitionSpec(*spec[: axis + 1]))
    return codes, _placed_as(scales, _scale_shape(layout)) or replicated


def _placed_as(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding | None:
    """`sharding` when its shards divide `shape`, else None."""
    try:
        sharding.shard_shape(shape)
    except ValueError:
        return None
    return sharding


def _explicit_sharding(x: Any) -> NamedSharding | None:
    """The sharding that `x`'s type carries when it is split over explicit mesh axes
    (``jax.make_mesh``'s default), eagerly and under ``jit`` alike; None otherwise."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    if not isinstance(sharding, NamedSharding) or not any(sharding.spec):
        return None
    return sharding


def _codes_shape(layout: Layout) -> tuple[int, ...]:
    """The shape of a `QuantizedArray`'s codes: the value's for 8 bits; for 4, the packed axis
    (`_packed_axis`) halved, rounded up."""
    shape = layout.shape
    if layout.bits == 8:
        return shape
    if not shape:
        return (1,)
    axis = _packed_axis(shape)
    return (*shape[:axis], -(-shape[axis] // 2), *shape[axis + 1 :])


def _blocked_axis(layout: Layout) -> int | None:
    """The last axis a from which on the value's elements (runs of prod(shape[a:]) in row-major
    order) hold whole blocks, so that blocks cut those axes alone; None when there is none (the
    value's size is not a multiple of the block size, or it is 0-d)."""
    shape, run = layout.shape, 1
    for axis in reversed(range(len(shape))):
        run *= shape[axis]
        if run % layout.block_size == 0:
            return axis
    return None


def _scale_shape(layout: Layout) -> tuple[int, ...]:
    """The shape of a `QuantizedArray`'s scales, one per block: the value's axes before
    `_blocked_axis`, then its blocks per run (so that the scales split with the value along
    those axes); else the number of blocks (row-major order, the last one padded)."""
    axis = _blocked_axis(layout)
    if axis is not None:
        return (*layout.shape[:axis], math.prod(layout.shape[axis:]) // layout.block_size)
    return (_block_count(layout),)


def _block_count(layout: Layout) -> int:
    """The number of blocks, and of scales: the value's elements over the block size, rounded up."""
    return -(-math.prod(layout.shape) // layout.block_size)


def encode(x: jax.Array, layout: Layout, seed: jax.Array | None) -> QuantizedArray:
    """`_encode`, also for `x` split over explicit mesh axes, whose type refuses the row-major
    reshapes of blocking: there it runs on auto axes and its codes and scales are placed as
    `_placements` says (the codes as `x`)."""
    sharding = _explicit_sharding(x)
    if sharding is None:
        return _encode(x, layout, seed)
    codes_sharding, scale_sharding = _placements(sharding, layout)
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    out = (codes_sharding or replicated, scale_sharding or replicated)
    if seed is None:
        codes, scale = jax.sharding.auto_axes(lambda x: _encode(x, layout, None)[:2], out_sharding=out)(x)
    else:
        codes, scale = jax.sharding.auto_axes(lambda x, seed: _encode(x, layout, seed)[:2], out_sharding=out)(x, seed)
    return QuantizedArray(codes, scale, layout)


def decode(q: QuantizedArray) -> jax.Array:
    """`_decode`, also for codes split over explicit mesh axes: the values are split as the codes."""
    sharding = _explicit_sharding(q.codes)
    if sharding is None:
        return _decode(q)
    out = _placed_as(sharding, q.layout.shape) or NamedSharding(sharding.mesh, PartitionSpec())
    return jax.sharding.auto_axes(lambda c, s: _decode(QuantizedArray(c, s, q.layout)), out_sharding=out)(
        q.codes, q.scale
    )


def _place(q: QuantizedArray, like: Any) -> QuantizedArray:
    """`q` with its codes given the sharding of `like` (the param) and its scales a matching one."""
    sharding = _known_sharding(like)
    codes_sharding, scale_sharding = _placements(sharding, q.layout)
    codes = q.codes if codes_sharding is None else jax.device_put(q.codes, codes_sharding)
    scale = q.scale if scale_sharding is None else jax.device_put(q.scale, scale_sharding)
    return QuantizedArray(codes, scale, q.layout)


def state_leaf(value: jax.Array, fmt: BlockwiseFormat, *, signed: bool, like: Any = None) -> Any:
    """An optimizer's state leaf in `fmt`: `value` (float32, from `_core.full_like_tree`, which
    refuses params that are not real floats) quantized, or float32 when smaller than ``fmt.min_size``
    or when its shards would hold more bytes quantized (`_saves_memory_on_each_device`).

    `like` (the param, possibly sharded or abstract) decides the block size, so that blocks
    never straddle the param's shards, and where the codes and scales go: the codes keep the
    param's sharding (when it is known: a concrete array or a ShapeDtypeStruct with one).
    """
    if value.size < fmt.min_size:
        return value.astype(jnp.float32)
    like = value if like is None else like
    layout = Layout(tuple(value.shape), fmt.bits, _shard_block_size(like, fmt.block_size), signed)
    if not _saves_memory_on_each_device(like, layout):
        return value.astype(jnp.float32)
    return _place(encode(value, layout, None), like)


def _saves_memory_on_each_device(like: Any, layout: Layout) -> bool:
    """False when a split param's quantized state would take more bytes on a device than its
    float32 state: where the shards' row-major runs force tiny blocks (a (512, 1000) param split
    by columns over 8 devices: runs of 125, blocks of 1, a float32 scale for each element), or
    where small blocks' scales are on every device (splits that leave the scales replicated,
    `_placements`)."""
    sharding = _known_sharding(like) or _explicit_sharding(like)
    if not isinstance(sharding, NamedSharding) or not layout.shape:
        return True
    try:
        shard = sharding.shard_shape(layout.shape)
    except ValueError:  # a sharding that cannot say (as in `_shard_block_size`): keep the format
        return True
    if tuple(shard) == layout.shape:
        return True
    codes_shape, scale_shape = _codes_shape(layout), _scale_shape(layout)
    codes_sharding, scale_sharding = _placements(sharding, layout)
    codes = math.prod(codes_sharding.shard_shape(codes_shape) if codes_sharding else codes_shape)
    scales = math.prod(scale_sharding.shard_shape(scale_shape) if scale_sharding else scale_shape)
    return codes + 4 * scales < 4 * math.prod(shard)
