"""jstep.linen.BatchRenorm against Stable-Baselines-JAX's layer (sbx-rl 0.28's
``sbx/common/jax_layers.py``, loaded from its file: ``import sbx`` pulls in Stable-Baselines3),
and jstep.nnx.BatchRenorm and jstep.equinox.BatchRenorm against a float64 transcription of the
training process and against the Linen layer's numbers: the variables, the warm-up of batch
norm, renormalization after it, the running statistics, the gradients and evaluation.
"""

import functools
import importlib.metadata
import importlib.util
import sys

import equinox as eqx
import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from layer_checks import close

import jstep.equinox
import jstep.linen
import jstep.nnx

SBX_VERSION = "0.28.0"


def load_sbx_layers():
    """sbx-rl's ``sbx/common/jax_layers.py`` as a module (it imports Flax and JAX only)."""
    try:
        distribution = importlib.metadata.distribution("sbx-rl")
    except importlib.metadata.PackageNotFoundError as error:
        raise RuntimeError(
            f"sbx-rl is not installed; these tests compare with its layer: pip install --no-deps sbx-rl=={SBX_VERSION} "
            "(the README's test command does)"
        ) from error
    assert distribution.version == SBX_VERSION, distribution.version
    path = distribution.locate_file("sbx/common/jax_layers.py")
    spec = importlib.util.spec_from_file_location("sbx_jax_layers", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The file needs Flax and JAX only: neither Stable-Baselines3 nor sbx's own package came in.
    assert not {"stable_baselines3", "sbx"} & set(sys.modules), sorted(set(sys.modules) & {"stable_baselines3", "sbx"})
    return module


sbx = load_sbx_layers()
RNG = np.random.default_rng(0)
BATCHES = [RNG.normal(2.0 + i, 1.0 + 0.5 * i, (8, 5)) for i in range(6)]  # drifting: mean and spread grow
WEIGHTS = RNG.normal(size=(8, 5))  # the loss is sum(sin(y) * w)


def transcription(batches, warmup_steps, momentum, eps, r_max=3.0, d_max=5.0):
    """The layer's training process in float64 NumPy, from mean 0, var 1: [(y, mean, var)] per call."""
    mean, var, out = np.zeros(5), np.ones(5), []
    for steps, x in enumerate(batches):
        mu_b, var_b = x.mean(0), x.var(0)
        if steps >= warmup_steps:
            r = np.clip(np.sqrt(var_b + eps) / np.sqrt(var + eps), 1 / r_max, r_max)
            d = np.clip((mu_b - mean) / np.sqrt(var + eps), -d_max, d_max)
        else:
            r, d = np.ones(5), np.zeros(5)
        y = (r * (x - mu_b) + d * np.sqrt(var_b)) / np.sqrt(var_b + eps * r**2)
        mean, var = momentum * mean + (1 - momentum) * mu_b, momentum * var + (1 - momentum) * var_b
        out.append((y, mean, var))
    return out


def linen_step(layer):
    """One jitted training apply: (y, new variables, dL/dparams, dL/dx)."""

    @jax.jit
    def step(variables, x, w):
        def loss(params, x):
            y, updates = layer.apply({**variables, "params": params}, x, mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y) * w), (y, updates["batch_stats"])

        (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
        return y, {"params": variables["params"], "batch_stats": stats}, grads

    return step


def float64_stats(variables):
    """The variables with float64 running statistics (both layers then keep float64)."""
    stats = dict(variables["batch_stats"])
    stats["mean"], stats["var"] = (jnp.asarray(stats[k], jnp.float64) for k in ("mean", "var"))
    return {"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables["params"]), "batch_stats": stats}


def max_rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) / np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize(
    "fields",
    [{}, {"use_scale": False, "axis": 0}, {"param_dtype": jnp.bfloat16, "scale_init": nn.initializers.normal()}],
    ids=["default", "no scale, axis 0", "bfloat16 params, random scale"],
)
def test_init_gives_sbxs_variables(fields):
    """params/{scale, bias}; batch_stats/{mean, var, r_max, d_max, steps}: the same tree, leaf
    types, shapes, dtypes and values, and init (training mode, axis_name unbound) moves nothing."""
    x = jnp.asarray(BATCHES[0], jnp.float32)
    ours = jstep.linen.BatchRenorm(use_running_average=False, axis_name="batch", **fields).init(jax.random.key(0), x)
    theirs = sbx.BatchRenorm(use_running_average=False, axis_name="batch", **fields).init(jax.random.key(0), x)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    assert list(ours["batch_stats"]) == list(theirs["batch_stats"]) == ["mean", "var", "r_max", "d_max", "steps"]
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert type(got) is type(want) and jnp.result_type(got) == jnp.result_type(want)
        np.testing.assert_array_equal(got, want)
    assert (ours["batch_stats"]["r_max"], ours["batch_stats"]["d_max"], ours["batch_stats"]["steps"]) == (3, 5, 0)


def test_init_output_is_batch_norm_as_sbxs():
    x = jnp.asarray(BATCHES[3], jnp.float32)
    layers = [cls(use_running_average=False, warmup_steps=0) for cls in (jstep.linen.BatchRenorm, sbx.BatchRenorm)]
    (ours, _), (theirs, _) = (layer.init_with_output(jax.random.key(0), x) for layer in layers)
    close(ours, theirs, tol=1e-5)


@pytest.mark.parametrize("warmup_steps", [0, 3])
def test_training_over_the_warmup_matches_sbx_and_the_transcription_in_float64(warmup_steps):
    """Six calls (warm-up of 3: batch norm, then renormalization with r and d clipped at some
    steps and features and not at others): outputs, gradients of params and x, and every
    batch_stats leaf equal Stable-Baselines-JAX's and the float64 transcription's."""
    r_max, d_max, eps = 1.5, 2.5, 1e-3
    want = transcription(BATCHES, warmup_steps, 0.8, eps, r_max=r_max, d_max=d_max)
    # The drift takes r and d past the bounds after the warm-up (else a missing clip would pass):
    # the running statistics each call reads are the previous call's, from (0, 1).
    read = [(np.zeros(5), np.ones(5))] + [(mean, var) for _, mean, var in want[:-1]]
    warm = [(x, mean, var) for x, (mean, var) in zip(BATCHES, read, strict=True)][warmup_steps:]
    r = np.array([np.sqrt(x.var(0) + eps) / np.sqrt(var + eps) for x, _, var in warm])
    d = np.array([(x.mean(0) - mean) / np.sqrt(var + eps) for x, mean, var in warm])
    assert np.any((r > r_max) | (r < 1 / r_max)) and np.any((r < r_max) & (r > 1 / r_max))
    assert np.any(np.abs(d) > d_max) and np.any(np.abs(d) < d_max)
    with jax.enable_x64(True):
        fields = {"use_running_average": False, "warmup_steps": warmup_steps, "momentum": 0.8, "epsilon": eps}
        ours_layer = jstep.linen.BatchRenorm(**fields, r_max=r_max, d_max=d_max)
        theirs_layer = sbx.BatchRenorm(**fields)  # reads its bounds from the variables given to it
        ours = theirs = float64_stats(ours_layer.init(jax.random.key(0), BATCHES[0]))
        assert (ours["batch_stats"]["r_max"], ours["batch_stats"]["d_max"]) == (r_max, d_max)
        ours_step, theirs_step = linen_step(ours_layer), linen_step(theirs_layer)
        for x, (y_ref, mean_ref, var_ref) in zip(BATCHES, want, strict=True):
            y, ours, grads = ours_step(ours, x, WEIGHTS)
            y_sbx, theirs, grads_sbx = theirs_step(theirs, x, WEIGHTS)
            assert max_rel(y, y_sbx) <= 1e-12 and max_rel(y, y_ref) <= 1e-12
            for got, sbx_grad in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_sbx), strict=True):
                assert max_rel(got, sbx_grad) <= 1e-10
            for key in ("mean", "var", "r_max", "d_max", "steps"):
                np.testing.assert_allclose(ours["batch_stats"][key], theirs["batch_stats"][key], rtol=1e-12)
            np.testing.assert_allclose(ours["batch_stats"]["var"], var_ref, rtol=1e-12)
            np.testing.assert_allclose(ours["batch_stats"]["mean"], mean_ref, rtol=1e-12)
        assert int(ours["batch_stats"]["steps"]) == len(BATCHES)


