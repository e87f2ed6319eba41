import torch

from clipcap.embed import embed_manifest
from clipcap.embedding_store import EmbeddingStore
from clipcap.encoders import build_encoder


def test_store_roundtrip_order_and_missing(tmp_path):
    store = EmbeddingStore(tmp_path, "enc@1")
    a, b = torch.randn(3, 4), torch.randn(2, 4)
    store.add(["x", "y", "z"], a)
    store.add(["u", "v"], b)
    fresh = EmbeddingStore(tmp_path, "enc@1")  # reads shard metadata from disk
    torch.testing.assert_close(fresh.get(["v", "x", "z"]), torch.stack([b[1], a[0], a[2]]))
    assert fresh.missing(["x", "new", "u", "new"]) == ["new"]
    assert EmbeddingStore(tmp_path, "enc@2").missing(["x"]) == ["x"]  # another encoder, another store


def test_embedding_is_incremental(make_image, tmp_path):
    encoder = build_encoder("efficientnet-lite0:random")
    store_dir = tmp_path / "store"
    paths = [str(make_image(f"i{i}.png", color=(40 * i, 0, 0))) for i in range(3)]
    ids = [f"id{i}" for i in range(3)]
    first = embed_manifest(ids, paths, encoder, EmbeddingStore(store_dir, encoder.key), batch_size=2)
    assert (first.encoded, first.reused) == (3, 0)
    again = embed_manifest(ids, paths, encoder, EmbeddingStore(store_dir, encoder.key), batch_size=2)
    assert (again.encoded, again.reused) == (0, 3)
    paths.append(str(make_image("i3.png", color=(0, 90, 0))))
    ids.append("id3")
    more = embed_manifest(ids, paths, encoder, EmbeddingStore(store_dir, encoder.key), batch_size=2)
    assert (more.encoded, more.reused) == (1, 3)
    vectors = EmbeddingStore(store_dir, encoder.key).get(ids)
    assert vectors.shape == (4, 1280) and torch.isfinite(vectors).all()
