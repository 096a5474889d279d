"""`gal-jax bench train|sample|score|unet|load`: compile time, steady throughput, MFU and peak memory.

`unet` times our UNet beside the classes it replaced (diffusers' Flax UNet, PyTorch diffusers).
`load` reads a UNet folder straight onto the mesh and reports its time and the peak host memory
it took (with `bench.model='sd15'`, SD 1.5-sized random weights written to a temporary folder).

Each benchmark compiles the same function the GAL loop runs, times `bench.iters` calls after
`bench.warmup`, and counts the matmul and convolution FLOPs of one call from its jaxpr with loops
counted as often as they run (`gal_jax.flops`; XLA's cost analysis, shown beside it, counts a loop
body once: a 50-step sampler as one step). MFU divides achieved FLOP/s by the detected device's
peak dense bf16 FLOP/s; it reads "n/a" where the peak is unknown (CPU). `bench.model='sd15'` swaps in SD
1.5 / CLIP ViT-B/32-sized models with random weights, `bench.model='sdxl'` SDXL base-sized ones.
Each benchmark builds only the model it times (score: CLIP alone), and compiles through the
persistent compilation cache.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gal_jax import flops as flops_lib
from gal_jax import io_utils, models, op_profile, sharding

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


def time_interleaved(calls: dict[str, Callable[[], Any]], iters: int, warmup: int) -> dict[str, list[float]]:
    """Returns each call's wall times (each blocked on) over `iters` rounds in which every call
    runs once in turn, after `warmup` such rounds: drifts of a shared, noisy machine hit all of
    them alike."""
    for _ in range(warmup):
        for call in calls.values():
            jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return times


def time_calls(call: Callable[[], Any], iters: int, warmup: int) -> list[float]:
    """Returns the wall time of `iters` calls of `call` (each blocked on), after `warmup` calls."""
    return time_interleaved({"call": call}, iters, warmup)["call"]


def profile_figures(config, prefix: str, compiled: jax.stages.Compiled, call: Callable[[], Any]) -> dict:
    """Returns where one call's op time goes (`gal_jax.op_profile`, flattened under `prefix`) when
    `config.bench.profile` is set, else nothing. `call` must run `compiled`."""
    if not config.bench.get("profile"):
        return {}
    iters = max(1, min(config.bench.iters, 3))
    return op_profile.flat_figures(prefix, op_profile.profile(compiled, call, iters))


def summarize(name: str, compile_s: float, times: list[float], items: int, unit: str,
              flops: float | None, mesh, compiled: jax.stages.Compiled | None = None) -> dict:
    """Returns the benchmark figures: compile time, step times, throughput, MFU, memory.

    `flops` is the global count of one call (`gal_jax.flops`); `compiled`, when given, adds XLA's
    own figure for comparison (loop bodies counted once).
    """
    step = statistics.median(times)
    devices = mesh.devices.size
    peak = peak_flops(mesh.devices.flat[0])
    mfu = flops / step / (peak * devices) if flops and peak else None
    # cost_analysis of an SPMD-partitioned executable counts one device's share of the work.
    xla_flops = compiled_flops(compiled) if compiled is not None else None
    return {
        "benchmark": name,
        "device": f"{devices} x {mesh.devices.flat[0].device_kind}",
        "compile_s": round(compile_s, 3),
        "step_s_median": round(step, 5),
        "step_s_min": round(min(times), 5),
        "step_s_max": round(max(times), 5),
        f"{unit}_per_step": items,
        f"{unit}_per_s": round(items / step, 3),
        "tflop_per_step": round(flops / 1e12, 4) if flops else None,
        "xla_cost_tflop_per_step": round(xla_flops * devices / 1e12, 4) if xla_flops else None,
        "mfu": f"{100 * mfu:.1f}%" if mfu else "n/a",
        "peak_memory_gib": round(peak_memory_bytes() / 2**30, 2) if peak_memory_bytes() else "n/a",
    }


RANDOM_MODELS = tuple(models.MODEL_SIZES)  # bench.model values besides 'config'


def random_model_size(config) -> str:
    """Returns config.bench.model when it names a random-weight architecture (models.MODEL_SIZES),
    '' for 'config' (the config's own models); raises ValueError for anything else."""
    name = config.bench.model
    if name != "config" and name not in RANDOM_MODELS:
        raise ValueError(f"config.bench.model={name!r}; expected 'config' or one of {', '.join(RANDOM_MODELS)}")
    return "" if name == "config" else name


def random_stable_diffusion(config, *, abstract: bool = False) -> tuple[Any, Any]:
    """Returns (sd, params) of bench.model's architecture with random weights in the config's
    dtypes and attention (`abstract`: ShapeDtypeStructs, nothing allocated). Random weights need
    only the real CLIP vocabulary, which ships with the package."""
    from gal_jax import tiny

    unet, vae, text, text_2 = models.MODEL_SIZES[random_model_size(config)]
    with tempfile.TemporaryDirectory(prefix="gal_jax_tokenizer_") as tokenizer_dir:
        tiny.write_tokenizer(Path(tokenizer_dir))
        sd, params = models.random_stable_diffusion(
            Path(tokenizer_dir), tiny.SD1_SCHEDULER, unet_config=unet, vae_config=vae, text_config=text,
            text_config_2=text_2, param_dtype=config.model.param_dtype, compute_dtype=config.model.compute_dtype,
            abstract=abstract,
        )
    return sd.with_attention(config.model.attention), params


def build_models(config, target: str) -> tuple[Any, Any]:
    """Returns (model, params) of what `target` runs: CLIP for 'score', Stable Diffusion for
    'sample' and 'train'; the config's models, or SD 1.5 / CLIP B/32-sized random ones."""
    from gal_jax import driver, inputs, tiny

    if random_model_size(config) and target == "score":
        with tempfile.TemporaryDirectory(prefix="gal_jax_tokenizer_") as tokenizer_dir:
            tiny.write_tokenizer(Path(tokenizer_dir))
            clip, params = models.random_clip(Path(tokenizer_dir))
            return clip.with_attention(config.model.attention), params
    if random_model_size(config):
        return random_stable_diffusion(config)
    if target == "score":
        return driver.load_clip(config, inputs.resolve(config, need=("clip",)).clip)
    return driver.load_sd(config, inputs.resolve(config, need=("sd",)).sd)


def bench_sample(config, sd, sd_params, mesh) -> dict:
    """Returns the figures of one compiled generation chunk (steps x CFG UNet + VAE decode)."""
    from gal_jax import sample

    generator = sample.Generator.from_config(config, sd, mesh)
    images = generator.chunk_size(None, sd_params)
    start = time.perf_counter()
    compiled, args = generator.compiled_chunk(sd_params, images)
    compile_s = time.perf_counter() - start
    times = time_calls(lambda: compiled(*args), config.bench.iters, config.bench.warmup)
    flops = flops_lib.count(generator.chunk_function, *args)
    result = summarize("sample", compile_s, times, images, "images", flops, mesh, compiled)
    result["s_per_denoising_step"] = round(result["step_s_median"] / config.sample.steps, 5)
    if config.bench.get("compare_torch") or config.bench.get("authors"):
        result |= compare_sample(config, sd, sd_params, lambda: compiled(*args), images)
    return result | profile_figures(config, "profile", compiled, lambda: compiled(*args))


def bench_score(config, clip, clip_params, mesh) -> dict:
    """Returns the figures of one compiled CLIP image-embedding batch."""
    from gal_jax import score

    scorer = score.Scorer(clip, clip_params, mesh, batch_size=config.gal.score_batch)
    size = config.data.resolution
    start = time.perf_counter()
    compiled, args = scorer.compiled_batch(size, size)
    compile_s = time.perf_counter() - start
    times = time_calls(lambda: compiled(*args), config.bench.iters, config.bench.warmup)
    flops = flops_lib.count(scorer.image_embedding_function, *args)
    return (summarize("score", compile_s, times, scorer.batch_size, "images", flops, mesh, compiled)
            | profile_figures(config, "profile", compiled, lambda: compiled(*args)))


def bench_train(config, sd, sd_params, mesh) -> dict:
    """Returns the figures of one compiled train step (global batch of config.train.batch_size)
    of config.train.method (its first stage); for a method other than DreamBooth, DreamBooth's
    step on the same model and batch too (its figures as dreambooth_*), with the ratios."""
    from gal_jax import personalize

    result = _bench_train_step(config, sd, sd_params, mesh)
    if personalize.method_name(config) == "dreambooth":
        return result
    full = config.copy_and_resolve_references()
    with full.unlocked():
        full.train.method, full.train.stages, full.train.trainable = "dreambooth", {}, ""
    dreambooth = _bench_train_step(full, sd, sd_params, mesh)
    for key in ("compile_s", "step_s_median", "samples_per_s", "compiled_memory_gib", "peak_memory_gib"):
        result[f"dreambooth_{key}"] = dreambooth[key]
    result["step_time_vs_dreambooth"] = round(result["step_s_median"] / dreambooth["step_s_median"], 3)
    result["memory_vs_dreambooth"] = round(result["compiled_memory_gib"] / result["dreambooth_compiled_memory_gib"], 3)
    return result


def bench_trainer(config, sd, mesh):
    """Returns the Trainer of config.train.method for benchmarks: the new-token methods get a
    placeholder token "<bench>" initialised from "photo"."""
    from gal_jax import personalize
    from gal_jax.trainer import Trainer

    sd, method = personalize.prepare(config, sd, placeholder="<bench>", class_word="photo")
    return Trainer(config, sd, mesh, method)


def _bench_train_step(config, sd, sd_params, mesh) -> dict:
    from gal_jax import memory

    trainer = bench_trainer(config, sd, mesh)
    sd, method = trainer.sd, trainer.method
    rows, with_prior = train_rows(config)
    start = time.perf_counter()
    compiled = trainer.compile_for(sd_params, rows)
    compile_s = time.perf_counter() - start
    state, batch, rng, frozen = _train_step_inputs(config, trainer, sd, sd_params, mesh, rows)

    def step():
        nonlocal state
        state, metrics = compiled(state, batch, rng, frozen)  # the state is donated: carry it
        return metrics

    flops = flops_lib.count(_train_step_function(trainer, sd), state, batch, rng, frozen)
    times = time_calls(step, config.bench.iters, config.bench.warmup)
    result = summarize("train", compile_s, times, rows, "samples", flops, mesh, compiled)
    result["method"] = trainer_method_label(config)
    # What XLA plans for the step (arguments, outputs, temporaries): a peak memory on every backend.
    result["compiled_memory_gib"] = round(memory.of_compiled(compiled).peak / 2**30, 4)
    if (config.bench.get("compare_torch") or config.bench.get("authors")) and method.name == "dreambooth":
        result |= compare_train(config, sd, sd_params, step, rows=rows, with_prior=with_prior,
                                cached_latents=trainer.cache_latents)
    return result | profile_figures(config, "profile", compiled, step)


def train_rows(config) -> tuple[int, bool]:
    """Returns (examples of one train step's global batch, whether half of them are class examples)."""
    with_prior = config.train.with_prior and config.data.kind == "object"
    return config.train.batch_size * config.train.grad_accum_steps * (2 if with_prior else 1), with_prior


def _train_step_inputs(config, trainer, sd, sd_params, mesh, rows: int) -> tuple:
    """Returns (state, synthetic batch, rng, frozen inputs) of a train step of `rows` examples."""
    from gal_jax import train

    trained, rest = trainer.split_for(sd_params)
    state = train.init_train_state(trained, trainer.optimizer, mesh, trainer.model_axes, trainer.rules)
    frozen = train.place_frozen(sd_params.vae, rest, sd, mesh, trainer.rules)
    batch = _synthetic_batch(
        train.abstract_batch(sd, mesh, num_examples=rows, resolution=config.data.resolution,
                             cached_latents=trainer.cache_latents)
    )
    return state, batch, jax.random.key(config.train.seed), frozen


def _train_step_function(trainer, sd) -> Callable:
    from gal_jax import train

    return functools.partial(train.train_step, sd=sd, config=trainer.step_config, optimizer=trainer.optimizer)


def round_flops(config, mesh) -> dict[str, float]:
    """Returns the FLOPs of one GAL round's work units, counted from their jaxprs (loops counted as
    often as they run): one train step at the global batch, one generated image (all denoising
    steps with CFG + VAE decode) and one scored image."""
    from gal_jax import sample, score

    sd, sd_params = build_models(config, "train")
    trainer = bench_trainer(config, sd, mesh)
    rows, _ = train_rows(config)
    step_inputs = _train_step_inputs(config, trainer, trainer.sd, sd_params, mesh, rows)
    generator = sample.Generator.from_config(config, sd, mesh)
    images = generator.chunk_size(None, sd_params)
    _, chunk_args = generator.compiled_chunk(sd_params, images)
    clip, clip_params = build_models(config, "score")
    scorer = score.Scorer(clip, clip_params, mesh, batch_size=config.gal.score_batch)
    _, score_args = scorer.compiled_batch(config.data.resolution, config.data.resolution)
    return {
        "train_step": flops_lib.count(_train_step_function(trainer, sd), *step_inputs),
        "generated_image": flops_lib.count(generator.chunk_function, *chunk_args) / images,
        "scored_image": flops_lib.count(scorer.image_embedding_function, *score_args) / scorer.batch_size,
    }


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def bench_round(config, mesh) -> dict:
    """Runs GAL for two rounds in a temporary workdir (the loop as `gal-jax run` runs it, compiles
    included, through the persistent cache) and returns the first round's wall time per phase
    (train; generate = denoising + VAE decode, with the PNG writing that overlaps it; write = the
    PNG writing left once the last chunk is done; score) beside each phase's FLOPs, its
    achieved TFLOP/s and, where the device's peak is known, its compute floor and time / floor."""
    from gal_jax import driver

    if config.bench.model != "config":
        return {"benchmark": "round", "skipped": "a round runs the config's own models and concept "
                f"(bench.model={config.bench.model!r} swaps in random weights with nothing to personalize)"}
    round_config = config.copy_and_resolve_references()
    with round_config.unlocked():
        round_config.gal.rounds = 2  # round 1 queries (generate, score); the last round only trains
        round_config.eval.enabled = False
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gal_jax_bench_round_") as workdir:
        driver.run(round_config, workdir)
        records = driver.read_records(workdir)
    run_s = time.perf_counter() - start
    first = next(record for record in records if record.scored)
    images = len(first.directions) * config.sample.num_per_prompt
    counts = round_flops(config, mesh)
    work = {"train": counts["train_step"] * config.train.steps, "generate": counts["generated_image"] * images,
            "score": counts["scored_image"] * images, "write": 0.0}
    peak = peak_flops(mesh.devices.flat[0])
    result = {"benchmark": "round", "device": f"{mesh.devices.size} x {mesh.devices.flat[0].device_kind}",
              "run_s (2 rounds, loads and compiles included)": round(run_s, 2),
              "round": first.round, "train_steps": config.train.steps, "images": images}
    return result | phase_figures(first.timings, work, peak * mesh.devices.size if peak else None)


def phase_figures(timings: dict[str, float], work: dict[str, float], peak: float | None) -> dict:
    """Returns each phase's seconds, TFLOPs and achieved TFLOP/s and, given the mesh's peak FLOP/s,
    its compute floor (work / peak) and time / floor, with the round's totals."""
    result = {"round_s": round(sum(timings.values()), 2)}
    floor_total = 0.0
    for phase, seconds in timings.items():
        result[f"{phase}_s"] = round(seconds, 3)
        flops = work.get(phase)
        if flops:
            result[f"{phase}_tflop"] = _significant(flops / 1e12)
            result[f"{phase}_tflop_per_s"] = _significant(flops / 1e12 / seconds)
            if peak:
                floor = flops / peak
                floor_total += floor
                result[f"{phase}_floor_s"] = _significant(floor)
                result[f"{phase}_vs_floor"] = round(seconds / floor, 1)
    if peak:
        result["round_floor_s"] = _significant(floor_total)
        result["round_vs_floor"] = round(result["round_s"] / floor_total, 1)
    else:
        result["floor"] = "n/a: no peak FLOP/s is known for this device (CPU); the floors need a GPU or TPU"
    return result


def _comparison(config, ours: Callable[[], Any], ours_items: int, references: dict, unit: str) -> dict:
    """Times `ours` interleaved with each reference ({name: (call, items per call)}) and returns
    their medians, throughputs and ratios (reference time per item / ours: above 1, ours is faster)."""
    calls = {"ours": ours, **{name: call for name, (call, _) in references.items()}}
    times = time_interleaved(calls, config.bench.iters, config.bench.warmup)
    ours_per_item = statistics.median(times["ours"]) / ours_items
    figures = {"interleaved_ours_s": round(statistics.median(times["ours"]), 5),
               f"interleaved_ours_{unit}_per_s": round(1 / ours_per_item, 3)}
    for name, (_, items) in references.items():
        median = statistics.median(times[name])
        figures[f"{name}_s"] = round(median, 5)
        figures[f"{name}_{unit}_per_s"] = round(items / median, 3)
        figures[f"ours_vs_{name}"] = round(median / items / ours_per_item, 2)
    return figures


def _compare(config, sd, sd_params, ours: Callable[[], Any], ours_items: int, unit: str,
             references: Callable[[Path], dict[str, Callable[[], tuple[Callable[[], Any], int]]]]) -> dict:
    """Returns `ours` timed interleaved with the PyTorch references that `references(folder)` makes
    ({name: () -> (call, items per call)}) from a diffusers folder of `sd`'s weights (written to a
    temporary folder, removed afterwards, when `sd` does not come from one). A reference that
    fails to build or run is reported with why, not raised."""
    from gal_jax import bench_torch

    why = bench_torch.unavailable()
    if not why and getattr(sd, "is_sdxl", False):  # bench_torch builds StableDiffusionPipeline, one text encoder
        why = "not compared: the PyTorch references are SD 1.x/2.x pipelines, not SDXL yet"
    if why:
        return {"torch": why}
    built, figures = {}, {}
    with tempfile.TemporaryDirectory(prefix="gal_jax_bench_torch_") as scratch:
        folder = bench_torch.pipeline_folder(sd, sd_params, Path(scratch))
        for name, make in references(folder).items():
            try:
                start = time.perf_counter()
                call, items = make()
                call()  # the first call: torch.compile compiles here, CUDA warms up
                figures[f"{name}_setup_s"] = round(time.perf_counter() - start, 3)
                built[name] = (call, items)
            except Exception as err:  # noqa: BLE001 - a reference that cannot run is reported, not fatal
                figures[name] = f"skipped: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        return {**bench_torch.versions(), **figures, **_comparison(config, ours, ours_items, built, unit)}


def compare_train(config, sd, sd_params, step: Callable[[], Any], *, rows: int, with_prior: bool,
                  cached_latents: bool) -> dict:
    """Returns our train step's time beside PyTorch diffusers' DreamBooth step at the same batch,
    resolution and precision (eager; torch.compile with bench.torch_compile) and, with
    bench.authors, the authors' float32 step at batch 1 (+1 class example) encoding pixels."""
    from gal_jax import bench_torch

    def references(folder: Path) -> dict:
        def torch_step(compile_unet: bool, **settings):
            return lambda: (bench_torch.DreamBoothStep(folder, config.train, compile=compile_unet, **settings),
                            settings["rows"])

        same = dict(rows=rows, with_prior=with_prior, resolution=config.data.resolution,
                    cached_latents=cached_latents, compute_dtype=config.model.compute_dtype)
        build = {}
        if config.bench.get("compare_torch"):
            build["torch_eager"] = torch_step(False, **same)
            if config.bench.get("torch_compile"):
                build["torch_compile"] = torch_step(True, **same)
        if config.bench.get("authors"):
            build["authors"] = torch_step(False, rows=2 if with_prior else 1, with_prior=with_prior,
                                          resolution=config.data.resolution, cached_latents=False,
                                          compute_dtype="float32")
        return build

    return _compare(config, sd, sd_params, step, rows, "samples", references)


def compare_sample(config, sd, sd_params, chunk: Callable[[], Any], images: int) -> dict:
    """Returns our generation chunk's time beside diffusers' StableDiffusionPipeline at the same
    scheduler, steps, guidance, resolution, batch and precision (eager; torch.compile of the UNet
    with bench.torch_compile) and, with bench.authors, the pipeline one image a call in float32."""
    from gal_jax import bench_torch

    settings = dict(images=images, steps=config.sample.steps, guidance_scale=config.sample.guidance_scale,
                    resolution=sd.resolution)

    def references(folder: Path) -> dict:
        def pipeline(compute_dtype: str, compile_unet: bool = False, per_image: bool = False):
            def make():
                pipe = bench_torch.make_pipeline(folder, config.sample.sampler, compute_dtype, compile_unet)
                return bench_torch.pipeline_call(pipe, per_image=per_image, **settings), images
            return make

        build = {}
        if config.bench.get("compare_torch"):
            build["torch_pipeline"] = pipeline(config.model.compute_dtype)
            if config.bench.get("torch_compile"):
                build["torch_pipeline_compile"] = pipeline(config.model.compute_dtype, compile_unet=True)
        if config.bench.get("authors"):
            build["authors"] = pipeline("float32", per_image=True)
        return build

    return _compare(config, sd, sd_params, chunk, images, "images", references)


def bench_unet(config, sd, sd_params, mesh) -> dict:
    """Returns our UNet's forward (the sampler's CFG batch) and DreamBooth-gradient times beside
    the classes it replaced, on the same weights and one device: diffusers' Flax UNet (0.39, the
    last release with Flax; from the test extra) and, where installed, PyTorch diffusers eager
    (CPU threads or CUDA). Each reference is skipped, saying why, when it cannot be imported."""
    from gal_jax import sample

    del mesh  # one device: the comparison is per kernel, not per mesh
    device = jax.local_devices()[0]
    # Conditional + unconditional rows of a chunk (auto, 0: the bound it falls back to on CPU).
    rows = 2 * (config.sample.max_images_per_device or sample.AUTO_FALLBACK_PER_DEVICE)
    # bench.latent_size: a smaller latent grid than the model's (an SD 1.5-sized gradient at 64x64
    # in three frameworks at once does not fit a 24 GiB host).
    size = config.bench.get("latent_size") or sd.resolution // sd.vae_scale_factor
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((rows, sd.latent_channels, size, size)).astype(np.float32)
    timesteps = rng.integers(0, 1000, rows).astype(np.int32)
    context = rng.standard_normal((rows, *sd.context_shape)).astype(np.float32)
    inputs = jax.device_put((latents, timesteps, context), device)
    params = jax.device_put(sd_params.unet, device)
    iters, warmup = config.bench.iters, config.bench.warmup
    result = {"benchmark": "unet", "device": f"1 x {device.device_kind}", "rows": rows, "latent_size": size,
              "compute_dtype": str(jnp.dtype(sd.unet.dtype))}

    calls = {"forward": {}, "grad": {}}  # {kind: {implementation: call}}, timed interleaved
    profiles = {}  # appended after the comparison figures

    def compile_both(name: str, apply) -> None:
        forward = jax.jit(apply)
        grad = jax.jit(jax.grad(lambda p, x, t, c: jnp.mean(jnp.square(apply(p, x, t, c).astype(jnp.float32) - x))))
        for kind, fn in (("forward", forward), ("grad", grad)):
            start = time.perf_counter()
            compiled = fn.lower(params, *inputs).compile()
            result[f"{name}_{kind}_compile_s"] = round(time.perf_counter() - start, 3)
            calls[kind][name] = functools.partial(compiled, params, *inputs)
            if name == "ours":
                profiles.update(profile_figures(config, f"ours_{kind}_profile", compiled, calls[kind][name]))

    compile_both("ours", lambda p, x, t, c: sd.apply_unet(p, x, t, c))
    old = _diffusers_flax_unet(sd)
    if isinstance(old, str):
        result["diffusers_flax"] = old
    else:
        compile_both("diffusers_flax", lambda p, x, t, c: old.apply({"params": p}, x, t, c).sample)
    torch_calls = _torch_unet_calls(sd, sd_params, (latents, timesteps, context))
    if isinstance(torch_calls, str):
        result["torch"] = torch_calls
    else:
        for kind in calls:
            calls[kind]["torch"] = torch_calls[kind]
    for kind, implementations in calls.items():  # interleaved: ours, Flax, torch, ours, ...
        times = time_interleaved(implementations, iters, warmup)
        for name, samples in times.items():
            result[f"{name}_{kind}_s"] = round(statistics.median(samples), 5)
        for name in implementations:
            if name != "ours":
                result[f"ours_vs_{name}_{kind}"] = round(result[f"{name}_{kind}_s"] / result[f"ours_{kind}_s"], 2)
    result["note"] = "x_vs_y: y's time / ours (above 1: ours is faster), timed interleaved"
    return result | profiles


def _diffusers_flax_unet(sd):
    """Returns diffusers' FlaxUNet2DConditionModel of `sd.unet`'s config (its param tree is ours),
    or why it cannot be had."""
    try:
        from diffusers import FlaxUNet2DConditionModel
    except ImportError as err:
        return f"skipped: diffusers' Flax UNet is not importable ({err}); it lives in diffusers<=0.39"
    fields = FlaxUNet2DConditionModel.__dataclass_fields__
    config = {k: v for k, v in sd.unet.config.to_dict().items() if k in fields}
    return FlaxUNet2DConditionModel(**config, dtype=sd.unet.dtype)


def _torch_unet_calls(sd, sd_params, inputs):
    """Returns PyTorch diffusers' eager UNet forward and gradient on the same weights as calls
    ({"forward": call, "grad": call}), or why they cannot be run."""
    from gal_jax import bench_torch

    why = bench_torch.unavailable()
    if why:
        return why
    import torch
    from diffusers import UNet2DConditionModel

    from gal_jax.nn import unet as nn_unet

    device, dtype = bench_torch.torch_device(), bench_torch.torch_dtype(jnp.dtype(sd.unet.dtype))
    with tempfile.TemporaryDirectory(prefix="gal_jax_bench_unet_") as folder:
        nn_unet.save_params(sd.unet, jax.device_get(sd_params.unet), folder)
        unet = UNet2DConditionModel.from_pretrained(folder).to(device, dtype)
    latents, timesteps, context = (torch.from_numpy(np.asarray(x)).to(device) for x in inputs)
    latents, context = latents.to(dtype), context.to(dtype)
    sync = bench_torch.synchronize

    def forward():
        with torch.no_grad():
            unet(latents, timesteps, context)
        sync()

    def grad():
        unet.zero_grad(set_to_none=True)
        ((unet(latents, timesteps, context).sample.float() - latents.float()) ** 2).mean().backward()
        sync()

    return {"forward": forward, "grad": grad}


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


BENCHMARKS = {"sample": bench_sample, "train": bench_train, "score": bench_score, "unet": bench_unet}


# ---------------------------------------------------------------------------------------------
# Loading: time and peak host memory of reading a UNet straight onto the mesh
# ---------------------------------------------------------------------------------------------


def host_memory_kib(field: str) -> int | None:
    """Returns a field of /proc/self/status in KiB (VmRSS, VmHWM), None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_host_memory() -> bool:
    """Resets this process's peak RSS (VmHWM) to its current RSS; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def write_random_unet(folder: Path, unet_config: dict, *, seed: int = 0, dtype="float32") -> Path:
    """Writes a diffusers UNet folder of `unet_config` with random N(0, 0.02) weights, one tensor
    generated and written at a time (an SD 1.5-sized UNet never sits in memory); returns `folder`."""
    from gal_jax.nn import unet as nn_unet
    from gal_jax.nn import weights

    model = nn_unet.UNet2DConditionModel(nn_unet.UNetConfig.from_dict(unet_config))
    rng = np.random.default_rng(seed)
    abstract = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(dtype)),
                                      nn_unet.abstract_params(model))
    weights.write_random_diffusers_folder(abstract, model.config.to_dict(), folder, rng)
    return folder


