"""`python -m jstep`: a short run, its files, the flags, bad flags, and --devices equivalence."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jstep import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
SHORT = ["--steps", "24", "--batch-size", "64", "--optimizers", "sgd,adam", "--seed", "1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_jstep(*args, env=None):
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    environment.pop("XLA_FLAGS", None) if env is None else None
    command = [sys.executable, "-m", "jstep", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=300, check=False)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("short") / "new folder"
    result = run_jstep(*SHORT, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return result, out, json.loads((out / cli.JSON_NAME).read_text())


def test_short_run_prints_the_table_and_the_check(short_run):
    result, out, _ = short_run
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("optimizer"))
    assert all(column in header for column in ("settings", "final train loss", "test accuracy", "steps/s"))
    assert any(line.startswith("sgd ") and "lr=0.1" in line for line in lines)
    assert any(line.startswith("adam ") and "lr=0.002" in line for line in lines)
    assert not any(line.startswith("momentum ") for line in lines)
    assert f"wrote {out / cli.PNG_NAME} and {out / cli.JSON_NAME}" in result.stdout
    assert "check_vjp, batch-norm layer 1" in result.stdout and "passed" in result.stdout


def test_progress_bar_per_run_on_stderr(short_run):
    result, _, _ = short_run
    bars = [line for line in result.stderr.splitlines() if "24/24" in line]
    assert [bar.split()[0] for bar in bars] == ["sgd", "adam"]
    assert all("#" * 30 in bar for bar in bars)
    assert "24/24" not in result.stdout


def test_png_is_written(short_run):
    _, out, _ = short_run
    assert (out / cli.PNG_NAME).read_bytes()[:8] == PNG_SIGNATURE


def test_json_holds_the_curves_and_the_table(short_run):
    _, _, record = short_run
    assert [run["optimizer"] for run in record["runs"]] == ["sgd", "adam"]
    assert (record["steps"], record["batch_size"], record["seed"], record["devices"]) == (24, 64, 1, 1)
    for run in record["runs"]:
        loss = np.array(run["loss"])
        assert loss.shape == (24,) and np.all(np.isfinite(loss))
        assert loss[-5:].mean() < 0.6 * loss[:5].mean()  # it trains
        assert 0.5 < run["test_accuracy"] <= 1 and run["final_train_loss"] > 0 and run["steps_per_second"] > 0
    check = record["check_vjp"]
    assert check["passed"] and check["input_shape"] == [64, 128]
    assert {c["against"] for c in check["comparisons"]} == {"autodiff of reference", "finite differences"}
    assert check["worst"]["autodiff of reference"]["rel"] < 1e-10


def test_devices_4_equals_devices_1(short_run, tmp_path):
    """Same seed, 4 host devices with shard_map and cross-device batch norm: the same numbers."""
    _, _, single = short_run
    result = run_jstep(*SHORT, "--devices", "4", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "on 4 devices" in result.stdout
    parallel = json.loads((tmp_path / cli.JSON_NAME).read_text())
    assert parallel["devices"] == 4
    # Float round-off (the 4-way split sums in another order) starts at ~1e-7. Over many steps
    # it can move a pre-activation across relu's kink, a discrete ~1e-4 change, so the later
    # steps get a looser bound; a real difference (per-device batch statistics, unaveraged
    # gradients) changes the very first losses by far more than either bound.
    for one, four in zip(single["runs"], parallel["runs"], strict=True):
        np.testing.assert_allclose(four["loss"][:8], one["loss"][:8], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(four["loss"], one["loss"], rtol=2e-3)
        np.testing.assert_allclose(four["final_train_loss"], one["final_train_loss"], rtol=2e-3)
        assert abs(four["test_accuracy"] - one["test_accuracy"]) <= 2 / 297


def test_help_documents_every_flag():
    result = run_jstep("--help")
    assert result.returncode == 0
    for flag in (
        "--steps",
        "--batch-size",
        "--optimizers",
        "--seed",
        "--out",
        "--devices",
        "--precision",
        "--rounding",
        "--state-format",
    ):
        assert flag in result.stdout
    assert all(name in result.stdout for name in cli.OPTIMIZERS)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--optimizers", "sgd,lion"], "unknown optimizer 'lion'"),
        (["--optimizers", ""], "unknown optimizer"),
        (["--steps", "0"], "--steps: must be > 0, got 0"),
        (["--steps", "-3"], "--steps: must be > 0, got -3"),
        (["--steps", "ten"], "--steps: expected a whole number"),
        (["--batch-size", "0"], "--batch-size: must be > 0"),
        (["--batch-size", "2000"], "--batch-size must be at most 1500"),
        (["--batch-size", "30", "--devices", "4"], "must be a multiple of --devices 4"),
        (["--devices", "0"], "--devices: must be > 0"),
        (["--precision", "float16"], "--precision: invalid choice: 'float16'"),
        (["--rounding", "up"], "--rounding: invalid choice: 'up'"),
        (["--state-format", "blockwise2"], "unknown state format 'blockwise2'; choose from blockwise8,blockwise4"),
        (["--state-format", ","], "unknown state format ','"),
        (["--seed", "-1"], "--seed: must be in [0, 2^31), got -1"),
        (["--colour", "red"], "unrecognized arguments: --colour red"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flags, message, capsys):
    assert cli.main(flags) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("jstep: error: ") and message in err


def unwritable_folder(tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    return str(blocker / "plots")


def test_unwritable_out_exits_2(tmp_path, capsys):
    assert cli.main(["--out", unwritable_folder(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("jstep: error: --out") and "is not a writable folder" in err


@pytest.mark.parametrize("flags", [["--optimizers", "sgd,lion"], ["--steps", "0"], ["--out", None]])
def test_bad_flags_from_the_command_line_no_traceback(flags, tmp_path):
    flags = [flag if flag is not None else unwritable_folder(tmp_path) for flag in flags]
    result = run_jstep(*flags)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("jstep: error: ")
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------- the pieces, in process


def test_parse_args_defaults_and_dedup(tmp_path):
    args = cli.parse_args(["--out", str(tmp_path), "--optimizers", "adam, sgd,adam"])
    assert args.optimizers == ["adam", "sgd"]
    assert (args.steps, args.batch_size, args.seed, args.devices) == (cli.DEFAULT_STEPS, cli.DEFAULT_BATCH_SIZE, 0, 1)
    assert (args.precision, args.rounding, args.state_format) == ("float32", "stochastic", [])
    formats = cli.parse_args(["--out", str(tmp_path), "--state-format", "blockwise4, blockwise8,blockwise4"])
    assert formats.state_format == ["blockwise4", "blockwise8"]
    assert cli.parse_args(["--out", str(tmp_path)]).optimizers == list(cli.OPTIMIZERS)


def test_optimizer_names_match_the_demo_settings():
    from jstep import _demo

    assert tuple(_demo.OPTIMIZER_SETTINGS) == cli.OPTIMIZERS


def test_with_host_devices_merges_xla_flags():
    flag = cli.HOST_DEVICES_FLAG
    assert cli.with_host_devices("", 4) == f"{flag}=4"
    assert cli.with_host_devices(f"--xla_cpu_a=1 {flag}=2", 4) == f"--xla_cpu_a=1 {flag}=4"
    assert cli.with_host_devices(f"{flag}=8", 4) == f"{flag}=8"


def test_progress_bar_to_a_file_writes_one_final_line(tmp_path):
    with open(tmp_path / "log", "w+") as stream:
        bar = cli.ProgressBar("adam", 100, stream, width=10)
        for step in (25, 50, 75, 100):
            bar.update(step, 1.0 / step)
        stream.seek(0)
        assert stream.read() == "adam          [##########] 100/100  loss 0.0100\n"


def test_table_alignment():
    row = {
        "optimizer": "sgd",
        "precision": "float32",
        "settings": "lr=0.1",
        "final_train_loss": 0.01234,
        "test_accuracy": 0.97,
        "state_bytes_per_parameter": 0.0,
        "bytes_per_parameter": 4.0002,
        "steps_per_second": 812.4,
    }
    table = cli.format_table([row, {**row, "optimizer": "ema_momentum"}]).splitlines()
    assert len(table) == 4 and len({len(line) for line in table}) == 1
    assert table[2].split() == ["sgd", "float32", "lr=0.1", "0.0123", "97.0%", "0.00", "4.00", "812"]


def test_same_seed_same_batches_and_init():
    import jax

    from jstep import _demo

    a, b, c = (_demo.batch_indices(seed, 1500, 64, 50) for seed in (1, 1, 2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (50, 64) and all(len(set(row)) == 64 for row in a)
    epoch = a[: 1500 // 64].ravel()
    assert len(set(epoch)) == len(epoch)  # an epoch visits each example at most once
    bn = _demo.batch_norm_layer()
    first, second = _demo.init_mlp(jax.random.key(0), bn), _demo.init_mlp(jax.random.key(0), bn)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True))


def test_devices_rerun_when_the_backend_already_started(tmp_path, monkeypatch):
    """In a process whose JAX already runs on fewer devices, main() runs the command again in a
    child process with XLA_FLAGS asking for enough host devices (the path the test above covers
    from a fresh process)."""
    import jax

    calls = []

    def fake_run(command, env, check):
        assert check is False
        calls.append((command, env))
        return subprocess.CompletedProcess(command, 7)

    jax.devices()  # the backend has started: XLA_FLAGS can no longer change this process
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    monkeypatch.delenv(cli._CHILD_MARK, raising=False)
    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    argv = ["--steps", "2", "--devices", str(jax.device_count() + 1), "--out", str(tmp_path)]
    assert cli.main(argv) == 7
    [(command, env)] = calls
    assert command == [sys.executable, "-m", "jstep", *argv]
    assert env["XLA_FLAGS"] == f"--xla_cpu_foo=1 {cli.HOST_DEVICES_FLAG}={jax.device_count() + 1}"
    assert env[cli._CHILD_MARK] == "1"


def test_devices_child_that_still_lacks_devices_exits_2(tmp_path, monkeypatch, capsys):
    import jax

    jax.devices()
    monkeypatch.setenv(cli._CHILD_MARK, "1")
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    assert cli.main(["--devices", "64", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jstep: error: --devices 64") and err.count("\n") == 1


# ---------------------------------------------------------------------------- bfloat16


@pytest.fixture(scope="module")
def bfloat16_run(tmp_path_factory):
    """The default training (1000 steps of 128) with Adam, in float32 and in bfloat16 with stochastic rounding."""
    out = tmp_path_factory.mktemp("bfloat16")
    result = run_jstep("--optimizers", "adam", "--precision", "bfloat16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return result, json.loads((out / cli.JSON_NAME).read_text())


def test_bfloat16_reaches_float32_test_accuracy_within_one_and_a_half_points(bfloat16_run):
    _, record = bfloat16_run
    assert (record["precision"], record["rounding"]) == ("bfloat16", "stochastic")
    wide, narrow = record["runs"]
    assert (wide["precision"], narrow["precision"]) == ("float32", "bfloat16 stochastic")
    assert wide["test_accuracy"] > 0.9  # both actually learned the digits ...
    assert abs(narrow["test_accuracy"] - wide["test_accuracy"]) <= 0.015  # ... to the same accuracy
    assert np.mean(narrow["loss"][-50:]) < 0.05 * np.mean(narrow["loss"][:10])


def test_bfloat16_bytes_per_parameter_are_half(bfloat16_run):
    """Adam holds params, m and v (3 arrays) and an int32 count: 3 * 4 bytes per parameter in float32,
    3 * 2 in bfloat16, plus 4 bytes over the 64*128 + 128*64 + 64*10 + 10 + 2*(128 + 64) parameters."""
    result, record = bfloat16_run
    count = 64 * 128 + 128 * 64 + 64 * 10 + 10 + 2 * (128 + 64)
    wide, narrow = record["runs"]
    assert wide["bytes_per_parameter"] == pytest.approx((3 * 4 * count + 4) / count, rel=1e-12)
    assert narrow["bytes_per_parameter"] == pytest.approx((3 * 2 * count + 4) / count, rel=1e-12)
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("adam ")]
    assert [row[1:3] for row in rows] == [["float32", "lr=0.002"], ["bfloat16", "stochastic"]]
    assert [row[-2] for row in rows] == ["12.00", "6.00"]
    assert "adam: bfloat16 stochastic test accuracy" in result.stdout and "6.00 against 12.00 bytes" in result.stdout
    assert [line.split()[0:2] for line in result.stderr.splitlines() if "1000/1000" in line] == [
        ["adam", "[" + "#" * 30 + "]"],
        ["adam", "bfloat16"],
    ]


@pytest.fixture(scope="module")
def bfloat16_nearest_run(tmp_path_factory):
    """The same training with --rounding nearest: float32, then bfloat16 stored by round-to-nearest."""
    out = tmp_path_factory.mktemp("bfloat16_nearest")
    result = run_jstep("--optimizers", "adam", "--precision", "bfloat16", "--rounding", "nearest", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return result, json.loads((out / cli.JSON_NAME).read_text())


def test_bfloat16_stochastic_rounding_ends_at_float32s_loss(bfloat16_run):
    """README: final training loss 0.0005 in float32 and in bfloat16 with stochastic rounding
    (0.0094 with round-to-nearest): the stochastic run ends within 1.5 times float32's loss,
    which a run that rounds to nearest (20 times float32's) cannot."""
    _, record = bfloat16_run
    wide, narrow = record["runs"]
    assert wide["final_train_loss"] < 1e-3
    assert narrow["final_train_loss"] <= 1.5 * wide["final_train_loss"]


def test_rounding_nearest_runs_and_loses_the_small_steps(bfloat16_run, bfloat16_nearest_run):
    """--rounding nearest: the same float32 run (same seed), then bfloat16 stored by round-to-nearest,
    labelled so in the table and the JSON; its final loss is the README's (0.0094 against 0.0005):
    over 5 times the stochastic run's, because the steps under half a bfloat16 ulp are lost."""
    result, record = bfloat16_nearest_run
    _, stochastic_record = bfloat16_run
    assert (record["precision"], record["rounding"]) == ("bfloat16", "nearest")
    wide, narrow = record["runs"]
    assert (wide["precision"], narrow["precision"]) == ("float32", "bfloat16 nearest")
    assert wide["final_train_loss"] == stochastic_record["runs"][0]["final_train_loss"]
    assert narrow["final_train_loss"] > 5 * stochastic_record["runs"][1]["final_train_loss"]
    assert 0.004 < narrow["final_train_loss"] < 0.02
    assert narrow["test_accuracy"] > 0.9
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("adam ")]
    assert [row[1:3] for row in rows] == [["float32", "lr=0.002"], ["bfloat16", "nearest"]]
    assert "stored by round-to-nearest" in result.stdout


