"""Config files in the big_vision manner: `get_config("k=v,runlocal")` -> ConfigDict.

Edit or copy them freely. They are also shipped inside the installed package (as `glp_jax.configs`), so
`--config=configs/train.py:runlocal` works after a plain `pip install` from any folder: a path that exists is
used as given, otherwise the packaged copy of that file.
"""
