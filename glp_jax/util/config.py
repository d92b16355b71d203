"""Config helpers in the big_vision manner: `configs/x.py:k=v,k2=v2,runlocal` -> ConfigDict.

A config file's `get_config(arg)` calls `parse_arg(arg, **defaults)`; every key in `arg` must be one of the
defaults, so a typo fails before any heavy work starts, with the key named.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
from typing import Any

import ml_collections

from glp_jax.util import files
from glp_jax.util.errors import ConfigError, GlpError  # re-exported: the config-facing error types

__all__ = ["ConfigError", "GlpError", "parse_arg", "to_dict", "write_config", "override", "load_file",
           "flatten_keys", "packaged_config"]


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
  return files.write_json(f"{workdir}/{name}", to_dict(cfg), sort_keys=True)


def flatten_keys(cfg: ml_collections.ConfigDict | dict, prefix: str = "") -> set[str]:
  """Every dotted key of a nested config: {'opt', 'opt.lr', ...}."""
  out = set()
  for k, v in cfg.items():
    out.add(prefix + k)
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out |= flatten_keys(v, f"{prefix}{k}.")
  return out


def flat_values(tree: ml_collections.ConfigDict | dict, prefix: str = "") -> dict[str, Any]:
  """{'opt.lr': value, ...}: every leaf of a nested config, in its order."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, (ml_collections.ConfigDict, dict)):
      out.update(flat_values(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def override(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys in place (`{"opt.lr": 3e-4}`), as `--config.opt.lr=3e-4` would; returns `cfg`."""
  unknown = sorted(set(overrides) - flatten_keys(cfg))
  if unknown:
    raise ConfigError(f"unknown config key {unknown[0]!r}")
  cfg.update_from_flattened_dict(overrides)
  return cfg


def packaged_config(path: str) -> str:
  """`path` when it exists; else, for a `configs/<name>.py` path, the copy shipped in the package
  (`glp_jax.configs`), so the README's `--config=configs/train.py:...` works after a plain `pip install`, from
  any folder. Any other missing path stays as given (reported by its name): a mistyped `/exp/mine/train.py`
  must not run the packaged train.py."""
  if os.path.exists(path) or os.path.normpath(os.path.dirname(path)) != "configs":
    return path
  shipped = importlib.resources.files("glp_jax.configs") / os.path.basename(path)
  return str(shipped) if shipped.is_file() else path   # a missing file is then reported by its given name


def load_module(path: str):
  """A config file as a module (under a private name, so files never collide)."""
  spec = importlib.util.spec_from_file_location(f"_glp_config_{abs(hash(path))}", path)
  if spec is None or spec.loader is None:
    raise ConfigError(f"{path}: not a Python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file."""
  return load_module(path).get_config(arg)


def build(path: str, **kwargs: Any) -> ml_collections.ConfigDict:
  """A config from Python: keyword arguments that are the file's args (its `ARGS`) select the variant, the
  rest override fields, with `__` for the dots (`opt__lr=1e-3` is `--config.opt.lr=1e-3`)."""
  module = load_module(path)
  names = getattr(module, "ARGS", {})
  arg = ",".join(f"{k}={v}" if not isinstance(v, bool) else (k if v else f"{k}=false")
                 for k, v in kwargs.items() if k in names)
  cfg = module.get_config(arg or None)
  return override(cfg, {k.replace("__", "."): v for k, v in kwargs.items() if k not in names})
