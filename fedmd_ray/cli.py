"""`fedmd-ray`: run a FedMD simulation from a preset or a config file."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from fedmd_ray import checkpoint, checks, running
from fedmd_ray import config as config_lib
from fedmd_ray.errors import CheckpointError, FedMDError, StorageError
from fedmd_ray.presets import PRESETS, get_preset, scale
from fedmd_ray.storage import Storage


def resolve_config(
    preset: str | None,
    config_file: str | None,
    overrides: list[str],
    data_dir: str | None = None,
    download: bool = False,
    backend: str | None = None,
    address: str | None = None,
    scale_factor: float | None = None,
) -> config_lib.Config:
    """Defaults <- preset <- config file <- --scale <- command-line flags <- --set pairs."""
    values: dict = get_preset(preset) if preset else {}
    if config_file:
        values = config_lib.merge(values, config_lib.load_file(config_file))
    if scale_factor is not None:
        values = scale(values, scale_factor)
    values = config_lib.merge(values, _flags(data_dir, download, backend, address))
    values = config_lib.merge(values, config_lib.parse_overrides(overrides))
    return checks.from_dict(values)


def _flags(data_dir: str | None, download: bool, backend: str | None, address: str | None) -> dict:
    flags: dict = {}
    if data_dir:
        flags.setdefault("data", {})["data_dir"] = data_dir
    if download:
        flags.setdefault("data", {})["download"] = True
    if backend:
        flags.setdefault("resources", {})["backend"] = backend
    if address:
        flags.setdefault("resources", {})["address"] = address
    return flags


def _resumed_config(args: argparse.Namespace) -> tuple[config_lib.Config, str]:
    """The config a run in `--resume DIR` (a folder or a URI) was started with, with
    --set/flags on top."""
    if args.preset or args.config or args.scale or args.out or args.overwrite:
        raise config_lib.ConfigError(
            "--resume DIR continues that run with its own config.json; drop --preset/--config/"
            "--scale/--out/--overwrite (change settings with --set, e.g. --set train.rounds=30)."
        )
    storage = Storage(args.resume)
    if not storage.exists("config.json"):
        raise CheckpointError(f"{storage} is not a fedmd-ray run directory (no config.json there).")
    values = config_lib.parse_text_config(storage.read_text("config.json"), storage.location("config.json"))
    flags = _flags(args.data_dir, args.download, args.backend, args.address)
    values = config_lib.merge(config_lib.merge(values, flags), config_lib.parse_overrides(args.set))
    return checks.from_dict(values), args.resume


def _run(args: argparse.Namespace) -> int:
    if args.log:
        args.set = [*args.set, f"log={args.log}"]

    had_runs = Path("runs").is_dir()
    if args.resume:
        config, out = _resumed_config(args)
    else:
        config = resolve_config(
            args.preset or (None if args.config else "smoke"),
            args.config,
            args.set,
            args.data_dir,
            args.download,
            args.backend,
            args.address,
            args.scale,
        )
        out = args.out or _claim_default_out(config.name)
        running.check_free(Storage(out))  # a live run there is not an earlier one to keep or replace
        if not args.overwrite:
            _keep_earlier_results(out)
    try:
        return _run_into(args, config, out)
    finally:
        if not args.out and not args.resume:
            _release_if_empty(Path(out))
            if not had_runs:
                _release_if_empty(Path("runs"))


def _claim_default_out(name: str) -> str:
    """runs/NAME-TIMESTAMP, made here so that runs started in the same second (a shell loop
    of `fedmd-ray run ... &`) each get a folder of their own (-2, -3, ...) rather than one
    folder that mixes them."""
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 1000):
        path = base if k == 1 else base.with_name(f"{base.name}-{k}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return str(path)
    raise config_lib.ConfigError(f"{base} and 998 more like it exist already; give --out.")


def _release_if_empty(path: Path) -> None:
    """A folder the command made for a run refused before writing anything goes again."""
    try:
        path.rmdir()  # only an empty folder
    except OSError:
        pass


def _run_into(args: argparse.Namespace, config: config_lib.Config, out: str) -> int:
    from fedmd_ray.fedmd import run
    from fedmd_ray.progress import Progress

    _stop_on_sigterm()
    display = Progress("none" if args.quiet else args.progress)
    display.say(f"fedmd-ray: {'resume' if args.resume else 'run'} '{config.name}' -> {out}")
    # An earlier run's results in the same place are not this run's to report.
    earlier = None if args.resume else _results_in(out)
    try:
        run(config, out, progress=display.say, resume=bool(args.resume), report=display.event)
    except KeyboardInterrupt:
        display.close()
        stopped = "stopped (SIGTERM)" if _TERMINATED else "interrupted"
        print(f"{stopped}; {_kept(out, earlier, resumable=True)}", file=sys.stderr)
        return 143 if _TERMINATED else 130
    except FedMDError as exc:
        display.close()
        print(f"error: {exc}", file=sys.stderr)
        if _results_in(out) not in (None, earlier):
            # Once the place can be written again, nothing is lost: it continues from there.
            print(_kept(out, earlier, resumable=isinstance(exc, StorageError)), file=sys.stderr)
        return 1
    display.close()
    if not args.quiet:
        print(Storage(out).read_text("summary.md"))
    return 0


def _keep_earlier_results(out: str) -> None:
    """Refuse to run where an earlier run's results are (rounds or a checkpoint): a new run
    would replace them. A folder with only an earlier start's files (stopped before its
    first round) holds nothing to lose."""
    storage = Storage(out)
    try:
        held = storage.exists("metrics.parquet") or checkpoint.exists(storage)
    except OSError:
        return  # an unreachable place is check_writable's to explain
    if not held:
        return
    config, summary = storage.read_json("config.json"), storage.read_json("summary.json")
    earlier = config.get("name", "?") if isinstance(config, dict) else "?"
    finished = isinstance(summary, dict) and summary.get("complete") is True
    how = "finished" if finished else "stopped part way"
    resume = "" if finished else f"continue it with `fedmd-ray run --resume {out}`, "
    raise config_lib.ConfigError(
        f"--out {out} holds the results of an earlier run ('{earlier}', {how}); {resume}choose "
        "another --out, or add --overwrite to replace them."
    )


def _results_in(out: str) -> tuple | None:
    """Which results are in `out`: its config.json's contents and time written (None: no
    results there). A rerun of the same config with --overwrite writes the same contents."""
    try:
        storage = Storage(out)
        if not storage.exists("config.json"):
            return None
        return storage.read_text("config.json"), storage.fs.get_file_info(storage.path("config.json")).mtime
    except (FedMDError, OSError):
        return None


def _kept(out: str, earlier: tuple | None, resumable: bool = False) -> str:
    if _results_in(out) in (None, earlier) and not resumable:
        return "nothing was written."
    if _results_in(out) is None:
        return "nothing was written."
    storage = Storage(out)
    if resumable and not checkpoint.exists(storage):
        again = f"; run it again with: fedmd-ray run --resume {out} (with no checkpoint, from its start)"
    else:
        again = f"; continue with: fedmd-ray run --resume {out}" if resumable else ""
    if not storage.exists("metrics.parquet"):  # stopped before transfer learning ended
        return f"no results yet (its config and partition are in {storage}/){again}."
    return f"results written so far are in {storage}/{again}"


_TERMINATED = False


def _stop_on_sigterm() -> None:
    """A scheduler's SIGTERM (Slurm, Kubernetes) stops the run as Ctrl-C does, at any moment:
    results written so far stay, the summary says the run is incomplete, and one line says
    how to resume (Ray's own handler would end the log in a C++ stack dump)."""

    def handler(signum: int, frame: object) -> None:
        global _TERMINATED
        _TERMINATED = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _tune(args: argparse.Namespace) -> int:
    from fedmd_ray.tune import search

    spec = config_lib.load_file(args.config)
    if args.samples is not None:
        spec["num_samples"] = args.samples
    if args.address:
        spec.setdefault("set", {})["resources.address"] = args.address
    rows = search(spec, args.out)
    return 0 if any(r["error"] is None for r in rows) else 1


def _list(kind: str, data_dir: str | None = None) -> int:
    if kind == "presets":
        for name, values in PRESETS.items():
            print(
                f"{name:28s} {values['data']['public']} -> {values['data']['private']} ({values['partition']['kind']}), "
                f"{len(values['models'])} participants"
            )
    elif kind == "models":
        from fedmd_ray.model_names import KNOWN_MODELS, PAPER_MODELS
        from fedmd_ray.plugins import MODELS

        for name in KNOWN_MODELS:
            extra = f"  (default {','.join(map(str, PAPER_MODELS[name]))})" if name in PAPER_MODELS else ""
            print(f"{name}{extra}")
        for name in [n for n in MODELS.names() if n not in KNOWN_MODELS]:
            print(f"{name}  (registered)")
        print("package.module:factory, path/to/file.py:factory[?key=value&...]  (your own; see README)")
    else:
        from fedmd_ray.data import DATASETS, FORMS, location
        from fedmd_ray.plugins import DATASETS as REGISTERED

        # Where each would be read from here (--data-dir, FEDMD_DATA_DIR, or the default).
        print("\n".join(f"{name:16s} {location(name, data_dir)}" for name in DATASETS))
        print("\n".join([*(f"{n:16s} (registered)" for n in REGISTERED.user), *FORMS]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmd-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run_p = sub.add_parser("run", help="run a FedMD simulation")
    run_p.add_argument("--preset", help=f"named configuration ({', '.join(PRESETS)}); default smoke")
    run_p.add_argument("--config", help="JSON or TOML config file (merged over the preset)")
    run_p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. train.rounds=5 or resources.num_gpus=0.1",
    )
    run_p.add_argument("--out", help="results folder (default runs/NAME-TIMESTAMP)")
    run_p.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier run in --out"
    )
    run_p.add_argument("--data-dir", help="datasets in torchvision's layouts (or FEDMD_DATA_DIR)")
    run_p.add_argument("--download", action="store_true", help="let torchvision download missing datasets")
    run_p.add_argument("--backend", choices=config_lib.BACKENDS, help="ray (default) or local")
    run_p.add_argument("--address", help="join a Ray cluster: 'auto' or 'ray://HOST:10001'")
    run_p.add_argument("--quiet", action="store_true", help="no progress display and no summary")
    run_p.add_argument(
        "--progress",
        choices=("auto", "live", "plain"),
        default="auto",
        help="live display in a terminal, plain lines elsewhere (auto, the default)",
    )
    run_p.add_argument(
        "--scale",
        type=float,
        help="shrink the preset for a laptop, e.g. 0.1 (public data, public epochs, rounds)",
    )

    run_p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    run_p.add_argument(
        "--log",
        metavar="TRACKERS",
        help="send every round's metrics and the config to tensorboard and/or mlflow, e.g. --log tensorboard,mlflow",
    )

    tune_p = sub.add_parser("tune", help="search FedMD hyper-parameters with Ray Tune")
    tune_p.add_argument("--config", required=True, help="search file (JSON or TOML; see fedmd_ray.tune)")
    tune_p.add_argument("--out", default="runs/tune", help="where trials and the results table go")
    tune_p.add_argument("--samples", type=int, help="trials per grid point (overrides num_samples)")
    tune_p.add_argument("--address", help="join a Ray cluster: 'auto' or 'ray://HOST:10001'")

    show = sub.add_parser("config", help="print the resolved config as JSON")
    show.add_argument("--preset")
    show.add_argument("--config")
    show.add_argument("--scale", type=float)
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    cmp_p = sub.add_parser("compare", help="several runs' summaries in one table and one figure")
    cmp_p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    cmp_p.add_argument("--out", default="runs/compare", help="where compare.md and compare.png go")

    for kind in ("presets", "models"):
        sub.add_parser(kind, help=f"list the known {kind}")
    sets = sub.add_parser("datasets", help="list the known datasets and where each would be read from")
    sets.add_argument("--data-dir", help="look here (default: FEDMD_DATA_DIR, else ./data)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "tune":
            return _tune(args)
        if args.command == "compare":
            from fedmd_ray.compare import compare

            print(compare(args.runs, args.out))
            print(f"written: {args.out}/compare.md, {args.out}/compare.png")
            return 0
        if args.command == "config":
            config = resolve_config(args.preset, args.config, args.set, scale_factor=args.scale)
            print(json.dumps(config.to_dict(), indent=2))
            return 0
        return _list(args.command, getattr(args, "data_dir", None))
    except FedMDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`fedmd-ray datasets | head`): nothing more to print, nor a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
