"""batch_norm across 8 (CPU) devices equals batch_norm of the whole batch on one device.

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
    r'''
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

    # A batch of one value per feature in total is refused even when split across devices.
    one = jax.shard_map(lambda x: jstep.batch_norm(x, scale[:1], offset[:1], axis_name="batch"), mesh=mesh,
                        in_specs=P("batch"), out_specs=P("batch"))
    try:
        jax.jit(one)(np.ones((8, 1)))
        print("K = 8 across devices: accepted")
    except ValueError as error:
        raise AssertionError(f"8 values across 8 devices are a valid batch: {error}")
    print("ALL OK")
    '''
)


@pytest.fixture(scope="module")
def eight_device_run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)


def test_eight_devices_give_the_single_device_values_and_gradients(eight_device_run):
    run = eight_device_run
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ALL OK" in run.stdout
    for check in ["shard_map input gradient", "sharded jit gradient of x", "pmap output", "BatchNorm running var"]:
        assert f"{check}: ok" in run.stdout, run.stdout
