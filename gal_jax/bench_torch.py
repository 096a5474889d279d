"""The PyTorch workloads `gal-jax bench train|sample --config.bench.compare_torch` times beside ours.

Each is the same work as our compiled function, done the way PyTorch diffusers users do it, on the
same weights (the config's pipeline folder, or our random SD 1.5-sized weights written out in the
diffusers layout), the same device kind (CUDA when torch sees one, else CPU threads) and precision:

- `DreamBoothStep`: diffusers' train_dreambooth.py step: (cached) latents, noise, timesteps,
  add_noise, the frozen text encoder, the UNet, the DreamBooth loss with prior preservation and
  absolute example weights as ours, backward, global-norm clipping, AdamW. Eager, and through
  `torch.compile` where it works (a failure is reported, not raised).
- `pipeline_call`: StableDiffusionPipeline with the same scheduler, steps, guidance, resolution
  and batch, from prompt embeddings (as our chunk takes them) to uint8-ready numpy images.
- `--config.bench.authors`: the GAL authors' workflow as their scripts run it: generation one image
  per pipeline call in float32, and their float32 DreamBooth step at batch 1 (+1 class image),
  encoding every image with the VAE each step.

torch and diffusers come from the `test` extra; when they are missing the comparison says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

# Our sampler names -> the diffusers scheduler class of the same update rule.
TORCH_SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


def unavailable() -> str | None:
    """Returns why the PyTorch references cannot run here, or None when they can."""
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError as err:
        return f"skipped: PyTorch diffusers is not installed ({err}); pip install -e '.[test]'"
    return None


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(compute_dtype: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(compute_dtype), torch.float32)


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_pipeline(sd, params, folder: Path) -> Path:
    """Writes `sd` with `params` as a diffusers StableDiffusionPipeline folder (for random models
    that exist nowhere on disk); returns it."""
    import jax

    from gal_jax import tiny
    from gal_jax.nn import clip as nn_clip, unet as nn_unet, vae as nn_vae

    host = jax.device_get(params)
    nn_unet.save_params(sd.unet, host.unet, folder / "unet")
    nn_vae.save_params(sd.vae, host.vae, folder / "vae")
    (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
    nn_clip.save_params(sd.text_encoder, host.text_encoder, folder / "text_encoder")
    sd.tokenizer.save_pretrained(str(folder / "tokenizer"))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sd.scheduler_config, indent=2))
    (folder / "model_index.json").write_text(json.dumps(tiny._model_index(), indent=2))
    return folder


def pipeline_folder(sd, params, scratch: Path) -> Path:
    """Returns a diffusers folder holding `sd`'s models: its own when it was loaded from one."""
    if (Path(sd.path) / "model_index.json").exists():
        return Path(sd.path)
    return write_pipeline(sd, params, scratch / "pipeline")