def bench_load(config, mesh) -> dict:
    """Returns the time and peak host memory of reading the UNet weights onto `mesh` by the
    trainer's shardings (`bench.model='sd15'`: SD 1.5-sized random weights in a temporary folder)."""
    from gal_jax import inputs

    with tempfile.TemporaryDirectory(prefix="gal_jax_bench_load_") as scratch:
        if random_model_size(config):
            unet = models.MODEL_SIZES[random_model_size(config)][0]
            folder = write_random_unet(Path(scratch) / "unet", unet, dtype=config.model.param_dtype)
        else:
            folder = inputs.resolve(config, need=("sd",)).sd / "unet"
        return load_figures(folder, mesh, config.model.param_dtype, sharding.logical_rules(config.mesh.rules))


def load_figures(folder: Path, mesh, param_dtype, rules=sharding.DEFAULT_LOGICAL_RULES) -> dict:
    """Returns the figures of loading the diffusers UNet `folder` onto `mesh`: seconds, GiB/s,
    the peak host memory it added, what the devices hold, and the host overhead beyond it."""
    from gal_jax.nn import unet as nn_unet

    model = nn_unet.UNet2DConditionModel(nn_unet.read_config(folder / "config.json"), param_dtype=param_dtype)
    shardings = sharding.param_shardings(
        nn_unet.abstract_params(model), mesh, nn_unet.logical_partition_specs(model), rules
    )
    file_bytes = sum(file.stat().st_size for file in folder.glob("*.safetensors"))
    measured = reset_peak_host_memory()
    before = host_memory_kib("VmRSS")
    start = time.perf_counter()
    params = jax.block_until_ready(nn_unet.load_params(model, folder, shardings=shardings))
    seconds = time.perf_counter() - start
    peak = host_memory_kib("VmHWM")
    leaves = jax.tree_util.tree_leaves(params)
    device_bytes = sum(shard.data.nbytes for leaf in leaves for shard in leaf.addressable_shards)
    largest = max(leaf.nbytes for leaf in leaves)
    # On CPU the "devices" are this process's memory: what they hold is not loading overhead.
    on_host = jax.devices()[0].platform == "cpu"
    added = (peak - before) * 1024 if measured and peak and before else None
    mib = lambda n: round(n / 2**20, 1) if n is not None else "n/a"  # noqa: E731
    return {
        "benchmark": "load",
        "params": sum(leaf.size for leaf in leaves),
        "weights_mib": mib(file_bytes),
        "load_s": round(seconds, 2),
        "mib_per_s": round(file_bytes / 2**20 / seconds, 1),
        "devices": len(mesh.devices.flat),
        "device_resident_mib": mib(device_bytes),
        "peak_host_added_mib": mib(added),
        "host_overhead_mib": mib(added - device_bytes if added is not None and on_host else added),
        "largest_tensor_mib": mib(largest),
    }


