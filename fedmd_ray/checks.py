"""Checks that need more than the config itself: that every name it holds resolves (models,
datasets, consensus and digest losses, user files) and that simulated faults fit the run.
`config.validate` checks the values; this module checks what they name. Both run before any
work, so a typo is one line, not a traceback from inside Ray."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmd_ray.config import Config
from fedmd_ray.config import from_dict as build
from fedmd_ray.consensus import AGGREGATORS
from fedmd_ray.data import check_dataset_name, default_data_dir, reads_data_dir
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
    """`config` with every path it holds made absolute where this process runs (ANCHORED):
    the run's config.json and checkpoint then mean the same from any working directory, so
    `--resume` works from anywhere. An unset data.data_dir becomes the folder it stands for
    here (FEDMD_DATA_DIR, else ./data) where a dataset is read from it, so that a resume
    from another folder or shell reads the same data. Idempotent."""
    values = with_absolute_values(config.to_dict())
    d = config.data
    if d.data_dir is None and (reads_data_dir(d.public) or reads_data_dir(d.private)):
        values["data"]["data_dir"] = str(default_data_dir().resolve())
    return build(values)


def with_absolute_values(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config values (a file's, a search's) with their paths made absolute where this
    process runs; the keys ANCHORED does not name are left as they are."""
    out = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if path in ANCHORED:
            out[key] = ANCHORED[path](value) if value is not None else value
        elif isinstance(value, dict) and any(a.startswith(path + ".") for a in ANCHORED):
            out[key] = with_absolute_values(value, path + ".")
        else:
            out[key] = value
    return out


def absolute_value(key: str, value: Any) -> Any:
    """The value of dotted `key` ('models', 'data', 'resources.per_model', ...) with its
    paths made absolute: one search value, before any Config exists."""
    return _at(with_absolute_values(_nested(key, value)), key)


def _nested(key: str, value: Any) -> dict[str, Any]:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def _at(values: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        values = values[part]
    return values


def _path(value: Any) -> Any:
    return str(Path(value).expanduser().resolve()) if isinstance(value, str) and value else value


def _spec(value: Any) -> Any:
    return absolute(value) if isinstance(value, str) else value


def _anchored_env(env: Any) -> Any:
    """resources.runtime_env with its local folders (working_dir, py_modules) absolute: Ray
    reads them where the driver runs, so a relative one would ship another folder when the
    run is resumed from elsewhere. URIs (s3://, gs://, https://) are left as written."""
    if not isinstance(env, dict) or not env:
        return env

    def local(path: Any) -> Any:
        return path if isinstance(path, str) and "://" in path else _path(path)

    out = dict(env)
    if "working_dir" in out:
        out["working_dir"] = local(out["working_dir"])
    if isinstance(out.get("py_modules"), list):
        out["py_modules"] = [local(m) for m in out["py_modules"]]
    return out


ANCHORED: dict[str, Callable[[Any], Any]] = {
    "models": lambda specs: [_spec(m) for m in specs] if isinstance(specs, list) else specs,
    "data.public": _spec,
    "data.private": _spec,
    "data.data_dir": _path,
    "train.consensus": _spec,
    "train.digest_loss": _spec,
    "resources.per_model": lambda shares: (
        {absolute_share_key(k): v for k, v in shares.items()} if isinstance(shares, dict) else shares
    ),
    "resources.runtime_env": _anchored_env,
}
"""The config keys that hold paths (user files, datasets, folders Ray ships), and how each
is made absolute. A resources.per_model key names a model's file like the models do."""


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