class DreamBoothStep:
    """One DreamBooth optimisation step of PyTorch diffusers' UNet, as train_dreambooth.py runs it.

    `rows` examples, every other one a class (prior) example when `with_prior`; latents cached
    (`cached_latents`, as ours) or encoded by the VAE from pixels every step (the authors' way).
    """

    def __init__(self, folder: Path, train_config, *, rows: int, with_prior: bool, resolution: int,
                 cached_latents: bool, compute_dtype: str, compile: bool = False, seed: int = 0):
        import diffusers
        import torch
        import transformers

        self.device = torch_device()
        self.dtype = torch_dtype(compute_dtype)
        self.unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).to(self.device).train()
        self.vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", low_cpu_mem_usage=False).to(self.device).eval()
        self.text_encoder = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", low_cpu_mem_usage=False).to(self.device).eval()
        for frozen in (self.vae, self.text_encoder):
            frozen.requires_grad_(False)
        self.scheduler = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(), lr=train_config.learning_rate,
            betas=(train_config.adam_b1, train_config.adam_b2), eps=train_config.adam_eps,
            weight_decay=train_config.weight_decay)
        self.max_grad_norm = train_config.max_grad_norm
        self.prior_loss_weight = train_config.prior_loss_weight
        self.forward = torch.compile(self.unet) if compile else self.unet
        generator = torch.Generator().manual_seed(seed)
        latent = resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        channels = self.unet.config.in_channels
        self.input_ids = torch.randint(0, self.text_encoder.config.vocab_size - 1, (rows, 77), generator=generator)
        self.input_ids = self.input_ids[:, : self.text_encoder.config.max_position_embeddings].to(self.device)
        self.is_prior = (torch.arange(rows) % 2 == 1) if with_prior else torch.zeros(rows, dtype=torch.bool)
        self.is_prior = self.is_prior.to(self.device)
        self.weight = torch.ones(rows, device=self.device)
        if cached_latents:
            self.mean = torch.randn(rows, channels, latent, latent, generator=generator).to(self.device)
            self.std = torch.full_like(self.mean, 0.1)
            self.pixels = None
        else:
            self.pixels = (torch.rand(rows, 3, resolution, resolution, generator=generator) * 2 - 1).to(self.device)

    def _latents(self):
        import torch

        if self.pixels is None:
            return self.mean + self.std * torch.randn_like(self.mean)
        with torch.no_grad():
            posterior = self.vae.encode(self.pixels).latent_dist
            return posterior.sample() * self.vae.config.scaling_factor

    def __call__(self) -> float:
        import torch

        with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32):
            latents = self._latents()
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=self.device)
            noisy = self.scheduler.add_noise(latents, noise, timesteps)
            with torch.no_grad():
                context = self.text_encoder(self.input_ids)[0]
            prediction = self.forward(noisy, timesteps, context).sample
            target = (self.scheduler.get_velocity(latents, noise, timesteps)
                      if self.scheduler.config.prediction_type == "v_prediction" else noise)
        per_example = ((prediction.float() - target.float()) ** 2).mean(dim=(1, 2, 3)) * self.weight
        instance = per_example[~self.is_prior].sum() / max(int((~self.is_prior).sum()), 1)
        prior = per_example[self.is_prior].sum() / max(int(self.is_prior.sum()), 1)
        loss = instance + self.prior_loss_weight * prior
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize()
        return float(loss.detach())


def make_pipeline(folder: Path, sampler: str, compute_dtype: str, compile: bool = False):
    """Returns diffusers' StableDiffusionPipeline of `folder` with the scheduler of our `sampler`,
    on the torch device in `compute_dtype` (no safety checker, no progress bar)."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False, low_cpu_mem_usage=False,
        torch_dtype=torch_dtype(compute_dtype))
    pipe.scheduler = getattr(diffusers, TORCH_SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(torch_device())
    if compile:
        pipe.unet = __import__("torch").compile(pipe.unet)
    return pipe


def pipeline_call(pipe, *, images: int, steps: int, guidance_scale: float, resolution: int,
                  per_image: bool = False, seed: int = 0) -> Callable[[], Any]:
    """Returns a call generating `images` images of the empty prompt from prompt embeddings (our
    chunk's inputs) to numpy images: one pipeline call of the whole batch, or one per image
    (`per_image`, the authors' loop)."""
    import torch

    with torch.no_grad():
        ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids.to(pipe.device)
        embeds = pipe.text_encoder(ids)[0]
    generator = torch.Generator(pipe.device).manual_seed(seed)

    def run(count):
        batch = embeds.expand(count, -1, -1)
        return pipe(prompt_embeds=batch, negative_prompt_embeds=batch, num_inference_steps=steps,
                    guidance_scale=guidance_scale, height=resolution, width=resolution,
                    generator=generator, output_type="np").images

    def call():
        out = [run(1) for _ in range(images)] if per_image else run(images)
        synchronize()
        return out

    return call


def versions() -> dict[str, str]:
    import diffusers
    import torch

    return {"torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
            "torch_threads": str(torch.get_num_threads()), "torch_device": torch_device()}
