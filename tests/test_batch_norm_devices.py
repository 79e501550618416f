"""batch_norm split across 8 (CPU) devices, across vmapped examples, or both, equals batch_norm
of the whole batch on one device: shard_map, pmap, sharded jit, jax.vmap(axis_name=...) and
vmap inside shard_map with a tuple (or list) axis_name, for the values, the gradients and the running
statistics; with axis_index_groups (pmap, shard_map with check_vma=False), each group equals one
device holding the group's examples, and where jax.lax.psum takes no groups the error says so.
Malformed groups are refused without devices, in this process.

The checks run in a subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=8,
so the rest of the suite keeps its single device.
"""

import textwrap

import numpy as np
import pytest

import jstep

from harness import run_on_eight_devices

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

    # The same shard_map run eagerly (op by op, no jit): the forward pass and the gradients.
    eager = jax.shard_map(per_device, mesh=mesh, in_specs=(P("batch"), P(), P(), P("batch")),
                          out_specs=(P("batch"), P("batch"), P("batch"), P("batch")))
    y, dx, dscale, _ = eager(x, scale, offset, w)
    close("eager shard_map output", y, y_ref)
    close("eager shard_map input gradient", dx, dx_ref)
    close("eager shard_map scale gradient, summed over devices", dscale.sum(0), dscale_ref)

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

    # axis_index_groups: each group of 4 devices is a batch of its own. Under pmap, and under a
    # shard_map with check_vma=False over a tuple axis ("a", "b") of a 2 x 4 mesh (the groups
    # index the flattened axis, as pmap's index), every device's values, input gradient,
    # batch_stats and running statistics, and its group's summed scale and offset gradients,
    # equal one device holding its group's examples; with the uneven mask above, K is the
    # count within the group.
    mesh_2x4 = Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b"))
    params = jstep.BatchNormParams(jnp.asarray(scale), jnp.asarray(offset))
    state = jstep.BatchNormState(jnp.asarray(rng.normal(size=5)), jnp.asarray(rng.uniform(1, 2, 5)))
    shards = lambda a: None if a is None else a.reshape(8, 2, *a.shape[1:])  # device d holds examples 2d, 2d + 1

    def grouped_step(names, groups):
        layer = jstep.BatchNorm(momentum=0.8, eps=1e-3, eps_in_sqrt=False, axis_name=names, axis_index_groups=groups)

        def step(params, state, x, w, mask):  # one device: the gradients of its share of the loss
            def share(params, x):
                y, new_state = layer.apply(params, state, x, mask=mask)
                return jnp.sum(jnp.sin(y) * w), (y, new_state)
            (_, (y, new_state)), (dparams, dx) = jax.value_and_grad(share, argnums=(0, 1), has_aux=True)(params, x)
            stats = jstep.batch_stats(x, axis_name=names, axis_index_groups=groups, mask=mask)
            return y, dx, dparams, new_state, stats
        return step

    def by_pmap(groups, mask):
        step = jax.pmap(grouped_step("i", groups), axis_name="i", in_axes=(None, None, 0, 0, 0))
        return step(params, state, shards(x), shards(w), shards(mask))

    def by_unchecked_shard_map(groups, mask):
        step = grouped_step(("a", "b"), groups)
        per_device = lambda *args: jax.tree.map(lambda a: a[None], step(*args))  # stacked like pmap's
        spec = P(("a", "b"))
        run = jax.shard_map(per_device, mesh=mesh_2x4, in_specs=(P(), P(), spec, spec, spec), out_specs=spec,
                            check_vma=False)
        return jax.jit(run)(params, state, x, w, mask)

    def group_reference(devices, mask):  # one device holding the group's examples; NumPy statistics
        xg, wg = shards(x)[devices].reshape(-1, *x.shape[1:]), shards(w)[devices].reshape(-1, *w.shape[1:])
        mg = None if mask is None else shards(mask)[devices].reshape(-1, *mask.shape[1:])

        def whole(params, x):
            y, new_state = jstep.BatchNorm(momentum=0.8, eps=1e-3, eps_in_sqrt=False).apply(params, state, x, mask=mg)
            return jnp.sum(jnp.sin(y) * wg), (y, new_state)
        (_, (y, new_state)), (dparams, dx) = jax.value_and_grad(whole, argnums=(0, 1), has_aux=True)(params, xg)
        counted = np.broadcast_to(True if mg is None else mg, xg.shape)
        values = [xg[..., i][counted[..., i]] for i in range(xg.shape[-1])]
        stats = (np.array([v.mean() for v in values]), np.array([v.var() for v in values]))
        return y, dx, dparams, new_state, stats

    contiguous, strided = [[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 2, 4, 6], [1, 3, 5, 7]]
    runs = [("pmap, groups [[0..3], [4..7]]", by_pmap, contiguous, None),
            ("pmap, groups [[0, 2, 4, 6], [1, 3, 5, 7]]", by_pmap, strided, None),
            ("pmap, strided groups, uneven mask", by_pmap, strided, mask),
            ("shard_map check_vma=False, axis ('a', 'b'), strided groups, uneven mask", by_unchecked_shard_map,
             strided, mask)]
    for label, run, groups, group_mask in runs:
        y, dx, dparams, new_state, stats = jax.tree.map(np.asarray, run(groups, group_mask))
        for devices in groups:
            y_ref, dx_ref, dparams_ref, state_ref, stats_ref = group_reference(devices, group_mask)
            close(f"{label}: group {devices} output", y[devices].reshape(y_ref.shape), y_ref)
            close(f"{label}: group {devices} input gradient", dx[devices].reshape(dx_ref.shape), dx_ref)
            close(f"{label}: group {devices} scale gradient, summed", dparams.scale[devices].sum(0), dparams_ref.scale)
            close(f"{label}: group {devices} offset gradient, summed", dparams.offset[devices].sum(0),
                  dparams_ref.offset)
            for d in devices:
                for name, got, want in [("mean", stats[0], stats_ref[0]), ("var", stats[1], stats_ref[1]),
                                        ("running mean", new_state.mean, state_ref.mean),
                                        ("running var", new_state.var, state_ref.var)]:
                    close(f"{label}: device {d} {name}", got[d], want)
        print(f"{label}: every group: ok")

    # Where jax.lax.psum takes no groups, and groups that do not cover the axis: clear errors.
    def refused(label, error, words, traced):
        try:
            jax.eval_shape(traced, x)
        except error as e:
            assert "axis_index_groups" in str(e) and words in str(e), e
            print(f"{label}: refused: ok")
        else:
            raise AssertionError(f"{label}: accepted")

    def normalize(names, groups):
        return lambda x: jstep.batch_norm(x, scale, offset, axis_name=names, axis_index_groups=groups)

    refused("groups in a type-checked shard_map", NotImplementedError, "check_vma=False",
            jax.shard_map(normalize("batch", contiguous), mesh=mesh, in_specs=P("batch"), out_specs=P("batch")))
    refused("groups over a vmap axis", NotImplementedError, "jax.vmap axis",
            jax.vmap(normalize("examples", [list(range(8)), list(range(8, 16))]), axis_name="examples"))
    refused("groups over a tuple with a vmap axis", NotImplementedError, "jax.vmap axis",
            jax.shard_map(jax.vmap(normalize(("batch", "examples"), [list(range(8)), list(range(8, 16))]),
                                   axis_name="examples"),
                          mesh=mesh, in_specs=P("batch"), out_specs=P("batch"), check_vma=False))
    refused("groups covering 4 of 8 devices", ValueError, "has size 8",
            jax.shard_map(normalize("batch", [[0, 1], [2, 3]]), mesh=mesh, in_specs=P("batch"), out_specs=P("batch"),
                          check_vma=False))

    # axis_name as a list of names, as jax.lax.psum takes it: a vmap inside a shard_map.
    def listed(x):
        return jstep.batch_norm(x, scale, offset, eps=1e-3, eps_in_sqrt=False, axis_name=["batch", "examples"])

    def listed_step(x, w):
        y, vjp = jax.vjp(jax.vmap(listed, axis_name="examples"), x)
        return y, vjp(w)[0]

    y, dx = jax.jit(jax.shard_map(listed_step, mesh=mesh, in_specs=(P("batch"), P("batch")),
                                  out_specs=(P("batch"), P("batch"))))(x, w)
    whole, vjp = jax.vjp(lambda x: jstep.batch_norm(x, scale, offset, eps=1e-3, eps_in_sqrt=False), x)
    close("axis_name as a list, vmap inside shard_map: output", y, whole)
    close("axis_name as a list, vmap inside shard_map: input gradient", dx, vjp(w)[0])
    print("ALL OK")
    """
)


FORWARD_SCRIPT = textwrap.dedent(
    r"""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    import jstep

    assert jax.device_count() == 8, jax.devices()
    jax.config.update("jax_enable_x64", True)
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, (16, 3, 5))
    scale, offset = rng.normal(1.0, 0.3, 5), rng.normal(0.0, 0.3, 5)
    dx, dscale, doffset = rng.normal(size=x.shape), rng.normal(size=5), rng.normal(size=5)
    w = rng.normal(size=x.shape)
    mask = rng.random((16, 3, 1)) < 0.6
    mask[:2] = True
    x, scale, offset, dx, dscale, doffset, w, mask = map(jnp.asarray, (x, scale, offset, dx, dscale, doffset, w, mask))
    EPS = 1e-3

    def close(name, got, want, tol=1e-12):
        err = float(np.max(np.abs(np.asarray(got) - np.asarray(want))) / np.max(np.abs(np.asarray(want))))
        assert err <= tol, f"{name}: relative error {err:.3e}"
        print(f"{name}: ok ({err:.1e})")

    def plain(x, scale, offset, eps_in_sqrt, mask=None):  # one device, the whole batch, autodiff
        m = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
        count = m.sum(axis=(0, 1))
        mean = jnp.where(m, x, 0).sum(axis=(0, 1)) / count
        var = jnp.where(m, (x - mean) ** 2, 0).sum(axis=(0, 1)) / count
        s = jnp.sqrt(var + EPS) if eps_in_sqrt else jnp.sqrt(var) + EPS
        return (x - mean) / s * scale + offset

    def forward_figures(normalize):
        # The output's tangent, and forward over reverse: the tangent of the gradient of
        # sum(sin(y) w) with respect to x and scale, for the tangents (dx, dscale, doffset).
        def loss(x, scale, offset):
            return jnp.sum(jnp.sin(normalize(x, scale, offset)) * w)
        tangent = jax.jvp(normalize, (x, scale, offset), (dx, dscale, doffset))[1]
        hvp = jax.jvp(jax.grad(loss, argnums=(0, 1)), (x, scale, offset), (dx, dscale, doffset))[1]
        jacobian = jax.jacfwd(normalize, argnums=1)(x, scale, offset)
        return tangent, hvp, jacobian

    for eps_in_sqrt in (True, False):
        for masked in (False, True):
            m = mask if masked else None
            label = f"{'sqrt' if eps_in_sqrt else 'sigma+eps'}{', masked' if masked else ''}"
            want = forward_figures(lambda x, s, o: plain(x, s, o, eps_in_sqrt, m))
            kw = dict(eps=EPS, eps_in_sqrt=eps_in_sqrt)

            def sharded(x, scale, offset, m=m, kw=kw):
                def per_device(x, scale, offset, m):
                    return jstep.batch_norm(x, scale, offset, axis_name="batch", mask=m, **kw)
                specs = (P("batch"), P(), P(), None if m is None else P("batch"))
                return jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P("batch"))(x, scale, offset, m)

            def by_vmap(x, scale, offset, m=m, kw=kw):  # one example per vmapped call
                def one(x, m):
                    return jstep.batch_norm(x, scale, offset, axis_name="examples", mask=m, **kw)
                return jax.vmap(one, axis_name="examples", in_axes=(0, None if m is None else 0))(x, m)

            def vmap_in_shard_map(x, scale, offset, m=m, kw=kw):  # 8 devices x 2 examples
                def per_device(x, scale, offset, m):
                    def one(x, m):
                        return jstep.batch_norm(x, scale, offset, axis_name=("batch", "examples"), mask=m, **kw)
                    return jax.vmap(one, axis_name="examples", in_axes=(0, None if m is None else 0))(x, m)
                specs = (P("batch"), P(), P(), None if m is None else P("batch"))
                return jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P("batch"))(x, scale, offset, m)

            mappings = [("shard_map", sharded), ("vmap", by_vmap), ("vmap inside shard_map", vmap_in_shard_map)]
            for name, mapped in mappings:
                got = jax.jit(lambda mapped=mapped: forward_figures(mapped))()
                for what, g, v in zip(["jvp", "forward over reverse, x", "forward over reverse, scale"],
                                      [got[0], *got[1]], [want[0], *want[1]]):
                    close(f"{name}, {label}: {what}", g, v, tol=1e-11)
                close(f"{name}, {label}: jacfwd in scale", got[2], want[2])
            got = forward_figures(sharded)  # eagerly, op by op
            close(f"eager shard_map, {label}: jvp", got[0], want[0])

    # axis_index_groups (pmap; shard_map with check_vma=False): each group of devices is a
    # batch of its own, so every group equals the plain batch norm of its examples.
    groups = [[0, 2, 4, 6], [1, 3, 5, 7]]
    shards = lambda a: np.asarray(a).reshape(8, 2, *a.shape[1:])

    def grouped(x, scale, offset):
        return jstep.batch_norm(x, scale, offset, eps=EPS, axis_name="i", axis_index_groups=groups)

    def grouped_figures(x, dx):
        def tangent_and_hvp(x, dx, w):
            loss = lambda x: jnp.sum(jnp.sin(grouped(x, scale, offset)) * w)
            return (jax.jvp(lambda x: grouped(x, scale, offset), (x,), (dx,))[1],
                    jax.jvp(jax.grad(loss), (x,), (dx,))[1])
        return map(np.asarray, jax.pmap(tangent_and_hvp, axis_name="i")(shards(x), shards(dx), shards(w)))

    tangent, hvp = grouped_figures(x, dx)
    for devices in groups:
        xg, dxg, wg = (shards(a)[devices].reshape(-1, *a.shape[1:]) for a in (x, dx, w))
        tangent_ref = jax.jvp(lambda x: plain(x, scale, offset, True), (xg,), (dxg,))[1]
        hvp_ref = jax.jvp(jax.grad(lambda x: jnp.sum(jnp.sin(plain(x, scale, offset, True)) * wg)), (xg,), (dxg,))[1]
        close(f"pmap, groups {groups}, group {devices}: jvp", tangent[devices].reshape(xg.shape), tangent_ref)
        close(f"pmap, groups {groups}, group {devices}: forward over reverse", hvp[devices].reshape(xg.shape),
              hvp_ref, tol=1e-11)

    def unchecked_tangent(x, dx):
        def per_device(x, dx):
            f = lambda x: jstep.batch_norm(x, scale, offset, eps=EPS, axis_name="batch", axis_index_groups=groups)
            return jax.jvp(f, (x,), (dx,))[1]
        return jax.shard_map(per_device, mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=P("batch"),
                             check_vma=False)(x, dx)

    # Ghost batch norm under shard_map: each device's 2 examples are one virtual batch (V = 2),
    # normalized alone; the gradient of the summed loss and the layer's running statistics (the
    # mean over all 8 devices' groups) against the plain batch norm of each device's examples.
    bn = jstep.BatchNorm(momentum=0.5, eps=EPS, axis_name="batch", virtual_batch_size=2)
    params = jstep.BatchNormParams(scale, offset)
    state = jstep.BatchNormState(jnp.zeros(5), jnp.ones(5))

    def ghost_loss(params, x):
        def per_device(params, x, w):
            y, new_state = bn.apply(params, state, x)
            return jax.lax.psum(jnp.sum(jnp.sin(y) * w), "batch"), (y, new_state)
        return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("batch"), P("batch")),
                             out_specs=(P(), (P("batch"), P())))(params, x, w)

    (_, (y, new_state)), (dparams, dx_ghost) = jax.jit(jax.value_and_grad(ghost_loss, argnums=(0, 1), has_aux=True))(
        params, x)
    pieces = [jax.value_and_grad(lambda x, s, o: jnp.sum(jnp.sin(plain(x, s, o, True)) * w[2 * d:2 * d + 2]),
                                 argnums=(0, 1, 2))(x[2 * d:2 * d + 2], scale, offset) for d in range(8)]
    close("ghost shard_map: output", y, jnp.concatenate([plain(x[2 * d:2 * d + 2], scale, offset, True)
                                                        for d in range(8)]))
    close("ghost shard_map: input gradient", dx_ghost, jnp.concatenate([g[0] for _, g in pieces]))
    close("ghost shard_map: scale gradient", dparams.scale, sum(g[1] for _, g in pieces))
    close("ghost shard_map: offset gradient", dparams.offset, sum(g[2] for _, g in pieces))
    groups_x = np.asarray(x).reshape(8, 2, 3, 5)
    close("ghost shard_map: running mean", new_state.mean, 0.5 * groups_x.mean(axis=(1, 2)).mean(0))
    close("ghost shard_map: running var", new_state.var, 0.5 + 0.5 * groups_x.var(axis=(1, 2)).mean(0))

    tangent = jax.jit(unchecked_tangent)(x, dx)
    for devices in groups:
        xg, dxg = (shards(a)[devices].reshape(-1, *a.shape[1:]) for a in (x, dx))
        tangent_ref = jax.jvp(lambda x: plain(x, scale, offset, True), (xg,), (dxg,))[1]
        close(f"shard_map check_vma=False, groups, group {devices}: jvp",
              shards(tangent)[devices].reshape(xg.shape), tangent_ref)
    print("ALL OK")
    """
)


def test_forward_mode_on_eight_devices_equals_the_whole_batch():
    """jvp, jacfwd and forward over reverse under shard_map, vmap, both, eager shard_map, pmap
    and unchecked shard_map with index groups, with and without a mask, for both eps forms,
    against autodiff of a plain jnp batch norm of the whole batch (or group) in float64."""
    stdout = run_on_eight_devices(FORWARD_SCRIPT, timeout=400)
    assert "ALL OK" in stdout
    for mapping in ["shard_map", "vmap", "vmap inside shard_map"]:
        for options in ["sqrt", "sigma+eps", "sqrt, masked", "sigma+eps, masked"]:
            for what in ["jvp", "forward over reverse, x", "forward over reverse, scale", "jacfwd in scale"]:
                assert f"{mapping}, {options}: {what}: ok" in stdout
    assert stdout.count("groups, group") >= 2 and stdout.count("eager shard_map") == 4
    assert stdout.count("ghost shard_map") == 6


@pytest.fixture(scope="module")
def eight_device_stdout():
    return run_on_eight_devices(SCRIPT)


def test_eight_devices_give_the_single_device_values_and_gradients(eight_device_stdout):
    stdout = eight_device_stdout
    assert "ALL OK" in stdout
    checks = [
        "shard_map input gradient",
        "eager shard_map output",
        "eager shard_map input gradient",
        "eager shard_map scale gradient, summed over devices",
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
        "pmap, groups [[0..3], [4..7]]: every group",
        "pmap, groups [[0, 2, 4, 6], [1, 3, 5, 7]]: every group",
        "pmap, strided groups, uneven mask: every group",
        "shard_map check_vma=False, axis ('a', 'b'), strided groups, uneven mask: every group",
        "groups in a type-checked shard_map: refused",
        "groups over a vmap axis: refused",
        "groups over a tuple with a vmap axis: refused",
        "groups covering 4 of 8 devices: refused",
        "axis_name as a list, vmap inside shard_map: output",
        "axis_name as a list, vmap inside shard_map: input gradient",
    ]
    quantities = ["output", "input gradient", "scale gradient", "running var"]
    for mapping in ["vmap", "vmap, jitted", "shard_map", "pmap", "vmap inside shard_map"]:
        checks += [f"{mapping}: {quantity}" for quantity in quantities]
    for check in checks:
        assert f"{check}: ok" in stdout, stdout


BAD_GROUPS = [  # (axis_index_groups, axis_name, error, words in the message)
    ([[0, 1], [2, 3]], None, ValueError, "without axis_name"),
    ([0, 1, 2, 3], "batch", TypeError, "list of non-empty lists of ints"),
    ([[0, 1], []], "batch", TypeError, "list of non-empty lists of ints"),
    ([[0.0, 1.0], [2.0, 3.0]], "batch", TypeError, "list of non-empty lists of ints"),
    ([[True, False]], "batch", TypeError, "list of non-empty lists of ints"),
    ("0123", "batch", TypeError, "list of non-empty lists of ints"),
    ([[0, 1, 2], [3, 4]], "batch", ValueError, "groups of sizes [2, 3]"),
    ([[0, 1], [1, 2]], "batch", ValueError, "repeated: [1], missing: [3]"),
    ([[1, 2], [3, 4]], "batch", ValueError, "repeated: [], missing: [0]"),
]


@pytest.mark.parametrize(("groups", "axis_name", "error", "words"), BAD_GROUPS)
def test_malformed_axis_index_groups_are_refused_before_any_device_is_needed(groups, axis_name, error, words):
    """Checked at construction (BatchNorm) and at trace time (batch_norm, batch_stats), naming
    the argument and its value, before the axis itself is looked up."""
    x, features = np.ones((4, 3)), np.ones(3)
    calls = [
        lambda: jstep.batch_norm(x, features, features, axis_name=axis_name, axis_index_groups=groups),
        lambda: jstep.batch_stats(x, axis_name=axis_name, axis_index_groups=groups),
        lambda: jstep.BatchNorm(axis_name=axis_name, axis_index_groups=groups),
    ]
    for call in calls:
        with pytest.raises(error) as raised:
            call()
        assert f"axis_index_groups={groups!r}" in str(raised.value)
        assert words in str(raised.value)
