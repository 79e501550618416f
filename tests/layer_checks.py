"""Comparisons shared by the tests of the framework layers (test_nnx, test_linen, test_equinox)."""

import jax
import jax.numpy as jnp
import numpy as np


def close(got, want, tol=2e-6):
    """|got - want| <= tol * max(max|want|, 1) elementwise (float32 agreement), and the same dtype."""
    assert jnp.result_type(got) == jnp.result_type(want)
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(np.max(np.abs(want)), 1.0))


def trees_close(got, want, tol=2e-6):
    """`close` leaf by leaf, for trees of the same structure."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: close(a, b, tol), got, want)
