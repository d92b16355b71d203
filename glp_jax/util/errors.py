"""The error types every stage raises for problems a user can act on.

The CLIs print these as one line naming the input and what to do (see `glp_jax.util.cli`); anything else
is a bug and keeps its traceback.
"""


class GlpError(Exception):
  """A failure the user can act on (a missing store, a full disk, a damaged checkpoint, ...): exit status 1."""


class ConfigError(GlpError, ValueError):
  """A config key or value that cannot be used; the message names the key: exit status 2."""
