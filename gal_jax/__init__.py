"""gal_jax: Generative Active Learning for image synthesis personalization, in JAX."""

__version__ = "0.1.0"