def abstract_stable_diffusion(config) -> tuple[Any, Any]:
    """Returns (sd, params as ShapeDtypeStructs) of the config's SD model (`bench.model='sd15'`:
    SD 1.5-sized), in the config's dtypes and attention; nothing model-sized is allocated."""
    from gal_jax import driver, inputs, memory

    if random_model_size(config):
        return random_stable_diffusion(config, abstract=True)
    sd, params = driver.load_sd(config, inputs.resolve(config, need=("sd",)).sd)
    return sd, memory.abstract(params)


def trainer_method_label(config) -> str:
    """Returns config.train.method, with its first stage's name for a multi-stage method (what
    the train figures measure)."""
    from gal_jax import personalize

    stages = personalize.stages_from_config(config)
    return personalize.method_name(config) + (f" (stage {stages[0].name})" if len(stages) > 1 else "")


def bench_memory(config, mesh) -> dict:
    """Returns one device's memory need of the train step and of a generation chunk, from XLA's
    buffer assignment of both compiled for the models' shapes (`gal_jax.memory`: nothing is
    allocated, so SD 1.5-sized configs are checked on any host), next to bench.memory_budget_gib."""
    from gal_jax import memory, sample

    sd, params = abstract_stable_diffusion(config)
    rows, _ = train_rows(config)
    start = time.perf_counter()
    train_need = memory.of_compiled(bench_trainer(config, sd, mesh).compile_for(params, rows))
    generator = sample.Generator.from_config(config, sd, mesh)
    images = generator.chunk_size(None, params)
    sample_need = memory.of_compiled(generator.compile_abstract(params, images))
    result = {
        "benchmark": "memory",
        "device": f"{mesh.devices.size} x {mesh.devices.flat[0].device_kind}",
        "mesh": " ".join(f"{axis}={size}" for axis, size in mesh.shape.items() if axis != "tensor" or size > 1),
        "compile_s": round(time.perf_counter() - start, 1),
        "train_examples": rows,
        "train_method": trainer_method_label(config),
        "train_remat": config.train.remat,
        **train_need.figures("train."),
        "sample_images_per_chunk": images,
        **sample_need.figures("sample."),
    }
    budget = float(config.bench.get("memory_budget_gib") or 0)
    if budget:
        result.update(budget_gib=budget, fits=memory.fits(budget, train=train_need, sample=sample_need))
    return result


