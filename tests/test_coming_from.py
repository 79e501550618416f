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
