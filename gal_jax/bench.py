"""`gal-jax bench train|sample|score`: compile time, steady throughput, MFU and peak memory.

Each benchmark compiles the same function the GAL loop runs, times `bench.iters` calls after
`bench.warmup`, and reads the FLOPs of one call from XLA's cost analysis. MFU divides achieved
FLOP/s by the detected device's peak dense bf16 FLOP/s; it reads "n/a" where the peak is unknown
(CPU). `bench.model='sd15'` swaps in SD 1.5 / CLIP ViT-B/32-sized models with random weights.
Each benchmark builds only the model it times (score: CLIP alone), and compiles through the
persistent compilation cache.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from gal_jax import io_utils, models, sharding

# Peak dense bf16 FLOP/s per device (vendor figures), keyed by a substring of device_kind.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device: jax.Device) -> float | None:
    """Returns the peak bf16 FLOP/s of a device, or None when unknown (CPU)."""
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in device.device_kind.lower():
            return flops
    return None


def compiled_flops(compiled: jax.stages.Compiled) -> float | None:
    """Returns the FLOPs of one call of a compiled function, from XLA's cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def peak_memory_bytes() -> int | None:
    """Returns the largest peak bytes in use over local devices (None where not reported)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def time_calls(call: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    """Returns the wall time of `iters` calls of `call` (each blocked on), after `warmup` calls."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return times


def summarize(name: str, compile_s: float, times: list[float], items: int, unit: str,
              flops: float | None, mesh) -> dict:
    """Returns the benchmark figures: compile time, step times, throughput, MFU, memory."""
    step = statistics.median(times)
    devices = mesh.devices.size
    peak = peak_flops(mesh.devices.flat[0])
    # cost_analysis of an SPMD-partitioned executable counts one device's share of the work.
    total_flops = flops * devices if flops is not None else None
    mfu = total_flops / step / (peak * devices) if total_flops and peak else None
    return {
        "benchmark": name,
        "device": f"{devices} x {mesh.devices.flat[0].device_kind}",
        "compile_s": round(compile_s, 3),
        "step_s_median": round(step, 5),
        "step_s_min": round(min(times), 5),
        "step_s_max": round(max(times), 5),
        f"{unit}_per_step": items,
        f"{unit}_per_s": round(items / step, 3),
        "tflop_per_step": round(total_flops / 1e12, 4) if total_flops else None,
        "mfu": f"{100 * mfu:.1f}%" if mfu else "n/a",
        "peak_memory_gib": round(peak_memory_bytes() / 2**30, 2) if peak_memory_bytes() else "n/a",
    }


def build_models(config, target: str) -> tuple[Any, Any]:
    """Returns (model, params) of what `target` runs: CLIP for 'score', Stable Diffusion for
    'sample' and 'train'; the config's models, or SD 1.5 / CLIP B/32-sized random ones."""
    from gal_jax import inputs, tiny

    if config.bench.model not in ("config", "sd15"):
        raise ValueError(f"config.bench.model={config.bench.model!r}; expected 'config' or 'sd15'")
    if config.bench.model == "sd15":
        # Random weights need only the real CLIP vocabulary, which ships with the package.
        with tempfile.TemporaryDirectory(prefix="gal_jax_tokenizer_") as tokenizer_dir:
            tiny.write_tokenizer(Path(tokenizer_dir))
            if target == "score":
                return models.random_clip(Path(tokenizer_dir))
            return models.random_stable_diffusion(
                Path(tokenizer_dir), tiny.SD1_SCHEDULER,
                param_dtype=config.model.param_dtype, compute_dtype=config.model.compute_dtype,
            )
    if target == "score":
        return models.load_clip(inputs.resolve(config, need=("clip",)).clip)
    from gal_jax import driver

    return driver.load_sd(config, inputs.resolve(config, need=("sd",)).sd)


