"""gal_jax: Generative Active Learning for image synthesis personalization, in JAX/Flax."""

from setuptools import find_packages, setup

# Versions that work together (../shared/STACK.md): diffusers 0.39 and transformers 4.57 are the last
# releases with Flax models; JAX 0.10.2 is the newest for Python 3.11.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    "diffusers==0.39.0",
    "transformers==4.57.6",
    "huggingface_hub<1.0",
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",
    "grain==0.2.18",
    "safetensors",
    "chex",
    "absl-py",
    "pillow",
    "importlib_resources",
    "matplotlib",
    "tqdm",
]

setup(
    name="gal_jax",
    version="0.1.0",
    description="Generative Active Learning for image synthesis personalization (Stable Diffusion DreamBooth) in JAX",
    python_requires=">=3.11",
    packages=find_packages(include=["gal_jax", "gal_jax.*", "configs"]),
    # The BPE vocabulary and the trained tiny world's models (clip/, sd/<part>/, tiny_train.json).
    package_data={"gal_jax": ["assets/*", "assets/tiny_world/*", "assets/tiny_world/*/*", "assets/tiny_world/*/*/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # PyTorch writes the tiny models' folders (make-tiny --train; the random-init test models)
        # and is the reference in parity tests; the default run needs none of it.
        # Install torch==2.13.0 first on CPU machines: a bare `torch` pulls several GB of CUDA.
        "torch": ["torch==2.13.0"],
        "cpu": ["jax[cpu]==0.10.2"],
        "cuda": ["jax[cuda12]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2"],
        "test": ["pytest", "chex", "selenium"],  # selenium drives Debian chromium in the review-page test
    },
    entry_points={"console_scripts": ["gal-jax=gal_jax.main:run"]},
)
