"""A state saved mid-run and reloaded continues bit for bit."""

import pickle

import jax
import numpy as np
import pytest

from harness import gradient_sequence, optimizers, params_like

NAMES = ["adam", "momentum", "rmsprop", "adagrad", "adadelta", "sgd"]
BEFORE, AFTER = 7, 8


def save_npz(state, path):
    np.savez(path, *jax.device_get(jax.tree.leaves(state)))


def load_npz(path, like):
    with np.load(path) as saved:
        leaves = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def save_pickle(state, path):
    with open(path, "wb") as f:
        pickle.dump(jax.device_get(state), f)


def load_pickle(path, like):
    with open(path, "rb") as f:
        return pickle.load(f)


FORMATS = {"npz": (save_npz, load_npz), "pickle": (save_pickle, load_pickle)}


@pytest.mark.parametrize("name", NAMES)
def test_a_reloaded_state_continues_bit_for_bit(name, tmp_path):
    """Save after 7 steps (np.savez of the state's leaves, or pickle of the device_get state),
    reload, take 8 more steps: updates and final state equal the uninterrupted run's bits."""
    opt = optimizers()[name]
    grads = gradient_sequence(50, BEFORE + AFTER, np.float32)
    params = params_like(grads, np.float32)
    update = jax.jit(opt.update)

    def steps(state, gs):
        out = []
        for g in gs:
            updates, state = update(g, state)
            out.append(updates)
        return jax.device_get(out), state

    _, mid = steps(opt.init(params), grads[:BEFORE])
    uninterrupted, final = steps(mid, grads[BEFORE:])

    for fmt, (save, load) in FORMATS.items():
        path = tmp_path / f"state.{fmt}"
        save(mid, path)
        restored = load(path, opt.init(params))
        assert type(restored) is type(mid)
        assert [np.dtype(x.dtype) for x in jax.tree.leaves(restored)] == [
            np.dtype(x.dtype) for x in jax.tree.leaves(mid)
        ]
        resumed, resumed_final = steps(restored, grads[BEFORE:])
        for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=fmt)
        for a, b in zip(jax.tree.leaves(resumed_final), jax.tree.leaves(final), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=fmt)
        assert int(resumed_final.count) == BEFORE + AFTER
