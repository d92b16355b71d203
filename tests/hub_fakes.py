"""A Hugging Face Hub that never touches the network: a hand-made Hub cache, and an `HfApi` stand-in whose
uploads land in it (so a push followed by `from_pretrained(repo_id)` round-trips offline)."""
import hashlib
import os
import shutil

from huggingface_hub.utils import filter_repo_objects


def put_in_hub_cache(folder: str, cache: str, repo_id: str, commit: str | None = None,
                     ref: str = "main", names: list[str] | None = None) -> str:
  """Lays `folder` (or its files `names`) out as the Hub cache does (`models--org--name/{blobs,
  snapshots/<commit>,refs/<ref>}`, files as symlinks to content-addressed blobs); returns the snapshot folder."""
  repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  names = sorted(os.listdir(folder) if names is None else names)
  if commit is None:   # a deterministic 40-hex "commit" from the content
    h = hashlib.sha1()
    for name in names:
      h.update(name.encode())
      with open(os.path.join(folder, name), "rb") as fh:
        h.update(fh.read())
    commit = h.hexdigest()
  snapshot = os.path.join(repo, "snapshots", commit)
  os.makedirs(snapshot, exist_ok=True)
  os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
  for name in names:
    src = os.path.join(folder, name)
    if not os.path.isfile(src):
      continue
    with open(src, "rb") as fh:
      blob = os.path.join(repo, "blobs", hashlib.sha256(fh.read()).hexdigest())
    if not os.path.exists(blob):
      shutil.copyfile(src, blob)
    link = os.path.join(snapshot, name)
    if os.path.lexists(link):
      os.remove(link)
    os.symlink(os.path.relpath(blob, snapshot), link)
  os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
  with open(os.path.join(repo, "refs", ref), "w") as fh:
    fh.write(commit)
  return snapshot


class FakeCommitInfo:
  def __init__(self, repo_id: str, oid: str):
    self.oid, self.commit_url = oid, f"https://huggingface.co/{repo_id}/commit/{oid}"
    self.repo_url = f"https://huggingface.co/{repo_id}"


class FakeHfApi:
  """Records every call; `upload_folder` publishes the folder into `FakeHfApi.cache` as revision `main` (or
  the branch given)."""
  cache: str = ""
  calls: list = []

  def __init__(self, token=None, **kwargs):
    self.token = token
    FakeHfApi.calls.append(("init", {"token": token, **kwargs}))

  def create_repo(self, repo_id, **kwargs):
    FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
    return f"https://huggingface.co/{repo_id}"

  def create_branch(self, repo_id, **kwargs):
    FakeHfApi.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

  def upload_folder(self, *, repo_id, folder_path, revision=None, allow_patterns=None, ignore_patterns=None,
                    **kwargs):
    FakeHfApi.calls.append(("upload_folder", {"repo_id": repo_id, "folder_path": folder_path,
                                              "revision": revision, "allow_patterns": allow_patterns,
                                              "ignore_patterns": ignore_patterns, **kwargs}))
    # The files the real upload_folder sends: the folder's, filtered by the patterns as it filters them.
    names = list(filter_repo_objects(os.listdir(folder_path), allow_patterns=allow_patterns,
                                     ignore_patterns=ignore_patterns))
    snapshot = put_in_hub_cache(folder_path, FakeHfApi.cache, repo_id, ref=revision or "main", names=names)
    return FakeCommitInfo(repo_id, os.path.basename(snapshot))


def install_fake_hub(monkeypatch, cache: str) -> type:
  """`huggingface_hub.HfApi` -> FakeHfApi publishing into `cache`, which also becomes the default Hub cache."""
  import huggingface_hub
  from huggingface_hub import constants
  FakeHfApi.cache, FakeHfApi.calls = cache, []
  monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
  return FakeHfApi
