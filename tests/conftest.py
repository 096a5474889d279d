"""Test set-up: 8 fake CPU devices, set before anything imports jax."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Paths of a tiny SD pipeline folder and a tiny CLIP folder, written once per test session."""
    from gal_jax import tiny

    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "sd": tiny.write_tiny_stable_diffusion(root / "sd"),
        "clip": tiny.write_tiny_clip(root / "clip"),
    }


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """Paths of the whole embedded tiny default (models and concept data), built by make_tiny."""
    from gal_jax import tiny

    return tiny.make_tiny(tmp_path_factory.mktemp("tiny_assets"))


@pytest.fixture(scope="session")
def loaded_sd(tiny_models):
    """(StableDiffusion, params) of the tiny SD, loaded once per session; tests must not mutate it."""
    from gal_jax import models

    return models.load_stable_diffusion(tiny_models["sd"])


@pytest.fixture(scope="session")
def loaded_clip(tiny_models):
    """(ClipModel, params) of the tiny CLIP, loaded once per session; tests must not mutate it."""
    from gal_jax import models

    return models.load_clip(tiny_models["clip"])
