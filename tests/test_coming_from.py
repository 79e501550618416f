"""Every row of docs/coming_from.md's optimizer table that pairs two calls gives the same numbers.

The page promises name-for-name counterparts; a row that pairs a jstep call with an Optax call
is run here as written (the cells are evaluated), over steps whose gradients range from 1e-4
to 1, where eps's placement and size show: a pair that differs only for small gradients
(eps inside the root against outside) fails.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jstep

PAGE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "coming_from.md"
# The values the cells' free names stand for: a decay, a momentum, an eps and a weight decay
# that differ from every default, so that a dropped argument shows.
VALUES = {
    "lr": 0.01,
    "gamma": 0.8,
    "decay": 0.8,
    "beta": 0.5,
    "eps": 1e-6,
    "b1": 0.7,
    "b2": 0.95,
    "wd": 0.05,
    "m": lambda params: {"w": True, "b": False},
}
STEPS = 20
# |jstep - Optax| <= RTOL * the leaf's largest update at that step: float32 rounding where the
# two libraries order an operation differently (rsqrt against 1 / sqrt).
RTOL = 1e-6


def optimizer_rows():
    """(jstep call, Optax call) for each row of the Optimizers table whose two cells are calls."""
    section = PAGE.read_text().split("### Optimizers", 1)[1].split("\n### ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        ours, theirs = (re.match(r"`([^`]+)`", cell) for cell in cells[:2])
        if ours and theirs:  # "—" and "(`optax.flatten(...)` packs ...)" pair no call
            rows.append(pytest.param(ours.group(1), theirs.group(1), id=ours.group(1)))
    return rows


ROWS = optimizer_rows()


def test_the_table_is_found():
    assert len(ROWS) >= 15


def evaluate(expression, namespace):
    try:
        return eval(expression, dict(namespace, **VALUES))  # the page's own cells
    except Exception as error:  # a cell that is not a valid call is a defect of the page
        raise AssertionError(f"the cell `{expression}` does not evaluate: {error!r}") from error


def steps(optimizer):
    rng = np.random.default_rng(1)
    scales = 10.0 ** rng.uniform(-4, 0, size=STEPS)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": jnp.ones(4, jnp.float32)}
    state, taken = optimizer.init(params), []
    update = jax.jit(optimizer.update)
    for scale in scales:
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32), params)  # noqa: B023
        updates, state = update(grads, state, params)
        taken.append(updates)
    return taken


@pytest.mark.parametrize(("ours", "theirs"), ROWS)
def test_row_gives_the_same_numbers(ours, theirs):
    jstep_names = {name: getattr(jstep, name) for name in jstep.__all__}
    ours_steps = steps(evaluate(ours, jstep_names))
    theirs_steps = steps(evaluate(theirs, {"optax": optax}))
    for t, (a_tree, b_tree) in enumerate(zip(ours_steps, theirs_steps, strict=True)):
        for a_leaf, b_leaf in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree), strict=True):
            a, b = np.asarray(a_leaf, np.float64), np.asarray(b_leaf, np.float64)
            worst = np.max(np.abs(a - b)) / np.max(np.abs(b))
            assert worst <= RTOL, f"step {t + 1}: `{ours}` and `{theirs}` differ by {worst:.3g} of the update"


# ------------------------------------------------------------- 8- and 4-bit optimizers


def quantized_rows():
    """(jstep call, [peer calls]) for each row of the 8- and 4-bit table."""
    section = PAGE.read_text().split("### 8- and 4-bit optimizers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        calls = [re.match(r"`([^`]+)`$", cell) for cell in cells]
        if len(cells) == 3 and calls[0]:
            rows.append(pytest.param(calls[0].group(1), [c.group(1) for c in calls[1:] if c], id=calls[0].group(1)))
    return rows


QUANTIZED_ROWS = quantized_rows()


def test_the_quantized_table_is_found():
    assert len(QUANTIZED_ROWS) == 6


def peer_bits(call):
    """8 or 4, from the peer's class name (Adam8bit, AdamW4bit, ...)."""
    return int(re.search(r"(\d)bit\(", call).group(1))


@pytest.mark.parametrize(("ours", "peers"), QUANTIZED_ROWS)
def test_quantized_row_keeps_state_in_the_peers_bits(ours, peers):
    """The jstep cell builds an optimizer whose state leaves of a 64 x 128 weight are quantized
    in the bits the peers' names say, and whose bias state (128 elements, under min_size) stays
    float32; the first step is Adam's/momentum's/... as computed in float32 (the state only
    changes what is stored)."""
    namespace = {name: getattr(jstep, name) for name in jstep.__all__}
    optimizer = evaluate(ours, namespace)
    params = {"w": jnp.ones((64, 128), jnp.float32), "b": jnp.ones(128, jnp.float32)}
    state = optimizer.init(params)
    quantized = [
        leaf
        for leaf in jax.tree.leaves(state, is_leaf=jstep.quantization.is_quantized)
        if isinstance(leaf, jstep.QuantizedArray)
    ]
    assert quantized and all(q.shape == (64, 128) for q in quantized)
    assert {q.layout.bits for q in quantized} == {peer_bits(call) for call in peers}
    float_state = [leaf for leaf in jax.tree.leaves(state) if leaf.shape == (128,)]
    assert float_state and all(leaf.dtype == jnp.float32 for leaf in float_state)
    plain = evaluate(re.sub(r",\s*(mu|nu|accumulator)_dtype=blockwise\(\d\)", "", ours), namespace)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.3, jnp.float32), params)
    first, _ = optimizer.update(grads, state, params)
    expected, _ = plain.update(grads, plain.init(params), params)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("call", sorted({call for row in QUANTIZED_ROWS for call in row.values[1]}))
def test_quantized_peer_cell_builds(call):
    torch = pytest.importorskip("torch")
    module = "bitsandbytes" if call.startswith("bnb.") else "torchao.optim"
    peer = pytest.importorskip(module)
    name = {"bitsandbytes": "bnb", "torchao.optim": "torchao"}[module]
    import importlib

    root = peer if name == "bnb" else importlib.import_module("torchao")
    values = {key: value for key, value in VALUES.items() if not callable(value)}
    params = [torch.nn.Parameter(torch.ones(64, 128))]
    optimizer = eval(call, {name: root, "params": params, **values})
    assert type(optimizer).__name__ == call.split("(")[0].split(".")[-1]
