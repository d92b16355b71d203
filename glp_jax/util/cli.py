"""The one command-line runner behind every `glp-*` tool.

Each tool module declares its flags at import time on a FlagValues of its own (`FLAGS = cli.flag_values()`),
so tools import each other freely and nothing collides in absl's global registry, and calls `cli.run(main,
FLAGS, __doc__)`. The runner gives every tool the same behaviour:
  * `--help` shows the tool's docstring, its own flags, and for config-driven tools the config's fields with
    their comments (read from the config file) and its presets;
  * `--config=configs/x.py:args` is used as given when that file exists, else the copy of the config shipped
    inside the installed package (so a plain `pip install` serves the README's command lines from any folder);
  * `--config.a.b=v` naming no field fails before any work, naming the field and the nearest valid ones;
  * `--print_config` prints the resolved config as JSON and exits;
  * expected errors (bad config, missing store, ...) are one line on stderr, exit status 2 for usage and
    config errors and 1 for runtime failures; `--debug` (or GLP_DEBUG=1) shows the traceback instead;
  * library chatter (backend probing, orbax) is silenced unless `--verbose`.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import re
import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

from glp_jax.util import config as config_lib

# Errors a user can act on: reported as one line, never as a traceback (unless --debug).
USAGE_ERRORS: tuple[type[BaseException], ...] = (config_lib.ConfigError, app.UsageError, flags.Error)
RUNTIME_ERRORS: tuple[type[BaseException], ...] = (OSError, config_lib.GlpError)
_CONFIG_ARG = re.compile(r"^--config=(?P<path>[^:]+)(?P<arg>:.*)?$")
_ASSIGN = re.compile(r"^\s*c\.(?P<key>[\w.]+)\s*=\s*(?P<value>.+?)\s*(?:#\s*(?P<comment>.*))?$")
_NOISY_LOGGERS = ("jax._src.xla_bridge", "absl", "orbax", "jax._src.distributed")


def _debug_env() -> bool:
  """GLP_DEBUG set to anything but empty / 0 / false (GLP_DEBUG=0 turned debugging on)."""
  return os.environ.get("GLP_DEBUG", "").lower() not in ("", "0", "false", "no")


def flag_values() -> flags.FlagValues:
  """A tool's own flag registry, holding the flags every tool shares."""
  fv = flags.FlagValues()
  flags.DEFINE_bool("debug", _debug_env(), "Show tracebacks of expected errors.",
                    flag_values=fv)
  flags.DEFINE_bool("verbose", False, "Show library logging (backends, orbax) as well.", flag_values=fv)
  return fv


# The config file whose fields `--help` lists when no --config is given, per tool (FlagValues).
_HELP_CONFIG: dict[int, str] = {}


def define_config(fv: flags.FlagValues, help_text: str, help_file: str) -> None:
  """Adds `--config` (a config file with args and `--config.x=v` overrides) and `--print_config`;
  `help_file` (e.g. configs/train.py) is the config whose fields `--help` lists when no --config is given."""
  config_flags.DEFINE_config_file("config", None, help_text, flag_values=fv, lock_config=True)
  _HELP_CONFIG[id(fv)] = help_file
  flags.DEFINE_bool("print_config", False, "Print the resolved config as JSON and exit.", flag_values=fv)


def _resolve_config_args(argv: list[str]) -> list[str]:
  out = []
  for a in argv:
    m = _CONFIG_ARG.match(a)
    out.append(f"--config={config_lib.packaged_config(m['path'])}{m['arg'] or ''}" if m else a)
  return out


def config_fields(path: str, arg: str | None = None) -> list[tuple[str, str, str]]:
  """(key, value, comment) of every field of the config `path` builds (with its `arg`), in its order: the
  value as built, the comment of the field's first assignment in the file (on its line, with the comment lines
  that continue it, or else the comment lines just above)."""
  try:
    cfg = config_lib.load_file(path, arg or None)
    with open(path) as f:
      comments = _field_comments(f.read().splitlines())
  except Exception:  # pylint: disable=broad-except  # a broken config lists no fields; running it says why
    return []
  fields = config_lib.flat_values(cfg.to_dict())
  order = {k: i for i, k in enumerate(comments)}   # as the file assigns them
  return [(k, _short(fields[k]), comments.get(k, "")) for k in sorted(fields, key=lambda k: order.get(k, 1e9))]


def _short(value) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def _field_comments(lines: list[str]) -> dict[str, str]:
  out: dict[str, str] = {}
  for i, line in enumerate(lines):
    m = _ASSIGN.match(line)
    if not m or m["key"] in out:
      continue
    parts = []
    if m["comment"] is not None:   # on the line, then the comment lines aligned under it
      column = line.index("#", m.end("value"))
      parts.append(m["comment"])
      for nxt in lines[i + 1:]:
        if not (nxt.strip().startswith("#") and nxt.index("#") == column):
          break
        parts.append(nxt.strip()[1:].strip())
    else:   # the comment lines just above (not a section's "# --- ... ---" heading)
      for prev in reversed(lines[:i]):
        if not prev.strip().startswith("#") or "---" in prev:
          break
        parts.insert(0, prev.strip()[1:].strip())
    out[m["key"]] = " ".join(p for p in parts if p)
  return out


