"""One JAX process of the multi-host check: train a round, generate a grid, gather it, score it.

    python tests/multihost_worker.py PROCESS_ID PORT WORKDIR [NUM_PROCESSES [driver]]

With `driver`, each process instead runs the whole GAL loop (driver.run) in WORKDIR/run.

Every process sees 8 // NUM_PROCESSES fake CPU devices; with NUM_PROCESSES > 1 the processes join
through `jax.distributed` on 127.0.0.1:PORT (gloo collectives), so the mesh spans 8 devices in all
either way. Process 0 writes the tiny models, concept and training set under WORKDIR/shared; the
others wait at a barrier before reading them. Each process writes WORKDIR/result_<id>.json
(checksums, similarities, timings) and WORKDIR/result_<id>.npz (trained UNet params, images).
"""

import os
import sys

TOTAL_DEVICES = 8

if __name__ == "__main__":
    _NUM_PROCESSES = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    # Before jax is imported: the device count is read once, at backend start-up.
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={TOTAL_DEVICES // _NUM_PROCESSES}"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

TRAIN_STEPS = 3
BATCH_SIZE = 4  # instance examples a step: 8 rows with their class images, one per device
PROMPTS = ["a <tiny-teapot> teapot in park", "a <tiny-teapot> teapot on the moon"]
PLAIN_PROMPTS = ["a teapot in park", "a teapot on the moon", "a teapot"]
NUM_PER_PROMPT = 4


def tiny_config():
    """Returns the tiny CPU config cut down to a 3-step round and a 2-step sampler."""
    from configs import tiny_cpu

    config = tiny_cpu.get_config()
    config.train.steps = TRAIN_STEPS
    config.train.batch_size = BATCH_SIZE
    config.train.log_every = TRAIN_STEPS
    config.train.checkpoint_every = TRAIN_STEPS
    config.train.adam_eps = 1e-6  # as train_test: eps 1e-8 amplifies float noise in tiny grads
    config.sample.steps = 2
    return config


def start(process_id: int, port: int, num_processes: int) -> None:
    """Joins the other processes (gloo collectives on CPU); a no-op for a single process."""
    if num_processes == 1:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=120,
    )


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name`."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def write_models(shared: Path) -> dict[str, Path]:
    """Returns the tiny model and concept paths under `shared`, written by process 0 only."""
    from gal_jax import tiny, tiny_data

    if jax.process_index() == 0:
        tiny.make_tiny(shared, trained=False)
    barrier("tiny models written")
    return {"sd": shared / "sd", "clip": shared / "clip", **tiny_data.concept_paths(shared / "data")}


def write_train_set(paths: dict[str, Path], out_dir: Path, tokenize) -> Path:
    """Returns the training set folder, written by process 0 only (the others wait for it)."""
    from gal_jax import data

    if jax.process_index() == 0:
        data.write_training_set(
            data.load_concept(paths["object_concept"]),
            data.list_class_images(paths["reg_dir"]),
            "a teapot",
            out_dir,
            tokenize,
            64,
        )
    barrier("training set written")
    return out_dir


def flat_params(params) -> dict[str, np.ndarray]:
    """Returns the params as a flat {'a/b/c': numpy} dict, gathered on every process."""
    host = jax.device_get(params)  # the data-only mesh replicates params: readable everywhere
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(host, sep="/").items()}


def run(process_id: int, port: int, workdir: Path, num_processes: int) -> dict:
    """Returns this process's results after training, generation and scoring."""
    from gal_jax import models, sample, score, sharding, trainer as trainer_lib

    timings = {}
    began = time.perf_counter()
    start(process_id, port, num_processes)
    if jax.device_count() != TOTAL_DEVICES:
        raise RuntimeError(f"expected {TOTAL_DEVICES} global devices, got {jax.device_count()}")
    mesh = sharding.make_mesh(data=TOTAL_DEVICES, fsdp=1)
    config = tiny_config()
    paths = write_models(workdir / "shared" / "tiny")
    sd, params = models.load_stable_diffusion(paths["sd"])
    train_set = write_train_set(paths, workdir / "shared" / "train_set", sd.tokenize)
    timings["setup_s"] = time.perf_counter() - began

    now = time.perf_counter()
    trainer = trainer_lib.Trainer(config, sd, mesh)
    result, metrics = trainer.train_round(params, train_set, workdir / "checkpoints",
                                          progress=False)
    timings["train_s"] = time.perf_counter() - now
    unet = result.unet
    trained = dataclasses.replace(params, unet=unet)

    now = time.perf_counter()
    generator = sample.Generator.from_config(config, sd, mesh)
    images = generator.generate(trained, PROMPTS, [0, 1], 0, NUM_PER_PROMPT, 0, progress=False)
    host_images = sample.to_host(images, NUM_PER_PROMPT)
    timings["generate_s"] = time.perf_counter() - now

    now = time.perf_counter()
    clip, clip_params = models.load_clip(paths["clip"])
    scorer = score.Scorer(clip, clip_params, mesh, batch_size=8)
    anchor_index = np.repeat(np.arange(len(PROMPTS)), NUM_PER_PROMPT)
    sim_anchor, sim_plain = scorer.similarities(images, anchor_index, PROMPTS, PLAIN_PROMPTS)
    timings["score_s"] = time.perf_counter() - now

    params_flat = flat_params(unet)
    np.savez(workdir / f"result_{process_id}.npz", images=host_images,
             **{f"param:{k}": v for k, v in params_flat.items()})
    barrier("results written")
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "loss": metrics["loss"],
        "param_checksum": float(sum(np.abs(v).astype(np.float64).sum() for v in params_flat.values())),
        "image_checksum": int(host_images.astype(np.int64).sum()),
        "image_shape": list(host_images.shape),
        "sim_anchor": np.asarray(sim_anchor).tolist(),
        "sim_plain": np.asarray(sim_plain).tolist(),
        "timings": timings,
    }


def run_driver(process_id: int, port: int, workdir: Path, num_processes: int) -> dict:
    """Runs the whole GAL loop (driver.run) in a workdir shared by every process; returns its records."""
    from gal_jax import driver

    start(process_id, port, num_processes)
    config = tiny_config()
    config.model.tiny_dir = str(workdir / "tiny")
    config.train.batch_size = 8
    config.sample.num_per_prompt = 4
    config.sample.max_images_per_device = 4
    config.gal.k = 2
    config.gal.rounds = 2
    report = driver.run(config, workdir / "run")
    return {"process_index": jax.process_index(), "report": str(report),
            "records": [r.to_json() for r in driver.read_records(workdir / "run")]}


def main(argv: list[str]) -> None:
    if len(argv) not in (4, 5, 6):
        raise SystemExit(__doc__)
    process_id, port, workdir = int(argv[1]), int(argv[2]), Path(argv[3])
    num_processes = int(argv[4]) if len(argv) > 4 else 2
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    if len(argv) > 5 and argv[5] == "driver":
        result = run_driver(process_id, port, workdir, num_processes)
        (workdir / f"result_{process_id}.json").write_text(json.dumps(result, indent=1))
        if num_processes > 1:
            jax.distributed.shutdown()
        return
    result = run(process_id, port, workdir, num_processes)
    (workdir / f"result_{process_id}.json").write_text(json.dumps(result, indent=1))
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv)
