"""Checks that need more than the config itself: that every name it holds resolves (models,
datasets, consensus and digest losses, user files) and that simulated faults fit the run.
`config.validate` checks the values; this module checks what they name. Both run before any
work, so a typo is one line, not a traceback from inside Ray."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmd_ray.config import Config
from fedmd_ray.config import from_dict as build
from fedmd_ray.consensus import AGGREGATORS
from fedmd_ray.data import check_dataset_name
from fedmd_ray.errors import ConfigError, did_you_mean
from fedmd_ray.faults import parse_fault
from fedmd_ray.model_names import check_model_name
from fedmd_ray.plugins import BUILTIN_DIGEST_LOSSES, CONSENSUS, DIGEST_LOSSES, Registry, parse_spec
from fedmd_ray.usercode import absolute, absolute_share_key


def check(config: Config) -> None:
    """Raise ConfigError for the first name in `config` that resolves to nothing."""
    for name in config.models:
        check_model_name(name)
    check_dataset_name(config.data.public)
    check_dataset_name(config.data.private)
    _check_plugin("train.digest_loss", config.train.digest_loss, BUILTIN_DIGEST_LOSSES, DIGEST_LOSSES)
    _check_plugin("train.consensus", config.train.consensus, tuple(AGGREGATORS), CONSENSUS)
    for fault in config.faults:
        parse_fault(fault, config.num_participants)


def with_absolute_paths(config: Config) -> Config:
    """`config` with every user file (models, consensus, digest loss, resources.per_model's
    keys) and dataset path made absolute where this process runs: the run's config.json and
    checkpoint then mean the same from any working directory, so `--resume` works from
    anywhere. Idempotent."""
    d, t, r = config.data, config.train, config.resources
    per_model = r.per_model
    if isinstance(per_model, dict):
        per_model = {absolute_share_key(k): v for k, v in per_model.items()}
    return replace(
        config,
        models=[absolute(m) for m in config.models],
        data=replace(
            d,
            public=absolute(d.public),
            private=absolute(d.private),
            data_dir=str(Path(d.data_dir).expanduser().resolve()) if d.data_dir else d.data_dir,
        ),
        train=replace(t, consensus=absolute(t.consensus), digest_loss=absolute(t.digest_loss)),
        resources=replace(r, per_model=per_model, runtime_env=_anchored_env(r.runtime_env)),
    )


def _anchored_env(env: dict[str, Any] | None) -> dict[str, Any] | None:
    """resources.runtime_env with its local folders (working_dir, py_modules) absolute: Ray
    reads them where the driver runs, so a relative one would ship another folder when the
    run is resumed from elsewhere. URIs (s3://, gs://, https://) are left as written."""
    if not env:
        return env

    def anchored(path: Any) -> Any:
        return path if not isinstance(path, str) or "://" in path else str(Path(path).expanduser().resolve())

    out = dict(env)
    if "working_dir" in out:
        out["working_dir"] = anchored(out["working_dir"])
    if isinstance(out.get("py_modules"), list):
        out["py_modules"] = [anchored(m) for m in out["py_modules"]]
    return out


def from_dict(values: dict[str, Any]) -> Config:
    """A Config from nested dicts, its values and its names checked."""
    config = build(values)
    check(config)
    return config


def _check_plugin(key: str, value: str, builtins: tuple[str, ...], registry: Registry) -> None:
    """A built-in name, or a user's (registered, module:function, file.py:function) that
    resolves on this machine."""
    if value in builtins:
        return
    plain = ":" not in value and "?" not in value
    if plain and registry.get(value) is None:
        names = registry.names()
        raise ConfigError(
            f"'{key}' is '{value}'; it must be one of {', '.join(names)}, or your own "
            f"(package.module:function or path/to/file.py:function).{did_you_mean(value, names)}"
        )
    parse_spec(value)  # a malformed spec says how specs look
    try:
        registry.check(value)
    except ConfigError as exc:
        raise ConfigError(f"'{key}': {exc}") from None
