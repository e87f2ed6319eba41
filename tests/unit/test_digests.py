"""Image digests cached by (path, size, mtime, inode): a fetch hashes only what is new or changed."""

from __future__ import annotations

import hashlib
import os

import pytest

import clipcap.data.digests as digests
from clipcap.data.digests import image_digests


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The files actually read and hashed, in order."""
    seen: list[str] = []
    real = digests.file_sha256

    def counting(path):
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(digests, "file_sha256", counting)
    return seen


def _files(folder, count):
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i}.bin"
        path.write_bytes(f"image {i}".encode())
        paths.append(str(path))
    return paths


def test_unchanged_files_come_from_the_cache_and_only_new_or_changed_ones_are_hashed(tmp_path, hashed):
    paths = _files(tmp_path / "images", 5)
    cache = tmp_path / "digests.sqlite"
    first = image_digests(paths, workers=2, cache=cache)
    assert first == {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths}
    assert sorted(hashed) == [f"{i}.bin" for i in range(5)]

    hashed.clear()
    assert image_digests(paths, cache=cache) == first and hashed == []  # nothing new: nothing read

    new = _files(tmp_path / "more", 2)
    with open(paths[0], "ab") as handle:  # changed in place: another size and mtime
        handle.write(b" edited")
    again = image_digests(paths + new, workers=2, cache=cache)
    assert sorted(hashed) == ["0.bin", "0.bin", "1.bin"]  # the edited file and the two new ones
    assert again[paths[0]] == hashlib.sha256(b"image 0 edited").hexdigest() != first[paths[0]]


def test_the_cache_only_saves_work(tmp_path, hashed):
    paths = _files(tmp_path / "images", 3)
    with_cache = image_digests(paths, cache=tmp_path / "digests.sqlite")
    (tmp_path / "digests.sqlite").unlink()
    assert image_digests(paths, cache=tmp_path / "digests.sqlite") == with_cache == image_digests(paths)


def test_a_replaced_file_with_the_same_size_and_mtime_is_hashed_again(tmp_path, hashed):
    """Another inode (a file replaced by rename, as editors and rsync do) is not trusted."""
    path = _files(tmp_path / "images", 1)[0]
    cache = tmp_path / "digests.sqlite"
    image_digests([path], cache=cache)
    stat = os.stat(path)
    replacement = tmp_path / "images" / "tmp"
    replacement.write_bytes(b"image X")  # the same length as "image 0"
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, path)
    hashed.clear()
    assert image_digests([path], cache=cache)[path] == hashlib.sha256(b"image X").hexdigest()
    assert hashed == ["0.bin"]


def test_missing_files_are_left_out_and_unreadable_ones_give_their_error(tmp_path, monkeypatch):
    paths = _files(tmp_path / "images", 2)
    real = digests.file_sha256

    def failing(path):
        if path == paths[1]:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(digests, "file_sha256", failing)
    found = image_digests([*paths, str(tmp_path / "gone.png")], cache=tmp_path / "d.sqlite")
    assert str(tmp_path / "gone.png") not in found and found[paths[0]] == real(paths[0])
    assert isinstance(found[paths[1]], PermissionError)
    monkeypatch.setattr(digests, "file_sha256", real)
    assert image_digests(paths, cache=tmp_path / "d.sqlite")[paths[1]] == real(paths[1])  # an error is not cached
