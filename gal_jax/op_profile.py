"""Where a compiled function's time goes, per op kind and per layer, from a device trace.

`profile(compiled, call, iters)` runs `call` (which must run `compiled`) under `jax.profiler.trace`,
reads the trace back (`jax.profiler.ProfileData`) and sums each executed HLO instruction's time.
The compiled module's HLO text says what each instruction is: a fusion is named by the heaviest op
it contains (convolution > matmul > reduction > elementwise > data movement), and its metadata's
`op_name` names the Flax module path that emitted it, so time can also be grouped by layer (the
innermost module, e.g. `attn1`, `conv2`, `norm1`) and by pass (forward / backward).

Only instructions the runtime executes as one unit are counted (XLA:CPU thunks, GPU kernels); the
control flow around them (while, conditional, call) is not, since its body's ops are. Op time is
summed across the threads that ran it, so on a multi-core CPU it may exceed the wall time.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import re
import tempfile
from typing import Any, Callable

import jax

# Op kinds in the order a fusion containing several is named by.
KINDS = ("convolution", "matmul", "reduction", "elementwise", "data movement", "other")

_DATA_MOVEMENT = {
    "bitcast", "broadcast", "concatenate", "copy", "dynamic-slice", "dynamic-update-slice", "gather",
    "iota", "pad", "reshape", "reverse", "scatter", "slice", "transpose", "copy-start", "copy-done",
    "get-tuple-element", "tuple", "parameter", "constant", "bitcast-convert", "all-gather",
    "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
}
_CONTROL = {"while", "conditional", "call", "async-start", "async-done", "async-update"}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) (?:\(.*\) -> .*)?\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply)=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]*)"')


# Path components of an op_name that are transformations or control flow, not Flax modules.
_NOT_MODULES = {"while", "body", "cond", "closed_call", "checkpoint", "remat", "rematted_computation",
                "custom_vjp_call", "custom_jvp_call", "pjit", "shard_map", "branch_0_fun", "branch_1_fun"}


@dataclasses.dataclass(frozen=True)
class Instruction:
    """What one HLO instruction is: its opcode, the op kind it counts as, the Flax layer that
    emitted it (innermost module name, indices stripped) and whether it is in the backward pass."""

    opcode: str
    kind: str
    layer: str
    backward: bool
    shape: str = ""


_UNKNOWN = Instruction("?", "other", "(not in this module)", False)


def _kind_of_opcodes(opcodes: set[str], custom_targets: set[str]) -> str:
    if "convolution" in opcodes or any("conv" in t.lower() for t in custom_targets):
        return "convolution"
    if "dot" in opcodes or any(("matmul" in t.lower() or "gemm" in t.lower()) for t in custom_targets):
        return "matmul"
    if opcodes & {"reduce", "reduce-window", "select-and-scatter", "sort"}:
        return "reduction"
    if opcodes - _DATA_MOVEMENT:
        return "elementwise" if opcodes - _DATA_MOVEMENT - {"custom-call", "rng", "rng-bit-generator"} else "other"
    return "data movement"


def layer_of(op_name: str) -> tuple[str, bool]:
    """Returns (layer, backward) for an HLO `op_name` such as
    'jit(f)/transpose(jvp(UNet2DConditionModel))/up_blocks_1/attentions_0/.../attn1/dot_general':
    the innermost module (digits after an underscore stripped: 'attn1', 'resnets', 'norm1'), or
    '(top level)' for ops outside any module."""
    backward = "transpose(" in op_name
    parts = [re.sub(r"^(?:\w+\()+|\)+$", "", p) for p in op_name.split("/")[1:]]
    modules = [p for p in parts[:-1] if p and p not in _NOT_MODULES]
    if not modules:
        return "(top level)", backward
    # 'attentions_0' -> 'attentions', 'attn1' stays: the index of a repeated block is noise here.
    return re.sub(r"_\d+$", "", modules[-1]), backward


def parse_hlo(text: str) -> dict[str, Instruction]:
    """Returns every instruction of an HLO module's text (`compiled.as_text()`) by name."""
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    current = None
    for line in text.splitlines():
        if current is None:
            header = _COMPUTATION.match(line)
            if header:
                current = computations.setdefault(header.group(1), [])
            continue
        if line.startswith("}"):
            current = None
            continue
        match = _INSTRUCTION.match(line)
        if match:
            current.append(match.groups())

    def contents(name: str, seen: set[str]) -> tuple[set[str], set[str], str]:
        """Opcodes, custom-call targets and the first op_name inside a called computation."""
        opcodes, targets, op_name = set(), set(), ""
        if name in seen:
            return opcodes, targets, op_name
        seen.add(name)
        for _, _, opcode, rest in computations.get(name, ()):
            opcodes.add(opcode)
            targets.update(_CUSTOM_TARGET.findall(rest))
            op_name = op_name or next(iter(_OP_NAME.findall(rest)), "")
            if opcode in ("fusion", "call", "custom-call"):
                for called in _CALLS.findall(rest):
                    inner = contents(called, seen)
                    opcodes |= inner[0]
                    targets |= inner[1]
                    op_name = op_name or inner[2]
        return opcodes, targets, op_name

    # Computations inlined into an instruction (fusion bodies, reducers) are not executed as units.
    inlined = {called for entries in computations.values() for _, _, opcode, rest in entries
               if opcode not in _CONTROL for called in _CALLS.findall(rest)}
    instructions = {}
    for computation, entries in computations.items():
        if computation in inlined:
            continue
        for name, shape, opcode, rest in entries:
            op_name = next(iter(_OP_NAME.findall(rest)), "")
            if opcode in _CONTROL:
                kind = "control"
            elif opcode == "fusion" or (opcode == "custom-call" and _CALLS.search(rest)):
                called = _CALLS.search(rest)
                opcodes, targets, inner_name = contents(called.group(1), set()) if called else (set(), set(), "")
                kind = _kind_of_opcodes(opcodes - {"parameter"}, targets)
                op_name = op_name or inner_name
            else:
                kind = _kind_of_opcodes({opcode}, set(_CUSTOM_TARGET.findall(rest)))
            # XLA drops the metadata of some ops it creates (e.g. convolution weight gradients).
            layer, backward = layer_of(op_name) if op_name else ("(no metadata)", False)
            instructions[name] = Instruction(opcode, kind, layer, backward, re.sub(r"\{[^}]*\}", "", shape))
    return instructions


