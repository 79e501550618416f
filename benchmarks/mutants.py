"""Mutation testing: plant small bugs in a copy of jstep, one at a time, and see which the tests catch.

Each mutant replaces one exact piece of text in one file of a copy of the repository (jstep/,
tests/, docs/, pyproject.toml, README.md) and runs the tests that guard that code. A mutant is
*killed* when those tests fail, and *survives* when they pass; a mutant whose text is no longer
in the file is reported as *stale* (the code moved: update the list). The list starts from the
bugs the tests once missed and from the equations of the notes: a constant off by 1%, a wrong
dtype, a dropped option. A mutant marked `claim` plants a bug that a README claim rules out:
it must be killed.

Run by hand, like the benchmarks (it is not part of the test suite):

    .venv/bin/python benchmarks/mutants.py            # every mutant, one after the other
    .venv/bin/python benchmarks/mutants.py adam_v     # the mutants whose name contains "adam_v"
    .venv/bin/python benchmarks/mutants.py --list     # names, files and test selections

Each mutant runs only its own test selection with `-x`, so a run of the whole list takes
minutes, not hours; the score is printed at the end, and CONTRIBUTING.md reports the last one.
The exit status is 0 only when every mutant run was killed: a stale mutant (its file or its
text gone) or one that survives makes it 1, a failing unmutated baseline 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
COPIED = ["jstep", "tests", "docs", "pyproject.toml", "README.md"]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # exact text, present once
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    claim: bool = True  # a README claim rules this bug out: it must be killed
    why: str = ""


M = Mutant

# The text between `_pack`'s uint16 path and `_unpack`'s shift, which the nibble-swap mutant
# changes together with its strided path (pack and unpack agree, the byte layout breaks).
_PACK_TO_UNPACK = (
    "    pairs = codes.reshape(*shape[:axis], shape[axis] // 2, 2, *shape[axis + 1 :])\n"
    "    low, high = (lax.index_in_dim(pairs, h, axis + 1, keepdims=False) for h in (0, 1))\n"
    "    return low | (high << jnp.uint8(4))\n"
    "\n"
    "\n"
    "def _unpack(packed: jax.Array, shape: tuple[int, ...]) -> jax.Array:\n"
    '    """The codes of `_pack`: element 2j + h along the packed axis is byte j shifted right by 4 h,\n'
    "    its low 4 bits.\n"
    "\n"
    "    Written per element (a broadcast of each byte to its two elements, a shift by 0 or 4), so\n"
    "    that it fuses into the lookups that read it at the cost of a few integer operations.\n"
    '    """\n'
    "    axis = _packed_axis(shape)\n"
    "    if shape and math.prod(shape[axis + 1 :]) == 1:  # as the pairs of the last axis\n"
    "        packed = packed.reshape(packed.shape[: axis + 1])\n"
    "    sizes = packed.shape\n"
    "    pairs = jnp.broadcast_to(jnp.expand_dims(packed, axis + 1), (*sizes[: axis + 1], 2, *sizes[axis + 1 :]))\n"
)
_PACK_TO_UNPACK_SWAPPED = _PACK_TO_UNPACK.replace(
    "    return low | (high << jnp.uint8(4))\n", "    return high | (low << jnp.uint8(4))\n"
)
MUTANTS = [
    # ------------------------------------------------------------- the bugs of the audit
    M(
        "gamma_rounded_before_one_minus",
        "jstep/averages.py",
        "weight_of_new = 1 - gamma\n",
        "weight_of_new = 1 - jnp.asarray(gamma, jnp.float32)\n",
        ("tests/test_adam.py", "-k", "optax_parity"),
        why="1 - gamma formed after rounding gamma to float32: 7e-6 per update, over the 4e-7 claimed",
    ),
    M(
        "adam_v_divided_by_correction_squared",
        "jstep/adam.py",
        "/ correction2.astype(real)",
        "/ correction2.astype(real) ** 2",
        ("jstep/adam.py",),
        why="the docstring example must show it",
    ),
    M(
        "stochastic_round_probability_1pct_high",
        "jstep/precision.py",
        "count = below + (_uniform(bits, work) < units - below).astype(work)",
        "count = below + (_uniform(bits, work) < (units - below) * 1.01).astype(work)",
        ("tests/test_precision.py", "-k", "half_a_percent"),
        why="E[round(x)] = x: a 1% bias in the probability (float16, float64 -> float32, float8)",
    ),
    M(
        "stochastic_round_probability_half_pct_high",
        "jstep/precision.py",
        "count = below + (_uniform(bits, work) < units - below).astype(work)",
        "count = below + (_uniform(bits, work) < (units - below) * 1.005).astype(work)",
        ("tests/test_precision.py", "-k", "half_a_percent"),
        why="a 0.5% relative bias",
    ),
    M(
        "stochastic_round_probability_half_pct_absolute",
        "jstep/precision.py",
        "count = below + (_uniform(bits, work) < units - below).astype(work)",
        "count = below + (_uniform(bits, work) < units - below + 0.005).astype(work)",
        ("tests/test_precision.py", "-k", "half_a_percent"),
        why="a bias of 0.005 in the probability",
    ),
    M(
        "stochastic_round_float32_uniform_half_pct_wide",
        "jstep/precision.py",
        "return (bits[0] >> 9).astype(dtype) * np.float32(2.0**-23)",
        "return (bits[0] >> 9).astype(dtype) * np.float32(1.005 * 2.0**-23)",
        ("tests/test_precision.py", "-k", "half_a_percent"),
        why="the float32 uniform stretched by 0.5%: the float32 -> float16/float8 probability 0.5% low",
    ),
    M(
        "stochastic_round_float64_uniform_half_pct_wide",
        "jstep/precision.py",
        "return (high.astype(dtype) * 2.0**26 + low.astype(dtype)) * 2.0**-52",
        "return (high.astype(dtype) * 2.0**26 + low.astype(dtype)) * (1.005 * 2.0**-52)",
        ("tests/test_precision.py", "-k", "half_a_percent"),
        why="the float64 uniform stretched by 0.5%: every float64 source 0.5% low",
    ),
    M(
        "stochastic_round_bfloat16_bits_half_pct_high",
        "jstep/precision.py",
        "rounded = ((word + (bits >> 16)) >> 16).astype(jnp.uint16)",
        "rounded = ((word + (bits >> 16) + 328) >> 16).astype(jnp.uint16)",
        ("tests/test_precision.py", "-k", "half_a_percent"),
        why="float32 -> bfloat16 rounds up 0.5% too often",
    ),
    M(
        "apply_updates_float16_to_nearest",
        "jstep/precision.py",
        "if seed is None or not _is_low_precision(p.dtype):",
        "if seed is None or p.dtype != jnp.bfloat16:",
        ("tests/test_precision.py", "-k", "apply_updates"),
        why="apply_updates(key=) rounds float16 leaves stochastically",
    ),
    M(
        "nnx_eps_in_sqrt_always_true",
        "jstep/nnx.py",
        "eps_in_sqrt=self.eps_in_sqrt,",
        "eps_in_sqrt=True,",
        ("tests/test_nnx.py", "-k", "eps_in_sqrt"),
        why="README: eps_in_sqrt=False gives the notes' form in every layer",
    ),
    M(
        "linen_eps_in_sqrt_always_true",
        "jstep/linen.py",
        "epsilon=self.epsilon,\n            eps_in_sqrt=self.eps_in_sqrt,",
        "epsilon=self.epsilon,\n            eps_in_sqrt=True,",
        ("tests/test_linen.py", "-k", "eps_in_sqrt"),
    ),
    M(
        "equinox_eps_in_sqrt_always_true",
        "jstep/equinox.py",
        "eps_in_sqrt=self.eps_in_sqrt,\n            feature_axis=0,",
        "eps_in_sqrt=True,\n            feature_axis=0,",
        ("tests/test_equinox.py", "-k", "eps_in_sqrt"),
    ),
    M(
        "core_layer_training_ignores_eps_in_sqrt",
        "jstep/normalization/layer.py",
        "                self.eps_in_sqrt,\n",
        "                True,\n",
        ("tests/test_batch_norm_layer.py", "-k", "float64_transcription"),
    ),
    # ------------------------------------------------------- the notes' equations, off by 1%
    M(
        "momentum_gamma_1pct_high",
        "jstep/momentum.py",
        "v_new = gamma * velocity.astype(dtype) + eta * g",
        "v_new = 1.01 * gamma * velocity.astype(dtype) + eta * g",
        ("tests/test_momentum.py", "-k", "matches_reference and float32"),
    ),
    M(
        "momentum_nesterov_dropped",
        "jstep/momentum.py",
        "return gamma * v_new + eta * gradient.astype(v_new.dtype) if nesterov else v_new",
        "return v_new",
        ("tests/test_momentum.py", "-k", "nesterov"),
    ),
    M(
        "running_average_new_weight_1pct_high",
        "jstep/averages.py",
        "return keep * old.astype(dtype) + take * new.astype(dtype)",
        "return keep * old.astype(dtype) + 1.01 * take * new.astype(dtype)",
        ("tests/test_averages.py", "-k", "float32"),
    ),
    M(
        "adam_bias_correction_1pct",
        "jstep/adam.py",
        "m_hat = m / correction1.astype(real)",
        "m_hat = m / (1.01 * correction1.astype(real))",
        ("tests/test_adam.py", "-k", "optax_parity"),
    ),
    M(
        "batch_norm_notes_form_replaced",
        "jstep/normalization/statistics.py",
        "return sigma, sigma + eps",
        "return sigma, jnp.sqrt(var + eps)",
        ("tests/test_batch_norm_layer.py", "-k", "float64_transcription"),
        why="batch norm's notes form (sigma + eps) replaced by the published one",
    ),
    M(
        "batch_norm_variance_1pct_high",
        "jstep/normalization/statistics.py",
        "var = _total(_masked(jnp.square(own.of(xc)), mask), layout, axis_name) / count",
        "var = 1.01 * _total(_masked(jnp.square(own.of(xc)), mask), layout, axis_name) / count",
        ("tests/test_batch_norm_layer.py", "-k", "float64_transcription"),
    ),
    M(
        "low_precision_arithmetic_in_its_own_dtype",
        "jstep/_core.py",
        "return jnp.promote_types(dtype, jnp.float32)",
        "return jnp.dtype(dtype)",
        ("tests/test_batch_norm.py", "-k", "float16_input or float32_statistics_of"),
        why="README: statistics of bfloat16/float16 inputs in float32",
    ),
    M(
        "batch_norm_backward_mean_term_1pct",
        "jstep/normalization/batchnorm.py",
        "shift = shift - gain * dmean",
        "shift = shift - 1.01 * gain * dmean",
        ("tests/test_batch_norm.py", "-k", "gradients_match_autodiff or notes_formula_summed_literally"),
        why="the tangent map's term through mu, -(G/s) a, 1% high (its transpose is the backward's)",
    ),
    M(
        "batch_norm_notes_form_gradient_factor_dropped",
        "jstep/normalization/batchnorm.py",
        "c_over_s3 = inverse_s * inverse_s * (inverse_s if eps_in_sqrt else _safe_inverse(sigma))",
        "c_over_s3 = inverse_s * inverse_s * inverse_s",
        ("tests/test_batch_norm.py", "-k", "gradients_match_autodiff or notes_formula_summed_literally"),
        why="the notes' form's tangent map (and so its backward) needs c = (sigma + eps)/sigma",
    ),
    M(
        "rmsprop_squared_average_1pct",
        "jstep/adaptive.py",
        "lambda G, g: running_average_value(G, _core.squared_magnitude(g), gamma),\n            state.nu,",
        "lambda G, g: running_average_value(G, 1.01 * _core.squared_magnitude(g), gamma),\n            state.nu,",
        ("tests/test_adaptive.py", "-k", "matches_reference and rmsprop-float32"),
    ),
    M(
        "rmsprop_centered_dropped",
        "jstep/adaptive.py",
        "            return jnp.maximum(G - _core.squared_magnitude(M), 0)",
        "            return G",
        ("tests/test_optax_contract.py", "-k", "rmsprop"),
        why="centered: the root of G - M^2",
    ),
    M(
        "rmsprop_bias_correction_dropped",
        "jstep/adaptive.py",
        "correction = _core.bias_correction(gamma, count) if bias_correction else None",
        "correction = None",
        ("tests/test_optax_contract.py", "-k", "bias_correction"),
    ),
    M(
        "adagrad_sum_1pct",
        "jstep/adaptive.py",
        "lambda G, g: G.astype(_core.compute_dtype(G.dtype)) + _core.squared_magnitude(g),",
        "lambda G, g: G.astype(_core.compute_dtype(G.dtype)) + 1.01 * _core.squared_magnitude(g),",
        ("tests/test_adaptive.py", "-k", "matches_reference and adagrad-float32"),
    ),
    M(
        "adadelta_numerator_eps_1pct",
        "jstep/adaptive.py",
        "* jnp.sqrt(Ex + eps)",
        "* jnp.sqrt(Ex + 1.01 * eps)",
        ("tests/test_adaptive.py", "-k", "matches_reference and adadelta-float32"),
    ),
    M(
        "adam_eps_root_dropped",
        "jstep/_core.py",
        "denominator = jnp.sqrt(second_moment.astype(dtype) + eps_root) + eps",
        "denominator = jnp.sqrt(second_moment.astype(dtype)) + eps",
        ("tests/test_adam.py", "-k", "optax_parity"),
    ),
    M(
        "adamw_weight_decay_1pct",
        "jstep/adam.py",
        "with_decay = d.astype(dtype) + decay * w.astype(dtype)",
        "with_decay = d.astype(dtype) + 1.01 * decay * w.astype(dtype)",
        ("tests/test_optax_contract.py", "-k", "adamw_equals"),
    ),
    M(
        "adam_nu_dtype_ignored",
        "jstep/adam.py",
        "_core.zeros_like_tree(params, nu_dtype, real=True, squares=True, nonnegative=True),",
        "_core.zeros_like_tree(params, None, real=True, squares=True, nonnegative=True),",
        ("tests/test_precision.py", "-k", "adam"),
        why="README: the state is stored in the dtype asked for, with exactly its bytes",
    ),
    M(
        "main_job_bfloat16_without_stochastic_rounding",
        "jstep/cli.py",
        'stochastic = args.rounding == "stochastic"',
        "stochastic = False",
        ("tests/test_cli.py", "-k", "ends_at_float32s_loss"),
        why="README: 0.0005 with stochastic rounding, 0.0094 with round-to-nearest",
    ),
    M(
        "learning_rate_1pct",
        "jstep/_core.py",
        "return jax.tree.map(lambda d: (-eta * d).astype(d.dtype), directions), new_state",
        "return jax.tree.map(lambda d: (-1.01 * eta * d).astype(d.dtype), directions), new_state",
        ("tests/test_momentum.py", "-k", "matches_reference and sgd-float32"),
    ),
    M(
        "cumulative_average_gamma_off",
        "jstep/averages.py",
        "running_average(lambda t: (t - 1) / t,",
        "running_average(lambda t: (t - 1.01) / t,",
        ("tests/test_averages.py", "-k", "cumulative"),
    ),
    M(
        "moving_average_debias_dropped",
        "jstep/averages.py",
        "    if not debias:\n        return biased",
        "    if True:\n        return biased",
        ("tests/test_averages.py",),
    ),
    M(
        "adam_nesterov_look_ahead_dropped",
        "jstep/adam.py",
        "m_hat = b1 * m / look_ahead.astype(real) + (1 - b1) * g.astype(dtype) / correction1.astype(real)",
        "m_hat = m / correction1.astype(real)",
        ("tests/test_adam.py", "-k", "nesterov"),
    ),
    M(
        "eps_in_sqrt_ignored_by_the_adaptive_rules",
        "jstep/adaptive.py",
        'return {"eps": 0.0, "eps_root": eps} if eps_in_sqrt else {"eps": eps, "eps_root": 0.0}',
        'return {"eps": eps, "eps_root": 0.0}',
        ("tests/test_adaptive.py", "-k", "optax_parity"),
    ),
    M(
        "adamw_mask_ignored",
        "jstep/adam.py",
        "    if mask is None:\n        return jax.tree.map(lambda _: True, params)",
        "    if True:\n        return jax.tree.map(lambda _: True, params)",
        ("tests/test_optax_contract.py", "-k", "adamw_equals_optax"),
    ),
    M(
        "rounding_seed_ignored",
        "jstep/precision.py",
        "    if rounding_seed is None:\n        return (None,) * streams",
        "    if True:\n        return (None,) * streams",
        ("tests/test_precision.py", "-k", "resumed or neighbour_of_the_float32"),
        why="README: rounding_seed stores narrow state by stochastic rounding",
    ),
    M(
        "momentum_accumulator_dtype_ignored",
        "jstep/momentum.py",
        "return MomentumState(_core.new_count(), _core.zeros_like_tree(params, accumulator_dtype))",
        "return MomentumState(_core.new_count(), _core.zeros_like_tree(params))",
        ("tests/test_precision.py", "-k", "momentum"),
        why="README: accumulator_dtype= stores the state in that dtype",
    ),
    # ------------------------------------------------------------ batch renormalization
    M(
        "batch_renorm_r_not_clipped",
        "jstep/normalization/renorm.py",
        "r = jnp.clip(jnp.sqrt(var_b + eps) / s, 1 / r_max, r_max)",
        "r = jnp.sqrt(var_b + eps) / s",
        ("tests/test_batch_renorm.py", "-k", "float64_transcription or clip_some"),
        why="r = clip(sigma_B / sigma, 1/r_max, r_max)",
    ),
    M(
        "batch_renorm_d_sign_flipped",
        "jstep/normalization/renorm.py",
        "d = jnp.clip((mean_b - mean) / s, -d_max, d_max)",
        "d = jnp.clip((mean - mean_b) / s, -d_max, d_max)",
        ("tests/test_batch_renorm_layers.py", "-k", "warmup"),
        why="d = (mu_B - mean) / sigma: the layers' training against SBX and the float64 transcription",
    ),
    M(
        "batch_renorm_r_and_d_not_held_constant",
        "jstep/normalization/renorm.py",
        "r, d = jax.lax.stop_gradient((r, d))",
        "r, d = r, d",
        ("tests/test_batch_renorm.py", "-k", "hessian or forward_mode"),
        why="r and d are constants of the gradient at every order (second derivatives are autodiff of the tangent map)",
    ),
    # ------------------------------------------------------- ghost batch norm (virtual batches)
    M(
        "virtual_batches_strided_not_consecutive",
        "jstep/normalization/virtual.py",
        "    def group(self, x: jax.Array) -> jax.Array:\n"
        "        return jnp.reshape(x, self.grouped_shape)\n\n"
        "    def ungroup(self, y: jax.Array) -> jax.Array:\n"
        "        return jnp.reshape(y, self.shape)\n",
        "    def group(self, x: jax.Array) -> jax.Array:\n"
        "        b, shape = self.batch_axis, self.grouped_shape\n"
        "        strided = (*shape[:b], shape[b + 1], shape[b], *shape[b + 2 :])\n"
        "        return jnp.swapaxes(jnp.reshape(x, strided), b, b + 1)\n\n"
        "    def ungroup(self, y: jax.Array) -> jax.Array:\n"
        "        return jnp.reshape(jnp.swapaxes(y, self.batch_axis, self.batch_axis + 1), self.shape)\n",
        ("tests/test_batch_norm_virtual.py", "-k", "are_each_groups"),
        why="README: the virtual batches are consecutive groups (examples 0..V-1, V..2V-1, ...), not strided ones",
    ),
    M(
        "virtual_batches_running_statistics_from_group_0",
        "jstep/normalization/layer.py",
        "(jnp.mean(mean, axis=0), jnp.mean(var, axis=0))",
        "(mean[0], var[0])",
        ("tests/test_batch_norm_virtual.py", "-k", "running_statistics"),
        why="the running statistics average every group's statistics",
    ),
    M(
        "equinox_virtual_batches_running_statistics_from_group_0",
        "jstep/equinox.py",
        "return y[group], jnp.mean(means, axis=0), jnp.mean(variances, axis=0)",
        "return y[group], means[0], variances[0]",
        ("tests/test_batch_norm_virtual.py", "-k", "equinox_layer"),
    ),
    # ------------------------------------------------------------------------ jstep.optax
    M(
        "optax_sgd_rate_inside_the_trace",
        "jstep/optax.py",
        "    return optax.chain(\n"
        "        _momentum_or_identity(momentum, nesterov, accumulator_dtype),\n"
        "        optax.scale_by_learning_rate(learning_rate),\n"
        "    )",
        "    return optax.chain(\n"
        "        optax.scale_by_learning_rate(learning_rate),\n"
        "        _momentum_or_identity(momentum, nesterov, accumulator_dtype),\n"
        "    )",
        ("tests/test_optax_aliases.py", "-k", "sgd_steps_by_the_rate"),
        why="README: jstep.optax.sgd's rate multiplies the whole trace (Optax's form), not the gradient entering it",
    ),
    M(
        "optax_rmsprop_eps_in_sqrt_default_flipped",
        "jstep/optax.py",
        "    eps_in_sqrt: bool = True,",
        "    eps_in_sqrt: bool = False,",
        ("tests/test_optax_aliases.py", "-k", "same_numbers and rmsprop"),
        why="README: jstep.optax.rmsprop gives optax.rmsprop's numbers (eps inside the root)",
    ),
    # --------------------------------------------------------------- float16 squared gradients
    M(
        "float16_squared_gradient_state_in_float16",
        "jstep/_core.py",
        "return jnp.dtype(jnp.float32) if jnp.dtype(dtype) == jnp.float16 else jnp.dtype(dtype)",
        "return jnp.dtype(dtype)",
        ("tests/test_precision.py", "-k", "float16_squared_gradient_state"),
        why="README: the squared-gradient state of float16 params is float32",
    ),
    # ------------------------------------------------------- block-wise 8- and 4-bit state
    M(
        "quantization_signed_map_without_minus_one",
        "jstep/quantization.py",
        "table = np.concatenate([-magnitudes[::-1], magnitudes]) if signed else magnitudes",
        "table = np.concatenate([-magnitudes[::-1] * 0.99, magnitudes]) if signed else magnitudes",
        ("tests/test_quantization.py", "-k", "code_table"),
        why="the signed map is symmetric and holds -1 (bitsandbytes' lacks it): every block's minimum is a code",
    ),
    M(
        "quantization_unsigned_map_with_zero",
        "jstep/quantization.py",
        "return 10.0 ** (-12 * np.arange(255, -1, -1) / 255)",
        "return np.concatenate([[0.0], 10.0 ** (-12 * np.arange(254, -1, -1) / 254)])",
        ("tests/test_quantization.py", "-k", "code_table or smallest_code"),
        why="v's map has no zero: a v that rounds to 0 divides the step by eps",
    ),
    M(
        "quantization_four_bit_dynamic_exponent_and_linear_v",
        "jstep/quantization.py",
        "return np.concatenate([[0.0], np.arange(2, 21, 3) / 20]) if signed else 16.0 ** (-np.arange(15, -1, -1) / 15)",
        "return np.array([0, 0.01, 0.055, 0.1, 0.325, 0.55, 0.775, 1]) if signed else np.arange(1, 17) / 16",
        ("tests/test_quantized_training.py", "-k", "three_learning_rates"),
        why="4 bits: m's codes 3.25 times apart (0.1, 0.325) over v's k / 16 (2 times apart at the bottom) step"
        " over 3 learning rates with stochastic rounding",
    ),
    M(
        "quantization_stochastic_probability_1pct_high",
        "jstep/quantization.py",
        "index = index + (uniform < fraction).astype(jnp.int32)",
        "index = index + (uniform < fraction * 1.01).astype(jnp.int32)",
        ("tests/test_quantization.py", "-k", "unbiased_between"),
        why="E[dequantize(quantize(x, key=k))] = x: rounding up 1% too often",
    ),
    M(
        "quantization_scale_max_not_absmax",
        "jstep/quantization.py",
        "words = lax.bitcast_convert_type(blocks, jnp.int32) & jnp.int32(0x7FFFFFFF)",
        "words = lax.bitcast_convert_type(blocks, jnp.int32)",
        ("tests/test_quantization.py", "-k", "absmax"),
        why="each block's scale is its largest magnitude",
    ),
    M(
        "quantization_four_bit_nibbles_swapped",
        "jstep/quantization.py",
        "        return ((words & 0x0F) | ((words >> 4) & 0xF0)).astype(jnp.uint8).reshape(packed_shape)\n"
        + _PACK_TO_UNPACK
        + "    shift = lax.broadcasted_iota(jnp.uint8, pairs.shape, axis + 1) * jnp.uint8(4)",
        "        return (((words >> 8) & 0x0F) | ((words << 4) & 0xF0)).astype(jnp.uint8).reshape(packed_shape)\n"
        + _PACK_TO_UNPACK_SWAPPED
        + "    shift = (jnp.uint8(1) - lax.broadcasted_iota(jnp.uint8, pairs.shape, axis + 1)) * jnp.uint8(4)",
        ("tests/test_quantization.py", "-k", "four_bit_bytes"),
        why="packing and unpacking agree, but the bytes break the documented layout (element 2j in the low nibble)",
    ),
    M(
        "quantization_min_size_ignored",
        "jstep/quantization.py",
        "if value.size < fmt.min_size:",
        "if False:",
        ("tests/test_quantization.py", "-k", "float32s_on and adam-8bit"),
        why="leaves under min_size stay float32, as in bitsandbytes",
    ),
    M(
        "quantization_split_scales_replicated",
        "jstep/quantization.py",
        "    scales = NamedSharding(sharding.mesh, PartitionSpec(*spec[: axis + 1]))",
        "    scales = NamedSharding(sharding.mesh, PartitionSpec())",
        ("tests/test_quantized_state.py", "-k", "split_leaf"),
        why="a split param's scales are split as the param, so each device holds only its own",
    ),
    M(
        "batch_norm_rule_without_vmap_axes",
        "jstep/normalization/batchnorm.py",
        "_normalize.defjvp(_rebinding_vmap_axes(_normalize_jvp), symbolic_zeros=True)",
        "_normalize.defjvp(_normalize_jvp, symbolic_zeros=True)",
        ("tests/test_batch_norm_forward.py", "-k", "outside"),
        why="gradients from outside a jit around a vmapped batch norm (Equinox's usual loop) do not raise",
    ),
    M(
        "quantized_state_maps_unchecked",
        "jstep/precision.py",
        "    if nonnegative is None:\n        return\n    for path",
        "    if True:\n        return\n    for path",
        ("tests/test_quantized_state.py", "-k", "other_map or recipe"),
        why="a quantized v on the signed map (a by-hand conversion) is refused, not stepped into 8 learning rates",
    ),
    M(
        "adamw_equinox_mask_called",
        "jstep/adam.py",
        "    tree = mask(params) if _is_mask_function(mask) else mask",
        "    tree = mask(params) if callable(mask) else mask",
        ("tests/test_optax_contract.py", "-k", "equinox_module"),
        why="an Equinox module of bools is a mask tree, as in Optax",
    ),
    M(
        "grouped_frozen_params_packed",
        "jstep/grouping.py",
        "        params = without_frozen(params, updates)\n",
        "",
        ("tests/test_optax_contract.py", "-k", "frozen_leaves"),
        why="grouped steps Equinox's frozen parts (None gradients, every array as params) as the plain optimizer",
    ),
    M(
        "grouping_pins_share_a_group",
        "jstep/grouping.py",
        "    with set_xla_metadata(jstep_pin=next(_pins)):",
        "    with set_xla_metadata(jstep_pin=0):",
        ("tests/test_sharding.py", "-k", "grouped_updates_keep_every_leaf_sharding"),
        why="on auto axes every grouped update keeps its gradient's sharding, also beside a leaf of its shape",
    ),
    M(
        "quantization_scales_kept_flat",
        "jstep/quantization.py",
        "        if run % layout.block_size == 0:\n            return axis",
        "        if run % layout.block_size == 0 and axis == 0:\n            return axis",
        ("tests/test_quantization.py", "-k", "nearest_code_of_block_absmax"),
        why="the scales keep the value's leading axes, so that they split with the value",
    ),
    M(
        "quantization_squares_on_the_signed_map",
        "jstep/_core.py",
        "signed=not nonnegative, like=leaf",
        "signed=True, like=leaf",
        ("tests/test_quantization.py", "-k", "float32s_on and adam-8bit"),
        why="second moments use the unsigned map (twice the codes, no zero)",
    ),
]


