"""The store as PyTorch datasets: the same rows, bf16 kept bit for bit, every row once per epoch."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import ml_dtypes  # noqa: E402

from glp_jax.data.store import ActivationStore  # noqa: E402
from glp_jax.data.writer import StoreWriter  # noqa: E402
from glp_jax.torch.data import StoreDataset, StoreIterableDataset  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture
def store(tmp_path):
  path = str(tmp_path / "s")
  rng = np.random.default_rng(0)
  with StoreWriter.create(path, layers=[3], d=8, dtype="bfloat16", shard_rows=256, chunk_rows=64) as st:
    for doc in range(10):
      x = (rng.normal(size=(100, 8)) * 3 + 1).astype(ml_dtypes.bfloat16)
      x[:, 0] = np.arange(doc * 100, doc * 100 + 100)   # row ids, exact in bf16 up to 256: checked below
      st.append({3: x}, doc_id=doc, positions=np.arange(100), heldout=doc == 4)
  return path


def test_map_style_rows_equal_the_store(store):
  st = ActivationStore.open(store)
  ds = StoreDataset(store)
  assert len(ds) == len(st) == 900 and ds[0].dtype == torch.bfloat16
  want = st.read(0, len(st)).view(np.int16)
  assert np.array_equal(ds[5].view(torch.int16).numpy(), want[5])
  assert np.array_equal(ds[10:50:7].view(torch.int16).numpy(), want[10:50:7])
  assert np.array_equal(ds[-1].view(torch.int16).numpy(), want[-1])
  with pytest.raises(IndexError):
    ds[900]
  held = StoreDataset(store, split="heldout", dtype=torch.float32)
  assert len(held) == 100 and held[0][0] == 400.0   # document 4


def test_iterable_covers_every_row_once_and_normalises(store):
  it = StoreIterableDataset(store, batch_rows=128, seed=1, normalize=True)
  loader = torch.utils.data.DataLoader(it, batch_size=None, num_workers=2, multiprocessing_context="spawn")
  rows = torch.cat(list(loader))
  assert rows.shape == (900, 8) and rows.dtype == torch.float32
  raw = StoreIterableDataset(store, batch_rows=128, seed=1, dtype=torch.float32)
  ids = torch.cat(list(raw))[:, 0]
  assert sorted(ids.tolist()) == sorted(torch.cat([StoreDataset(store, dtype=torch.float32)[:]])[:, 0].tolist())
  assert not torch.equal(ids, torch.sort(ids).values)   # shuffled
  assert abs(float(rows[:, 1:].mean())) < 0.1 and abs(float(rows[:, 1:].std()) - 1) < 0.1
  # The order depends on (seed, epoch) only: any worker count reads it, and set_epoch gives a new one.
  assert torch.equal(torch.sort(torch.cat(list(loader))[:, 0]).values, torch.sort(rows[:, 0]).values)
  assert torch.equal(torch.cat(list(raw))[:, 0], ids)
  raw.set_epoch(1)
  again = torch.cat(list(raw))[:, 0]
  assert sorted(again.tolist()) == sorted(ids.tolist()) and not torch.equal(again, ids)
  two = StoreIterableDataset(store, batch_rows=128, seed=1, dtype=torch.float32)
  two.set_epoch(1)
  by_block = {int(b[:, 0].min()) // 128: b[:, 0] for b in torch.utils.data.DataLoader(
      two, batch_size=None, num_workers=2, multiprocessing_context="spawn")}
  assert all(torch.equal(b[:, 0], by_block[int(b[:, 0].min()) // 128]) for b in raw)


def test_strided_slice_reads_only_its_rows(store, monkeypatch):
  """ds[::k] of a huge store must not load the k-times larger range it spans (a covering read did)."""
  fetched = []
  for name in ("read", "read_heldout", "take"):
    orig = getattr(ActivationStore, name)
    def spy(self, *a, _orig=orig, **kw):
      out = _orig(self, *a, **kw)
      fetched.append(len(out))
      return out
    monkeypatch.setattr(ActivationStore, name, spy)
  ds = StoreDataset(store)
  want = ActivationStore.open(store).read(0, 900).view(np.int16)
  for sl in (slice(None, None, 300), slice(850, 10, -200), slice(3, 4, 5)):
    fetched.clear()
    got = ds[sl]
    assert np.array_equal(got.view(torch.int16).numpy(), want[sl]) and sum(fetched) == len(want[sl]), sl
  assert ds[7:7].shape == (0, 8) and np.array_equal(ds[10:20].view(torch.int16).numpy(), want[10:20])
  held = StoreDataset(store, split="heldout", dtype=torch.float32)
  assert held[::50][:, 0].tolist() == [400.0, 450.0]
