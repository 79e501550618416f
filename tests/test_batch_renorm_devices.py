"""batch_renorm split across 8 (CPU) devices, or across vmapped examples, equals batch_renorm of
the whole batch on one device (shard_map, eager shard_map, pmap, vmap with axis_name), for the
values and the gradients; with axis_index_groups under pmap each group equals one device holding
the group's examples. Run in a subprocess with 8 host devices, as tests/test_batch_norm_devices.py.
"""

import textwrap

from harness import run_on_eight_devices

SCRIPT = textwrap.dedent(
    r"""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    import jstep

    assert jax.device_count() == 8, jax.devices()
    jax.config.update("jax_enable_x64", True)  # float64: differences are the algorithm's, not round-off
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (16, 3, 5))
    scale, offset = rng.normal(1.0, 0.3, 5), rng.normal(0.0, 0.3, 5)
    w = rng.normal(size=x.shape)
    # running statistics that put r and d inside and outside their bounds (r_max 1.5, d_max 0.5)
    var = x.var(axis=(0, 1)) * np.array([1.3, 0.1, 10.0, 1.3, 0.1])
    mean = x.mean(axis=(0, 1)) - np.sqrt(var) * np.array([0.2, 2.0, -0.3, -2.0, 0.1])
    kw = dict(r_max=1.5, d_max=0.5, eps=1e-3)

    def close(name, got, want, tol=1e-12):
        err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))) / np.max(np.abs(np.asarray(want))))
        assert err <= tol, f"{name}: relative error {err:.3e}"
        print(f"{name}: ok ({err:.1e})")

    def loss(x, scale, offset, w, axis_name=None, axis_index_groups=None):
        groups = {"axis_name": axis_name, "axis_index_groups": axis_index_groups}
        y = jstep.batch_renorm(x, scale, offset, mean, var, **groups, **kw)
        return jnp.sum(jnp.sin(y) * w)

    grads = jax.grad(loss, argnums=(0, 1, 2))
    y_ref = jstep.batch_renorm(x, scale, offset, mean, var, **kw)
    dx_ref, dscale_ref, doffset_ref = grads(x, scale, offset, w)

    def per_device(x, scale, offset, w):
        y = jstep.batch_renorm(x, scale, offset, mean, var, axis_name="batch", **kw)
        scale = jax.lax.pcast(scale, "batch", to="varying")  # take this device's share
        offset = jax.lax.pcast(offset, "batch", to="varying")
        dx, dscale, doffset = grads(x, scale, offset, w, "batch")
        return y, dx, dscale[None], doffset[None]

    specs = dict(mesh=mesh, in_specs=(P("batch"), P(), P(), P("batch")), out_specs=(P("batch"),) * 4)
    for name, mapped in [("shard_map", jax.jit(jax.shard_map(per_device, **specs))),
                         ("eager shard_map", jax.shard_map(per_device, **specs))]:
        y, dx, dscale, doffset = mapped(x, scale, offset, w)
        close(f"{name} output", y, y_ref)
        close(f"{name} input gradient", dx, dx_ref)
        close(f"{name} scale gradient, summed over devices", dscale.sum(0), dscale_ref)
        close(f"{name} offset gradient, summed over devices", doffset.sum(0), doffset_ref)

    # Forward mode across devices: the tangent of the whole batch's output.
    dx = rng.normal(size=x.shape)
    _, dy_ref = jax.jvp(lambda x: jstep.batch_renorm(x, scale, offset, mean, var, **kw), (x,), (dx,))
    def tangent(x, dx):
        f = lambda x: jstep.batch_renorm(x, scale, offset, mean, var, axis_name="batch", **kw)
        return jax.jvp(f, (x,), (dx,))[1]
    dy = jax.jit(jax.shard_map(tangent, mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=P("batch")))(x, dx)
    close("shard_map forward-mode tangent", dy, dy_ref)

    # vmap with axis_name: one example per call; gradients taken outside the map are summed by vmap.
    def whole(x, scale, offset):
        f = jax.vmap(lambda xi: jstep.batch_renorm(xi, scale, offset, mean, var, axis_name="examples", **kw),
                     axis_name="examples")
        return jnp.sum(jnp.sin(f(x)) * w)

    close("vmap output", jax.vmap(lambda xi: jstep.batch_renorm(xi, scale, offset, mean, var, axis_name="e", **kw),
                                  axis_name="e")(x), y_ref)
    for name, got, want in zip(["input", "scale", "offset"], jax.grad(whole, argnums=(0, 1, 2))(x, scale, offset),
                               (dx_ref, dscale_ref, doffset_ref)):
        close(f"vmap {name} gradient", got, want)

    # pmap with groups: each group of 4 devices is a batch of its own.
    for groups in ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]]):
        xs, ws = x.reshape(8, 2, 3, 5), w.reshape(8, 2, 3, 5)
        y = jax.pmap(lambda xi: jstep.batch_renorm(xi, scale, offset, mean, var, axis_name="batch",
                                                   axis_index_groups=groups, **kw), axis_name="batch")(xs)
        dx = jax.pmap(lambda xi, wi: grads(xi, scale, offset, wi, "batch", groups)[0], axis_name="batch")(xs, ws)
        for group in groups:
            xg, wg = xs[np.array(group)].reshape(-1, 3, 5), ws[np.array(group)].reshape(-1, 3, 5)
            close(f"pmap, groups {groups}: output of group {group}", y[np.array(group)].reshape(-1, 3, 5),
                  jstep.batch_renorm(xg, scale, offset, mean, var, **kw))
            close(f"pmap, groups {groups}: input gradient of group {group}", dx[np.array(group)].reshape(-1, 3, 5),
                  grads(xg, scale, offset, wg)[0])
    # The Linen layer under pmap, batch split over 8 devices, after a warm-up of one call: equal to
    # Stable-Baselines-JAX's layer under the same pmap and to jstep's on the whole batch.
    import importlib.metadata, importlib.util
    import jstep.linen
    path = importlib.metadata.distribution("sbx-rl").locate_file("sbx/common/jax_layers.py")
    spec = importlib.util.spec_from_file_location("sbx_jax_layers", str(path))
    sbx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sbx)
    xs = x.reshape(8, 2, 3, 5)
    def train(layer_class, axis_name, batches):
        layer = layer_class(use_running_average=False, warmup_steps=1, momentum=0.5, axis_name=axis_name)
        variables = layer.init(jax.random.key(0), batches[0][0] if axis_name else batches[0])
        apply = lambda v, b: layer.apply(v, b, mutable=["batch_stats"])
        apply = jax.pmap(apply, axis_name=axis_name, in_axes=(None, 0)) if axis_name else apply
        for b in batches:
            y, updates = apply(variables, b)
            stats = jax.tree.map(lambda a: a[0], updates["batch_stats"]) if axis_name else updates["batch_stats"]
            variables = {"params": variables["params"], "batch_stats": stats}
        return y, variables["batch_stats"]
    batches = [xs, xs * 2.0 + 1.0, xs - 3.0]
    y, stats = train(jstep.linen.BatchRenorm, "batch", batches)
    y_sbx, stats_sbx = train(sbx.BatchRenorm, "batch", batches)
    y_one, stats_one = train(jstep.linen.BatchRenorm, None, [b.reshape(16, 3, 5) for b in batches])
    # sbx-rl stores the float64 statistics into its float32 variables, jstep keeps them float32:
    # float32 rounding of the running statistics is what separates the two.
    close("pmap Linen layer: output against sbx-rl's", y.reshape(16, 3, 5), y_sbx.reshape(16, 3, 5), tol=1e-6)
    close("pmap Linen layer: output against one device", y.reshape(16, 3, 5), y_one)
    close("pmap Linen layer: running var against one device", stats["var"], stats_one["var"])
    close("pmap Linen layer: running var against sbx-rl's", stats["var"], stats_sbx["var"], tol=1e-6)
    print("ALL OK")
    """
)


def test_eight_devices_give_the_single_device_values_and_gradients():
    stdout = run_on_eight_devices(SCRIPT)
    assert "ALL OK" in stdout
    checks = [f"{m} {q}" for m in ("shard_map", "eager shard_map") for q in ("output", "input gradient")]
    checks += ["shard_map scale gradient, summed over devices", "eager shard_map offset gradient, summed over devices"]
    checks += ["shard_map forward-mode tangent", "vmap output", "vmap input gradient", "vmap scale gradient"]
    checks += ["pmap, groups [[0, 2, 4, 6], [1, 3, 5, 7]]: input gradient of group [1, 3, 5, 7]"]
    checks += ["pmap Linen layer: output against sbx-rl's", "pmap Linen layer: output against one device"]
    for check in checks:
        assert f"{check}: ok" in stdout, stdout
