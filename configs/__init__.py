"""Config files in the big_vision manner: `get_config("k=v,runlocal")` -> ConfigDict.

Edit or copy them freely. They are also shipped inside the installed package (as `glp_jax.configs`), so
`--config=configs/train.py:runlocal` works after a plain `pip install` from any folder: a path that exists is
used as given, otherwise the packaged copy of that file.

From Python (a notebook, a script), the same configs without absl flags:
  glp_jax.configs.train(model="tiny", runlocal=True, opt__lr=1e-3)   # args select, the rest override fields
  glp_jax.configs.extract(runlocal=True, rows=20_000)
  glp_jax.configs.sweep(runlocal=True)
"""
import os as _os


def _build(name: str, kwargs: dict):
  from glp_jax.util import config as config_lib   # noqa: PLC0415  (keeps `import glp_jax.configs` light)
  return config_lib.build(_os.path.join(_os.path.dirname(__file__), f"{name}.py"), **kwargs)


def train(**kwargs):
  """configs/train.py: args `model`, `runlocal`, `budget`, `seed`; any other keyword overrides a field."""
  return _build("train", kwargs)


def extract(**kwargs):
  """configs/extract.py: args `model`, `layers`, `ctx`, `runlocal`, `stream`, `rows`; the rest override fields."""
  return _build("extract", kwargs)


def sweep(**kwargs):
  """configs/sweep.py: args `runlocal`, `study`; the rest override fields."""
  return _build("sweep", kwargs)
