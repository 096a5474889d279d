"""`gal-jax bench train|sample --config.bench.compare_torch/authors`: PyTorch diffusers' DreamBooth
step and pipeline on our weights, timed interleaved with ours, reported as ratios."""

import diffusers
import jax
import numpy as np
import pytest
import torch

from configs import tiny_cpu
from gal_jax import bench, bench_torch


def _config(tiny_models, **bench_fields):
    config = tiny_cpu.get_config()
    config.model.sd_path, config.model.clip_path = str(tiny_models["sd"]), str(tiny_models["clip"])
    config.sample.steps, config.sample.max_images_per_device = 2, 1
    config.train.batch_size = 4  # with prior rows: one per device of the 8
    config.bench.iters, config.bench.warmup, config.bench.torch_compile = 2, 0, False
    config.bench.update(bench_fields)
    return config


@pytest.mark.parametrize("target, unit, references", [
    ("train", "samples", ("torch_eager", "authors")),
    ("sample", "images", ("torch_pipeline", "authors")),
])
def test_compare_torch_and_the_authors_workflow_report_ratios(tiny_models, target, unit, references):
    result = bench.run(target, _config(tiny_models, compare_torch=True, authors=True))
    assert result["torch_device"] == "cpu" and result["torch_version"] == torch.__version__
    assert result[f"interleaved_ours_{unit}_per_s"] > 0
    for name in references:
        assert result[f"{name}_s"] > 0 and result[f"{name}_setup_s"] > 0, result
        # Per item: the authors' train step has 2 rows to our 8; their generation is 1 image a call.
        throughput_ratio = result[f"interleaved_ours_{unit}_per_s"] / result[f"{name}_{unit}_per_s"]
        assert result[f"ours_vs_{name}"] == pytest.approx(throughput_ratio, rel=0.02, abs=0.006)
    assert "torch_compile_s" not in result and "torch_pipeline_compile_s" not in result


def test_a_reference_that_cannot_run_is_reported_not_raised(tiny_models, monkeypatch):
    monkeypatch.setattr(bench_torch, "DreamBoothStep", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no inductor")))
    result = bench.run("train", _config(tiny_models, compare_torch=True))
    assert result["torch_eager"] == "skipped: RuntimeError: no inductor"
    assert "ours_vs_torch_eager" not in result and result["step_s_median"] > 0
    monkeypatch.setattr(bench_torch, "unavailable", lambda: "skipped: PyTorch diffusers is not installed")
    assert bench.compare_train(None, None, None, None, rows=2, with_prior=True, cached_latents=True) == {
        "torch": "skipped: PyTorch diffusers is not installed"}


def test_the_torch_dreambooth_step_trains_the_unet_on_both_halves(tiny_models):
    config = tiny_cpu.get_config()
    step = bench_torch.DreamBoothStep(tiny_models["sd"], config.train, rows=4, with_prior=True, resolution=64,
                                      cached_latents=False, compute_dtype="float32")
    before = [p.detach().clone() for p in step.unet.parameters()]
    loss = step()
    assert np.isfinite(loss) and step.is_prior.tolist() == [False, True, False, True]
    assert any(not torch.equal(a, b) for a, b in zip(before, step.unet.parameters()))
    assert not any(p.requires_grad for p in step.text_encoder.parameters())


def test_random_models_are_written_as_a_pipeline_diffusers_loads(tmp_path, loaded_sd):
    sd, params = loaded_sd
    folder = bench_torch.write_pipeline(sd, params, tmp_path / "pipeline")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False)
    kernel = np.asarray(jax.device_get(params.unet["conv_in"]["kernel"]))
    np.testing.assert_array_equal(pipe.unet.conv_in.weight.detach().numpy(), kernel.transpose(3, 2, 0, 1))
    assert pipe.scheduler.config.num_train_timesteps == sd.scheduler_config["num_train_timesteps"]
    call = bench_torch.pipeline_call(pipe, images=2, steps=2, guidance_scale=7.5, resolution=sd.resolution,
                                     per_image=True)
    images = call()
    assert len(images) == 2 and images[0].shape == (1, sd.resolution, sd.resolution, 3)


def test_interleaved_timing_runs_every_call_once_per_round():
    order = []
    times = bench.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                  iters=2, warmup=1)
    assert order == ["a", "b"] * 3 and [len(t) for t in times.values()] == [2, 2]


def test_bench_unet_times_ours_beside_diffusers_flax_and_torch_interleaved(tiny_models):
    config = _config(tiny_models, profile=True)
    result = bench.run("unet", config)
    assert result["rows"] == 2 and result["latent_size"] == 16
    for kind in ("forward", "grad"):
        for name in ("diffusers_flax", "torch"):
            assert result[f"ours_vs_{name}_{kind}"] == pytest.approx(
                result[f"{name}_{kind}_s"] / result[f"ours_{kind}_s"], abs=0.006)
        assert f"ours_{kind}_profile.top1" in result
