"""Block-wise quantized optimizer state: jstep's quantization error against bitsandbytes' and
torchao's on the same data, and the state bytes per parameter of 8- and 4-bit optimizers.

Error. Each data set (float32, `--size` elements, 2^20 by default, fixed seeds) is stored and
read back once by each contender; the table shows the mean absolute error, the RMS error and
the median and 99th percentile of the relative error |x~ - x| / |x| (over x != 0) of the
values read back, and jstep's figure / the peer's (the issue's target: <= 1.25 against bitsandbytes' block-wise 8 bits):

- jstep: ``jstep.dequantize(jstep.quantize(x, jstep.blockwise(bits), signed=...))`` (block 256
  for 8 bits, 128 for 4).
- nearest: the float64 reference of tests/quantization_reference.py on jstep's maps
  (``jstep.quantization.code_table``) and jstep's blocks (each element the code nearest to
  x / absmax): the floor for those maps.
- bitsandbytes: ``bitsandbytes.functional.quantize_blockwise(x, code, blocksize)`` then
  ``dequantize_blockwise`` on the CPU, with the map its 8-bit optimizers use:
  ``create_dynamic_map(signed)``, blocksize 256 (its optimizers' block size on the CPU); for 4
  signed bits ``create_dynamic_map(True, 3, 4)`` at blocksize 128 (one code per byte: bitsandbytes
  has no 4-bit optimizer state, only these kernels). bitsandbytes' CPU kernel does not always
  pick the nearest code (a binary search over the map): the `nearest` row shows the gap.
- torchao: the quantizers of ``torchao.optim``'s AdamW8bit / AdamW4bit states (``scale_tensor``,
  ``quantize_8bit_with_qmap`` / ``quantize_4bit_with_qmap``, ``dequant_with_qmap``) with their
  maps: bitsandbytes' dynamic maps for 8 bits (the unsigned one with its zero), ``(True, 3, 4)``
  and {k / 16 : k = 1..16} for 4 bits, blocks of 256 and 128.

The data: `t3` Student-t with 3 degrees of freedom (heavy tails, a first moment's stand-in);
`t3 decades` the same times 10^u, u ~ U(-6, 0) per element (values spanning six decades inside
one block); `t3^2` and `adam v` their squares (second moments g^2: `adam v` spans twelve
decades; the unsigned maps).

Bytes. The state of ``opt.init(params)`` (abstract: ``jax.eval_shape``) on two trees of float32
leaves, ResNet-50 (25.6M parameters, 161 leaves, 107 of them under 4096 elements) and a
GPT-2-small-shaped transformer (124M, 148 leaves), counted as every state array's bytes (a
QuantizedArray's uint8 codes and float32 scales, float32 leaves under ``min_size``, the step
count) / the number of parameters. The targets: Adam with 8-bit m and v <= 2.07, 4-bit <= 1.07,
one-moment optimizers in 8 bits <= 1.04. bitsandbytes' 8-bit optimizers and torchao's AdamW8bit /
AdamW4bit are counted the same way from the state they allocate for the same shapes
(``init_state`` / ``_new_buffer``; the shared 256-entry maps counted once). The row with
``min_size=0`` quantizes the small leaves too (biases and norms: 8 float32 bytes each otherwise).

    python benchmarks/quantization.py                 # both tables
    python benchmarks/quantization.py --size 65536    # a quick look
    python benchmarks/quantization.py --no-bytes      # the error table only
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import jstep

import quantization_reference as ref
from _harness import format_table, machine_report
from optimizers import resnet50_shapes

LEARNING_RATE = 1e-3
BLOCK = {8: 256, 4: 128}


# ------------------------------------------------------------------------------------ data


def student_t(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.standard_t(3, size)


def six_decades(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.standard_t(3, size) * 10.0 ** rng.uniform(-6, 0, size)


DATA: dict[str, tuple[Callable[[np.random.Generator, int], np.ndarray], bool]] = {
    # name: (sampler, signed)
    "t3": (student_t, True),
    "t3 decades": (six_decades, True),
    "t3^2": (lambda rng, size: student_t(rng, size) ** 2, False),
    "adam v": (lambda rng, size: six_decades(rng, size) ** 2, False),
}


def data_set(name: str, size: int) -> tuple[np.ndarray, bool]:
    sampler, signed = DATA[name]
    x = sampler(np.random.default_rng(list(DATA).index(name)), size).astype(np.float32)
    return x, signed


# ----------------------------------------------------------------------------- contenders
# Each takes float32 x (NumPy) and returns the float32 (or float64) values read back.


def jstep_round_trip(x: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    q = jstep.quantize(jnp.asarray(x), jstep.blockwise(bits), signed=signed)
    return np.asarray(jstep.dequantize(q))


def jstep_code(bits: int, signed: bool) -> np.ndarray:
    """jstep's map (see the module docstring of jstep.quantization), in float64."""
    return np.asarray(jstep.quantization.code_table(bits, signed), np.float64)


