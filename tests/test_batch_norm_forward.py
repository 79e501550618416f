"""Forward-mode differentiation of batch_norm (jax.jvp, jacfwd, linearize) and the second
derivatives built on it, against autodiff of a plain jnp batch norm in float64; reverse mode
still runs the notes' backward (two reductions, x the one activation-sized residual).

The same across 8 host devices (shard_map, pmap with index groups, vmap axes) is in
tests/test_batch_norm_devices.py; the framework layers' forward mode is at the end here.
"""

import functools
import warnings

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import jstep
from jstep.normalization import _normalize_checked

LAYOUTS = [  # (name, shape, feature_axis)
    ("NHWC", (4, 3, 5), -1),
    ("notes n x K", (3, 7), 0),
    ("two feature axes", (2, 5, 3), (0, 2)),
]
EPS = 0.05


def plain_statistics_and_output(x, scale, offset, feature_axis, eps, eps_in_sqrt, mask=None):
    """(Zhat, mu, sigma^2), a direct jnp transcription of B.0.2 (with the masked-in values'
    statistics when a mask is given), left to JAX's autodiff."""
    features = (feature_axis,) if isinstance(feature_axis, int) else feature_axis
    features = tuple(a % x.ndim for a in features)
    axes = tuple(a for a in range(x.ndim) if a not in features)
    keep = tuple(n if a in features else 1 for a, n in enumerate(x.shape))
    m = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
    count = jnp.sum(m, axis=axes, keepdims=True)
    mean = jnp.sum(jnp.where(m, x, 0), axis=axes, keepdims=True) / count
    var = jnp.sum(jnp.where(m, (x - mean) ** 2, 0), axis=axes, keepdims=True) / count
    s = jnp.sqrt(var + eps) if eps_in_sqrt else jnp.sqrt(var) + eps
    y = (x - mean) / s * scale.reshape(keep) + offset.reshape(keep)
    feature_shape = tuple(x.shape[a] for a in features)
    return y, mean.reshape(feature_shape), var.reshape(feature_shape)


def inputs(shape, feature_axis, seed=0):
    rng = np.random.default_rng(seed)
    features = (feature_axis,) if isinstance(feature_axis, int) else feature_axis
    feature_shape = tuple(shape[a] for a in features)
    x = rng.normal(1.5, 2.0, shape)
    scale, offset = rng.normal(1.0, 0.5, feature_shape), rng.normal(0.0, 0.5, feature_shape)
    tangents = (rng.normal(size=shape), rng.normal(size=feature_shape), rng.normal(size=feature_shape))
    return (x, scale, offset), tangents


def a_mask(shape, feature_axis, seed=1):
    """Booleans of x's shape with about 60% in, and at least 2 values in for every feature
    (the first two along the first batch axis)."""
    features = {a % len(shape) for a in ((feature_axis,) if isinstance(feature_axis, int) else feature_axis)}
    batch_axis = min(a for a in range(len(shape)) if a not in features)
    mask = np.random.default_rng(seed).random(shape) < 0.6
    mask[(slice(None),) * batch_axis + (slice(0, 2),)] = True
    assert not mask.all()
    return mask


def max_rel(got, want):
    got, want = np.asarray(got), np.asarray(want)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))


def both(feature_axis, eps_in_sqrt, mask):
    """jstep's (Zhat, mu, sigma^2) and the plain reference's, as functions of (x, scale, offset)."""

    def ours(x, scale, offset):
        return _normalize_checked(x, scale, offset, feature_axis, EPS, eps_in_sqrt, None, mask)

    def reference(x, scale, offset):
        return plain_statistics_and_output(x, scale, offset, feature_axis, EPS, eps_in_sqrt, mask)

    return ours, reference


OPTIONS = [(eps_in_sqrt, masked) for eps_in_sqrt in (True, False) for masked in (False, True)]
OPTION_IDS = [f"{'sqrt(var+eps)' if e else 'sigma+eps'}{'-masked' if m else ''}" for e, m in OPTIONS]


