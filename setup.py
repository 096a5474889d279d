"""gal_jax: Generative Active Learning for image synthesis personalization, in JAX/Flax."""

from setuptools import find_packages, setup

# Ranges the code is written for; launch/constraints.txt pins the combination CI tests (STACK.md).
# transformers is only the CLIP tokenizer here (4.57 and 5.x both work); the models are ours
# (gal_jax.nn), so neither diffusers nor PyTorch is needed to run anything.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.12",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml_collections>=1.1.0",
    "transformers>=4.57.6,<6",
    "tensorflow-datasets>=4.9.10",
    "array_record>=0.8.6",
    "grain>=0.2.18",
    "safetensors>=0.4",
    "absl-py",
    "pillow",
    "importlib_resources",
    "matplotlib",
    "tqdm",
    "filelock",  # jax needs it for the size-limited persistent compilation cache
]

setup(
    name="gal_jax",
    version="0.1.0",
    description="Generative Active Learning for image synthesis personalization (Stable Diffusion DreamBooth) in JAX",
    python_requires=">=3.11",
    packages=find_packages(include=["gal_jax", "gal_jax.*", "configs"]),
    # The BPE vocabulary and the trained tiny world's models (clip/, sd/<part>/, tiny_train.json).
    package_data={"configs": ["anchors/*.txt"], "gal_jax": ["assets/*", "assets/tiny_world/*", "assets/tiny_world/*/*", "assets/tiny_world/*/*/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "cpu": ["jax[cpu]>=0.10.2,<0.12"],
        "cuda": ["jax[cuda12]>=0.10.2,<0.12"],
        "tpu": ["jax[tpu]>=0.10.2,<0.12"],
        # The references: PyTorch diffusers/transformers in parity and export tests and in
        # `gal-jax bench --compare-torch`. Install torch==2.13.0 first on CPU machines: a bare
        # `torch` pulls several GB of CUDA. selenium drives Debian chromium in the browser tests.
        # peft: diffusers' load_lora_weights needs it (the LoRA export test loads ours with it).
        # pytest-xdist: pytest.ini runs the suite over several processes (`-n auto`, conftest.py).
        "test": ["pytest", "pytest-xdist>=3.8", "chex", "selenium", "torch>=2.11", "diffusers>=0.39.0", "peft>=0.17"],
    },
    entry_points={"console_scripts": ["gal-jax=gal_jax.main:run"]},
)
