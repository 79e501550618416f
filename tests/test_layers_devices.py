"""The framework layers data-parallel over 8 (CPU) devices equal one device holding the batch.

For jstep.nnx, jstep.linen and jstep.equinox: under ``shard_map`` with the layer's axis_name
(for Equinox, its per-example vmap inside shard_map, a tuple axis_name, in both of its modes), under
``nnx.shard_map``, and under a plain sharded ``jit`` (no axis_name: XLA adds the collectives),
the outputs, the gradients of the parameters and of the input, and the new running statistics
equal those of one device, in float64; for the Flax layers also with a mask that gives the
devices different numbers of values (device 0 none). With axis_index_groups under ``pmap``,
jstep.nnx and jstep.linen equal Flax's own layers given the same groups. One subprocess, started
with XLA_FLAGS=--xla_force_host_platform_device_count=8, runs every check.
"""

import textwrap

import pytest

from harness import run_on_eight_devices

SCRIPT = textwrap.dedent(
    r'''
    import equinox as eqx
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jstep.equinox
    import jstep.linen
    import jstep.nnx

    assert jax.device_count() == 8, jax.devices()
    jax.config.update("jax_enable_x64", True)  # float64: differences are the algorithm's, not round-off
    # jax.make_mesh's default in jax 0.10: explicit axes (arrays are typed by their sharding).
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
    rng = np.random.default_rng(0)
    C = 5
    x = rng.normal(2.0, 3.0, (16, 3, C))
    w = rng.normal(size=x.shape)  # the loss is sum(sin(y) * w)
    # A mask that leaves device 0 (examples 0 and 1) no value and the other devices different numbers.
    mask = rng.random((16, 3, 1)) < 0.7
    mask[:2] = False


    def close(name, got, want, tol=1e-12):
        for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            g, v = np.asarray(g, np.float64), np.asarray(v, np.float64)
            err = float(np.max(np.abs(g - v)) / max(np.max(np.abs(v)), 1e-300))
            assert err <= tol, f"{name}: relative error {err:.3e}"
        print(f"{name}: ok")


    def on_devices(forward, mesh):
        """forward(params, stats, x, w, mask) -> (y, loss, stats) on each device's shard; the loss psum'd."""
        def local(params, stats, x, w, mask):
            y, loss, stats = forward(params, stats, x, w, mask)
            return y, jax.lax.psum(loss, "batch"), stats
        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("batch"), P("batch"), P("batch")),
                             out_specs=(P("batch"), P(), P()))


    def train(forward, params, stats, x, w, mask):
        """(y, (d loss/d params, d loss/dx), new stats), jitted; the gradient taken outside any map."""
        def total(params, stats, x, w, mask):
            y, loss, stats = forward(params, stats, x, w, mask)
            return loss, (y, stats)
        run = jax.jit(jax.value_and_grad(total, argnums=(0, 2), has_aux=True))
        (_, (y, stats)), grads = run(params, stats, x, w, mask)
        return y, grads, stats


    def compare(label, make_forward, params, stats, mesh=mesh, stats_tol=1e-12, mask=None):
        """One device against shard_map (the layer's axis_name "batch") and a sharded jit (axis_name None).

        The batch (and the mask) is split over the mesh; params and statistics are replicated on it.
        """
        one = train(make_forward(None), params, stats, x, w, mask)
        batch = jax.device_put((x, w, mask), NamedSharding(mesh, P("batch")))
        replicated = jax.device_put((params, stats), NamedSharding(mesh, P()))
        runs = {
            "shard_map": train(on_devices(make_forward("batch"), mesh), *replicated, *batch),
            "sharded jit": train(make_forward(None), *replicated, *batch),
        }
        assert len(runs["sharded jit"][0].sharding.device_set) == 8
        for how, (y, grads, new_stats) in runs.items():
            close(f"{label}, {how}: output", y, one[0])
            close(f"{label}, {how}: parameter and input gradients", grads, one[1], tol=1e-11)
            close(f"{label}, {how}: running statistics", new_stats, one[2], tol=stats_tol)


    # ---- jstep.nnx: the functional split/merge API under shard_map and sharded jit
    def nnx_model(axis_name):
        return jstep.nnx.BatchNorm(C, momentum=0.8, epsilon=1e-3, param_dtype=jnp.float64, axis_name=axis_name,
                                   scale_init=nnx.initializers.normal(), bias_init=nnx.initializers.normal(),
                                   rngs=nnx.Rngs(0))

    def nnx_forward(axis_name):
        graphdef, _, _ = nnx.split(nnx_model(axis_name), nnx.Param, nnx.BatchStat)
        def forward(params, stats, x, w, mask):
            model = nnx.merge(graphdef, params, stats, copy=True)  # fresh variables in this trace
            y = model(x, mask=mask)
            return y, jnp.sum(jnp.sin(y) * w), nnx.state(model, nnx.BatchStat)
        return forward

    _, nnx_params, nnx_stats = nnx.split(nnx_model(None), nnx.Param, nnx.BatchStat)
    # NNX keeps its running statistics in float32 whatever the input, so they agree to float32.
    compare("nnx", nnx_forward, nnx_params, nnx_stats, stats_tol=1e-6)
    compare("nnx with a mask, uneven across devices", nnx_forward, nnx_params, nnx_stats, stats_tol=1e-6, mask=mask)

    # ---- jstep.nnx under nnx.shard_map, the model updated in place (jitted: jstep.batch_norm's
    # custom_vjp with symbolic zeros cannot run under an eager shard_map in jax 0.10)
    model, reference = nnx_model("batch"), nnx_model(None)
    apply = nnx.jit(nnx.shard_map(lambda model, x: model(x), mesh=mesh, in_specs=(P(), P("batch")),
                                  out_specs=P("batch")))
    close("nnx.shard_map: output", apply(model, jax.device_put(x, NamedSharding(mesh, P("batch")))), reference(x))
    close("nnx.shard_map: running statistics", nnx.state(model, nnx.BatchStat), nnx.state(reference, nnx.BatchStat))

    # ---- jstep.linen
    def linen_forward(axis_name):
        module = jstep.linen.BatchNorm(use_running_average=False, momentum=0.8, epsilon=1e-3, axis_name=axis_name,
                                       param_dtype=jnp.float64, force_float32_reductions=False)
        def forward(params, stats, x, w, mask):
            y, updates = module.apply({"params": params, "batch_stats": stats}, x, mask=mask, mutable=["batch_stats"])
            return y, jnp.sum(jnp.sin(y) * w), updates["batch_stats"]
        return forward

    variables = jstep.linen.BatchNorm(use_running_average=False, param_dtype=jnp.float64,
                                      force_float32_reductions=False).init(jax.random.key(0), x)
    linen_params = jax.tree.map(lambda a: a + rng.normal(size=a.shape), variables["params"])
    compare("linen", linen_forward, linen_params, variables["batch_stats"])
    linen_stats = variables["batch_stats"]
    compare("linen with a mask, uneven across devices", linen_forward, linen_params, linen_stats, mask=mask)

    # ---- jstep.equinox: per example under vmap; on devices, vmap inside shard_map (axis_name a tuple).
    # Each example x[i] is (3 channels, C positions), channel-first as Equinox wants. Both modes; "ema"
    # from running statistics already set, so that the batch's are averaged into them.
    # Auto axes: in jax 0.10 a psum over a vmap axis whose batch is sharded on an explicit-axes mesh
    # fails to trace (Equinox's own BatchNorm too), so Equinox data parallelism uses an auto-axes mesh.
    auto_mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    for mode in ["batch", "ema"]:
        layer, eqx_state = eqx.nn.make_with_state(jstep.equinox.BatchNorm)(3, "examples", momentum=0.8, eps=1e-3,
                                                                           dtype=jnp.float64, mode=mode)
        layer = eqx.tree_at(lambda m: (m.weight, m.bias), layer, tuple(rng.normal(size=(2, 3))))
        if mode == "ema":
            eqx_state = eqx_state.set(layer.ema_first_time_index, jnp.array(False))
            eqx_state = eqx_state.set(layer.ema_state_index, (rng.normal(size=3), 1 + rng.random(3)))

        def eqx_forward(mapped_axis_name, layer=layer):
            names = "examples" if mapped_axis_name is None else (mapped_axis_name, "examples")
            _, static = eqx.partition(eqx.tree_at(lambda m: m.axis_name, layer, names), eqx.is_inexact_array)
            def forward(params, state, x, w, mask):  # Equinox's layer takes no mask
                model = eqx.combine(params, static)
                y, state = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="examples")(x, state)
                return y, jnp.sum(jnp.sin(y) * w), state
            return forward

        compare(f"equinox, mode {mode}", eqx_forward, eqx.filter(layer, eqx.is_inexact_array), eqx_state, auto_mesh)

    # ---- axis_index_groups under pmap: jstep's Flax layers against Flax's own with the same groups
    # (Flax's variance two-pass), each group of 4 devices a batch of its own. Values, gradients of
    # the parameters and the input, and every device's running statistics agree.
    def on_pmap(forward, params, stats):
        """(y, (d loss/d params, d loss/dx), stats per device) of forward on 8 devices of 2 examples."""
        def total(params, x, w):
            y, losses, new_stats = jax.pmap(forward, axis_name="i", in_axes=(None, None, 0, 0))(params, stats, x, w)
            return losses.sum(), (y, new_stats)
        shard = lambda a: a.reshape(8, 2, *a.shape[1:])
        (_, (y, new_stats)), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(params, shard(x),
                                                                                            shard(w))
        return y, grads, new_stats

    def compare_groups(label, groups, ours, theirs, params, stats, stats_tol):
        y, grads, new_stats = on_pmap(ours, params, stats)
        y_flax, grads_flax, new_stats_flax = on_pmap(theirs, params, stats)
        close(f"{label}: output", y, y_flax)
        close(f"{label}: parameter and input gradients", grads, grads_flax, tol=1e-11)
        close(f"{label}: running statistics of every device", new_stats, new_stats_flax, tol=stats_tol)
        means = np.asarray(jax.tree.leaves(new_stats)[0])
        first, second = groups[0][0], groups[1][0]
        assert not np.allclose(means[first], means[second]), "the two groups keep different running statistics"

    def nnx_grouped(layer, groups):
        model = layer(C, momentum=0.8, epsilon=1e-3, param_dtype=jnp.float64, axis_name="i", axis_index_groups=groups,
                      rngs=nnx.Rngs(0))
        graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)
        def forward(params, stats, x, w):
            model = nnx.merge(graphdef, params, stats, copy=True)
            y = model(x)
            return y, jnp.sum(jnp.sin(y) * w), nnx.state(model, nnx.BatchStat)
        return forward

    strided = [[0, 2, 4, 6], [1, 3, 5, 7]]
    flax_nnx = lambda *args, **kwargs: nnx.BatchNorm(*args, use_fast_variance=False, **kwargs)
    compare_groups("nnx, groups [[0, 2, 4, 6], [1, 3, 5, 7]], pmap", strided, nnx_grouped(jstep.nnx.BatchNorm, strided),
                   nnx_grouped(flax_nnx, strided), nnx_params, nnx_stats, stats_tol=1e-6)

    def linen_grouped(layer, groups):
        module = layer(use_running_average=False, momentum=0.8, epsilon=1e-3, axis_name="i",
                       axis_index_groups=groups, param_dtype=jnp.float64, force_float32_reductions=False)
        def forward(params, stats, x, w):
            y, updates = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
            return y, jnp.sum(jnp.sin(y) * w), updates["batch_stats"]
        return forward

    contiguous = [[0, 1, 2, 3], [4, 5, 6, 7]]
    flax_linen = lambda **fields: nn.BatchNorm(use_fast_variance=False, **fields)
    compare_groups("linen, groups [[0, 1, 2, 3], [4, 5, 6, 7]], pmap", contiguous,
                   linen_grouped(jstep.linen.BatchNorm, contiguous),
                   linen_grouped(flax_linen, contiguous), linen_params, linen_stats, stats_tol=1e-12)
    print("ALL OK")
    '''
)


@pytest.fixture(scope="module")
def eight_device_stdout():
    return run_on_eight_devices(SCRIPT)


def test_layers_on_eight_devices_equal_one_device(eight_device_stdout):
    stdout = eight_device_stdout
    assert stdout.strip().endswith("ALL OK"), stdout