# ----------------------------------------------------------------------- 8- and 4-bit state

# The network's leaves: two weight matrices of 8192 elements (quantized: at least min_size = 4096
# elements) and 640 + 10 + 2 * (128 + 64) = 1034 parameters in small leaves that stay float32.
LARGE, SMALL = (64 * 128, 128 * 64), 64 * 10 + 10 + 2 * (128 + 64)


def quantized_moment_bytes(bits, block_size):
    """Bytes of one moment: per large leaf, bits/8 per element and a float32 scale per block."""
    return sum(size * bits // 8 + 4 * (size // block_size) for size in LARGE) + 4 * SMALL


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized")
    flags = ["--steps", "60", "--batch-size", "64", "--optimizers", "sgd,momentum,adam"]
    result = run_jstep(*flags, "--state-format", "blockwise8,blockwise4", "--rounding", "nearest", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return result, out, json.loads((out / cli.JSON_NAME).read_text())


def test_state_formats_add_a_row_per_optimizer_with_state(quantized_run):
    result, out, record = quantized_run
    assert record["state_formats"] == ["blockwise8", "blockwise4"]
    assert [(r["optimizer"], r["precision"], r["dtype"], r["state_format"], r["rounding"]) for r in record["runs"]] == [
        ("sgd", "float32", "float32", "float32", None),
        ("momentum", "float32", "float32", "float32", None),
        ("momentum", "8-bit nearest", "float32", "blockwise8", "nearest"),
        ("momentum", "4-bit nearest", "float32", "blockwise4", "nearest"),
        ("adam", "float32", "float32", "float32", None),
        ("adam", "8-bit nearest", "float32", "blockwise8", "nearest"),
        ("adam", "4-bit nearest", "float32", "blockwise4", "nearest"),
    ]
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith(("sgd ", "momentum ", "adam "))]
    assert [row[1] for row in rows[:7]] == ["float32", "float32", "8-bit", "4-bit", "float32", "8-bit", "4-bit"]
    assert "sgd keeps no optimizer state: no 8- or 4-bit row." in result.stdout
    assert "adam: 8-bit nearest test accuracy" in result.stdout
    bars = [line.split("[")[0].split() for line in result.stderr.splitlines() if "60/60" in line]
    assert bars[-2:] == [["adam", "blockwise8"], ["adam", "blockwise4"]]
    assert (out / cli.AGAINST_FLOAT32_PNG_NAME).read_bytes()[:8] == PNG_SIGNATURE
    for run in record["runs"]:
        assert all(np.isfinite(run["loss"])) and np.mean(run["loss"][-5:]) < 0.6 * np.mean(run["loss"][:5])


def test_state_formats_hold_the_bytes_of_their_codes_and_scales(quantized_run):
    """State bytes per parameter, counted from the layout: adam (m, v and an int32 count) 41556 / 17418
    = 2.39 bytes in 8 bits and 25684 / 17418 = 1.47 in 4 bits against 8.00; momentum one moment
    (its velocity) and an int32 count."""
    _, _, record = quantized_run
    count = sum(LARGE) + SMALL
    runs = {(r["optimizer"], r["state_format"]): r for r in record["runs"]}
    for bits, name in ((8, "blockwise8"), (4, "blockwise4")):
        moment = quantized_moment_bytes(bits, 256 if bits == 8 else 128)
        adam, momentum = runs["adam", name], runs["momentum", name]
        assert adam["state_bytes_per_parameter"] == pytest.approx((2 * moment + 4) / count, rel=1e-12)
        assert momentum["state_bytes_per_parameter"] == pytest.approx((moment + 4) / count, rel=1e-12)
        assert adam["bytes_per_parameter"] == pytest.approx((4 * count + 2 * moment + 4) / count, rel=1e-12)
    assert runs["adam", "float32"]["state_bytes_per_parameter"] == pytest.approx((8 * count + 4) / count, rel=1e-12)
    assert runs["sgd", "float32"]["state_bytes_per_parameter"] == pytest.approx(4 / count, rel=1e-12)  # a count


def test_training_runs_and_labels_with_a_narrow_precision_and_state_formats():
    """With --precision bfloat16 the 8- and 4-bit runs keep bfloat16 params: each optimizer with
    state trains in float32, in bfloat16, then in bfloat16 with each state format."""
    from jstep import _demo

    runs = cli.training_runs(["sgd", "adam"], "bfloat16", ["blockwise8", "blockwise4"])
    assert runs == [
        ("sgd", "float32", None),
        ("sgd", "bfloat16", None),
        ("adam", "float32", None),
        ("adam", "bfloat16", None),
        ("adam", "bfloat16", "blockwise8"),
        ("adam", "bfloat16", "blockwise4"),
    ]
    assert [cli.run_label(*run) for run in runs[3:]] == [
        "adam bfloat16",
        "adam bfloat16 blockwise8",
        "adam bfloat16 blockwise4",
    ]
    assert _demo.describe_precision("bfloat16", True, "blockwise8") == "bfloat16 8-bit stochastic"
    assert _demo.describe_precision("float32", False, "blockwise4") == "4-bit nearest"
    assert cli.training_runs(["adam"], "float32", []) == [("adam", "float32", None)]
    with pytest.raises(ValueError, match="sgd keeps no state"):
        _demo.make_optimizer("sgd", state_format="blockwise8")