def test_float32_training_and_evaluation_match_sbx():
    """Float32, default settings with a warm-up of 2: Stable-Baselines-JAX's one-pass variance
    differs from jstep's two-pass one by float32 rounding, which is all that separates them."""
    fields = {"use_running_average": False, "warmup_steps": 2}
    ours_layer, theirs_layer = jstep.linen.BatchRenorm(**fields), sbx.BatchRenorm(**fields)
    batches = [jnp.asarray(x, jnp.float32) for x in BATCHES]
    ours = theirs = ours_layer.init(jax.random.key(0), batches[0])
    ours_step, theirs_step = linen_step(ours_layer), linen_step(theirs_layer)
    for x in batches:
        y, ours, grads = ours_step(ours, x, jnp.asarray(WEIGHTS, jnp.float32))
        y_sbx, theirs, grads_sbx = theirs_step(theirs, x, jnp.asarray(WEIGHTS, jnp.float32))
        close(y, y_sbx, tol=1e-5)
        jax.tree.map(lambda a, b: close(a, b, tol=1e-5), grads, grads_sbx)
        for key in ("mean", "var"):
            close(ours["batch_stats"][key], theirs["batch_stats"][key], tol=1e-5)
    evaluate = [cls(use_running_average=True) for cls in (jstep.linen.BatchRenorm, sbx.BatchRenorm)]
    close(evaluate[0].apply(theirs, batches[0]), evaluate[1].apply(theirs, batches[0]), tol=1e-6)


