"""Float64 NumPy references for block-wise quantized optimizer state, written without jstep.

The maps are transcribed from bitsandbytes 0.50 (``bitsandbytes.functional.create_dynamic_map``,
Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization") and from torchao 0.18's
4-bit optimizer (after Li et al. 2023, "Memory Efficient Optimizers with 4-bit States"):

- ``dynamic_map(signed, max_exponent_bits, total_bits)``: the dynamic-exponent map. Decade
  ``i = 0 .. E-1`` (E = max_exponent_bits) holds the midpoints of ``F_i + 1`` evenly spaced
  boundaries on [0.1, 1], scaled by ``10^(i - E + 1)``, where ``F_i = 2^(i + T - 1 - E)`` for a
  signed map (each value also negated) and ``2^(i + T - E)`` for an unsigned one (T = total_bits);
  then 0 and 1. Signed 8 bits: 2 * 127 + 2 = 256 values in [-1, 1]; unsigned 8 bits: 254 + 2 = 256
  values in [0, 1]; signed 4 bits (E = 3): 2 * 7 + 2 = 16 values.
- ``dynamic_map_float32``: the same table as bitsandbytes computes it, bit for bit: in float32,
  with ``torch.linspace``'s CPU kernel (``start + step * i`` for the first half and
  ``end - step * (n - 1 - i)`` for the second, each one fused multiply-add, i.e. rounded once).
  ``dynamic_map`` rounded to float32 differs from it by one or two float32 ulps in some entries
  (72 of the signed 8-bit map's 256, 100 of the unsigned one's, 4 of the signed 4-bit map's 16).
- ``linear_map_without_zero(total_bits=4)``: {k / 2^T : k = 1 .. 2^T}, torchao's 4-bit map for v.

``quantize_blockwise`` / ``dequantize_blockwise``: the array is read in row-major order and cut
into runs of ``block_size`` consecutive elements (the last run may be shorter); each run is
divided by its absolute maximum (its "absmax", the block's scale; a block of zeros divides by 1)
and each element becomes the index of the nearest map value (the upper index on a tie).
Dequantizing multiplies each map value back by its block's absmax. Everything in float64;
codes are returned unpacked, one per element.
"""

from __future__ import annotations

import numpy as np


def _decade_sizes(signed: bool, max_exponent_bits: int, total_bits: int) -> list[int]:
    """The number of boundaries F_i + 1 in each decade i = 0 .. E-1, bitsandbytes' `fraction_items`."""
    if not 1 <= max_exponent_bits <= total_bits - 1:
        raise ValueError(f"max_exponent_bits must be in [1, total_bits - 1], got {max_exponent_bits}")
    if total_bits - 1 != max_exponent_bits:
        # bitsandbytes then adds a few "additional items" in the last decade; neither map jstep
        # follows ((True, 7, 8), (False, 7, 8), (True, 3, 4)) has them, so they are not transcribed.
        raise ValueError("only maps with max_exponent_bits = total_bits - 1 are transcribed")
    extra = 0 if signed else 1
    return [2 ** (i + total_bits - 1 - max_exponent_bits + extra) + 1 for i in range(max_exponent_bits)]


