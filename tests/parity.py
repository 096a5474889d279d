"""Parity against the PyTorch references: errors relative to the reference's largest magnitude."""

import numpy as np


def errors(ours, reference) -> tuple[float, float]:
    """Returns (max abs error, max abs error / max abs reference)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape
    error = float(np.abs(ours - reference).max())
    return error, error / float(np.abs(reference).max())


def assert_parity(ours, reference, what: str, *, tolerance: float) -> None:
    """Asserts the relative error is at most `tolerance`, printing both errors under `what`."""
    absolute, relative = errors(ours, reference)
    print(f"parity {what}: max abs {absolute:.2e}, relative {relative:.2e}")
    assert relative <= tolerance, what