# `bench all`: the loop's three compiled functions, then a whole round, in one table.
ALL = ("train", "sample", "score", "round")
TARGETS = (*BENCHMARKS, "load", "memory", "round", "all")


def _run_one(target: str, config, mesh) -> dict:
    if target == "load":
        return bench_load(config, mesh)
    if target == "round":
        return bench_round(config, mesh)
    if target == "memory":
        return bench_memory(config, mesh)
    model, params = build_models(config, target)
    if target == "train":  # on the devices a run trains on (config.mesh.train_devices)
        mesh = sharding.train_mesh_from_config(config.mesh, mesh)
    return BENCHMARKS[target](config, model, params, mesh)


def run(target: str, config) -> dict:
    """Runs one benchmark (or `all`: train, sample, score and round, their figures prefixed by the
    benchmark's name), prints its figures and returns them (also written to bench.out)."""
    if target not in TARGETS:
        raise ValueError(f"unknown benchmark {target!r}; expected one of {', '.join(TARGETS)}")
    # A rerun on the same machine then loads its executables instead of compiling (compile_s
    # reads the load time): device time is scarce.
    io_utils.enable_compilation_cache()
    mesh = sharding.mesh_from_config(config.mesh)
    if target == "all":
        result = {"benchmark": "all", "device": f"{mesh.devices.size} x {mesh.devices.flat[0].device_kind}"}
        for name in ALL:
            part = _run_one(name, config, mesh)
            result.update({f"{name}.{key}": value for key, value in part.items() if key not in ("benchmark", "device")})
    else:
        result = _run_one(target, config, mesh)
    result.update(model=config.bench.model, compilation_cache=str(io_utils.COMPILATION_CACHE))
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    if config.bench.out:
        io_utils.write_json(Path(config.bench.out), result)
    if config.bench.get("record"):
        append_record(Path(config.bench.record), target, result)
    return result


def record_markdown(target: str, result: dict, *, command: str | None = None) -> str:
    """Returns one run's section for BENCHMARKS.md: a heading with the date and device, the
    versions and command that produced it, then its figures as a table."""
    import datetime
    import platform
    import sys
    from importlib import metadata

    versions = []
    for package in ("jax", "jaxlib", "flax", "torch", "diffusers"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    device = result.get("device") or f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    command = command or " ".join(["gal-jax", *sys.argv[1:]])
    rows = "\n".join(f"| {key} | {value} |" for key, value in result.items())
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"### bench {target}: {date}, {device}\n\n"
        f"- host: {platform.machine()}, {os.cpu_count()} CPU cores; Python {platform.python_version()}; "
        f"{', '.join(versions)}\n"
        f"- command: `{command}`\n\n"
        f"| figure | value |\n|---|---|\n{rows}\n"
    )


def append_record(file: Path, target: str, result: dict) -> None:
    """Appends `result`'s section to the markdown `file` (created with a title if absent); the
    file is replaced whole, so an interrupted write leaves the old records intact."""
    old = file.read_text() if file.exists() else "# Benchmarks\n"
    io_utils.atomic_write_bytes(file, (old.rstrip("\n") + "\n\n" + record_markdown(target, result)).encode())
