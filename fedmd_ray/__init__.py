"""fedmd_ray: FedMD (heterogeneous federated learning via model distillation) on Ray."""

from fedmd_ray.checks import from_dict
from fedmd_ray.config import Config
from fedmd_ray.errors import FedMDError
from fedmd_ray.fedmd import RunResult, run
from fedmd_ray.plugins import register_consensus, register_dataset, register_digest_loss, register_model

__all__ = [
    "Config",
    "FedMDError",
    "RunResult",
    "from_dict",
    "register_consensus",
    "register_dataset",
    "register_digest_loss",
    "register_model",
    "run",
]
__version__ = "0.1.0"
