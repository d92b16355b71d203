"""Prior folders on the Hugging Face Hub: resolve a repo id to a local folder, and push a folder.

  folder = resolve("org/glp-llama1b-d6")          # Hub cache (works offline with HF_HUB_OFFLINE=1 once cached)
  folder = resolve("exports/d6")                  # an existing local folder is returned as it is
  push_folder("exports/d6", "org/glp-llama1b-d6")  # create the repo if needed, upload the folder

Only the files a prior needs are downloaded: the config files first, then the one weights file the layout
loads (`model.safetensors` for our export, `final.safetensors` or `<checkpoint>.safetensors` for the
reference layout), so a reference repo's many intermediate checkpoints are never fetched.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import huggingface_hub
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import validate_repo_id

import glp_jax
from glp_jax.torch import card as card_lib
from glp_jax.torch import io
from glp_jax.util import files

log = logging.getLogger("glp_jax")
# Small files that tell the layout (and describe the prior); the weights come in a second, targeted pass.
META_PATTERNS = ["config.json", "config.yaml", "rep_statistics.pt", card_lib.CARD_FILE]


def is_repo_id(path: str | os.PathLike) -> bool:
  """True for a string that is not an existing path and is a valid Hub repo id ('org/name' or 'name')."""
  if not isinstance(path, str) or os.path.exists(path) or path.startswith((".", "/", "~")):
    return False
  try:
    validate_repo_id(path)
  except hf_errors.HFValidationError:
    return False
  return True


def check_repo_id(repo_id: str) -> str:
  """`repo_id` when it is a valid Hub repo id; ValueError naming it otherwise."""
  try:
    validate_repo_id(repo_id)
  except hf_errors.HFValidationError as e:
    raise ValueError(f"{repo_id!r} is not a Hugging Face Hub repo id (org/name): {e}") from None
  return repo_id


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], cache_dir: str | None,
              token: str | bool | None) -> str:
  # Offline (HF_HUB_OFFLINE=1, e.g. compute nodes without internet): say so, so no version of huggingface_hub
  # tries the network first (1.x listed a pinned commit's files online and failed where the cache had them).
  return huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                           cache_dir=cache_dir, token=token, library_name="glp_jax",
                                           library_version=glp_jax.__version__,
                                           local_files_only=huggingface_hub.is_offline_mode())


def resolve(path: str | os.PathLike, revision: str | None = None, checkpoint: str | None = None,
            cache_dir: str | None = None, token: str | bool | None = None) -> str:
  """A local folder holding the prior `path` (a folder, or a Hub repo id fetched into the Hub cache).

  `revision` (branch, tag or commit) applies to repo ids only. `checkpoint` names the weights stem the
  caller will load (default: the layout's own), so only that file is downloaded.
  """
  if not is_repo_id(path):
    if revision is not None:
      raise ValueError(f"revision={revision!r} applies to Hub repo ids; {os.fspath(path)!r} is a local path")
    return os.fspath(path)
  try:
    folder = _snapshot(path, revision, META_PATTERNS, cache_dir, token)
    # Pin the commit the config files came from, so the weights cannot come from a newer push.
    commit = os.path.basename(os.path.normpath(folder))
    stem = checkpoint or ("model" if io.is_export_folder(folder) else io.REF_CHECKPOINT)
    return _snapshot(path, commit, [f"{stem}.safetensors"], cache_dir, token)
  except OSError as e:  # every Hub error (offline, not cached, not found, HTTP) is an OSError
    raise FileNotFoundError(
        f"{path!r} is not a local folder, and as a Hugging Face Hub repo id (revision {revision or 'main'}) "
        f"it could not be found online or in the Hub cache: {type(e).__name__}: {e}") from e


def refresh_card(folder: str, repo_id: str | None = None) -> bool:
  """Rewrites the folder's generated README.md (with `repo_id` and the eval_*.json numbers now present in
  the folder); a card someone edited is left alone. Returns whether it was written."""
  path = os.path.join(folder, card_lib.CARD_FILE)
  config = files.read_json(os.path.join(folder, "config.json"), {})
  if config.get("format") != "glp_jax.torch" or not card_lib.is_generated(path):
    return False
  evals = card_lib.read_evals(folder)
  # An eval_*.json older than the weights measured other weights (a re-export into this folder): not theirs.
  born = files.mtime(os.path.join(folder, io.MODEL_FILE))
  for name in sorted(evals):
    if files.mtime(os.path.join(folder, f"eval_{name}.json")) < born:
      log.warning("%s: eval_%s.json predates the weights %s; not recorded in the model card", folder, name,
                  io.MODEL_FILE)
      del evals[name]
  files.atomic_write(path, card_lib.model_card(config, repo_id, evals).encode("utf-8"))
  return True


def push_folder(folder: str, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                token: str | bool | None = None, commit_message: str | None = None) -> Any:
  """Uploads a prior folder to the Hub model repo `repo_id` (created when missing); returns the CommitInfo.

  The model card is refreshed first so that its loading snippet names `repo_id`.
  """
  check_repo_id(repo_id)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"prior folder {folder!r} does not exist")
  layouts = ((io.CONFIG_FILE, io.MODEL_FILE), (io.REF_CONFIG_FILE, io.REF_CHECKPOINT + ".safetensors"))
  if not any(all(os.path.exists(os.path.join(folder, f)) for f in pair) for pair in layouts):
    # An export writes its config files last: a folder without them is one cut short, and would load as nothing.
    raise FileNotFoundError(f"{folder} holds no complete prior (neither {' + '.join(layouts[0])} nor "
                            f"{' + '.join(layouts[1])}; an export cut short?): export it again before pushing")
  refresh_card(folder, repo_id)
  api = huggingface_hub.HfApi(token=token)
  api.create_repo(repo_id, private=private, exist_ok=True)
  if revision is not None:
    api.create_branch(repo_id, branch=revision, exist_ok=True)
  config = files.read_json(os.path.join(folder, "config.json"), {})
  step = (config.get("provenance") or {}).get("step")
  message = commit_message or ("Upload GLP prior" + (f" (step {step})" if step is not None else ""))
  # `files.atomic_path` names its temporaries `<name>.tmp.<pid>`: a killed export leaves them in the folder.
  return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=message,
                           ignore_patterns=["*.tmp", "*.tmp.*", ".*"])


def describe_commit(info: Any) -> dict:
  """JSON-able summary of an upload's CommitInfo."""
  return {"commit_url": getattr(info, "commit_url", None), "oid": getattr(info, "oid", None),
          "repo_url": str(getattr(info, "repo_url", "") or "") or None}


def read_card_metadata(folder: str) -> dict:
  """The YAML front matter of the folder's README.md as a dict ({} when absent)."""
  path = os.path.join(folder, card_lib.CARD_FILE)
  if not os.path.exists(path):
    return {}
  return huggingface_hub.ModelCard.load(path).data.to_dict()
