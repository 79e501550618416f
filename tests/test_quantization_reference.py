"""The float64 references of tests/quantization_reference.py against the closed forms of the maps,
a brute-force nearest code, and (where they are installed: the bench extra) bitsandbytes' and
torchao's own tables and quantizers, so that jstep's tests can rely on the references alone."""

from __future__ import annotations

import numpy as np
import pytest

import quantization_reference as ref


def closed_form_dynamic_map(signed: bool, bits: int) -> np.ndarray:
    """+-10^-z (0.1 + 0.9 (k + 1/2) / F_z), z = 0 .. E-1, with F_z = 2^(z + 1 + s) cells counted
    from the smallest decade (E = bits - 1 exponent bits, s = 0 signed, 1 unsigned), and 0, 1."""
    exponents = bits - 1
    values = [0.0, 1.0]
    for z in range(exponents):
        cells = 2 ** (exponents - 1 - z + (0 if signed else 1))
        magnitudes = [10.0**-z * (0.1 + 0.9 * (k + 0.5) / cells) for k in range(cells)]
        values += magnitudes + ([-m for m in magnitudes] if signed else [])
    return np.sort(values)


@pytest.mark.parametrize(("signed", "bits"), [(True, 8), (False, 8), (True, 4)])
def test_dynamic_map_is_the_closed_form(signed, bits):
    got = ref.dynamic_map(signed, bits - 1, bits)
    assert got.shape == (2**bits,)
    np.testing.assert_allclose(got, closed_form_dynamic_map(signed, bits), rtol=1e-14, atol=0)


@pytest.mark.parametrize(("signed", "bits"), [(True, 8), (False, 8), (True, 4)])
def test_float32_table_is_the_float64_map_within_two_ulps(signed, bits):
    table, exact = ref.dynamic_map_float32(signed, bits - 1, bits), ref.dynamic_map(signed, bits - 1, bits)
    assert table.dtype == np.float32
    np.testing.assert_array_less(np.abs(table - exact), 2 * np.spacing(np.abs(exact).astype(np.float32)) + 1e-45)


def test_linear_map_has_no_zero():
    np.testing.assert_array_equal(ref.linear_map_without_zero(4), np.arange(1, 17) / 16)


@pytest.mark.parametrize("code", [ref.dynamic_map(True), ref.dynamic_map(False), ref.linear_map_without_zero()])
def test_quantize_blockwise_is_the_nearest_code_of_each_block(code):
    rng = np.random.default_rng(0)
    block_size = 64
    x = rng.standard_t(3, (7, 45))  # 315 elements: 4 full blocks and one of 59
    if code[0] >= 0:
        x = x**2
    x[1, :] = 0.0  # a row of zeros inside a block
    x.ravel()[:block_size] = 0.0  # a whole block of zeros
    x.ravel()[-3:] = code[5] * np.max(np.abs(x.ravel()[256:]))  # exactly on a code
    codes, absmax = ref.quantize_blockwise(x, code, block_size)
    flat = x.ravel()
    for b, start in enumerate(range(0, flat.size, block_size)):
        block = flat[start : start + block_size]
        assert absmax[b] == np.max(np.abs(block))
        normalized = block / (absmax[b] if absmax[b] > 0 else 1.0)
        distance = np.abs(normalized[:, None] - code[None, ::-1])
        nearest = code.size - 1 - np.argmin(distance, axis=1)  # the upper index on a tie
        np.testing.assert_array_equal(codes.ravel()[start : start + block_size], nearest)
    back = ref.dequantize_blockwise(codes, absmax, code, block_size)
    assert back.shape == x.shape
    np.testing.assert_array_equal(back.ravel()[-3:], flat[-3:])
    scale = np.repeat(absmax, block_size)[: flat.size]
    np.testing.assert_array_equal(back.ravel(), code[codes.ravel()] * scale)


@pytest.mark.parametrize(("signed", "exponents", "bits"), [(True, 7, 8), (False, 7, 8), (True, 3, 4)])
def test_float32_table_is_bitsandbytes_create_dynamic_map(signed, exponents, bits):
    functional = pytest.importorskip("bitsandbytes.functional")
    theirs = functional.create_dynamic_map(signed, exponents, bits).numpy()
    padding = np.flatnonzero(theirs == 0)[: theirs.size - 2**bits]  # 256 entries, the rest zeros
    np.testing.assert_array_equal(ref.dynamic_map_float32(signed, exponents, bits), np.delete(theirs, padding))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_blockwise_is_torchao_quantizer(bits, signed):
    torch = pytest.importorskip("torch")
    quant_utils = pytest.importorskip("torchao.optim.quant_utils")
    if signed:
        code = ref.dynamic_map_float32(True, bits - 1, bits)
    else:
        code = ref.dynamic_map_float32(False) if bits == 8 else ref.linear_map_without_zero(4).astype(np.float32)
    block_size = 256 if bits == 8 else 128
    x = np.random.default_rng(1).standard_t(3, 1 << 14).astype(np.float32)
    x = x if signed else x**2
    scaled, scale = quant_utils.scale_tensor(torch.from_numpy(x), block_size)
    quantizer = quant_utils.quantize_8bit_with_qmap if bits == 8 else quant_utils.quantize_4bit_with_qmap
    theirs = quantizer(scaled, torch.from_numpy(code)).numpy()
    codes, absmax = ref.quantize_blockwise(x, code, block_size)
    np.testing.assert_array_equal(absmax.astype(np.float32), scale.numpy())
    np.testing.assert_array_equal(codes, theirs)


def test_a_tie_goes_to_the_upper_code():
    code = ref.linear_map_without_zero(4)  # k / 16: the midpoint 3/32 of 1/16 and 2/16 is exact
    x = np.array([1.0, 3 / 32, 5 / 32, 0.5 + 1 / 32])
    codes, absmax = ref.quantize_blockwise(x, code, 4)
    assert absmax.tolist() == [1.0]
    assert codes.tolist() == [15, 1, 2, 8]
