import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from clipcap.pipeline.stages.embed import embed_missing
from clipcap.errors import ClipcapError
from clipcap.pipeline.embedding_store import INDEX, DamagedShardError, EmbeddingStore
from clipcap.modeling.encoders import build_encoder

JOB = Path(__file__).resolve().parents[1] / "jobs" / "embed_images.py"


def assert_same_vectors(found: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """``found`` holds ``expected``'s vectors, to within ``rtol`` of their size (not an absolute tolerance:
    the random encoder's vectors are ~1e-8), and the images' vectors differ from each other by far more than
    that, so another image's vector never passes for the right one."""
    tolerance = rtol * float(expected.abs().max())
    torch.testing.assert_close(found, expected, rtol=0, atol=tolerance)
    gaps = (expected[:, None] - expected[None]).abs().amax(dim=-1)
    others = gaps[~torch.eye(len(expected), dtype=torch.bool)]
    assert others.numel() == 0 or others.min() > 100 * tolerance, "images' vectors within the tolerance: vacuous"


def test_store_roundtrip_order_and_missing(tmp_path):
    store = EmbeddingStore(tmp_path, "enc@1")
    a, b = torch.randn(3, 4), torch.randn(2, 4)
    store.add(["x", "y", "z"], a)
    store.add(["u", "v"], b)
    fresh = EmbeddingStore(tmp_path, "enc@1")  # reads the index from disk
    assert_same_vectors(fresh.get(["v", "x", "z"]), torch.stack([b[1], a[0], a[2]]))
    assert fresh.missing(["x", "new", "u", "new"]) == ["new"]
    assert EmbeddingStore(tmp_path, "enc@2").missing(["x"]) == ["x"]  # another encoder, another store


def test_stale_or_missing_index_is_rebuilt_from_the_shards(tmp_path):
    store = EmbeddingStore(tmp_path, "enc@1")
    vectors = torch.randn(3, 4)
    store.add(["a", "b"], vectors[:2])
    stale = (store.dir / INDEX).read_text()  # what a kill between the next shard and its index leaves
    store.add(["c"], vectors[2:])
    (store.dir / INDEX).write_text(stale)
    assert EmbeddingStore(tmp_path, "enc@1").missing(["a", "b", "c", "d"]) == ["d"]
    (store.dir / INDEX).unlink()
    reopened = EmbeddingStore(tmp_path, "enc@1")
    assert len(reopened) == 3
    assert_same_vectors(reopened.get(["c", "a", "b"]), vectors[[2, 0, 1]])
    reopened.add(["d"], torch.randn(1, 4))  # the next write brings the index up to date
    assert len(json.loads((store.dir / INDEX).read_text())["ids"]) == 4


def _truncate(shard: Path) -> None:
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _overwrite_values(shard: Path) -> None:
    """Same size, same header, other numbers: what a bad disk or a stray write leaves."""
    data = bytearray(shard.read_bytes())
    tail = np.full(16, 1e30, dtype=np.float32).tobytes()
    data[-len(tail):] = tail
    shard.write_bytes(bytes(data))


def _nan_with_its_digest(shard: Path) -> None:
    """A NaN written as if it were a value, the digest recomputed to match: what a broken encoder run
    that bypassed the store's own check would leave."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from clipcap.pipeline.embedding_store import _digest

    with safe_open(str(shard), framework="pt") as handle:
        metadata, embeddings = handle.metadata(), handle.get_tensor("embeddings")
    embeddings[0, 0] = float("nan")
    save_file({"embeddings": embeddings}, str(shard), metadata=metadata | {"sha256": _digest(embeddings)})


DAMAGE = [_truncate, _overwrite_values, _nan_with_its_digest]


def test_the_store_refuses_to_write_non_finite_embeddings_and_names_the_image(tmp_path):
    store = EmbeddingStore(tmp_path, "enc@1")
    embeddings = torch.randn(3, 8)
    embeddings[1, 2] = float("inf")
    with pytest.raises(ClipcapError, match=r"NaN or inf for 1 of 3 images \(first: b\)"):
        store.add(["a", "b", "c"], embeddings)
    assert len(store) == 0 and not store.shards()


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_reader_refuses_a_damaged_shard_by_name(tmp_path, damage):
    store = EmbeddingStore(tmp_path, "enc@1")
    intact = torch.randn(2, 8)
    store.add(["a", "b"], intact)
    shard = store.add(["c", "d"], torch.randn(2, 8))
    damage(shard)
    reader = EmbeddingStore(tmp_path, "enc@1")
    assert_same_vectors(reader.get(["b", "a"]), intact[[1, 0]])  # the intact shard still reads
    with pytest.raises(DamagedShardError, match=rf"{shard.name}.*clipcap embed"):
        reader.get(["a", "c"])


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
    return folder


def _embed(paths, store_dir, encoder, **kwargs):
    return embed_missing([Path(p).stem for p in paths], paths, encoder, EmbeddingStore(store_dir, encoder.key),
                          batch_size=2, **kwargs)


def test_embedding_is_incremental_and_keyed_by_encoder(images, tmp_path):
    paths = sorted(str(p) for p in images.glob("*.png"))
    random, imagenet = build_encoder("efficientnet-lite0:random"), build_encoder("efficientnet-lite0")
    store_dir = tmp_path / "store"
    first = _embed(paths[:3], store_dir, random)
    assert (first.encoded, first.reused) == (3, 0)
    again = _embed(paths[:3], store_dir, random)
    assert (again.encoded, again.reused) == (0, 3)  # the same data: nothing encoded
    more = _embed(paths[:7], store_dir, random)
    assert (more.encoded, more.reused) == (4, 3)  # N new images: exactly N encoded
    other = _embed(paths[:7], store_dir, imagenet)
    assert (other.encoded, other.reused) == (7, 0)  # another encoder: everything again, in its own store
    assert len(EmbeddingStore(store_dir, random.key)) == 7  # the first store is kept
    from clipcap.modeling.encoders import encode_images

    ids = [Path(p).stem for p in paths[:7]]
    vectors = EmbeddingStore(store_dir, random.key).get(ids)
    assert vectors.shape == (7, 1280)
    assert_same_vectors(vectors, torch.cat(list(encode_images(random, paths[:7], 2))))  # each image's own vector
    assert_same_vectors(EmbeddingStore(store_dir, imagenet.key).get(ids),
                        torch.cat(list(encode_images(imagenet, paths[:7], 2))))


def test_sigkill_mid_run_resumes_without_reencoding_finished_shards(images, tmp_path):
    paths = sorted(str(p) for p in images.glob("*.png"))
    store_dir = tmp_path / "store"
    job = subprocess.run([sys.executable, str(JOB), str(images), str(store_dir), "--shard-size", "4",
                          "--kill-in-shard", "3"], capture_output=True, timeout=300)
    assert job.returncode == -signal.SIGKILL, job.stderr.decode()[-2000:]
    encoder = build_encoder("efficientnet-lite0:random")
    store = EmbeddingStore(store_dir, encoder.key)
    finished = {p.name: p.read_bytes() for p in store.shards()}
    assert sorted(finished) == ["shard-000000.safetensors", "shard-000001.safetensors"]
    assert len(list(store.dir.glob(".shard-000002.safetensors.*"))) == 1  # killed inside the third shard's write

    resumed = _embed(paths, store_dir, encoder, shard_size=4)
    assert resumed.encoded == 40 - 4 * len(finished)  # finished shards are not encoded again
    assert all((store_dir / store.dir.name / name).read_bytes() == data for name, data in finished.items())
    for shard in EmbeddingStore(store_dir, encoder.key).shards():  # every shard readable: nothing corrupt
        with safe_open(shard, framework="pt") as handle:
            assert handle.get_tensor("embeddings").shape[1] == 1280
    ids = [Path(p).stem for p in paths]
    uninterrupted = tmp_path / "uninterrupted"
    _embed(paths, uninterrupted, encoder, shard_size=4)
    assert_same_vectors(EmbeddingStore(store_dir, encoder.key).get(ids), EmbeddingStore(uninterrupted, encoder.key).get(ids))


@pytest.mark.parametrize("damage", DAMAGE)
def test_embed_sets_a_damaged_shard_aside_and_encodes_its_images_again(images, tmp_path, damage):
    paths = sorted(str(p) for p in images.glob("*.png"))[:6]
    encoder = build_encoder("efficientnet-lite0:random")
    store_dir = tmp_path / "store"
    _embed(paths, store_dir, encoder, shard_size=2)
    store = EmbeddingStore(store_dir, encoder.key)
    ids = [Path(p).stem for p in paths]
    before = store.get(ids)
    damaged = store.shards()[1]  # the middle one of three: the re-encoded shard must not take the last one's name
    intact = {p.name: p.read_bytes() for p in store.shards() if p != damaged}
    damage(damaged)
    again = _embed(paths, store_dir, encoder, shard_size=2)
    assert (again.encoded, again.reused) == (2, 4)  # exactly the damaged shard's images
    assert (store_dir / store.dir.name / "damaged" / damaged.name).exists()  # kept for inspection
    assert all((store.dir / name).read_bytes() == data for name, data in intact.items())  # shards are never rewritten
    assert_same_vectors(EmbeddingStore(store_dir, encoder.key).get(ids), before)  # every image: its own vector


def test_named_writers_share_a_store_without_colliding_and_merge_indexes_them(tmp_path):
    EmbeddingStore(tmp_path, "enc@1").add(["old"], torch.randn(1, 4))
    first, second = (EmbeddingStore(tmp_path, "enc@1", writer=w) for w in ("part1of2", "part2of2"))
    vectors = torch.randn(4, 4)
    first.add(["a", "b"], vectors[:2])
    second.add(["c"], vectors[2:3])
    first.add(["d"], vectors[3:])
    names = sorted(p.name for p in first.shards())
    assert names == ["shard-000000.safetensors", "shard-part1of2-000000.safetensors",
                     "shard-part1of2-000001.safetensors", "shard-part2of2-000000.safetensors"]
    assert json.loads((first.dir / INDEX).read_text())["shards"] == ["shard-000000.safetensors"]  # writers leave it
    merged = EmbeddingStore(tmp_path, "enc@1")
    assert merged.merge() == 5
    assert json.loads((merged.dir / INDEX).read_text())["shards"] == names
    assert_same_vectors(EmbeddingStore(tmp_path, "enc@1").get(["d", "a", "c"]), vectors[[3, 0, 2]])
    with pytest.raises(ValueError, match="writer name"):
        EmbeddingStore(tmp_path, "enc@1", writer="../x")


def test_parts_split_the_images_once_and_evenly():
    from clipcap.pipeline.parts import in_part, parse_part

    ids = [f"{n:064x}" for n in range(1000)]
    parts = [[i for i in ids if in_part(i, (k, 3))] for k in range(3)]
    assert sorted(sum(parts, [])) == ids and all(250 < len(p) < 420 for p in parts)
    assert parse_part("2/3") == (1, 3)
    for bad in ("0/2", "3/2", "x", "1/0"):
        with pytest.raises(ClipcapError, match="--part"):
            parse_part(bad)
