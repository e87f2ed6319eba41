"""Downloads against a real HTTP server on 127.0.0.1: cuts, resumes, servers ignoring Range, corruption, 404s;
and safe extraction of archives."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from clipcap.data import download as dl
from clipcap.data.download import DownloadError, download, extract, part_path

CHUNK = 256  # small chunks so a cut lands mid-file and the loop runs many times
STALL_S = 1.0


def make_archive() -> tuple[bytes, dict[str, bytes]]:
    """A few-KB tar.gz of noisy PNGs (they do not compress away) and a captions.jsonl; returns it and its files."""
    rng = random.Random(0)
    files: dict[str, bytes] = {}
    for index in range(3):
        buffer = io.BytesIO()
        Image.frombytes("RGB", (20, 20), rng.randbytes(20 * 20 * 3)).save(buffer, format="PNG")
        files[f"images/{index}.png"] = buffer.getvalue()
    captions = [{"image": f"images/{index}.png", "caption": f"Noise number {index}."} for index in range(3)]
    files["captions.jsonl"] = "".join(json.dumps(row) + "\n" for row in captions).encode()
    return tar_gz(files), files


def tar_gz(files: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    """tar.gz bytes with ``files`` as written (names unchanged, even absolute or with '..') and optional links."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return buffer.getvalue()


ARCHIVE, ARCHIVE_FILES = make_archive()
ARCHIVE_SHA = hashlib.sha256(ARCHIVE).hexdigest()


@dataclass
class ServerState:
    """What the server does (``mode``) and what it saw: one Range header (or None) per request, bytes sent."""

    mode: str = "normal"  # normal | cut_first | cut_always | stall_first | ignore_range | corrupt | missing
    body: bytes = ARCHIVE
    ranges: list[str | None] = field(default_factory=list)
    bytes_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    """Serves ``state.body`` at any path, honouring ``Range: bytes=N-`` unless the mode says otherwise."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        with state.lock:
            state.ranges.append(self.headers.get("Range"))
            first = len(state.ranges) == 1
        if state.mode == "missing":
            self.send_error(404, "Not Found")
            return
        body = self._body(state)
        start = self._range_start(state)
        if start is not None and start >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._send(state, body, start or 0, cut=state.mode == "cut_always" or (
            first and state.mode in ("cut_first", "ignore_range", "stall_first")))

    def _body(self, state: ServerState) -> bytes:
        if state.mode != "corrupt":
            return state.body
        flipped = bytearray(state.body)
        flipped[len(flipped) // 2] ^= 0xFF
        return bytes(flipped)

    def _range_start(self, state: ServerState) -> int | None:
        header = self.headers.get("Range")
        if state.mode == "ignore_range" or not header:
            return None
        return int(header.removeprefix("bytes=").split("-")[0])

    def _send(self, state: ServerState, body: bytes, start: int, cut: bool) -> None:
        """Headers announce the full remainder; a cut sends only half of it, then closes the socket."""
        remainder = body[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(remainder)))
        self.send_header("Content-Type", "application/gzip")
        self.end_headers()
        payload = remainder[: len(remainder) // 2] if cut else remainder
        with state.lock:  # counted before sending: the client may finish before this thread runs on
            state.bytes_sent += len(payload)
        self.wfile.write(payload)
        self.wfile.flush()
        if cut and state.mode == "stall_first":
            time.sleep(STALL_S)  # silence past the client's timeout, before the socket closes
        if cut:
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output quiet
        pass


@pytest.fixture
def server():
    """A threaded HTTP server on 127.0.0.1 (any free port); yields (base url, state)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = ServerState()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd.state  # type: ignore[attr-defined]
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(dl, "RETRY_BACKOFF_S", 0.0)


def fetch(url: str, target: Path, sha256: str | None = ARCHIVE_SHA, retries: int = 5, timeout: float = 5.0,
          progress: bool = False) -> Path:
    return download(url, target, sha256, retries=retries, timeout=timeout, chunk_size=CHUNK, progress=progress)