def bench_sample(config, sd, sd_params, mesh) -> dict:
    """Returns the figures of one compiled generation chunk (steps x CFG UNet + VAE decode)."""
    from gal_jax import sample

    generator = sample.Generator.from_config(config, sd, mesh)
    images = generator.chunk_size(config.sample.max_images_per_device * sharding.num_batch_shards(mesh))
    start = time.perf_counter()
    compiled, args = generator.compiled_chunk(sd_params, images)
    compile_s = time.perf_counter() - start
    times = time_calls(lambda: compiled(*args), config.bench.iters, config.bench.warmup)
    result = summarize("sample", compile_s, times, images, "images", compiled_flops(compiled), mesh)
    result["s_per_denoising_step"] = round(result["step_s_median"] / config.sample.steps, 5)
    return result


def bench_score(config, clip, clip_params, mesh) -> dict:
    """Returns the figures of one compiled CLIP image-embedding batch."""
    from gal_jax import score

    scorer = score.Scorer(clip, clip_params, mesh, batch_size=config.gal.score_batch)
    size = config.data.resolution
    start = time.perf_counter()
    compiled, args = scorer.compiled_batch(size, size)
    compile_s = time.perf_counter() - start
    times = time_calls(lambda: compiled(*args), config.bench.iters, config.bench.warmup)
    return summarize("score", compile_s, times, scorer.batch_size, "images", compiled_flops(compiled), mesh)


def bench_train(config, sd, sd_params, mesh) -> dict:
    """Returns the figures of one compiled train step (global batch of config.train.batch_size)."""
    from gal_jax import train
    from gal_jax.trainer import Trainer

    trainer = Trainer(config, sd, mesh)
    with_prior = config.train.with_prior and config.data.kind == "object"
    rows = config.train.batch_size * config.train.grad_accum_steps * (2 if with_prior else 1)
    start = time.perf_counter()
    compiled = trainer.compile_for(sd_params, rows)
    compile_s = time.perf_counter() - start
    state = train.init_train_state(sd_params.unet, trainer.optimizer, mesh, sd.logical_axes().unet, trainer.rules)
    frozen = train.place_frozen(sd_params, sd, mesh, trainer.rules)
    batch = _synthetic_batch(
        train.abstract_batch(sd, mesh, num_examples=rows, resolution=config.data.resolution,
                             cached_latents=trainer.cache_latents)
    )
    rng = jax.random.key(config.train.seed)

    def step():
        nonlocal state
        state, metrics = compiled(state, batch, rng, frozen)  # the state is donated: carry it
        return metrics

    times = time_calls(step, config.bench.iters, config.bench.warmup)
    result = summarize("train", compile_s, times, rows, "samples", compiled_flops(compiled), mesh)
    if config.train.grad_accum_steps > 1:
        result["note"] = "tflop_per_step/mfu count one micro-batch (XLA costs a scan body once)"
    return result


def _synthetic_batch(specs: dict) -> dict:
    """Returns a batch of the given shapes and shardings: unit weights, every other row a prior."""

    def fill(name, spec):
        if name == "weight":
            value = np.ones(spec.shape, spec.dtype)
        elif name == "is_prior":
            value = np.arange(spec.shape[0]) % 2 == 1
        else:
            value = np.random.default_rng(0).standard_normal(spec.shape).astype(spec.dtype)
        return jax.device_put(value, spec.sharding)

    return {name: fill(name, spec) for name, spec in specs.items()}


BENCHMARKS = {"sample": bench_sample, "train": bench_train, "score": bench_score}


def run(target: str, config) -> dict:
    """Runs one benchmark, prints its figures and returns them (also written to bench.out)."""
    if target not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {target!r}; expected one of {', '.join(BENCHMARKS)}")
    # A rerun on the same machine then loads its executables instead of compiling (compile_s
    # reads the load time): device time is scarce.
    io_utils.enable_compilation_cache()
    model, params = build_models(config, target)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    result = BENCHMARKS[target](config, model, params, mesh)
    result.update(model=config.bench.model, compilation_cache=str(io_utils.COMPILATION_CACHE))
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if config.bench.out:
        io_utils.write_json(Path(config.bench.out), result)
    return result
