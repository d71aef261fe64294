"""What a participant is built from: a small, picklable description that travels to its
actor (or pool worker), where participant.py builds the model. No torch here: the driver
makes one per participant without loading it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedmd_ray.config import SharingConfig, TrainConfig
from fedmd_ray.faults import Fault
from fedmd_ray.plugins import Code


@dataclass
class ParticipantSpec:
    index: int
    name: str
    model: str
    seed: int
    num_classes: int
    image_shape: tuple[int, ...]
    """The shape of one input sample: (C, H, W) for images, (F,) for features, (T,) for tokens."""
    train: TrainConfig
    device: str = "auto"
    torch_threads: int | None = None
    sharing: SharingConfig = field(default_factory=SharingConfig)
    adversary: bool = False
    """Sends corrupted scores (sharing.attack) instead of its own."""
    faults: tuple[Fault, ...] = ()
    """Simulated failures planned for this participant (faults.py)."""
    code: Code | None = None
    """Where user code shipped to this participant's actor lives (None: import as usual)."""
    model_factory: object = None
    """The factory of a model registered on the driver with register_model (pickled)."""
    digest_function: object = None
    """A digest loss registered on the driver with register_digest_loss (pickled)."""
    public_mean: np.ndarray | None = None
    """data.scaling='mean_image': the public data's per-pixel mean image in [0, 1] (C, H, W)."""
    private_mean: np.ndarray | None = None
    """... and the private dataset's, for private training and test images."""