def test_plain_download_verifies_and_second_call_makes_no_request(server, tmp_path, caplog):
    base, state = server
    target = tmp_path / "sub" / "archive.tar.gz"
    caplog.set_level("INFO", logger="clipcap.data.download")
    assert fetch(f"{base}/archive.tar.gz", target) == target
    assert target.read_bytes() == ARCHIVE
    assert not part_path(target).exists()
    assert "verified sha256" in caplog.text
    assert state.ranges == [None]
    fetch(f"{base}/archive.tar.gz", target)
    fetch(f"{base}/archive.tar.gz", target, sha256=None)
    assert len(state.ranges) == 1


def test_connection_cut_mid_file_resumes_with_range(server, tmp_path, caplog):
    base, state = server
    state.mode = "cut_first"
    target = tmp_path / "archive.tar.gz"
    caplog.set_level("INFO", logger="clipcap.data.download")
    fetch(f"{base}/a.tgz", target, progress=True)
    half = len(ARCHIVE) // 2
    assert target.read_bytes() == ARCHIVE
    assert state.ranges == [None, f"bytes={half}-"]
    assert state.bytes_sent == len(ARCHIVE) < 1.6 * len(ARCHIVE)
    assert f"resuming {base}/a.tgz at {half} bytes" in caplog.text


def test_read_timeout_resumes(server, tmp_path):
    """Half the body, then silence: the read times out and the next attempt asks for the rest."""
    base, state = server
    state.mode = "stall_first"
    target = tmp_path / "archive.tar.gz"
    fetch(f"{base}/a.tgz", target, timeout=0.3)
    assert target.read_bytes() == ARCHIVE
    assert len(state.ranges) == 2 and state.ranges[0] is None
    resumed_at = int(state.ranges[1].removeprefix("bytes=").rstrip("-"))  # what reached the .part before the stall
    assert 0 < resumed_at <= len(ARCHIVE) // 2


def test_part_left_by_killed_run_is_resumed(server, tmp_path):
    base, state = server
    target = tmp_path / "archive.tar.gz"
    third = len(ARCHIVE) // 3
    part_path(target).write_bytes(ARCHIVE[:third])
    fetch(f"{base}/a.tgz", target)
    assert target.read_bytes() == ARCHIVE
    assert state.ranges == [f"bytes={third}-"]
    assert state.bytes_sent == len(ARCHIVE) - third


def test_complete_part_is_finished_without_a_body(server, tmp_path):
    """Killed between the last byte and the rename: the server answers 416 and the .part is verified as is."""
    base, state = server
    target = tmp_path / "archive.tar.gz"
    part_path(target).write_bytes(ARCHIVE)
    fetch(f"{base}/a.tgz", target)
    assert target.read_bytes() == ARCHIVE and state.bytes_sent == 0


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, caplog):
    base, state = server
    state.mode = "ignore_range"
    target = tmp_path / "archive.tar.gz"
    fetch(f"{base}/a.tgz", target)
    assert target.read_bytes() == ARCHIVE
    assert state.ranges == [None, f"bytes={len(ARCHIVE) // 2}-"]
    assert "ignored the Range request" in caplog.text


def test_corrupted_file_is_deleted_and_named(server, tmp_path):
    base, state = server
    state.mode = "corrupt"
    target = tmp_path / "archive.tar.gz"
    with pytest.raises(DownloadError, match="sha256") as info:
        fetch(f"{base}/a.tgz", target)
    message = str(info.value)
    assert f"{base}/a.tgz" in message and ARCHIVE_SHA in message and "params.yaml" in message
    assert not target.exists() and not part_path(target).exists()


def test_existing_target_with_wrong_digest_is_downloaded_again(server, tmp_path):
    base, state = server
    target = tmp_path / "archive.tar.gz"
    target.write_bytes(b"stale")
    fetch(f"{base}/a.tgz", target)
    assert target.read_bytes() == ARCHIVE and len(state.ranges) == 1


