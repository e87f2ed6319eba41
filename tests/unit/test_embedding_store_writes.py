"""A write into the embedding store that fails (a full disk, a read-only folder) is one error line naming
the store folder and the fix; it leaves no shard, partial or whole, and keeps what the store held."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import SafetensorError

from clipcap.pipeline import embedding_store
from clipcap.pipeline.embedding_store import INDEX, EmbeddingStore, StoreWriteError

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# what safetensors raises itself when the disk fills under save_file
RUST_ENOSPC = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')


def _disk_fills(error):
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 100)  # half a shard reached the disk
        raise error
    return save_file


@pytest.mark.parametrize("error", [ENOSPC, RUST_ENOSPC], ids=["OSError", "SafetensorError"])
def test_a_full_disk_under_a_shard_is_one_line_and_leaves_no_shard(tmp_path, monkeypatch, error):
    store = EmbeddingStore(tmp_path, "enc")
    first = store.add(["a", "b"], torch.ones(2, 4))
    before = {p.name: p.read_bytes() for p in store.dir.iterdir()}
    monkeypatch.setattr(embedding_store, "save_file", _disk_fills(error))
    with pytest.raises(StoreWriteError) as err:
        store.add(["c"], torch.zeros(1, 4))
    message = str(err.value)
    assert message.startswith(f"{store.dir}: could not write the embedding shard shard-000001.safetensors (")
    assert "nothing of this batch was stored: free space on its disk, then run 'clipcap embed' again" in message
    assert "\n" not in message
    assert {p.name: p.read_bytes() for p in store.dir.iterdir()} == before  # no partial shard, no temporary file
    monkeypatch.undo()  # space freed: the next run goes on where it stopped
    fresh = EmbeddingStore(tmp_path, "enc")
    assert fresh.missing(["a", "c"]) == ["c"] and fresh.shards() == [first]
    assert fresh.add(["c"], torch.zeros(1, 4)).name == "shard-000001.safetensors"


def test_a_failed_index_write_keeps_the_whole_shard(tmp_path, monkeypatch):
    store = EmbeddingStore(tmp_path, "enc")
    store.add(["a"], torch.ones(1, 4))

    def full(path, data):
        raise ENOSPC

    monkeypatch.setattr(embedding_store, "write_json", full)
    with pytest.raises(StoreWriteError, match=rf"could not write the embedding {INDEX} \(No space left on device\); "
                                              r"shard shard-000001.safetensors was stored whole: free space"):
        store.add(["b"], torch.zeros(1, 4))
    monkeypatch.undo()
    assert not list(store.dir.glob(".*.tmp"))
    torch.testing.assert_close(EmbeddingStore(tmp_path, "enc").get(["b", "a"]), torch.tensor([[0.0] * 4, [1.0] * 4]))