@functools.partial(jax.jit, static_argnums=(0, 3))
def apply_jitted(layer, variables, x, use_running_average):
    return layer.apply(variables, x, use_running_average=use_running_average, mutable=["batch_stats"])[0]


def test_checkpoints_load_both_ways():
    """Variables trained by one layer, serialized by Flax, restore into the other's and give the
    same outputs, in training and in evaluation."""
    layers = {"ours": jstep.linen.BatchRenorm(warmup_steps=1), "sbx": sbx.BatchRenorm(warmup_steps=1)}
    x = jnp.asarray(BATCHES[0], jnp.float32)
    for source, target in (("ours", "sbx"), ("sbx", "ours")):
        variables = layers[source].init(jax.random.key(0), x, use_running_average=False)
        for batch in BATCHES[:3]:
            batch32 = jnp.asarray(batch, jnp.float32)
            _, updates = layers[source].apply(variables, batch32, use_running_average=False, mutable=["batch_stats"])
            variables = {**variables, **updates}
        template = layers[target].init(jax.random.key(1), x, use_running_average=False)
        restored = flax.serialization.from_bytes(template, flax.serialization.to_bytes(variables))
        for mode in (False, True):
            # jitted, as a training loop runs (the restored leaves are read-only NumPy arrays)
            y_source = apply_jitted(layers[source], variables, x, mode)
            y_target = apply_jitted(layers[target], restored, x, mode)
            close(y_target, y_source, tol=1e-5)


