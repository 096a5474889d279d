"""DINOv2 image embeddings for the DINO image-similarity metric (optional, beside IMG-ALN).

Runs PyTorch transformers on the host, as the authors' evaluator does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class DinoEmbedder:
    """DINOv2 image embeddings: mean-pooled last hidden state, L2-normalised (the authors' DINOEvaluator).

    Loads a transformers-layout folder (config.json, weights, preprocessor_config.json), e.g. a local
    copy of facebook/dinov2-base, and runs it with PyTorch on the host.
    """

    def __init__(self, path: str | Path, *, batch_size: int = 32):
        import transformers

        transformers.utils.logging.set_verbosity_error()
        path = Path(path).expanduser()
        if not (path / "config.json").is_file() or not (path / "preprocessor_config.json").is_file():
            raise FileNotFoundError(
                f"{path}: not a transformers DINOv2 folder (needs config.json and preprocessor_config.json)"
            )
        # The slow (PIL) processor, as the authors' evaluator used.
        self.processor = transformers.AutoImageProcessor.from_pretrained(path, use_fast=False)
        self.model = transformers.AutoModel.from_pretrained(path).eval()
        self.batch_size = int(batch_size)

    def image_embeddings(self, images: Any) -> np.ndarray:
        """Returns L2-normalised embeddings (n, hidden) of uint8 (n, H, W, 3) images."""
        import jax
        import torch

        images = np.asarray(jax.device_get(images))
        pooled = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = list(images[start : start + self.batch_size])
                inputs = self.processor(images=batch, return_tensors="pt")
                pooled.append(self.model(**inputs).last_hidden_state.mean(dim=1).numpy())
        embeddings = np.concatenate(pooled).astype(np.float64)
        return embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