@pytest.mark.parametrize(("name", "shape", "feature_axis"), LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
@pytest.mark.parametrize(("eps_in_sqrt", "masked"), OPTIONS, ids=OPTION_IDS)
def test_jvp_of_output_and_statistics_matches_autodiff_in_float64(name, shape, feature_axis, eps_in_sqrt, masked):
    with jax.enable_x64(True):
        primals, tangents = inputs(shape, feature_axis)
        mask = a_mask(shape, feature_axis) if masked else None
        ours, reference = both(feature_axis, eps_in_sqrt, mask)
        got_out, got_tan = jax.jit(lambda p, t: jax.jvp(ours, p, t))(primals, tangents)
        want_out, want_tan = jax.jvp(reference, primals, tangents)
        for got, want in zip(got_out + got_tan, want_out + want_tan, strict=True):
            assert max_rel(got, want) < 1e-12
        # Each argument's tangent alone (the others symbolic zeros inside the rule).
        for i in range(3):

            def one(arg, i=i):
                return ours(*(arg if j == i else p for j, p in enumerate(primals)))[0]

            def one_reference(arg, i=i):
                return reference(*(arg if j == i else p for j, p in enumerate(primals)))[0]

            got = jax.jvp(one, (primals[i],), (tangents[i],))[1]
            assert max_rel(got, jax.jvp(one_reference, (primals[i],), (tangents[i],))[1]) < 1e-12


@pytest.mark.parametrize(("eps_in_sqrt", "masked"), OPTIONS, ids=OPTION_IDS)
def test_jacfwd_and_linearize_match_autodiff_and_jacrev(eps_in_sqrt, masked):
    with jax.enable_x64(True):
        shape, feature_axis = (5, 2, 3), -1
        primals, tangents = inputs(shape, feature_axis, seed=2)
        mask = a_mask(shape, feature_axis, seed=3) if masked else None
        ours, reference = both(feature_axis, eps_in_sqrt, mask)
        forward = jax.jacfwd(lambda *p: ours(*p)[0], argnums=(0, 1, 2))(*primals)
        want = jax.jacfwd(lambda *p: reference(*p)[0], argnums=(0, 1, 2))(*primals)
        backward = jax.jacrev(lambda *p: ours(*p)[0], argnums=(0, 1, 2))(*primals)
        for got, rev, ref in zip(forward, backward, want, strict=True):
            assert max_rel(got, ref) < 1e-12 and max_rel(rev, ref) < 1e-12
        y, linear = jax.linearize(ours, *primals)
        assert max_rel(y[0], reference(*primals)[0]) < 1e-12
        got = jax.jit(linear)(*tangents)
        want = jax.jvp(reference, primals, tangents)[1]
        for g, w in zip(got, want, strict=True):
            assert max_rel(g, w) < 1e-12


SECOND_ORDER = [  # (shape, feature_axis, eps_in_sqrt, masked): every option, small shapes
    ((4, 3), -1, True, False),
    ((4, 3), -1, False, False),
    ((2, 3, 2), (0, 2), True, True),
    ((3, 4), 0, False, True),
]


@pytest.mark.parametrize(("shape", "feature_axis", "eps_in_sqrt", "masked"), SECOND_ORDER, ids=str)
def test_second_derivatives_in_every_order_match_autodiff(shape, feature_axis, eps_in_sqrt, masked):
    """Hessians of a scalar loss: jacfwd of jacfwd, jacrev of jacfwd, jacfwd of grad
    (forward over reverse), with respect to x and scale, against autodiff of the reference."""
    with jax.enable_x64(True):
        primals, _ = inputs(shape, feature_axis, seed=4)
        weights = np.random.default_rng(5).normal(size=shape)
        mask = a_mask(shape, feature_axis, seed=6) if masked else None
        ours, reference = both(feature_axis, eps_in_sqrt, mask)

        def loss(f):
            def scalar(x, scale):
                y, mean, var = f(x, scale, primals[2])
                return jnp.sum(jnp.sin(y) * weights) + jnp.sum(mean * var)

            return scalar

        want = jax.hessian(loss(reference), argnums=(0, 1))(*primals[:2])
        hessians = {
            "jacfwd(jacfwd)": jax.jacfwd(jax.jacfwd(loss(ours), argnums=(0, 1)), argnums=(0, 1)),
            "jacrev(jacfwd)": jax.jacrev(jax.jacfwd(loss(ours), argnums=(0, 1)), argnums=(0, 1)),
            "jacfwd(grad)": jax.jacfwd(jax.grad(loss(ours), argnums=(0, 1)), argnums=(0, 1)),
        }
        for label, hessian in hessians.items():
            got = hessian(*primals[:2])
            for got_row, want_row in zip(got, want, strict=True):
                for g, w in zip(got_row, want_row, strict=True):
                    assert max_rel(g, w) < 1e-11, label


def test_k_equal_one_and_a_constant_feature_have_the_documented_tangents():
    with jax.enable_x64(True):
        # One value per feature: Zhat = B, so the tangent is dB (to rounding; eps = 0 included).
        x, scale, offset = np.array([[2.0, -1.0]]), np.array([1.5, 0.5]), np.array([0.1, 0.2])
        dx, dscale, doffset = np.array([[0.3, 0.7]]), np.array([1.0, 2.0]), np.array([0.4, -0.6])
        for eps in (0.0, 1e-3):

            def one_value(*args, eps=eps):
                return jstep.batch_norm(*args, eps=eps)

            _, dy = jax.jvp(one_value, (x, scale, offset), (dx, dscale, doffset))
            np.testing.assert_allclose(dy, doffset[None], rtol=1e-15, atol=0)
        # A constant feature with eps > 0: Zbar = 0 and s = sqrt(eps) or eps, so the tangent is
        # (G/s)(dZ - mean dZ) + dB, d mu = mean dZ, d sigma^2 = 0 (autodiff of the plain
        # version gives NaN there, through sqrt at 0); the other feature is the reference's.
        x = np.stack([np.full(4, 3.0), np.arange(4.0)], axis=1)
        args, tangents = (x, np.array([2.0, 1.0]), np.array([0.5, 0.0])), (np.sin(x), np.ones(2), np.ones(2))
        for eps_in_sqrt, s in ((True, np.sqrt(EPS)), (False, EPS)):
            ours, reference = both(-1, eps_in_sqrt, None)
            (dy, dmean, dvar), (dy_ref, dmean_ref, dvar_ref) = (
                jax.jvp(ours, args, tangents)[1],
                jax.jvp(reference, args, tangents)[1],
            )
            dz = np.sin(x[:, 0])
            np.testing.assert_allclose(dy[:, 0], 2.0 / s * (dz - dz.mean()) + 1.0, rtol=1e-14)
            np.testing.assert_allclose([dmean[0], dvar[0]], [dz.mean(), 0.0], rtol=1e-14, atol=1e-15)
            np.testing.assert_allclose(dy[:, 1], dy_ref[:, 1], rtol=1e-12)
            np.testing.assert_allclose([dmean[1], dvar[1]], [dmean_ref[1], dvar_ref[1]], rtol=1e-12)


def activation_sized_reductions(jaxpr, shape) -> int:
    """How many reduce_sum equations of `jaxpr` (and its sub-jaxprs) read an array of `shape`."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "reduce_sum" and tuple(eqn.invars[0].aval.shape) == shape:
            count += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            count += activation_sized_reductions(sub, shape)
    return count


def test_reverse_mode_runs_the_notes_backward_two_reductions_and_keeps_x():
    """The transposed tangent map is the notes' backward: the cotangent's two per-feature
    sums (dL/dB and sum dZhat (Z - mu)) are its only reductions over activations; autodiff of
    the plain version needs more. The residuals are checked in test_batch_norm.py."""
    shape = (8, 4, 6)
    x, scale, offset = (jnp.asarray(a, jnp.float32) for a in inputs(shape, -1)[0])
    _, backward = jax.vjp(jstep.batch_norm, x, scale, offset)
    dy = jnp.ones(shape, jnp.float32)
    assert activation_sized_reductions(jax.make_jaxpr(backward)(dy).jaxpr, shape) == 2
    _, autodiff = jax.vjp(lambda *a: plain_statistics_and_output(*a, -1, 1e-5, True)[0], x, scale, offset)
    assert activation_sized_reductions(jax.make_jaxpr(autodiff)(dy).jaxpr, shape) > 2
    # And the values are the notes' formula (G/s)(dZhat - mean dZhat - Zbar mean(dZhat Zbar)).
    with jax.enable_x64(True):
        (x, scale, offset), (dy, _, _) = inputs(shape, -1, seed=7)
        got = jax.vjp(lambda x: jstep.batch_norm(x, scale, offset, eps=EPS), x)[1](dy)[0]
        mean, var = x.mean(axis=(0, 1)), x.var(axis=(0, 1))
        s = np.sqrt(var + EPS)
        xbar = (x - mean) / s
        want = scale / s * (dy - dy.mean(axis=(0, 1)) - xbar * (dy * xbar).mean(axis=(0, 1)))
        assert max_rel(got, want) < 1e-12


def test_forward_mode_under_vmap_scan_checkpoint_and_jit():
    with jax.enable_x64(True):
        (x, scale, offset), (dx, _, _) = inputs((3, 6, 4), -1, seed=8)

        def jvp(x, dx):
            return jax.jvp(lambda x: jstep.batch_norm(x, scale, offset), (x,), (dx,))[1]

        def reference(x, dx):
            return jax.jvp(lambda x: plain_statistics_and_output(x, scale, offset, -1, 1e-5, True)[0], (x,), (dx,))[1]

        want = np.stack([reference(x[i], dx[i]) for i in range(3)])
        assert max_rel(jax.jit(jax.vmap(jvp))(x, dx), want) < 1e-12
        _, scanned = jax.lax.scan(lambda c, a: (c, jvp(*a)), None, (x, dx))
        assert max_rel(scanned, want) < 1e-12
        assert max_rel(jax.checkpoint(jvp)(x[0], dx[0]), want[0]) < 1e-12
        # jvp of a checkpointed, vmapped batch norm: the rule under both transformations.
        checkpointed = jax.checkpoint(jax.vmap(lambda x: jstep.batch_norm(x, scale, offset)))
        assert max_rel(jax.jvp(checkpointed, (x,), (dx,))[1], want) < 1e-12


# ------------------------------------------------------------------ the framework layers


def test_nnx_layer_forward_mode_matches_flax_nnx():
    nnx = pytest.importorskip("flax.nnx")
    import jstep.nnx

    with jax.enable_x64(True):
        (x, _, _), (dx, _, _) = inputs((6, 3, 4), -1, seed=9)
        results = []
        for layer in (jstep.nnx.BatchNorm, nnx.BatchNorm):
            graphdef, state = nnx.split(layer(4, momentum=0.8, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))

            def apply(x, graphdef=graphdef, state=state):
                return nnx.merge(graphdef, state, copy=True)(x)  # a fresh module per trace

            with warnings.catch_warnings():
                # Flax's layer writes its float64 batch statistics into float32 running ones with a
                # FutureWarning from JAX's scatter; jstep's layer must not warn.
                if layer is nnx.BatchNorm:
                    warnings.filterwarnings("ignore", "scatter inputs have incompatible types", FutureWarning)
                else:
                    warnings.simplefilter("error", FutureWarning)
                tangent = jax.jvp(apply, (x,), (dx,))[1]
                hvp = jax.jvp(jax.grad(lambda x, apply=apply: jnp.sum(jnp.sin(apply(x)))), (x,), (dx,))[1]
                results.append((tangent, jax.jacfwd(apply)(x[:2]), hvp))
        for ours, theirs in zip(*results, strict=True):
            assert max_rel(ours, theirs) < 1e-11


def test_linen_layer_forward_mode_matches_flax_linen():
    nn = pytest.importorskip("flax.linen")
    import jstep.linen

    with jax.enable_x64(True):
        (x, _, _), (dx, _, _) = inputs((6, 3, 4), -1, seed=10)
        results = []
        for layer in (jstep.linen.BatchNorm(use_running_average=False), nn.BatchNorm(use_running_average=False)):
            variables = layer.init(jax.random.key(0), x)

            def apply(x, layer=layer, variables=variables):
                return layer.apply(variables, x, mutable=["batch_stats"])[0]

            tangent = jax.jvp(apply, (x,), (dx,))[1]
            hvp = jax.jvp(jax.grad(lambda x, apply=apply: jnp.sum(jnp.sin(apply(x)))), (x,), (dx,))[1]
            results.append((tangent, hvp))
        for ours, theirs in zip(*results, strict=True):
            assert max_rel(ours, theirs) < 1e-11


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_equinox_layer_forward_mode_matches_equinox(mode):
    """mode="batch" (jstep.batch_norm) and mode="ema" (its own hand-derived tangent map), on a
    second training call (for "ema", the running statistics then mix the batch's with weight
    1 - momentum); forward over reverse in x for "batch" (for "ema" it is refused, see
    tests/test_equinox.py)."""
    eqx = pytest.importorskip("equinox")
    import jstep.equinox

    with jax.enable_x64(True):
        (x, _, _), (dx, _, _) = inputs((6, 4, 3), 1, seed=11)
        results = []
        for layer in (jstep.equinox.BatchNorm, eqx.nn.BatchNorm):
            bn, state = eqx.nn.make_with_state(layer)(4, axis_name="batch", dtype=jnp.float64, mode=mode, momentum=0.7)
            train = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
            _, state = train(x[::-1] * 0.5 + 1.0, state)  # one step first: the state moves

            def apply(x, train=train, state=state):
                return train(x, state)[0]

            figures = [jax.jvp(apply, (x,), (dx,))[1], jax.jacfwd(apply)(x[:2])]
            if mode == "batch":
                figures.append(jax.jvp(jax.grad(lambda x, apply=apply: jnp.sum(jnp.sin(apply(x)))), (x,), (dx,))[1])
            results.append(figures)
        for ours, theirs in zip(*results, strict=True):
            assert max_rel(ours, theirs) < 1e-11


# ------------------------------------- derivatives taken from outside a jit around a vmap


def vmapped_batch_norms():
    """name -> (f(x, scale, offset), plain reference or None): a batch norm of the rows of x,
    each row one example of a ``jax.vmap`` with axis_name="b", the statistics taken across
    the examples; the plain reference is a jnp batch norm with pmean statistics, left to autodiff."""
    eqx = pytest.importorskip("equinox")
    import jstep.equinox

    def plain(z, scale, offset):
        mean = jax.lax.pmean(z, "b")
        return (z - mean) / jnp.sqrt(jax.lax.pmean((z - mean) ** 2, "b") + 1e-5) * scale + offset

    def mapped(one):
        return jax.vmap(one, in_axes=(0, None, None), axis_name="b")

    def equinox(layer, **options):
        bn, state = eqx.nn.make_with_state(layer)(4, axis_name="b", dtype=jnp.float64, **options)
        leaves, treedef = jax.tree.flatten(state)

        def one(z, scale, offset):
            weighted = eqx.tree_at(lambda m: (m.weight, m.bias), bn, (scale, offset))
            return weighted(z, jax.tree.unflatten(treedef, leaves))[0]  # a fresh state for each trace

        return mapped(one), None

    renorm_statistics = (jnp.full(4, 1.0), jnp.full(4, 3.0))
    return {
        "batch_norm": (mapped(lambda z, g, b: jstep.batch_norm(z[None], g, b, axis_name="b")[0]), mapped(plain)),
        "batch_renorm": (
            mapped(lambda z, g, b: jstep.batch_renorm(z[None], g, b, *renorm_statistics, axis_name="b")[0]),
            None,
        ),
        "equinox batch": equinox(jstep.equinox.BatchNorm, mode="batch"),
        "equinox ema": equinox(jstep.equinox.BatchNorm, mode="ema"),
        "equinox renorm": equinox(jstep.equinox.BatchRenorm),
    }


@pytest.mark.parametrize("name", ["batch_norm", "batch_renorm", "equinox batch", "equinox ema", "equinox renorm"])
def test_gradients_from_outside_a_jit_scan_cond_or_remat_around_a_vmapped_batch_norm(name):
    """``jax.grad(jax.jit(f))`` where f vmaps the layer with an axis_name (Equinox's usual
    loop: eqx.filter_value_and_grad around an eqx.filter_jit forward) makes JAX trace the
    hand-derived tangent map after the vmap has returned; it raised "NameError: unbound axis
    name". Each wrapper's gradient (in x, scale and offset) equals the one taken inside jit, and
    for batch_norm autodiff of the plain pmean reference."""
    with jax.enable_x64(True):
        f, reference = vmapped_batch_norms()[name]
        (x, scale, offset), _ = inputs((6, 4), -1, seed=12)

        def loss(f):
            return lambda x, scale, offset: jnp.sum(jnp.sin(f(x, scale, offset)))

        def scanned(*args):
            return jax.lax.scan(lambda carry, _: (carry, f(*args)), None, None, length=2)[1][1]

        def branched(*args):
            return jax.lax.cond(args[0][0, 0] > -1e9, f, lambda *a: -f(*a), *args)

        nothing_saved = jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)
        grad = functools.partial(jax.grad, argnums=(0, 1, 2))
        gradients = []
        for wrapped in (jax.jit(f), scanned, branched, nothing_saved):
            jax.clear_caches()  # a tangent map traced before (inside the vmap) would be reused
            gradients.append(grad(loss(wrapped))(x, scale, offset))
        want = jax.jit(grad(loss(f)))(x, scale, offset)
        if reference is not None:
            for got, plain in zip(want, grad(loss(reference))(x, scale, offset), strict=True):
                assert max_rel(got, plain) < 1e-10
        for gradient in gradients:
            for got, expected in zip(gradient, want, strict=True):
                assert max_rel(got, expected) < 1e-12