def test_http_404_fails_at_once_naming_the_url(server, tmp_path):
    base, state = server
    state.mode = "missing"
    with pytest.raises(DownloadError, match="404") as info:
        fetch(f"{base}/nowhere.zip", tmp_path / "x.zip")
    assert f"{base}/nowhere.zip" in str(info.value)
    assert len(state.ranges) == 1
    assert not (tmp_path / "x.zip").exists()


def test_persistent_failure_gives_up_after_retries_and_keeps_part_for_a_rerun(server, tmp_path):
    base, state = server
    state.mode = "cut_always"
    target = tmp_path / "archive.tar.gz"
    with pytest.raises(DownloadError, match="after 3 attempts") as info:
        fetch(f"{base}/a.tgz", target, retries=3)
    kept = part_path(target).stat().st_size
    assert f"{base}/a.tgz" in str(info.value) and f"{kept} of {len(ARCHIVE)} bytes" in str(info.value)
    assert len(state.ranges) == 3 and 0 < kept < len(ARCHIVE) and not target.exists()
    state.mode = "normal"
    fetch(f"{base}/a.tgz", target)  # the re-run resumes where the last attempt stopped
    assert target.read_bytes() == ARCHIVE and state.ranges[-1] == f"bytes={kept}-"


def test_unreachable_server_fails_after_retries(tmp_path):
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DownloadError, match=f"127.0.0.1:{port}"):
        fetch(f"http://127.0.0.1:{port}/a.tgz", tmp_path / "a.tgz", retries=2)


def test_extract_tar_gz_and_zip(tmp_path):
    archive = tmp_path / "good.tar.gz"
    archive.write_bytes(ARCHIVE)
    out = extract(archive, tmp_path / "out")
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == set(ARCHIVE_FILES)
    assert (out / "captions.jsonl").read_bytes() == ARCHIVE_FILES["captions.jsonl"]
    (out / "mine.txt").write_text("kept")
    assert extract(archive, out) == out and (out / "mine.txt").exists()  # existing destination: untouched
    zipped = tmp_path / "good.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for name, data in ARCHIVE_FILES.items():
            zf.writestr(name, data)
    assert (extract(zipped, tmp_path / "zout") / "images" / "2.png").read_bytes() == ARCHIVE_FILES["images/2.png"]
    assert not list(tmp_path.glob(".*extracting"))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "zip_dotdot"])
def test_extract_refuses_members_escaping_destination(tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    evil = {"dotdot": "../evil.txt", "absolute": f"{outside}/abs.txt", "symlink": "link",
            "hardlink": "hard", "zip_dotdot": "../evil.txt"}[kind]
    files = {"ok.txt": b"fine"}
    links: dict[str, tuple[bytes, str]] = {}
    if kind in ("dotdot", "absolute"):
        files[evil] = b"pwned"
    elif kind == "symlink":
        links[evil] = (tarfile.SYMTYPE, "../outside")
    elif kind == "hardlink":
        links[evil] = (tarfile.LNKTYPE, "../outside/target.txt")
    archive = tmp_path / ("bad.zip" if kind == "zip_dotdot" else "bad.tar.gz")
    if kind == "zip_dotdot":
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("ok.txt", b"fine")
            zf.writestr(evil, b"pwned")
    else:
        archive.write_bytes(tar_gz(files, links))
    destination = tmp_path / "dest" / "out"
    with pytest.raises(DownloadError, match="Refusing") as info:
        extract(archive, destination)
    assert repr(evil) in str(info.value)
    assert not destination.exists() and list((tmp_path / "dest").iterdir()) == []
    assert not (tmp_path / "evil.txt").exists() and list(outside.iterdir()) == []


def test_extract_rejects_a_non_archive(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not an archive at all")
    with pytest.raises(DownloadError, match="neither a zip nor a tar"):
        extract(junk, tmp_path / "out")
    assert not (tmp_path / "out").exists()