def _config_help(argv: list[str], help_file: str | None) -> str:
  spec = next((a[len("--config="):] for a in argv if a.startswith("--config=")), None)
  if spec is None and help_file is None:
    return ""
  path, _, arg = spec.partition(":") if spec is not None else (config_lib.packaged_config(help_file), "", "")
  lines = [f"\nconfig fields of {path}{':' + arg if arg else ''} (override with --config.<field>=<value>):"]
  lines += [f"  {k:<28} {v:<14} {c}" for k, v, c in config_fields(path, arg)]
  doc = _module_doc(path)
  if doc:
    lines += ["", doc]
  return "\n".join(lines)


def _module_doc(path: str) -> str:
  import ast
  try:
    with open(path) as f:
      return ast.get_docstring(ast.parse(f.read())) or ""
  except (OSError, SyntaxError):
    return ""


def _check_config(argv: list[str]) -> None:
  """Loads `--config` once before absl does, so a bad config arg or a `--config.a.b=v` naming no field is
  one clear error (absl would bury either in a traceback)."""
  spec = next((a[len("--config="):] for a in argv if a.startswith("--config=")), None)
  if spec is None:
    return
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):   # absl's own message would not name the file
    raise config_lib.ConfigError(f"--config={spec}: no config file {path!r} (see configs/ for the ones there are)")
  try:
    cfg = config_lib.load_file(path, arg or None)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"--config={spec}: {e}") from None
  except Exception:  # pylint: disable=broad-except  (a missing or broken file: absl's parse says which)
    return
  known = config_lib.flatten_keys(cfg)
  for key in (a[len("--config."):].split("=")[0] for a in argv if a.startswith("--config.")):
    if key not in known:
      near = nearest_keys(key, known)
      hint = f"; did you mean {' or '.join(near)}?" if near else ""
      raise config_lib.ConfigError(f"--config.{key}: the config has no field {key!r}{hint}")


def nearest_keys(key: str, known: set[str]) -> list[str]:
  """The valid keys a mistyped `key` most likely meant: a sibling whose name is the typed name's initials or
  a prefix of it ('opt.learning_rate' -> 'opt.lr'), else the closest spellings."""
  parent, _, leaf = key.rpartition(".")
  siblings = sorted(k for k in known if k.rpartition(".")[0] == parent)
  initials = "".join(w[0] for w in leaf.split("_") if w)
  exact = [k for k in siblings if k.rpartition(".")[2] in (initials, leaf.replace("_", ""))
           or (len(k.rpartition(".")[2]) > 1 and leaf.startswith(k.rpartition(".")[2]))]
  return exact or difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)


def quiet_libraries(verbose: bool) -> None:
  """Library loggers down to errors (unless verbose); glp_jax's own INFO lines stay visible."""
  logging.getLogger("glp_jax").setLevel(logging.INFO)
  for name in _NOISY_LOGGERS:
    logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


def report(prog: str, e: BaseException) -> int:
  """Prints an expected error as one line; returns the exit status (2: usage/config, 1: runtime)."""
  message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  if isinstance(e, KeyError) and message.startswith(("'", '"')):
    message = message.strip("'\"")
  print(f"{prog}: error: {message}", file=sys.stderr)
  return 2 if isinstance(e, USAGE_ERRORS) else 1


def _parse(fv: flags.FlagValues, argv: list[str]) -> list[str]:
  """`fv(argv)`, with `argv` as sys.argv meanwhile: ml_collections' config flag reads which `--config.x=v`
  overrides there are from sys.argv, not from the list being parsed, so `run_train(argv)` from Python refused
  the overrides in `argv` (and took their names from the caller's own command line)."""
  saved = sys.argv
  sys.argv = list(argv)
  try:
    return fv(argv)
  finally:
    sys.argv = saved


def run(main: Callable[..., object], fv: flags.FlagValues, doc: str, argv: list[str] | None = None, *,
        positional: bool = False, prog: str | None = None) -> None:
  """Parses `argv` (default sys.argv) into `fv` and runs `main(fv)` (`main(fv, args)` with the positional
  arguments when `positional`) with the behaviour above; exits."""
  argv = _resolve_config_args(list(sys.argv if argv is None else argv))
  prog = prog or os.path.basename(argv[0])   # the tool's name, also under `python -m`
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print(doc.strip() + "\n\nflags:\n" + fv.get_help(include_special_flags=False)
          + _config_help(argv, _HELP_CONFIG.get(id(fv))))
    sys.exit(0)
  debug = "--debug" in argv or _debug_env()
  try:
    _check_config(argv)
    args = _parse(fv, argv)[1:]
    if args and not positional:
      raise app.UsageError(f"unexpected arguments {args} (see --help)")
  except Exception as e:  # pylint: disable=broad-except  (absl wraps override errors in several types)
    if debug:
      raise
    sys.exit(report(prog, e if isinstance(e, USAGE_ERRORS) else flags.Error(str(e))))
  if "config" in fv and fv.print_config:
    print(json.dumps(config_lib.to_dict(fv.config), indent=2, sort_keys=True))
    sys.exit(0)

  def body(_):
    quiet_libraries(fv.verbose)
    try:
      main(fv, args) if positional else main(fv)
    except USAGE_ERRORS + RUNTIME_ERRORS as e:
      if fv.debug:
        raise
      sys.exit(report(prog, e))
  app.run(body, argv=argv[:1])
