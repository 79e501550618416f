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
per element (1.6% at B = 256). The table is where the precision goes: the averages of the
notes span many decades inside one block (a weight that sees gradients of 1e-6 beside one that
sees 1), so a uniform grid of 2^8 levels would round most of a block to 0.

The signed map (m_t, velocities, any average of g)
-------------------------------------------------
A dynamic exponent (Dettmers 2016, the map of bitsandbytes' 8-bit optimizers). After the sign
bit, a run of z zeros and a 1 says that the magnitude lies in the decade [0.1, 1) 10^-z; the
n - 1 - z bits that remain (n = bits - 1 magnitude bits) number 2^(n-1-z) equal cells of
that decade, and the code is the cell's midpoint::

    q = +-10^-z (0.1 + 0.9 (k + 1/2) / 2^(n-1-z)),   z = 0 .. n-1,  k = 0 .. 2^(n-1-z) - 1.

The top decade gets 2^(n-1) codes, each decade below half as many: the relative spacing is
0.9 / 2^(n-1-z) / 0.1 at the decade's low end, 1.4% at the top decade for 8 bits, while values
down to 10^-(n-1) (1e-6 for 8 bits, 1e-2 for 4) keep a code of their own. The all-zero
pattern is 0, and the pattern of sign 1 with all zeros (minus zero) is 1, so that the block's
largest positive element is exact. 8 bits: 127 negative codes, 0, 128 positive (up to 1);
4 bits: 7, 0, 8 (``create_dynamic_map(True, 7, 8)`` and ``(True, 3, 4)`` of bitsandbytes,
whose codes these are, and torchao's 4-bit first moment). The block's most negative element,
when it is the block's largest magnitude, is stored as the lowest code, -0.993 s for 8 bits.

The unsigned maps (v_t and every average of g^2)
-----------------------------------------------
Second moments are never negative, so the sign bit becomes one more bit of fraction: decade z
gets 2^(n-z) codes, 254 codes over seven decades for 8 bits, plus 1. But they must not
contain 0. The step is m_hat / (sqrt(v_hat) + eps): a v that rounds to 0 while m does not
(a weight whose gradients are 1e-6 in a block where another's are 1: v/s ~ 1e-12, m/s ~ 1e-6)
divides by eps and the step explodes (m_hat / eps ~ 100 learning rates). A linear map
(s k / 255) rounds to 0 everything under s / 510, most of such a block. So the code that
would be 0 is instead the midpoint of one decade further down, 0.55e-7, and a v under it is
stored as that: rounded up, never to 0, so the step of such a weight can only shrink. With
the smallest v code v_min = c s_v and m within its own block's codes, the step of a weight is
at most about max(|m|) / sqrt(c max(v)) * (its share): bounded by the block, never 1/eps.

For 4 bits (Li et al. 2023, "Memory efficient optimizers with 4-bit states"), the second
moment's 16 codes are linear without zero, q = k / 16 for k = 1 .. 16: 4 bits cannot cover
decades, and any zero code is the failure above. Blocks are smaller (128) so that fewer
weights share a scale.

Rounding
--------
Round to nearest picks the nearest code. With a key the code is chosen at random between the
two neighbouring codes lo <= y <= hi of y = x / s, hi with probability (y - lo) / (hi - lo),
so that E[s q(c)] = x for every x within the map's range, as `jstep.stochastic_round` does
for narrow floats (a resumed run draws the same bits: the keys come from the rounding seed,
the step count and the leaf). Values outside the range ([-0.993 s, s] for the signed 8-bit
map, below 0.55e-7 s or s / 16 for the unsigned ones) go to the nearest end.

Arithmetic always runs in float32: a state is dequantized to float32, the notes' rule is
applied, and the result is quantized, one leaf at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
    norms) stay float32, as in bitsandbytes. First moments and velocities use the signed
    dynamic-exponent map, second moments the unsigned map without zero (see the module's
    docstring for both). The arithmetic of every step runs in float32.

    Args:
      bits: 8 or 4.
      block_size: elements per scale, a positive power of two (default 256 for 8 bits, 128
        for 4).
      min_size: leaves with fewer elements stay float32; an int >= 0 (0 quantizes every leaf).

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
      codes per byte along the last axis (element 2j in the low half, 2j + 1 in the high
      half), the last axis halved and rounded up.
    * ``scale``: float32, one per block of ``layout.block_size`` consecutive elements in
      row-major order: the block's largest magnitude.
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


def _flatten_with_keys(q: QuantizedArray):
    return ((jax.tree_util.GetAttrKey("codes"), q.codes), (jax.tree_util.GetAttrKey("scale"), q.scale)), q.layout


def _unflatten(layout: Layout, children: Any) -> QuantizedArray:
    codes, scale = children
    return QuantizedArray(codes, scale, layout)


jax.tree_util.register_pytree_with_keys(QuantizedArray, _flatten_with_keys, _unflatten)


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, QuantizedArray)


# -------------------------------------------------------------------------------- the maps


def _signed_map(bits: int) -> np.ndarray:
    """The signed dynamic-exponent codes (module docstring), sorted, in float64: 2^bits values."""
    magnitude_bits = bits - 1
    decades = []
    for z in range(magnitude_bits):
        steps = 2 ** (magnitude_bits - 1 - z)
        decades.append(10.0**-z * (0.1 + 0.9 * np.arange(1, steps + 1) / steps))
    magnitudes = np.concatenate(decades)
    return np.sort(np.concatenate([-magnitudes, [0.0, 0.0], magnitudes]))  # 0 twice: +0 and -0


def _unsigned_map(bits: int) -> np.ndarray:
    """The unsigned dynamic-exponent codes without zero (module docstring), sorted, in float64."""
    magnitude_bits = bits - 1
    values = [1.0, 10.0**-magnitude_bits * 0.55]  # 1, and the code that would be 0 in bitsandbytes' map
    for z in range(magnitude_bits):
        cells = 2 ** (magnitude_bits - z)
        values += (10.0**-z * (0.1 + 0.9 * (np.arange(cells) + 0.5) / cells)).tolist()
    return np.sort(np.asarray(values))


@functools.cache
def code_table(bits: int, signed: bool) -> np.ndarray:
    """The 2^bits codes q(c) of a map, sorted (code c is the c-th smallest), as float32."""
    if signed:
        table = _signed_map(bits)
    elif bits == 4:
        table = np.arange(1, 17, dtype=np.float64) / 16
    else:
        table = _unsigned_map(bits)
    assert table.size == 2**bits
    return table.astype(np.float32)


# ---------------------------------------------------------------------------- quantization


def _search(thresholds: np.ndarray, y: jax.Array) -> jax.Array:
    """The number of `thresholds` (sorted, 2^k - 1 of them) that are <= y: a branchless binary search."""
    padded = jnp.asarray(np.append(thresholds, np.float32(np.inf)))
    index = jnp.zeros(y.shape, jnp.int32)
    step = padded.size // 2
    while step:
        index = index + step * (padded[index + step - 1] <= y).astype(jnp.int32)
        step //= 2
    return index


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
    """`x` in row-major order as (blocks, block_size), the last block padded with zeros."""
    flat = x.reshape(-1)
    padding = -flat.size % block_size
    if padding:
        flat = jnp.pad(flat, (0, padding))
    return flat.reshape(-1, block_size)


def _unblock(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)


def _pack(codes: jax.Array) -> jax.Array:
    """Two 4-bit codes per byte along the last axis (padded to even): element 2j low, 2j + 1 high."""
    if codes.ndim == 0:
        codes = codes.reshape(1)
    if codes.shape[-1] % 2:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    pairs = jnp.stack([packed & 15, packed >> 4], axis=-1)
    codes = pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return codes[..., : shape[-1] if shape else 1].reshape(shape)


def _encode(x: jax.Array, layout: Layout, seed: jax.Array | None) -> QuantizedArray:
    """Quantize `x` (any real dtype, computed in float32) to `layout`; stochastically with `seed`."""
    table = code_table(layout.bits, layout.signed)
    blocks = _blocks(x.astype(jnp.float32), layout.block_size)
    scale = jnp.max(jnp.abs(blocks), axis=1)
    y = blocks / jnp.where(scale > 0, scale, 1)[:, None]
    if seed is None:
        codes = _search((table[1:] + table[:-1]) / 2, y)
    else:
        y = jnp.clip(y, table[0], table[-1])
        below = _search(table[1:], y)  # table[below] <= y < table[below + 1]
        above = jnp.minimum(below + 1, table.size - 1)
        low, high = jnp.asarray(table)[below], jnp.asarray(table)[above]
        gap = high - low
        fraction = jnp.where(gap > 0, (y - low) / jnp.where(gap > 0, gap, 1), 0)
        uniform = precision._uniform(precision._hashed_bits(seed, y.shape, 1), jnp.float32)
        codes = below + (uniform < fraction).astype(jnp.int32)
    codes = _unblock(codes.astype(jnp.uint8), layout.shape)
    if layout.bits == 4:
        codes = _pack(codes)
    return QuantizedArray(codes, scale, layout)


def _decode(q: QuantizedArray) -> jax.Array:
    layout = q.layout
    codes = _unpack(q.codes, layout.shape) if layout.bits == 4 else q.codes
    values = jnp.asarray(code_table(layout.bits, layout.signed))[codes.astype(jnp.int32)]
    blocks = _blocks(values, layout.block_size) * q.scale[:, None]
    return _unblock(blocks, layout.shape)


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
    which leaves to leave in float32).

    Args:
      x: a real floating array, any shape.
      fmt: a format, ``jstep.blockwise(bits, block_size)``.
      signed: True for values of either sign (the dynamic-exponent map of first moments),
        False for non-negative values (the map of second moments, without zero; negative
        values are refused by no check and stored as its smallest code).
      key: None (round to nearest), or a JAX random key: round at random between the two
        neighbouring codes so that ``E[dequantize(quantize(x, fmt, key=k))] = x`` within the
        map's range.

    Returns:
      A `QuantizedArray`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jstep
      >>> x = jnp.array([1.0, -0.5, 1e-3, 0.0])
      >>> q = jstep.quantize(x, jstep.blockwise(8))
      >>> print(q.codes.dtype, q.scale)
      uint8 [1.]
      >>> print(jstep.dequantize(q))
      [ 1.         -0.49921876  0.00099688  0.        ]
    """
    fmt = _check_format(fmt)
    x = _check_real("x", x)
    signed = bool(signed)
    if key is not None:
        precision._check_key(key)
    layout = Layout(tuple(x.shape), fmt.bits, fmt.block_size, signed)
    return _encode(x, layout, None if key is None else precision._seed_words(key))


def dequantize(q: QuantizedArray) -> jax.Array:
    """The float32 values a `QuantizedArray` stands for: s q(c) for each element."""
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"q must be a jstep.QuantizedArray (from jstep.quantize), got {type(q).__name__}")
    return _decode(q)


# ----------------------------------------------------------------------- optimizer state


def _shard_block_size(leaf: Any, block_size: int) -> int:
    """The largest power of two <= `block_size` that divides every row-major run of `leaf`'s
    shards, so that no block straddles two devices (`block_size` when the leaf is not split)."""
    sharding = getattr(leaf, "sharding", None)
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


def state_leaf(value: jax.Array, fmt: BlockwiseFormat, *, signed: bool, like: Any = None) -> Any:
    """An optimizer's state leaf in `fmt`: `value` quantized, or float32 when smaller than ``fmt.min_size``.

    `like` (the param, possibly sharded or abstract) decides the block size, so that blocks
    never straddle the param's shards.
    """
    value = _check_real("a param given to init with a block-wise state format", value)
    if value.size < fmt.min_size:
        return value.astype(jnp.float32)
    block_size = _shard_block_size(value if like is None else like, fmt.block_size)
    return _encode(value, Layout(tuple(value.shape), fmt.bits, block_size, signed), None)