def trace_op_times(call: Callable[[], Any], iters: int) -> dict[str, float]:
    """Runs `call` `iters` times under the profiler and returns seconds per call of every HLO
    instruction the runtime reported (summed over threads and over the modules it ran)."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory(prefix="gal_jax_profile_") as folder:
        with jax.profiler.trace(folder):
            for _ in range(iters):
                jax.block_until_ready(call())
        files = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)
        if not files:
            raise RuntimeError(f"the profiler wrote no trace under {folder}")
        data = ProfileData.from_file(files[0])
    totals: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    totals[stats["hlo_op"]] += event.duration_ns
    return {name: ns / 1e9 / iters for name, ns in totals.items()}


def breakdown(op_seconds: dict[str, float], instructions: dict[str, Instruction], top: int = 8) -> dict:
    """Returns the op time per call grouped by kind, by layer and by pass, with shares in percent
    and the `top` heaviest instructions. Control-flow instructions are left out (their bodies'
    ops are counted); ops missing from the module text (another module's) count as 'other'."""
    by_kind: collections.Counter = collections.Counter()
    by_layer: collections.Counter = collections.Counter()
    by_pass: collections.Counter = collections.Counter()
    counted = {}
    for name, seconds in op_seconds.items():
        info = instructions.get(name, _UNKNOWN)
        if info.kind == "control":
            continue
        counted[name] = seconds
        by_kind[info.kind] += seconds
        by_layer[info.layer] += seconds
        by_pass["backward" if info.backward else "forward"] += seconds
    total = sum(counted.values())

    def shares(counter):
        return {key: round(100 * value / total, 1) if total else 0.0 for key, value in counter.most_common()}

    heaviest = sorted(counted.items(), key=lambda item: -item[1])[:top]
    return {
        "op_seconds_per_call": round(total, 5),
        "by_kind_pct": shares(by_kind),
        "by_layer_pct": dict(list(shares(by_layer).items())[:top]),
        "by_pass_pct": shares(by_pass),
        "top_ops": [
            {"op": name, "kind": info.kind, "layer": info.layer, "shape": info.shape,
             "pass": "backward" if info.backward else "forward", "ms": round(1e3 * seconds, 2)}
            for name, seconds in heaviest
            for info in [instructions.get(name, _UNKNOWN)]
        ],
    }


def profile(compiled: jax.stages.Compiled, call: Callable[[], Any], iters: int = 2, top: int = 8) -> dict:
    """Returns `breakdown` of `call` (which runs `compiled`), traced over `iters` calls."""
    jax.block_until_ready(call())  # warm: the first call may still load or autotune
    return breakdown(trace_op_times(call, iters), parse_hlo(compiled.as_text()), top)


def flat_figures(prefix: str, result: dict) -> dict:
    """Returns a breakdown as flat `prefix.by_kind.convolution: 31.2%`-style figures for a bench
    table, the heaviest ops as 'name (kind, layer): ms'."""
    figures = {f"{prefix}.op_s_per_call": result["op_seconds_per_call"]}
    for group in ("by_kind_pct", "by_pass_pct", "by_layer_pct"):
        for key, value in result[group].items():
            figures[f"{prefix}.{group.removesuffix('_pct')}.{key}"] = f"{value}%"
    for rank, op in enumerate(result["top_ops"], 1):
        figures[f"{prefix}.top{rank}"] = (
            f"{op['ms']} ms: {op['op']} {op['shape']} ({op['kind']}, {op['layer']}, {op['pass']})")
    return figures