def _assemble(decades: list[np.ndarray], signed: bool, total_bits: int) -> np.ndarray:
    values = np.concatenate(decades)
    if signed:
        values = np.concatenate([values, -values])
    values = np.concatenate([values, [0.0, 1.0]])
    assert values.size == 2**total_bits, values.size
    return np.sort(values)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic-exponent map in float64: 2^total_bits sorted values in [-1, 1] or [0, 1]."""
    decades = []
    for i, n in enumerate(_decade_sizes(signed, max_exponent_bits, total_bits)):
        boundaries = np.linspace(0.1, 1.0, n)
        midpoints = (boundaries[:-1] + boundaries[1:]) / 2
        decades.append(10.0 ** (i - max_exponent_bits + 1) * midpoints)
    return _assemble(decades, signed, total_bits)


def _torch_linspace_float32(start: float, end: float, n: int) -> np.ndarray:
    """torch.linspace(start, end, n, dtype=float32) on the CPU, bit for bit.

    The step is (end - start) / (n - 1) in float32; element i < n // 2 is start + step * i, the
    others end - step * (n - 1 - i), each a fused multiply-add. For float32 operands and i < 2^20
    the float64 product and sum below are exact, so the one rounding to float32 is the FMA's.
    """
    f32 = np.float32
    lo, hi = f32(start), f32(end)
    step = f32(f32(hi - lo) / f32(n - 1))
    i = np.arange(n, dtype=np.float64)
    head = np.float64(lo) + np.float64(step) * i
    tail = np.float64(hi) - np.float64(step) * (n - 1 - i)
    return np.where(i < n // 2, head, tail).astype(f32)


def dynamic_map_float32(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' `create_dynamic_map(signed, max_exponent_bits, total_bits)` as it computes it, in
    float32 (its 256-entry tensor has 256 - 2^total_bits zeros more; this returns 2^total_bits values)."""
    f32 = np.float32
    decades = []
    for i, n in enumerate(_decade_sizes(signed, max_exponent_bits, total_bits)):
        boundaries = _torch_linspace_float32(0.1, 1.0, n)
        midpoints = (boundaries[:-1] + boundaries[1:]) / f32(2)
        # Python's 10 ** k (a float64 for k < 0) times a float32 tensor: torch casts it to float32.
        scale = f32(10 ** (i - max_exponent_bits + 1))
        decades.append((scale * midpoints).astype(f32))
    return _assemble(decades, signed, total_bits).astype(f32)


def linear_map_without_zero(total_bits: int = 4) -> np.ndarray:
    """{k / 2^T : k = 1 .. 2^T}: evenly spaced on (0, 1], without zero."""
    levels = 2**total_bits
    return np.arange(1, levels + 1, dtype=np.float64) / levels


def block_absmax(x: np.ndarray, block_size: int) -> np.ndarray:
    """max |x| over each run of `block_size` consecutive elements of x in row-major order."""
    flat = np.abs(np.ravel(np.asarray(x, dtype=np.float64)))
    starts = np.arange(0, flat.size, block_size)
    return np.maximum.reduceat(flat, starts) if flat.size else np.zeros(0)


def quantize_blockwise(x: np.ndarray, code: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, absmax): codes[j] = the index of the map value nearest x_j / absmax(block of j).

    `code` must be sorted: the nearest value is one of the two that bracket x_j / absmax.

    `codes` has x's shape (one integer per element, not packed); `absmax` one value per block.
    """
    code = np.asarray(code, dtype=np.float64)
    if np.any(np.diff(code) <= 0):
        raise ValueError("code must be strictly increasing")
    flat = np.ravel(np.asarray(x, dtype=np.float64))
    absmax = block_absmax(flat, block_size)
    scale = np.repeat(np.where(absmax > 0, absmax, 1.0), block_size)[: flat.size]
    normalized = flat / scale
    upper = np.clip(np.searchsorted(code, normalized), 1, code.size - 1)
    lower = upper - 1
    # The nearer neighbour; the upper one on a tie (as torchao's 4- and 8-bit states round).
    codes = np.where(normalized - code[lower] < code[upper] - normalized, lower, upper)
    return codes.reshape(np.shape(x)), absmax


def dequantize_blockwise(codes: np.ndarray, absmax: np.ndarray, code: np.ndarray, block_size: int) -> np.ndarray:
    """code[codes_j] * absmax(block of j), in x's shape, float64."""
    flat = np.asarray(code, dtype=np.float64)[np.ravel(codes)]
    scale = np.repeat(np.asarray(absmax, dtype=np.float64), block_size)[: flat.size]
    return (flat * scale).reshape(np.shape(codes))


def quantize_dequantize(x: np.ndarray, code: np.ndarray, block_size: int) -> np.ndarray:
    """dequantize_blockwise(quantize_blockwise(x)): the value the state holds after one store."""
    codes, absmax = quantize_blockwise(x, code, block_size)
    return dequantize_blockwise(codes, absmax, code, block_size)