def run_tests(copy: pathlib.Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    """(pytest's exit code, its output's tail), run in `copy` so that it imports the copy's jstep."""
    env = dict(os.environ, PYTHONPATH=str(copy), JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-n", "0", *tests]
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    return done.returncode, (done.stdout + done.stderr)[-2000:]


def stale_because(target: pathlib.Path, m: Mutant) -> str:
    """Why mutant `m` cannot be planted in `target` (its file or its text is gone, or the text is
    there more than once), or "" when it can."""
    if not target.is_file():
        return "no such file"
    found = target.read_text().count(m.old)
    return "" if found == 1 else f"the text is there {found} times"


def fresh_copy(into: pathlib.Path) -> pathlib.Path:
    copy = into / "repo"
    if copy.exists():
        shutil.rmtree(copy)
    copy.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "_build", "*.egg-info")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=ignore)
        else:
            shutil.copy2(source, copy / name)
    return copy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only the mutants whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per mutant (default 900)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test selection")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.names or any(n in m.name for n in args.names)]
    if args.list:
        for m in chosen:
            print(f"{m.name:52s} {m.path:24s} {' '.join(m.tests)}")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="jstep-mutants-") as tmp:
        tmp_path = pathlib.Path(tmp)
        if not args.no_baseline:
            copy = fresh_copy(tmp_path)
            for tests in dict.fromkeys(m.tests for m in chosen):
                code, tail = run_tests(copy, tests, args.timeout)
                if code != 0:
                    print(f"baseline FAILS for {' '.join(tests)}:\n{tail}")
                    return 2
            print(f"baseline: {len({m.tests for m in chosen})} test selections pass unmutated", flush=True)
        for m in chosen:
            copy = fresh_copy(tmp_path)
            target = copy / m.path
            problem = stale_because(target, m)
            if problem:
                results.append((m, "stale", 0.0))
                print(f"{'stale':9s} {m.name} ({m.path}: {problem})", flush=True)
                continue
            text = target.read_text()
            target.write_text(text.replace(m.old, m.new))
            start = time.perf_counter()
            code, tail = run_tests(copy, m.tests, args.timeout)
            seconds = time.perf_counter() - start
            outcome = "killed" if code == 1 else "survived" if code == 0 else f"error {code}"
            results.append((m, outcome, seconds))
            caught_by = next((line for line in tail.splitlines() if line.startswith(("FAILED ", "ERROR "))), "")
            print(f"{outcome:9s} {m.name} ({seconds:.0f} s) {caught_by}", flush=True)
            if outcome.startswith("error"):
                print(tail)

    applicable = [r for r in results if r[1] != "stale"]
    killed = [r for r in applicable if r[1] == "killed"]
    stale = [r[0].name for r in results if r[1] == "stale"]
    print(f"\nscore: {len(killed)} of {len(applicable)} mutants killed ({len(stale)} stale)")
    missed = [r[0].name for r in applicable if r[1] != "killed" and r[0].claim]
    if missed:
        print("NOT KILLED, though a README claim rules them out: " + ", ".join(missed))
    others = [r[0].name for r in applicable if r[1] != "killed" and not r[0].claim]
    if others:
        print("NOT KILLED (no README claim): " + ", ".join(others))
    if stale:
        print("STALE (the code moved: update the list): " + ", ".join(stale))
    return 1 if stale or len(killed) < len(applicable) else 0


if __name__ == "__main__":
    sys.exit(main())
