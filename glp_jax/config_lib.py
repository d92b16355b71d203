"""Config helpers in the big_vision manner: `configs/x.py:k=v,k2=v2,runlocal` -> ConfigDict.

A config file's `get_config(arg)` calls `parse_arg(arg, **defaults)`; every key in `arg` must be one of the
defaults, so a typo fails before any heavy work starts, with the key named.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config key or value that cannot be used; the message names the key."""


def _coerce(key: str, text: str, default: Any) -> Any:
  """Parses `text` with the type of `default` (bool/int/float/str); None defaults keep the string."""
  if isinstance(default, bool):
    if text.lower() in ("1", "true", "yes", ""):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ConfigError(f"config arg {key!r}: expected a boolean, got {text!r}")
  for typ in (int, float):
    if isinstance(default, typ):
      try:
        return typ(text)
      except ValueError:
        raise ConfigError(f"config arg {key!r}: expected {typ.__name__}, got {text!r}") from None
  return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'k=v,k2=v2,flag' into a locked ConfigDict over `defaults`.

  A bare name sets a boolean default to True (`runlocal`). Unknown keys raise ConfigError naming them.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f"unknown config arg {key!r}; known args: {sorted(defaults)}")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ConfigError(f"config arg {key!r} needs a value ({key}=...)")
      out[key] = True
    else:
      out[key] = _coerce(key, value.strip(), default)
  out.lock()
  return out


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
  """Plain JSON-able dict of a config (tuples become lists)."""
  return json.loads(cfg.to_json_best_effort())


def write_config(cfg: ml_collections.ConfigDict, workdir: str, name: str = "config.json") -> str:
  """Writes the resolved config to `<workdir>/<name>` (process 0 only is the caller's job)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  with open(path + ".tmp", "w") as f:
    json.dump(to_dict(cfg), f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  return path


def require(cfg: ml_collections.ConfigDict, key: str, ok: bool, what: str) -> None:
  """Raises ConfigError naming `key` when `ok` is false; `what` says what the value must be."""
  if not ok:
    raise ConfigError(f"config.{key}: {what} (got {cfg[key] if key in cfg else '<missing>'!r})")


def override(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys in place (`{"opt.lr": 3e-4}`), as `--config.opt.lr=3e-4` would; returns `cfg`."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cfg
    try:
      for p in parents:
        node = node[p]
      node[leaf] = value
    except (KeyError, AttributeError) as e:
      raise ConfigError(f"unknown config key {key!r}: {e}") from None
  return cfg