def nearest_round_trip(x: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """x stored in jstep's map by the nearest code. A signed map holds 0 twice (+0 and -0, as
    floats do); the reference wants each value once, and either 0 stores the same value."""
    return ref.quantize_dequantize(x, np.unique(jstep_code(bits, signed)), BLOCK[bits])


def load_peers() -> dict[str, Any]:
    """The peers that import here, by name (a note is printed for each that does not)."""
    peers: dict[str, Any] = {}
    try:
        import torch

        peers["torch"] = torch
    except ImportError as error:
        print(f"note: torch does not import ({error}); bitsandbytes' and torchao's rows are left out")
        return peers
    for name in ("bitsandbytes", "torchao"):
        try:
            peers[name] = __import__(name)
        except Exception as error:  # an import that fails for any reason is reported, not fatal
            print(f"note: {name} does not import ({type(error).__name__}: {error}); its rows are left out")
    return peers


def bitsandbytes_round_trip(peers: dict[str, Any], x: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    torch, functional = peers["torch"], peers["bitsandbytes"].functional
    code = functional.create_dynamic_map(signed) if bits == 8 else functional.create_dynamic_map(True, 3, 4)
    codes, state = functional.quantize_blockwise(torch.from_numpy(x), code=code, blocksize=BLOCK[bits])
    return functional.dequantize_blockwise(codes, state).numpy()


def torchao_round_trip(peers: dict[str, Any], x: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    torch = peers["torch"]
    from torchao.optim import quant_utils, subclass_4bit, subclass_8bit

    maps = subclass_8bit if bits == 8 else subclass_4bit
    qmap = torch.tensor(maps.get_qmap_signed() if signed else maps.get_qmap_unsigned(), dtype=torch.float32)
    scaled, scale = quant_utils.scale_tensor(torch.from_numpy(x), BLOCK[bits])
    quantizer = quant_utils.quantize_8bit_with_qmap if bits == 8 else quant_utils.quantize_4bit_with_qmap
    return quant_utils.dequant_with_qmap(quantizer(scaled, qmap), qmap, scale).numpy()


def peer_round_trips(peers: dict[str, Any], bits: int, signed: bool) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The peers' contenders for one format: bitsandbytes has no unsigned 4-bit map."""
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    if "bitsandbytes" in peers and (bits == 8 or signed):
        out["bitsandbytes"] = lambda x: bitsandbytes_round_trip(peers, x, bits, signed)
    if "torchao" in peers:
        out["torchao"] = lambda x: torchao_round_trip(peers, x, bits, signed)
    return out


def errors(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """(mean |y - x|, sqrt(mean (y - x)^2), the median and the 99th percentile of |y - x| / |x|
    over x != 0), in float64."""
    x64, err = x.astype(np.float64), np.asarray(y, np.float64) - x.astype(np.float64)
    nonzero = x64 != 0
    relative = np.abs(err[nonzero]) / np.abs(x64[nonzero])
    return (
        float(np.mean(np.abs(err))),
        float(np.sqrt(np.mean(err**2))),
        float(np.median(relative)),
        float(np.percentile(relative, 99)),
    )


def error_rows(peers: dict[str, Any], size: int) -> list[list[str]]:
    rows = []
    for name in DATA:
        x, signed = data_set(name, size)
        for bits in (8, 4):
            contenders: dict[str, Callable[[np.ndarray], np.ndarray]] = {
                "jstep": lambda x, bits=bits, signed=signed: jstep_round_trip(x, bits, signed),
                "nearest": lambda x, bits=bits, signed=signed: nearest_round_trip(x, bits, signed),
                **peer_round_trips(peers, bits, signed),
            }
            figures = {}
            for who, round_trip in contenders.items():
                try:
                    figures[who] = errors(x, round_trip(x))
                except Exception as error:  # a peer that fails on this machine is shown, not hidden
                    figures[who] = f"fails: {type(error).__name__}: {str(error)[:60]}"
            mine = figures["jstep"]
            for who, figure in figures.items():
                row = [name, f"{bits}", "signed" if signed else "unsigned", who]
                if isinstance(figure, str):
                    rows.append([*row, figure, "", "", "", "", "", ""])
                    continue
                row += [f"{v:.4g}" for v in figure]
                if who == "jstep" or isinstance(mine, str):
                    row += ["", "", ""]
                else:
                    row += [f"{a / b:.3f}" for a, b in zip(mine[:3], figure[:3], strict=True)]
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------- bytes


def transformer_shapes(
    vocab: int = 50257, context: int = 1024, width: int = 768, layers: int = 12
) -> dict[str, tuple[int, ...]]:
    """GPT-2 small's parameter shapes (Radford et al. 2019): tied token embedding, learned
    positions, per layer two layer norms, fused qkv and output projections, a 4x MLP, biases."""
    shapes: dict[str, tuple[int, ...]] = {"wte": (vocab, width), "wpe": (context, width)}
    for i in range(layers):
        block = {
            "ln1/scale": (width,), "ln1/bias": (width,),
            "attn/qkv": (width, 3 * width), "attn/qkv_bias": (3 * width,),
            "attn/proj": (width, width), "attn/proj_bias": (width,),
            "ln2/scale": (width,), "ln2/bias": (width,),
            "mlp/fc": (width, 4 * width), "mlp/fc_bias": (4 * width,),
            "mlp/proj": (4 * width, width), "mlp/proj_bias": (width,),
        }  # fmt: skip
        shapes.update({f"h{i:02d}/{k}": v for k, v in block.items()})
    shapes["ln_f/scale"], shapes["ln_f/bias"] = (width,), (width,)
    return shapes


TREES = {"resnet50": resnet50_shapes, "gpt2-small": transformer_shapes}

Q8, Q4 = "jstep.blockwise(8)", "jstep.blockwise(4)"
JSTEP_OPTIMIZERS: dict[str, Callable[[], Any]] = {
    "adam float32": lambda: jstep.adam(LEARNING_RATE),
    "adam 8-bit": lambda: jstep.adam(LEARNING_RATE, mu_dtype=jstep.blockwise(8), nu_dtype=jstep.blockwise(8)),
    "adam 4-bit": lambda: jstep.adam(LEARNING_RATE, mu_dtype=jstep.blockwise(4), nu_dtype=jstep.blockwise(4)),
    "adam 4-bit min_size=0": lambda: jstep.adam(
        LEARNING_RATE, mu_dtype=jstep.blockwise(4, min_size=0), nu_dtype=jstep.blockwise(4, min_size=0)
    ),
    "momentum 8-bit": lambda: jstep.momentum(LEARNING_RATE, 0.9, accumulator_dtype=jstep.blockwise(8)),
    "rmsprop 8-bit": lambda: jstep.rmsprop(LEARNING_RATE, accumulator_dtype=jstep.blockwise(8)),
    "adagrad 8-bit": lambda: jstep.adagrad(LEARNING_RATE, accumulator_dtype=jstep.blockwise(8)),
}
TARGETS = {
    "adam 8-bit": 2.07,
    "adam 4-bit": 1.07,
    "adam 4-bit min_size=0": 1.07,
    "momentum 8-bit": 1.04,
    "rmsprop 8-bit": 1.04,
    "adagrad 8-bit": 1.04,
}


def jstep_state_bytes(make: Callable[[], Any], shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes of every array in ``make().init(params)``, computed abstractly (nothing allocated)."""
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    state = jax.eval_shape(make().init, params)
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(state))


def torch_state_bytes(torch: Any, states: list[dict[str, Any]]) -> int:
    """Bytes of the tensors in a torch optimizer's per-param states, each storage counted once."""
    seen, total = set(), 0

    def count(tensor: Any) -> None:
        nonlocal total
        inner = getattr(tensor, "__tensor_flatten__", None)
        if inner is not None and type(tensor) is not torch.Tensor:  # torchao's OptimState8bit/4bit
            for name in inner()[0]:
                count(getattr(tensor, name))
            return
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()

    for state in states:
        for value in state.values():
            if torch.is_tensor(value):
                count(value)
    return total


def bitsandbytes_bytes(peers: dict[str, Any], make: Callable[[list], Any], shapes: dict[str, tuple[int, ...]]) -> int:
    torch = peers["torch"]
    params = [torch.nn.Parameter(torch.empty(s)) for s in shapes.values()]
    opt = make(params)
    group = opt.param_groups[0]
    for index, p in enumerate(params):
        opt.init_state(group, p, 0, index)
    return torch_state_bytes(torch, [opt.state[p] for p in params])


def torchao_bytes(peers: dict[str, Any], make: Callable[[list], Any], shapes: dict[str, tuple[int, ...]]) -> int:
    torch = peers["torch"]
    params = [torch.nn.Parameter(torch.empty(s)) for s in shapes.values()]
    opt = make(params)
    states = [{"exp_avg": opt._new_buffer(p, True), "exp_avg_sq": opt._new_buffer(p, False)} for p in params]
    return torch_state_bytes(torch, states)


def peer_optimizers(peers: dict[str, Any]) -> dict[str, tuple[str, Callable[[dict], int]]]:
    """(row it sits beside, bytes of its state on a tree of shapes) for each peer optimizer."""
    out: dict[str, tuple[str, Callable[[dict], int]]] = {}
    if "bitsandbytes" in peers:
        optim = peers["bitsandbytes"].optim
        for row, label, make in [
            ("adam 8-bit", "bitsandbytes Adam8bit", lambda ps: optim.Adam8bit(ps, lr=LEARNING_RATE)),
            ("momentum 8-bit", "bitsandbytes SGD8bit", lambda ps: optim.SGD8bit(ps, lr=LEARNING_RATE, momentum=0.9)),
            ("rmsprop 8-bit", "bitsandbytes RMSprop8bit", lambda ps: optim.RMSprop8bit(ps, lr=LEARNING_RATE)),
            ("adagrad 8-bit", "bitsandbytes Adagrad8bit", lambda ps: optim.Adagrad8bit(ps, lr=LEARNING_RATE)),
        ]:
            out[label] = (row, lambda shapes, make=make: bitsandbytes_bytes(peers, make, shapes))
    if "torchao" in peers:
        from torchao import optim as ao

        for row, label, cls in [
            ("adam 8-bit", "torchao AdamW8bit", "AdamW8bit"),
            ("adam 4-bit", "torchao AdamW4bit", "AdamW4bit"),
        ]:
            make = lambda ps, cls=cls: getattr(ao, cls)(ps, lr=LEARNING_RATE)  # noqa: E731
            out[label] = (row, lambda shapes, make=make: torchao_bytes(peers, make, shapes))
    return out


def bytes_rows(peers: dict[str, Any]) -> list[list[str]]:
    contenders: list[tuple[str, str, Callable[[dict], int]]] = [
        (name, f"jstep {name}", lambda shapes, make=make: jstep_state_bytes(make, shapes))
        for name, make in JSTEP_OPTIMIZERS.items()
    ]
    for label, (row, count) in peer_optimizers(peers).items():
        contenders.append((row, label, count))
    contenders.sort(key=lambda c: list(JSTEP_OPTIMIZERS).index(c[0]))
    rows = []
    for row, label, count in contenders:
        cells = [label]
        for build in TREES.values():
            shapes = build()
            params = sum(math.prod(s) for s in shapes.values())
            try:
                cells.append(f"{count(shapes) / params:.4f}")
            except Exception as error:  # a format or argument this version lacks is shown, not hidden
                cells.append(f"fails: {type(error).__name__}: {str(error)[:50]}")
        target = TARGETS.get(row)
        cells.append("" if target is None or not label.startswith("jstep") else f"<= {target}")
        rows.append(cells)
    return rows


# ------------------------------------------------------------------------------------ main


def versions(peers: dict[str, Any]) -> str:
    parts = [f"jstep {getattr(jstep, '__version__', '?')}", f"numpy {np.__version__}"]
    parts += [f"{name} {module.__version__}" for name, module in peers.items()]
    return ", ".join(parts)


def check_reference(peers: dict[str, Any]) -> str:
    """The float32 transcription of `create_dynamic_map` against bitsandbytes' own tables."""
    if "bitsandbytes" not in peers:
        return "bitsandbytes absent: the transcription of create_dynamic_map is not checked here"
    functional = peers["bitsandbytes"].functional
    results = []
    for args in [(True, 7, 8), (False, 7, 8), (True, 3, 4)]:
        theirs = functional.create_dynamic_map(*args).numpy()
        theirs = np.sort(np.concatenate([theirs[theirs != 0], [0.0]])).astype(np.float32)  # drop the padding
        same = np.array_equal(ref.dynamic_map_float32(*args), theirs)
        results.append(f"{args}: {'equal' if same else 'DIFFERENT'}")
    return "tests/quantization_reference.dynamic_map_float32 against bitsandbytes.create_dynamic_map: " + ", ".join(
        results
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1 << 20, help="elements per data set (default 2^20)")
    parser.add_argument(
        "--bytes", action=argparse.BooleanOptionalAction, default=True,
        help="the table of state bytes per parameter (default on)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    peers = load_peers()
    print(machine_report())
    print(versions(peers))
    print(check_reference(peers))

    header = ["data", "bits", "map", "who", "mean |err|", "rms err", "median rel", "p99 rel",
              "jstep/who mean", "rms", "median rel"]  # fmt: skip
    print(f"\nquantization error, {args.size} elements per data set, stored once and read back\n")
    print(format_table(header, error_rows(peers, args.size), text_columns=4))
    print(
        """
nearest:  float64 reference: the nearest code of jstep's map in jstep's blocks: the floor for that map
jstep/who: jstep's figure / the row's (target <= 1.25 against bitsandbytes' 8 bits)
4 bits:   bitsandbytes: create_dynamic_map(True, 3, 4) through quantize_blockwise, block 128, one
          code per byte (it has no unsigned 4-bit map); torchao: AdamW4bit's maps and quantizer"""
    )
    if args.bytes:
        names = list(TREES)
        print("\noptimizer state bytes per parameter (float32 params; counted from the state init allocates)\n")
        print(format_table(["optimizer", *names, "target"], bytes_rows(peers)))
        counts = {name: build() for name, build in TREES.items()}
        print(
            "\n"
            + "\n".join(
                f"{name}: {sum(math.prod(s) for s in shapes.values()):,} parameters in {len(shapes)} leaves, "
                f"{sum(math.prod(s) for s in shapes.values() if math.prod(s) < 4096):,} of them in "
                f"{sum(math.prod(s) < 4096 for s in shapes.values())} leaves under 4096 elements"
                for name, shapes in counts.items()
            )
        )


if __name__ == "__main__":
    main()
