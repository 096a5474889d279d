"""gal_jax: Generative Active Learning for image synthesis personalization, in JAX."""

import os
from pathlib import Path

__version__ = "0.1.0"

# Where the tiny models and JAX's persistent compilation cache live (GAL_JAX_CACHE); here, so that
# host_malloc can look at the cache before anything starts a thread.
CACHE_ROOT = Path(os.environ.get("GAL_JAX_CACHE", "~/.cache/gal_jax")).expanduser()
# "xla-lru", not the "xla" of earlier versions: a size-limited cache needs an access-time file beside
# every entry, and jax fails to write into a folder whose older entries lack them.
COMPILATION_CACHE = CACHE_ROOT / "xla-lru"
