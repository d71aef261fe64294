"""Search FedMD's own hyper-parameters with Ray Tune, from Python.

Each trial is a whole FedMD simulation (transfer learning, rounds, bounds); its participant
actors are reserved through the trial's placement group, and ASHA stops trials whose mean
accuracy lags after the first rounds. The same search from the command line:
`fedmd-ray tune --config configs/tune-smoke.json`.

    python scripts/tune_example.py                      # ~10 minutes on 2 cores (the smoke preset)
    python scripts/tune_example.py --samples 1 --rounds 2
    python scripts/tune_example.py --preset fashion --gpus 0.1   # on a GPU machine
"""

from __future__ import annotations

import argparse

from fedmd_ray.benchmarking import at_least_one
from fedmd_ray.tune import search


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smoke")
    p.add_argument("--samples", type=at_least_one, default=2, help="trials per grid point")
    p.add_argument("--rounds", type=at_least_one, default=4)
    p.add_argument("--gpus", type=float, default=0.0, help="GPU fraction per participant")
    p.add_argument("--out", default="runs/tune-example")
    args = p.parse_args(argv)
    spec = {
        "preset": args.preset,
        # Each trial takes an even share of the cluster's CPUs unless resources.num_cpus says
        # otherwise (set it lower to run trials side by side on a bigger machine).
        "set": {"train.rounds": args.rounds, "resources.num_gpus": args.gpus, "checkpoint_every": 0},
        "search": {
            # The knobs FedMD adds on top of ordinary training:
            "train.public_subset_size": {"choice": [250, 500, 1000]},  # alignment data per round
            "train.digest_loss": {"grid": ["mae", "kl"]},  # how the consensus is matched
            "train.temperature": {"uniform": [1.0, 4.0]},  # for kl
            "train.digest_epochs": {"randint": [1, 3]},  # randint's high is exclusive
            "train.digest_lr": {"loguniform": [1e-4, 1e-2]},
            "train.revisit_epochs": {"choice": [1, 2, 4]},
        },
        "num_samples": args.samples,
        "scheduler": "asha",
        "metric": "mean_accuracy",
    }
    rows = search(spec, args.out)
    best = rows[0]
    print(
        "best:",
        {k[len("param:") :]: v for k, v in best.items() if k.startswith("param:")},
        f"mean accuracy {best['mean_accuracy']:.1%}, gain {best['mean_gain']:+.1%}",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