def test_evaluation_uses_the_running_statistics_and_leaves_them():
    variables = jstep.linen.BatchRenorm().init(jax.random.key(0), BATCHES[0], use_running_average=True)
    variables["batch_stats"]["mean"] = jnp.full(5, 2.0)
    variables["batch_stats"]["var"] = jnp.full(5, 4.0)
    y, updates = jstep.linen.BatchRenorm(use_running_average=True).apply(variables, BATCHES[1], mutable=["batch_stats"])
    close(y, jnp.asarray((BATCHES[1] - 2.0) / np.sqrt(4.0 + 1e-3), jnp.float32), tol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])


@pytest.mark.parametrize(
    ("fields", "error", "words"),
    [
        ({"warmup_steps": -1}, ValueError, "warmup_steps"),
        ({"warmup_steps": 2.5}, TypeError, "warmup_steps"),
        ({"momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\], got 1.5"),
        ({"epsilon": -1.0}, ValueError, "eps"),
        ({"r_max": 0.5}, ValueError, "r_max"),
        ({"d_max": -1}, ValueError, "d_max"),
        ({"r_max": "3"}, TypeError, r"r_max must be .*number.*, got str '3'"),
        ({"d_max": None}, TypeError, r"d_max must be .*number.*, got NoneType None"),
        ({"r_max": [3.0]}, TypeError, r"r_max must be .*number.*, got list \[3.0\]"),
        ({"warmup_steps": "3"}, TypeError, r"warmup_steps must be .*integer.*, got str '3'"),
        ({"warmup_steps": None}, TypeError, r"warmup_steps must be .*integer.*, got NoneType None"),
    ],
)
def test_bad_settings_are_refused_when_built(fields, error, words):
    makers = [
        lambda: jstep.linen.BatchRenorm(**fields),
        lambda: jstep.nnx.BatchRenorm(5, rngs=nnx.Rngs(0), **fields),
        lambda: jstep.equinox.BatchRenorm(
            5, "batch", **{("eps" if k == "epsilon" else k): v for k, v in fields.items()}
        ),
    ]
    for make in makers:
        with pytest.raises(error, match=words):
            make()


def linen_reference(batches, warmup_steps, momentum, eps):
    """Linen's outputs and running statistics over `batches`, from a fresh layer."""
    layer = jstep.linen.BatchRenorm(
        use_running_average=False, warmup_steps=warmup_steps, momentum=momentum, epsilon=eps
    )
    variables = layer.init(jax.random.key(0), batches[0])
    out = []
    for x in batches:
        y, updates = layer.apply(variables, x, mutable=["batch_stats"])
        variables = {**variables, **updates}
        out.append((y, variables["batch_stats"]["mean"], variables["batch_stats"]["var"]))
    return out, variables


def test_nnx_layer_matches_linen_and_the_transcription():
    batches = [jnp.asarray(x, jnp.float32) for x in BATCHES]
    layer = jstep.nnx.BatchRenorm(5, warmup_steps=2, momentum=0.8, epsilon=1e-3, rngs=nnx.Rngs(0))
    assert isinstance(layer.steps, nnx.BatchStat) and isinstance(layer.mean, nnx.BatchStat)
    want, linen_vars = linen_reference(batches, 2, 0.8, 1e-3)
    float64 = transcription(BATCHES, 2, 0.8, 1e-3)

    @nnx.jit
    def train(layer, x):
        return layer(x)

    for x, (y_ref, mean_ref, var_ref), (y64, _, var64) in zip(batches, want, float64, strict=True):
        y = train(layer, x)
        close(y, y_ref, tol=2e-6)
        close(layer.mean[...], mean_ref, tol=2e-6)
        close(layer.var[...], var_ref, tol=2e-6)
        assert max_rel(y, y64) <= 1e-5 and max_rel(layer.var[...], var64) <= 1e-5
    assert int(layer.steps[...]) == len(batches)
    layer.eval()
    y_eval = layer(batches[0])
    close(
        y_eval, jstep.linen.BatchRenorm(use_running_average=True, epsilon=1e-3).apply(linen_vars, batches[0]), tol=2e-6
    )
    assert int(layer.steps[...]) == len(batches)


def test_nnx_gradient_is_linens():
    x, w = jnp.asarray(BATCHES[4], jnp.float32), jnp.asarray(WEIGHTS, jnp.float32)
    layer = jstep.nnx.BatchRenorm(5, warmup_steps=0, epsilon=1e-3, rngs=nnx.Rngs(0))
    layer.mean[...], layer.var[...] = jnp.full(5, 1.0), jnp.full(5, 0.5)

    def loss(layer, x):
        return jnp.sum(jnp.sin(layer(x)) * w)

    grads, dx = nnx.grad(loss, argnums=(0, 1))(layer, x)
    linen = jstep.linen.BatchRenorm(use_running_average=False, warmup_steps=0)
    variables = linen.init(jax.random.key(0), x)
    variables["batch_stats"].update(mean=jnp.full(5, 1.0), var=jnp.full(5, 0.5))

    def linen_loss(params, x):
        return jnp.sum(jnp.sin(linen.apply({**variables, "params": params}, x, mutable=["batch_stats"])[0]) * w)

    want_params, want_dx = jax.grad(linen_loss, argnums=(0, 1))(variables["params"], x)
    close(dx, want_dx)
    close(grads["scale"][...], want_params["scale"])
    close(grads["bias"][...], want_params["bias"])


def test_equinox_layer_matches_linen_under_vmap():
    """One example per call, the batch across jax.vmap's axis_name, as Equinox does."""
    batches = [jnp.asarray(x, jnp.float32) for x in BATCHES]
    layer, state = eqx.nn.make_with_state(jstep.equinox.BatchRenorm)(5, "batch", eps=1e-3, momentum=0.8, warmup_steps=2)
    want, linen_vars = linen_reference(batches, 2, 0.8, 1e-3)

    @eqx.filter_jit
    def train(layer, x, state):
        return jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    for x, (y_ref, mean_ref, var_ref) in zip(batches, want, strict=True):
        y, state = train(layer, x, state)
        mean, var = state.get(layer.batch_state_index)
        close(y, y_ref, tol=2e-6)
        close(mean, mean_ref, tol=2e-6)
        close(var, var_ref, tol=2e-6)
    assert int(state.get(layer.batch_counter)) == len(batches)
    infer = jax.vmap(eqx.nn.inference_mode(layer), axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    y, same = infer(batches[0], state)
    close(y, jstep.linen.BatchRenorm(use_running_average=True, epsilon=1e-3).apply(linen_vars, batches[0]), tol=2e-6)
    jax.tree.map(np.testing.assert_array_equal, same, state)  # inference leaves the statistics


def test_equinox_gradient_is_linens():
    x, w = jnp.asarray(BATCHES[4], jnp.float32), jnp.asarray(WEIGHTS, jnp.float32)
    layer, state = eqx.nn.make_with_state(jstep.equinox.BatchRenorm)(5, "batch", eps=1e-3, warmup_steps=0)
    state = state.set(layer.batch_state_index, (jnp.full(5, 1.0, jnp.float32), jnp.full(5, 0.5, jnp.float32)))

    def loss(layer, x):
        y, _ = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
        return jnp.sum(jnp.sin(y) * w)

    grads, dx = eqx.filter_grad(lambda pair: loss(*pair))((layer, x))
    linen = jstep.linen.BatchRenorm(use_running_average=False, warmup_steps=0)
    variables = linen.init(jax.random.key(0), x)
    variables["batch_stats"].update(mean=jnp.full(5, 1.0), var=jnp.full(5, 0.5))

    def linen_loss(params, x):
        return jnp.sum(jnp.sin(linen.apply({**variables, "params": params}, x, mutable=["batch_stats"])[0]) * w)

    want_params, want_dx = jax.grad(linen_loss, argnums=(0, 1))(variables["params"], x)
    close(dx, want_dx)
    close(grads.weight, want_params["scale"])
    close(grads.bias, want_params["bias"])


SCHEDULE = [(1.0 + 0.5 * t, 1.0 * t) for t in range(len(BATCHES))]  # the paper's: r_max from 1, d_max from 0


def linen_with_bounds(batches, schedule):
    """Linen's outputs and running statistics with its r_max, d_max variables set before each call."""
    layer = jstep.linen.BatchRenorm(use_running_average=False, warmup_steps=1, momentum=0.8, epsilon=1e-3)
    variables = layer.init(jax.random.key(0), batches[0])
    out = []
    for x, (r_max, d_max) in zip(batches, schedule, strict=True):
        stats = {**variables["batch_stats"], "r_max": jnp.float32(r_max), "d_max": jnp.float32(d_max)}
        y, updates = layer.apply({**variables, "batch_stats": stats}, x, mutable=["batch_stats"])
        variables = {**variables, **updates}
        out.append((y, variables["batch_stats"]["mean"], variables["batch_stats"]["var"]))
    return out


def test_nnx_bounds_are_state_so_a_schedule_runs_in_one_trace_as_linen():
    """r_max and d_max are nnx.BatchStat variables: set between nnx.jit calls they change the
    numbers (as the Linen layer's batch_stats do) without a new trace (6 traces for 6 values
    when they were attributes), and the layer's state holds them."""
    batches = [jnp.asarray(x, jnp.float32) for x in BATCHES]
    layer = jstep.nnx.BatchRenorm(5, warmup_steps=1, momentum=0.8, epsilon=1e-3, rngs=nnx.Rngs(0))
    assert isinstance(layer.r_max, nnx.BatchStat) and {"r_max", "d_max"} <= set(nnx.state(layer, nnx.BatchStat))
    traces = []

    @nnx.jit
    def train(layer, x):
        traces.append(1)
        return layer(x)

    want = linen_with_bounds(batches, SCHEDULE)
    for x, (r_max, d_max), (y_ref, mean_ref, var_ref) in zip(batches, SCHEDULE, want, strict=True):
        layer.r_max[...], layer.d_max[...] = r_max, d_max
        close(train(layer, x), y_ref, tol=2e-6)
        close(layer.mean[...], mean_ref, tol=2e-6)
        close(layer.var[...], var_ref, tol=2e-6)
    assert len(traces) == 1


def test_equinox_bounds_are_state_so_a_schedule_runs_in_one_trace_as_linen():
    """(r_max, d_max) live in the eqx.nn.State at `bounds_index`: set between eqx.filter_jit
    calls they change the numbers as the Linen layer's batch_stats do, without a new trace."""
    batches = [jnp.asarray(x, jnp.float32) for x in BATCHES]
    layer, state = eqx.nn.make_with_state(jstep.equinox.BatchRenorm)(5, "batch", eps=1e-3, momentum=0.8, warmup_steps=1)
    np.testing.assert_array_equal(state.get(layer.bounds_index), (3.0, 5.0))  # the constructor's r_max, d_max
    traces = []

    @eqx.filter_jit
    def train(layer, x, state):
        traces.append(1)
        return jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    want = linen_with_bounds(batches, SCHEDULE)
    for x, bounds, (y_ref, mean_ref, var_ref) in zip(batches, SCHEDULE, want, strict=True):
        state = state.set(layer.bounds_index, tuple(jnp.float32(b) for b in bounds))
        y, state = train(layer, x, state)
        mean, var = state.get(layer.batch_state_index)
        close(y, y_ref, tol=2e-6)
        close(mean, mean_ref, tol=2e-6)
        close(var, var_ref, tol=2e-6)
    assert len(traces) == 1


def test_equinox_refuses_modes_other_than_batch():
    with pytest.raises(ValueError, match="mode='ema'"):
        jstep.equinox.BatchRenorm(5, "batch", mode="ema")
