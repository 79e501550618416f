"""Two processes, two CPU devices each, train as one: the same numbers as one device.

JAX's multi-controller runtime is what runs jstep across machines: every process runs the
same program on its share of a global batch, `jax.distributed.initialize` connects them, and
collectives cross process boundaries (here over gloo, on localhost). The test starts two
such processes (2 x 2 = 4 devices) that train a batch-normalized network data-parallel,
with `batch_norm(axis_name="batch")` inside `shard_map` and `grouped(adam)`, and a third,
plain process that trains the same network on one device with the whole batch. It proves:

- both processes end with the one-device run's losses and params, to float32 round-off;
- the global mesh really spans both processes (4 devices, 2 of them local);
- the same holds for 8-bit Adam states (grouped, stochastic rounding): the same codes.

Every process has a timeout and is killed if the test fails or times out.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROCESSES, LOCAL_DEVICES, STEPS = 2, 2, 5
TIMEOUT_S = 120  # for all the processes together

# argv: process id (-1: the one-device reference), number of processes, coordinator port, steps.
SCRIPT = r"""
import json, sys
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import jstep

process_id, processes, port, steps = map(int, sys.argv[1:])
reference = process_id < 0
if not reference:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=processes,
                               process_id=process_id, initialization_timeout=60)

# The same data and initial params in every process, drawn from one seed.
rng = np.random.default_rng(0)
x_all = rng.normal(size=(steps, 32, 8)).astype(np.float32)
y_all = rng.normal(size=(steps, 32, 3)).astype(np.float32)
host_params = {
    "w1": (rng.normal(size=(8, 16)) / np.sqrt(8)).astype(np.float32),
    "bn": {"scale": np.ones(16, np.float32), "offset": np.zeros(16, np.float32)},
    "w2": (rng.normal(size=(16, 3)) / 4).astype(np.float32),
    "b2": np.zeros(3, np.float32),
}

def local_loss(params, x, y, axis_name):
    # dense -> batch norm (statistics over the whole batch, across devices) -> relu -> dense
    h = jstep.batch_norm(x @ params["w1"], params["bn"]["scale"], params["bn"]["offset"], axis_name=axis_name)
    return jnp.mean((jax.nn.relu(h) @ params["w2"] + params["b2"] - y) ** 2)

optimizer = jstep.grouped(jstep.adam(0.05))

if reference:
    loss = lambda params, x, y: local_loss(params, x, y, None)
    put_batch = lambda a: a
    params = host_params
else:
    mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    # Each device's loss over its share of the batch, averaged: the whole batch's mean.
    loss = jax.shard_map(lambda p, x, y: jax.lax.pmean(local_loss(p, x, y, "batch"), "batch"),
                         mesh=mesh, in_specs=(P(), P("batch"), P("batch")), out_specs=P())
    batch = NamedSharding(mesh, P("batch"))
    rows = 32 // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    # Each process holds only its own rows of the batch: they become one global array.
    put_batch = lambda a: jax.make_array_from_process_local_data(batch, a[mine], a.shape)
    params = jax.device_put(host_params, NamedSharding(mesh, P()))

@jax.jit
def train_step(params, state, x, y):
    value, grads = jax.value_and_grad(loss)(params, x, y)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

state = optimizer.init(params)
losses = []
for t in range(steps):
    params, state, value = train_step(params, state, put_batch(x_all[t]), put_batch(y_all[t]))
    losses.append(value)

# The same training with 8-bit Adam states (blocks of 64, every leaf), packed by grouped and
# rounded stochastically: its codes and scales are global arrays like any state.
fmt = jstep.blockwise(8, 64, min_size=0)
quantized = jstep.grouped(jstep.adam(0.05, mu_dtype=fmt, nu_dtype=fmt, rounding_seed=0))

@jax.jit
def quantized_step(params, state, x, y):
    updates, state = quantized.update(jax.grad(loss)(params, x, y), state, params)
    return optax.apply_updates(params, updates), state

q_params = host_params if reference else jax.device_put(host_params, NamedSharding(mesh, P()))
q_state = quantized.init(q_params)
for t in range(steps):
    q_params, q_state = quantized_step(q_params, q_state, put_batch(x_all[t]), put_batch(y_all[t]))
is_q = jstep.quantization.is_quantized
q_leaves = [q for q in jax.tree.leaves(q_state, is_leaf=is_q) if is_q(q)]

local = lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else np.asarray(a)
print("RESULT" + json.dumps({
    "devices": jax.device_count(), "local_devices": jax.local_device_count(),
    "losses": [float(local(v)) for v in losses],
    "params": {jax.tree_util.keystr(k): local(v).tolist() for k, v in jax.tree_util.tree_leaves_with_path(params)},
    "quantized_params": [local(v).tolist() for v in jax.tree.leaves(q_params)],
    "quantized_codes": [local(q.codes).tolist() for q in q_leaves],
    "quantized_scales": [local(q.scale).tolist() for q in q_leaves],
}))
if not reference:
    jax.distributed.shutdown()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(process_id, port, local_devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    args = [sys.executable, "-c", SCRIPT, str(process_id), str(PROCESSES), str(port), str(STEPS)]
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result_of(process, outputs):
    out, err = outputs
    assert process.returncode == 0, err[-4000:]
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT"))[len("RESULT") :])


@pytest.fixture(scope="module")
def runs():
    """(results of the processes of the distributed run, result of the one-device run)."""
    port = free_port()
    processes = [launch(i, port, LOCAL_DEVICES) for i in range(PROCESSES)] + [launch(-1, port, 1)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        outputs = [p.communicate(timeout=max(deadline - time.monotonic(), 1)) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.communicate()
    results = [result_of(p, o) for p, o in zip(processes, outputs, strict=True)]
    return results[:-1], results[-1]


def test_the_global_mesh_spans_both_processes(runs):
    distributed, single = runs
    assert [(r["devices"], r["local_devices"]) for r in distributed] == [(PROCESSES * LOCAL_DEVICES, LOCAL_DEVICES)] * 2
    assert (single["devices"], single["local_devices"]) == (1, 1)


def test_losses_equal_the_one_device_run(runs):
    distributed, single = runs
    for result in distributed:
        np.testing.assert_allclose(result["losses"], single["losses"], rtol=1e-6)
    assert single["losses"][-1] < single["losses"][0]  # it trains


def test_params_equal_the_one_device_run(runs):
    distributed, single = runs
    for result in distributed:
        assert result["params"].keys() == single["params"].keys()
        for key, value in single["params"].items():
            got, want = np.asarray(result["params"][key]), np.asarray(value)
            error = np.max(np.abs(got - want)) / np.max(np.abs(want))
            assert error <= 1e-6, f"{key}: relative error {error:.2e}"  # measured: 1.8e-7


def test_a_quantized_state_trains_as_on_one_device(runs):
    """grouped 8-bit Adam with stochastic rounding: the packed m and v buffers (one
    QuantizedArray each) hold the one-device run's codes after 5 steps, their scales and the
    params agree to float32 round-off."""
    distributed, single = runs
    assert len(single["quantized_codes"]) == 2  # m and v, one packed buffer each
    for result in distributed:
        for codes, want in zip(result["quantized_codes"], single["quantized_codes"], strict=True):
            np.testing.assert_array_equal(codes, want)
        for scale, want in zip(result["quantized_scales"], single["quantized_scales"], strict=True):
            np.testing.assert_allclose(scale, want, rtol=1e-6)
        for got, want in zip(result["quantized_params"], single["quantized_params"], strict=True):
            error = np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want))
            assert error <= 1e-6, f"relative error {error:.2e}"
