"""A float64 transcription of a batch-norm layer, from the notes (B.0.2) and the frameworks' rule
for the running statistics, not from jstep: the reference for every option of jstep's layers.

Training:   mu = mean of x over the batch axes, sigma^2 = mean of (x - mu)^2 (two passes),
            y = G (x - mu) / s + B  with  s = sqrt(sigma^2 + eps)  or the notes'  s = sigma + eps;
            running mean <- momentum mean + (1 - momentum) mu, and likewise the variance.
Evaluation: y = G (x - mean) / s(var) + B with the running statistics.
The gradient dL/dx of L = sum(sin(y) w) is autodiff of this transcription, in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def denominator(var, eps, eps_in_sqrt):
    """s = sqrt(sigma^2 + eps) (Ioffe & Szegedy), or the notes' sigma + eps."""
    return jnp.sqrt(var + eps) if eps_in_sqrt else jnp.sqrt(var) + eps


def training(x, w, scale, bias, mean, var, *, reduce, momentum, eps, eps_in_sqrt):
    """(y, dL/dx, new running mean, new running var) as float64 NumPy arrays.

    `reduce` are the batch axes of `x`; `scale`, `bias`, `mean` and `var` broadcast against `x`
    (features kept, batch axes of size 1), and the running statistics come back in that shape.
    """
    with jax.enable_x64(True):
        x, w, scale, bias, mean, var = (jnp.asarray(np.asarray(a, np.float64)) for a in (x, w, scale, bias, mean, var))

        def forward(x):
            mu = jnp.mean(x, axis=reduce, keepdims=True)
            sigma2 = jnp.mean((x - mu) ** 2, axis=reduce, keepdims=True)
            y = scale * (x - mu) / denominator(sigma2, eps, eps_in_sqrt) + bias
            return jnp.sum(jnp.sin(y) * w), (y, mu, sigma2)

        (_, (y, mu, sigma2)), dx = jax.value_and_grad(forward, has_aux=True)(x)
        new_mean = momentum * mean + (1 - momentum) * mu
        new_var = momentum * var + (1 - momentum) * sigma2
        return tuple(np.asarray(a) for a in (y, dx, new_mean, new_var))


def evaluation(x, scale, bias, mean, var, *, eps, eps_in_sqrt):
    """y = G (x - mean) / s(var) + B with the running statistics, float64."""
    x, scale, bias, mean, var = (np.asarray(a, np.float64) for a in (x, scale, bias, mean, var))
    return scale * (x - mean) / np.asarray(denominator(var, eps, eps_in_sqrt)) + bias


def assert_close(got, want, rtol=2e-5):
    """float32 against the float64 transcription: within rtol of the largest |want| (normwise)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    error = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert error <= rtol, f"relative error {error:.3g} > {rtol:.3g}"
