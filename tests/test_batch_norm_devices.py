"""batch_norm split across 8 (CPU) devices, across vmapped examples, or both, equals batch_norm
of the whole batch on one device: shard_map, pmap, sharded jit, jax.vmap(axis_name=...) and
vmap inside shard_map with a tuple axis_name, for the values, the gradients and the running
statistics.

The checks run in a subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=8,
so the rest of the suite keeps its single device.
"""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    r"""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import jstep

    assert jax.device_count() == 8, jax.devices()
    jax.config.update("jax_enable_x64", True)  # float64: differences are the algorithm's, not round-off
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (16, 3, 2, 5))
    scale, offset = rng.normal(1.0, 0.3, 5), rng.normal(0.0, 0.3, 5)
    w = rng.normal(size=x.shape)

    def close(name, got, want, tol=1e-12):
        err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))) / np.max(np.abs(np.asarray(want))))
        assert err <= tol, f"{name}: relative error {err:.3e}"
        print(f"{name}: ok ({err:.1e})")

    def loss(x, scale, offset, w, axis_name=None):
        return jnp.sum(jstep.batch_norm(x, scale, offset, eps=1e-3, eps_in_sqrt=False, axis_name=axis_name) * w)

    # The reference: one device, the whole batch.
    y_ref = jstep.batch_norm(x, scale, offset, eps=1e-3, eps_in_sqrt=False)
    dx_ref, dscale_ref, doffset_ref = jax.grad(loss, argnums=(0, 1, 2))(x, scale, offset, w)

    # shard_map with axis_name: values and input gradients of the whole batch; the scale and
    # offset gradients are per-device shares that sum to the whole batch's.
    def per_device(x, scale, offset, w):
        y = jstep.batch_norm(x, scale, offset, eps=1e-3, eps_in_sqrt=False, axis_name="batch")
        scale = jax.lax.pcast(scale, "batch", to="varying")  # take this device's share
        offset = jax.lax.pcast(offset, "batch", to="varying")
        dx, dscale, doffset = jax.grad(loss, argnums=(0, 1, 2))(x, scale, offset, w, "batch")
        return y, dx, dscale[None], doffset[None]

    mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("batch"), P(), P(), P("batch")),
                                   out_specs=(P("batch"), P("batch"), P("batch"), P("batch"))))
    y, dx, dscale, doffset = mapped(x, scale, offset, w)
    close("shard_map output", y, y_ref)
    close("shard_map input gradient", dx, dx_ref)
    close("shard_map scale gradient, summed over devices", dscale.sum(0), dscale_ref)
    close("shard_map offset gradient, summed over devices", doffset.sum(0), doffset_ref)
    share = np.asarray(dscale[0])
    assert np.max(np.abs(share - np.asarray(dscale_ref))) > 1e-3, "device 0 holds only its share"

    # Gradient of the global loss with a replicated scale: shard_map's transpose sums the shares.
    def global_loss(x, scale, offset, w):
        return jax.lax.psum(loss(x, scale, offset, w, "batch"), "batch")

    sharded_loss = jax.shard_map(global_loss, mesh=mesh, in_specs=(P("batch"), P(), P(), P("batch")), out_specs=P())
    grads = jax.jit(jax.grad(sharded_loss, argnums=(0, 1, 2)))(x, scale, offset, w)
    for name, got, want in zip(["x", "scale", "offset"], grads, [dx_ref, dscale_ref, doffset_ref]):
        close(f"shard_map global-loss gradient of {name}", got, want)

    # Plain sharded jit: no axis_name, the batch axis laid out over 8 devices.
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
    w_sharded = jax.device_put(w, NamedSharding(mesh, P("batch")))
    y = jax.jit(lambda x: jstep.batch_norm(x, scale, offset, eps=1e-3, eps_in_sqrt=False))(x_sharded)
    assert len(y.sharding.device_set) == 8
    close("sharded jit output", y, y_ref)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x_sharded, scale, offset, w_sharded)
    for name, got, want in zip(["x", "scale", "offset"], grads, [dx_ref, dscale_ref, doffset_ref]):
        close(f"sharded jit gradient of {name}", got, want)

    # pmap with axis_name.
    y = jax.pmap(lambda x: jstep.batch_norm(x, scale, offset, eps=1e-3, eps_in_sqrt=False, axis_name="i"),
                 axis_name="i")(x.reshape(8, 2, 3, 2, 5))
    close("pmap output", y.reshape(x.shape), y_ref)

    # The BatchNorm layer under axis_name: the running statistics of the whole batch.
    bn = jstep.BatchNorm(axis_name="batch", eps=1e-3)
    params, state = bn.init(x)
    step = jax.jit(jax.shard_map(lambda p, s, x: bn.apply(p, s, x), mesh=mesh,
                                 in_specs=(P(), P(), P("batch")), out_specs=(P("batch"), P())))
    y, new_state = step(params, state, x)
    y1, state1 = jstep.BatchNorm(eps=1e-3).apply(params, state, x)
    close("BatchNorm output", y, y1)
    close("BatchNorm running mean", new_state.mean, state1.mean)
    close("BatchNorm running var", new_state.var, state1.var)

    # The BatchNorm layer under every way of splitting the batch: a function of one shard that
    # returns (y, its share of the loss, the new state), mapped over the batch; the gradient of
    # the summed loss is taken outside the map (Equinox's, nnx.vmap's and Linen's nn.vmap's
    # pattern). Values, gradients of x, scale and offset, and the running statistics must be
    # those of one device holding the whole batch.
    def shard_step(names):
        layer = jstep.BatchNorm(momentum=0.8, eps=1e-3, eps_in_sqrt=False, axis_name=names)

        def step(params, state, x, w):
            y, new_state = layer.apply(params, state, x)
            return y, jnp.sum(jnp.sin(y) * w), new_state
        return step

    params = jstep.BatchNormParams(jnp.asarray(scale), jnp.asarray(offset))
    state = jstep.BatchNormState(jnp.asarray(rng.normal(size=5)), jnp.asarray(rng.uniform(1, 2, 5)))

    def whole_batch(params, state, x, w):
        y, new_state = jstep.BatchNorm(momentum=0.8, eps=1e-3, eps_in_sqrt=False).apply(params, state, x)
        return jnp.sum(jnp.sin(y) * w), (y, new_state)

    reference = jax.value_and_grad(whole_batch, argnums=(0, 2), has_aux=True)
    (_, (y_ref, state_ref)), (dparams_ref, dx_ref) = reference(params, state, x, w)

    def by_vmap(params, state, x, w):  # one example per mapped slice
        y, losses, new_state = jax.vmap(shard_step("examples"), in_axes=(None, None, 0, 0), out_axes=(0, 0, None),
                                        axis_name="examples")(params, state, x, w)
        return losses.sum(), (y, new_state)

    def by_shard_map(params, state, x, w):
        def step(params, state, x, w):
            y, loss, new_state = shard_step("batch")(params, state, x, w)
            return y, loss[None], new_state
        y, losses, new_state = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")),
                                             out_specs=(P("batch"), P("batch"), P()))(params, state, x, w)
        return losses.sum(), (y, new_state)

    def by_pmap(params, state, x, w):
        y, losses, new_state = jax.pmap(shard_step("i"), in_axes=(None, None, 0, 0), axis_name="i")(
            params, state, x.reshape(8, 2, *x.shape[1:]), w.reshape(8, 2, *w.shape[1:]))
        for leaf in jax.tree.leaves(new_state):  # every device holds the same running statistics
            np.testing.assert_array_equal(leaf, jnp.broadcast_to(leaf[0], leaf.shape))
        return losses.sum(), (y.reshape(x.shape), jax.tree.map(lambda a: a[0], new_state))

    def by_vmap_in_shard_map(params, state, x, w):  # axis_name=("batch", "examples"): 8 devices x 2 examples
        def on_device(params, state, x, w):
            y, losses, new_state = jax.vmap(shard_step(("batch", "examples")), in_axes=(None, None, 0, 0),
                                            out_axes=(0, 0, None), axis_name="examples")(params, state, x, w)
            return y, losses, new_state
        y, losses, new_state = jax.shard_map(on_device, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch")),
                                             out_specs=(P("batch"), P("batch"), P()))(params, state, x, w)
        return losses.sum(), (y, new_state)

    mappings = [("vmap", by_vmap, True), ("vmap, jitted", by_vmap, False), ("shard_map", by_shard_map, False),
                ("pmap", by_pmap, True), ("vmap inside shard_map", by_vmap_in_shard_map, False)]
    for label, mapped, eager in mappings:
        run = jax.value_and_grad(mapped, argnums=(0, 2), has_aux=True)
        (_, (y, new_state)), (dparams, dx) = run(params, state, x, w) if eager else jax.jit(run)(params, state, x, w)
        close(f"{label}: output", y, y_ref)
        close(f"{label}: input gradient", dx, dx_ref)
        close(f"{label}: scale gradient", dparams.scale, dparams_ref.scale)
        close(f"{label}: offset gradient", dparams.offset, dparams_ref.offset)
        close(f"{label}: running mean", new_state.mean, state_ref.mean)
        close(f"{label}: running var", new_state.var, state_ref.var)

    # Per-example gradients under vmap (the gradient taken inside the map): the input gradient is
    # the whole batch's, and the examples' scale and offset gradients are shares summing to it.
    def example_loss(x, scale, offset, w):
        y = jstep.batch_norm(x, scale, offset, eps=1e-3, eps_in_sqrt=False, axis_name="examples")
        return jnp.sum(jnp.sin(y) * w)

    dx, dscale, doffset = jax.jit(jax.vmap(jax.grad(example_loss, argnums=(0, 1, 2)), in_axes=(0, None, None, 0),
                                           axis_name="examples"))(x, scale, offset, w)
    close("vmap per-example grad: input gradient", dx, dx_ref)
    close("vmap per-example grad: scale shares, summed", dscale.sum(0), dparams_ref.scale)
    close("vmap per-example grad: offset shares, summed", doffset.sum(0), dparams_ref.offset)
    # Second derivatives through the all-reduces over a vmap axis inside shard_map: a
    # Hessian-vector product of the summed loss equals the whole batch's.
    v = jnp.asarray(rng.normal(size=x.shape))

    def total_loss(x, mapped):
        return mapped(params, state, x, w)[0]

    hvp_ref = jax.jvp(jax.grad(lambda x: whole_batch(params, state, x, w)[0]), (x,), (v,))[1]
    hvp = jax.jit(lambda x, v: jax.jvp(jax.grad(lambda x: total_loss(x, by_vmap_in_shard_map)), (x,), (v,))[1])(x, v)
    close("vmap inside shard_map: Hessian-vector product", hvp, hvp_ref, tol=1e-11)

    mean, var = jax.vmap(lambda x: jstep.batch_stats(x, axis_name="examples"), axis_name="examples",
                         out_axes=None)(x)
    close("vmap batch_stats mean", mean, x.mean((0, 1, 2)))
    close("vmap batch_stats var", var, x.var((0, 1, 2)))

    # One value per feature on each device is a valid batch of K = 8 across the devices.
    one = jax.shard_map(lambda x: jstep.batch_norm(x, scale[:1], offset[:1], axis_name="batch"), mesh=mesh,
                        in_specs=P("batch"), out_specs=P("batch"))
    try:
        jax.jit(one)(np.ones((8, 1)))
        print("K = 8 across devices: accepted")
    except ValueError as error:
        raise AssertionError(f"8 values across 8 devices are a valid batch: {error}")

    # A mask with different numbers of masked-in values per device (device 0: none, device 1:
    # one): K is the sum of the devices' counts, and everything equals one device's masked run
    # on the whole batch, itself checked against NumPy statistics of the masked-in values.
    mask = rng.random((16, 3, 1, 1)) < 0.5
    mask[0:2] = False
    mask[2:4] = False
    mask[2, 0] = True
    mask[4] = True

    def masked_loss(x, scale, offset, mask):
        return jnp.sum(jnp.sin(jstep.batch_norm(x, scale, offset, eps=1e-3, mask=mask)) * w)

    y_ref = jstep.batch_norm(x, scale, offset, eps=1e-3, mask=mask)
    grads_ref = jax.grad(masked_loss, argnums=(0, 1, 2))(x, scale, offset, mask)
    values = [x[..., i][np.broadcast_to(mask, x.shape)[..., i]] for i in range(5)]
    mu, sd = np.array([v.mean() for v in values]), np.array([np.sqrt(v.var() + 1e-3) for v in values])
    close("masked one-device output against NumPy", y_ref, (x - mu) / sd * scale + offset)

    def masked_global_loss(x, scale, offset, mask, w):
        y = jstep.batch_norm(x, scale, offset, eps=1e-3, mask=mask, axis_name="batch")
        return jax.lax.psum(jnp.sum(jnp.sin(y) * w), "batch"), y

    sharded = jax.shard_map(masked_global_loss, mesh=mesh, in_specs=(P("batch"), P(), P(), P("batch"), P("batch")),
                            out_specs=(P(), P("batch")))
    (_, y), grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2), has_aux=True))(x, scale, offset, mask, w)
    close("masked shard_map output", y, y_ref)
    for name, got, want in zip(["x", "scale", "offset"], grads, grads_ref):
        close(f"masked shard_map gradient of {name}", got, want)
    bn = jstep.BatchNorm(axis_name="batch", eps=1e-3)
    params, state = bn.init(x)
    step = jax.jit(jax.shard_map(lambda p, s, x, m: bn.apply(p, s, x, mask=m), mesh=mesh,
                                 in_specs=(P(), P(), P("batch"), P("batch")), out_specs=(P("batch"), P())))
    _, masked_state = step(params, state, x, mask)
    _, masked_state_ref = jstep.BatchNorm(eps=1e-3).apply(params, state, x, mask=mask)
    close("masked BatchNorm running mean", masked_state.mean, masked_state_ref.mean)
    close("masked BatchNorm running var", masked_state.var, masked_state_ref.var)

    # A mask known when traced is the same on every device, so its count is known: 1 value on
    # each of 8 devices is accepted, none is refused.
    def with_fixed_mask(fixed):
        return jax.jit(jax.shard_map(lambda x: jstep.batch_norm(x, scale[:1], offset[:1], axis_name="batch",
                                                                mask=fixed), mesh=mesh,
                                     in_specs=P("batch"), out_specs=P("batch")))

    y = with_fixed_mask(np.array([[True], [False]]))(x[:, 0, 0, :1])
    assert np.all(np.isfinite(y)), y
    try:
        with_fixed_mask(np.zeros((2, 1), bool))(x[:, 0, 0, :1])
        raise AssertionError("a mask with no value in was accepted")
    except ValueError as error:
        assert "K = 0" in str(error), error
    print("fixed masks: K = 8 accepted, K = 0 refused: ok")
    print("ALL OK")
    """
)


@pytest.fixture(scope="module")
def eight_device_run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-c", SCRIPT]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_eight_devices_give_the_single_device_values_and_gradients(eight_device_run):
    run = eight_device_run
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ALL OK" in run.stdout
    checks = [
        "shard_map input gradient",
        "sharded jit gradient of x",
        "pmap output",
        "BatchNorm running var",
        "vmap per-example grad: scale shares, summed",
        "vmap inside shard_map: Hessian-vector product",
        "masked one-device output against NumPy",
        "masked shard_map output",
        "masked shard_map gradient of x",
        "masked shard_map gradient of scale",
        "masked BatchNorm running var",
        "fixed masks: K = 8 accepted, K = 0 refused",
    ]
    quantities = ["output", "input gradient", "scale gradient", "running var"]
    for mapping in ["vmap", "vmap, jitted", "shard_map", "pmap", "vmap inside shard_map"]:
        checks += [f"{mapping}: {quantity}" for quantity in quantities]
    for check in checks:
        assert f"{check}: ok" in run.stdout, run.stdout
