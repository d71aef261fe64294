"""Check fractional GPU placement: N participant-sized actors at `--fraction` GPU each.

Each actor builds one of the paper's CNNs on the GPU Ray gave it, takes a few training steps
at the paper's batch size, and reports what it saw: Ray's GPU ids, CUDA_VISIBLE_DEVICES,
the CUDA device, and its own peak memory (PyTorch's allocator; nvidia-smi's per-process
figure adds the CUDA context on top). Prints one line per actor and a summary.

    python scripts/gpu_placement.py --actors 10 --fraction 0.1
"""

from __future__ import annotations

import argparse
import os
import time

import ray
import torch

from fedmd_ray.backends.resources import init_ray
from fedmd_ray.benchmarking import at_least_one, nvidia_smi, share
from fedmd_ray.models import build_model
from fedmd_ray.presets import PAPER_MODELS


@ray.remote
class Probe:
    def run(self, model_name: str, steps: int, batch: int) -> dict:
        torch.manual_seed(0)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(model_name, (1, 28, 28), 16).to(device)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        x = torch.randn(batch, 1, 28, 28, device=device)
        y = torch.randint(0, 16, (batch,), device=device)
        start = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {
            "pid": os.getpid(),
            "ray_gpu_ids": ray.get_gpu_ids(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0,
            "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if device.type == "cuda" else 0.0,
            "steps_per_second": steps / (time.perf_counter() - start),
        }


def per_process_mib() -> dict[int, float]:
    return {int(pid): float(mib) for pid, mib in nvidia_smi("compute-apps=pid,used_memory")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--actors", type=at_least_one, default=10)
    p.add_argument("--fraction", type=share, default=0.1)
    p.add_argument("--steps", type=at_least_one, default=50)
    p.add_argument("--batch", type=at_least_one, default=32)
    args = p.parse_args(argv)

    init_ray()
    print(f"cluster: {ray.cluster_resources()}")
    probes = [Probe.options(num_gpus=args.fraction, num_cpus=0.1).remote() for _ in range(args.actors)]
    models = [PAPER_MODELS[i % len(PAPER_MODELS)] for i in range(args.actors)]
    # Actors that cannot be placed stay pending: wait with a deadline rather than forever.
    refs = [probe.run.remote(m, args.steps, args.batch) for probe, m in zip(probes, models)]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=300)
    smi = per_process_mib()
    for model, ref in zip(models, refs):
        if ref in pending:
            print(f"{model:24s} NOT PLACED within 300 s")
            continue
        r = ray.get(ref)
        print(
            f"{model:24s} pid {r['pid']:>7d} ray gpu ids {r['ray_gpu_ids']} CUDA_VISIBLE_DEVICES="
            f"{r['cuda_visible_devices']} {r['device']}: peak allocated {r['peak_allocated_mib']:.0f} MiB, "
            f"reserved {r['peak_reserved_mib']:.0f} MiB, nvidia-smi {smi.get(r['pid'], float('nan')):.0f} MiB, "
            f"{r['steps_per_second']:.0f} steps/s"
        )
    print(f"{len(ready)}/{len(refs)} actors placed at {args.fraction} GPU each")
    ray.shutdown()
    return 0 if not pending else 1


if __name__ == "__main__":
    raise SystemExit(main())
