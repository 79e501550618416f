"""Sharded jit on 8 CPU devices: state and updates keep the params' NamedSharding, values match one device.

`grouped` is run with its sharded leaf kept large: its updates keep the sharding, its values match.

The 8 devices come from XLA_FLAGS, which must be set before jax is imported, so the check
runs in a subprocess; the rest of the suite keeps its single device.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

NAMES = ["adam", "momentum", "rmsprop", "adagrad", "grouped_adam"]

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jstep

assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("x",))
shardings = {"w": NamedSharding(mesh, P("x", None)), "b": NamedSharding(mesh, P())}
rng = np.random.default_rng(0)
params = {"w": rng.normal(size=(64, 16)).astype(np.float32), "b": rng.normal(size=(16,)).astype(np.float32)}
grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(3)]
make = {
    "adam": lambda: jstep.adam(0.01),
    "momentum": lambda: jstep.momentum(0.05, 0.9),
    "rmsprop": lambda: jstep.rmsprop(0.01),
    "adagrad": lambda: jstep.adagrad(0.1),
    "adadelta": lambda: jstep.adadelta(),
    "ema_momentum": lambda: jstep.ema_momentum(0.5),
    # The sharded w (1024 values) stays an array of its own, the replicated b is grouped; the
    # packed state is not shaped like the params, so only the updates' shardings are checked.
    "grouped_adam": lambda: jstep.grouped(jstep.adam(0.01), max_leaf_size=100),
}

def put(tree, sharded):
    if sharded:
        return jax.tree.map(jax.device_put, tree, shardings)
    return jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), tree)

def param_shaped_fields(state):
    return {f: getattr(state, f) for f in state._fields if f != "count"}

def check(tree, where, problems):
    def one(path, leaf):
        want = shardings[path[0].key]
        if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
            problems.append(f"{where}{jax.tree_util.keystr(path)}: {leaf.sharding} (params: {want})")
    jax.tree_util.tree_map_with_path(one, tree)

def trajectory(opt, sharded, problems, state_like_params):
    fields = param_shaped_fields if state_like_params else lambda state: {}
    state = jax.jit(opt.init)(put(params, sharded))
    if sharded:
        for f, tree in fields(state).items():
            check(tree, f"init state.{f}", problems)
    update = jax.jit(opt.update)
    out = []
    for t, g in enumerate(grads):
        updates, state = update(put(g, sharded), state)
        if sharded:
            check(updates, f"step {t} updates", problems)
            for f, tree in fields(state).items():
                check(tree, f"step {t} state.{f}", problems)
        out.append(jax.device_get((updates, fields(state) if state_like_params else state)))
    return out

report = {}
for name in sys.argv[1:]:
    problems = []
    like = not name.startswith("grouped")
    sharded = trajectory(make[name](), True, problems, like)
    single = trajectory(make[name](), False, [], like)
    diff = max(
        float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
        for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single))
    )
    report[name] = {"problems": problems, "max_relative_difference": diff}
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, *NAMES], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


@pytest.mark.parametrize("name", NAMES)
def test_state_and_updates_keep_the_params_sharding(report, name):
    assert report[name]["problems"] == []


@pytest.mark.parametrize("name", NAMES)
def test_sharded_values_equal_the_single_device_run(report, name):
    assert report[name]["max_relative_difference"] <= 1e-6
