"""What leaves a participant, and how the consensus side reads it back.

On the way out, in this order: an adversarial participant corrupts its scores (a
simulation option); differential privacy clips each sample's score vector and adds Gaussian
noise; the payload is encoded (float32, float16, or the top-k scores per sample).
"""

from __future__ import annotations

import numpy as np

from fedmd_ray.config import ATTACKS
from fedmd_ray.privacy import sensitivity


def corrupt(scores: np.ndarray, attack: str, scale: float, rng: np.random.Generator) -> np.ndarray:
    """An adversary's scores: `random` noise of the honest scores' spread, `scaled` (negated
    and amplified by `scale`), or `label_flip` (class columns reversed, so each sample's
    favourite class moves)."""
    if attack == "random":
        return rng.normal(scores.mean(), scores.std() * scale, size=scores.shape).astype(np.float32)
    if attack == "scaled":
        return (-scale * scores).astype(np.float32)
    if attack == "label_flip":
        return np.ascontiguousarray(scores[:, ::-1])
    raise ValueError(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")


def privatise(
    scores: np.ndarray, clip: float, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """Clip every row to L2 norm `clip`, then add N(0, (noise_multiplier x sensitivity)^2)."""
    norms = np.linalg.norm(scores, axis=1, keepdims=True)
    clipped = scores * np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    if noise_multiplier > 0:
        std = noise_multiplier * sensitivity(clip, len(scores))
        clipped = clipped + rng.normal(0.0, std, size=scores.shape)
    return clipped.astype(np.float32)


def encode(scores: np.ndarray, payload: str, topk: int) -> np.ndarray | dict:
    if payload == "float16":
        return scores.astype(np.float16)
    if payload == "topk":
        k = min(topk, scores.shape[1])
        index = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        return {
            "indices": index.astype(np.int16),
            "values": np.take_along_axis(scores, index, axis=1).astype(np.float32),
            "classes": scores.shape[1],
        }
    return scores.astype(np.float32)


def decode(payload: np.ndarray | dict) -> np.ndarray:
    """Dense float32 scores. Top-k rows get their smallest kept score in the missing classes:
    a lower bound on what was left out, so the kept ranking survives averaging."""
    if isinstance(payload, dict):
        values, index = payload["values"], payload["indices"].astype(np.int64)
        dense = np.repeat(values.min(axis=1, keepdims=True), payload["classes"], axis=1)
        np.put_along_axis(dense, index, values, axis=1)
        return dense.astype(np.float32)
    return np.asarray(payload, dtype=np.float32)


def nbytes(payload: np.ndarray | dict) -> int:
    if isinstance(payload, dict):
        return int(payload["values"].nbytes + payload["indices"].nbytes)
    return int(payload.nbytes)
