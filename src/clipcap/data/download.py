"""Resumable, verified downloads and safe archive extraction for the fetch stage.

Datasets such as the COCO 2014 images (~13 GB) arrive over links that drop. A download therefore streams into
``<target>.part``, resumes with an HTTP ``Range`` request after a cut (or after a killed run), verifies the sha256
when one is configured, and only then renames the file into place: ``target`` is either absent or complete and
verified. Archives are extracted into a temporary folder beside the destination that is renamed into place, and
members that would land outside the destination are refused.
"""

from __future__ import annotations

import http.client
import logging
import os
import posixpath
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from clipcap.errors import ClipcapError
from clipcap.fileio import file_sha256

log = logging.getLogger(__name__)

RETRY_BACKOFF_S = 1.0  # first pause between attempts; doubles each time (tests shrink it)
RETRY_BACKOFF_MAX_S = 30.0
RETRYABLE_4XX = frozenset({408, 429})  # request timeout / too many requests: worth another try
USER_AGENT = "clipcap-download/1"
PART_SUFFIX = ".part"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class DownloadError(ClipcapError, RuntimeError):
    """A download or an extraction that cannot complete; the message names the item and what to do."""


class _RetryableError(Exception):
    """One attempt failed in a way another attempt (resuming from the .part) may fix; ``total`` is the full size
    when the server announced it, so the final message can say how far the download got."""

    def __init__(self, message: str, total: int | None = None) -> None:
        super().__init__(message)
        self.total = total


def part_path(target: str | Path) -> Path:
    """The ``<target>.part`` file a download streams into (exposed so callers and tests agree on it)."""
    target = Path(target)
    return target.with_name(target.name + PART_SUFFIX)


def download(url: str, target: str | Path, sha256: str | None = None, *, retries: int = 5,
             timeout: float = 60.0, chunk_size: int = 1 << 20, progress: bool = True) -> Path:
    """Download ``url`` to ``target`` and return ``target``.

    If ``target`` exists and matches ``sha256`` (or ``sha256`` is None) it is returned at once, without a request.
    Bytes stream into ``<target>.part``; after a dropped connection, a short read, a timeout or a 5xx reply the
    next attempt (after a short, doubling backoff) asks for the rest with ``Range: bytes=<size of .part>-``.
    A 206 reply appends; a 200 reply (a server that ignores ranges) restarts from zero. A .part left by a killed
    run is resumed the same way. Once the full size is reached the sha256 is verified (when given): a mismatch
    deletes the .part and raises :class:`DownloadError`. Only a complete, verified file is renamed onto ``target``.

    ``retries`` is the number of attempts in total (at least one); after that many failures DownloadError is raised
    and the .part is kept, so running again resumes. HTTP 4xx replies (except 408/429) fail at once.
    """
    target = Path(target)
    expected = sha256.strip().lower() if sha256 else None
    if _already_done(target, expected):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(target)
    with tqdm(total=None, desc=target.name, unit="B", unit_scale=True, unit_divisor=1024,
              disable=not progress) as bar:
        _fetch_with_retries(url, part, max(1, retries), timeout, chunk_size, bar)
    _verify(url, part, expected)
    os.replace(part, target)
    log.info("downloaded %s -> %s", url, target)
    return target


def _already_done(target: Path, expected: str | None) -> bool:
    """True when ``target`` is there and, if a digest is configured, matches it: no request is needed."""
    if not target.is_file():
        return False
    if expected is None:
        log.info("%s already exists (no sha256 configured): not downloading again", target)
        return True
    actual = file_sha256(target)
    if actual == expected:
        log.info("%s already exists with the expected sha256: not downloading again", target)
        return True
    log.warning("%s exists but its sha256 is %s, not %s: downloading it again", target, actual, expected)
    return False


def _fetch_with_retries(url: str, part: Path, attempts: int, timeout: float, chunk_size: int, bar: tqdm) -> None:
    """Run attempts until the .part holds the whole file; raise DownloadError (keeping the .part) when out of tries."""
    last_error: BaseException | None = None
    total: int | None = None
    for attempt in range(1, attempts + 1):
        if attempt > 1:
            pause = min(RETRY_BACKOFF_S * 2 ** (attempt - 2), RETRY_BACKOFF_MAX_S)
            log.warning("attempt %d/%d for %s failed (%s); retrying in %.1f s", attempt - 1, attempts, url,
                        last_error, pause)
            time.sleep(pause)
        try:
            _fetch_once(url, part, timeout, chunk_size, bar)
            return
        except _RetryableError as exc:
            last_error = exc.__cause__ or exc
            total = exc.total or total
    received = part.stat().st_size if part.exists() else 0
    of_total = f" of {total}" if total else ""
    raise DownloadError(
        f"Downloading {url} failed after {attempts} attempts: {received}{of_total} bytes received and kept in "
        f"{part} ({last_error}). Run the same command again to resume from there; if it keeps failing, check the "
        f"network and the URL (the dataset's URL in params.yaml or the mirror)."
    ) from last_error


def _fetch_once(url: str, part: Path, timeout: float, chunk_size: int, bar: tqdm) -> None:
    """One request: resume from the .part's size, append or restart as the reply says, stream to the end."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        log.info("resuming %s at %d bytes", url, have)
    request = urllib.request.Request(url, headers=headers)
    total: int | None = None
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            have, total, mode = _plan_write(url, response, have, part)
            bar.reset(total=total)
            bar.update(have)
            have = _stream(response, part, mode, have, chunk_size, bar)
    except urllib.error.HTTPError as exc:  # before OSError: HTTPError is one
        _handle_http_error(url, exc, part, have)
        return
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, IncompleteRead, ...
        raise _RetryableError(str(exc), total) from exc
    if total is not None and have < total:  # http.client returns a short body silently: check the size
        raise _RetryableError(f"connection closed after {have} of {total} bytes", total)
    if total is not None and have > total:
        part.unlink()
        raise _RetryableError(f"received {have} bytes but the server announced {total}; restarting", total)


def _plan_write(url: str, response: http.client.HTTPResponse, have: int, part: Path) -> tuple[int, int | None, str]:
    """From the reply's status and headers: bytes kept, full size (None if unknown) and the file mode to write with."""
    status = getattr(response, "status", None) or 200  # file:// and ftp:// replies carry no status
    length = _int_or_none(response.headers.get("Content-Length"))
    if have and status == 206:
        start, total = _parse_content_range(response.headers.get("Content-Range"))
        if start != have:
            part.unlink(missing_ok=True)
            raise _RetryableError(f"server resumed at byte {start}, not {have}; restarting from zero")
        return have, total if total is not None else (have + length if length is not None else None), "ab"
    if have:
        log.warning("server ignored the Range request for %s (status %d): restarting from zero", url, status)
    return 0, length, "wb"


def _stream(response: http.client.HTTPResponse, part: Path, mode: str, have: int, chunk_size: int,
            bar: tqdm) -> int:
    """Copy the body into the .part chunk by chunk; return the .part's size when the body ends or breaks off."""
    with open(part, mode) as out:  # closed (so flushed) even when the read breaks off: the bytes stay resumable
        while chunk := response.read(chunk_size):
            out.write(chunk)
            have += len(chunk)
            bar.update(len(chunk))
    return have


def _handle_http_error(url: str, exc: urllib.error.HTTPError, part: Path, have: int) -> None:
    """416 on a resume can mean the .part is already whole; 4xx fail at once; 5xx are worth another attempt."""
    code = exc.code
    if code == 416 and have:
        _, total = _parse_content_range(exc.headers.get("Content-Range") if exc.headers else None)
        if total == have:
            log.info("%s: the .part already holds all %d bytes", url, have)
            return
        part.unlink(missing_ok=True)  # larger than the file: it cannot be resumed
        raise _RetryableError(str(exc), total) from exc
    if 400 <= code < 500 and code not in RETRYABLE_4XX:
        raise DownloadError(
            f"Downloading {url} failed: HTTP {code} {exc.reason}. The server refuses this URL; check the URL "
            f"configured for the dataset in params.yaml (a typo, a moved file, or a mirror that needs access)."
        ) from exc
    raise _RetryableError(str(exc)) from exc


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-999/1000`` -> (100, 1000); ``bytes */1000`` -> (None, 1000); unknown parts -> None."""
    if not value:
        return None, None
    match = _CONTENT_RANGE.search(value)
    if match:
        return int(match.group(1)), _int_or_none(match.group(3))
    star = re.search(r"bytes\s+\*/(\d+)", value)
    return None, int(star.group(1)) if star else None


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _verify(url: str, part: Path, expected: str | None) -> None:
    """Check the finished .part against the configured digest; a corrupt file is deleted, never moved into place."""
    actual = file_sha256(part)
    if expected is None:
        log.info("%s: no sha256 configured; its sha256 is %s (configure it to verify future downloads)", url, actual)
        return
    if actual != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"Downloading {url} gave a corrupt file: sha256 {actual}, expected {expected}. The file was deleted. "
            f"Run again to download it afresh; if the digest differs again, check the dataset's *_sha256 value in "
            f"params.yaml or use another mirror."
        )
    log.info("verified sha256 of %s (%s)", url, actual)


def extract(archive: str | Path, destination: str | Path) -> Path:
    """Extract a .zip / .tar / .tar.gz / .tgz into ``destination`` safely and atomically; return ``destination``.

    Members with an absolute path or one escaping the destination (``..``), and links pointing outside, are refused
    with DownloadError naming the member. Files go to ``.<destination>.extracting`` beside it, renamed into place at
    the end, so an existing destination is always complete: it is returned untouched. A leftover temporary folder
    from a killed extraction is removed first.
    """
    archive, destination = Path(archive), Path(destination)
    if destination.exists():
        log.info("%s already extracted at %s", archive, destination)
        return destination
    if not archive.is_file():
        raise DownloadError(f"Cannot extract {archive}: the file does not exist. Download it first (clipcap fetch).")
    staging = destination.with_name(f".{destination.name}.extracting")
    if staging.exists():
        log.warning("removing %s left by an interrupted extraction", staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        _extract_into(archive, staging)
        os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("extracted %s -> %s", archive, destination)
    return destination


def _extract_into(archive: Path, staging: Path) -> None:
    """Pick the format from the file's content (not its name) and extract every member into ``staging``."""
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, staging)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, staging)
        else:
            raise DownloadError(f"Cannot extract {archive}: it is neither a zip nor a tar archive "
                                f"(.zip, .tar, .tar.gz, .tgz). Check the downloaded file or the URL.")
    except (zipfile.BadZipFile, tarfile.ReadError, EOFError, zlib.error) as exc:
        raise DownloadError(f"Cannot extract {archive}: the archive is damaged ({exc}). Delete it and download "
                            f"it again.") from exc


def _is_absolute(name: str) -> bool:
    """POSIX or Windows absolute (``/x``, ``\\x``, ``C:x``): such a member would be written wherever it says."""
    normal = name.replace("\\", "/")
    return normal.startswith("/") or re.match(r"^[A-Za-z]:", normal) is not None


def _unsafe_reason(name: str) -> str | None:
    """Why a member path must not be written (absolute, or leaving the destination); None when it is safe."""
    if _is_absolute(name):
        return "has an absolute path"
    resolved = posixpath.normpath(name.replace("\\", "/"))
    if resolved == ".." or resolved.startswith("../"):
        return "escapes the destination with '..'"
    return None


def _refuse(archive: Path, member: str, reason: str) -> DownloadError:
    return DownloadError(f"Refusing to extract {archive}: member {member!r} {reason}. The archive may be malicious "
                         f"or damaged; nothing was extracted. Check where it came from.")


def _extract_zip(archive: Path, staging: Path) -> None:
    """Check every name first (the zip directory is cheap to read), then extract; zipfile writes no links."""
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            reason = _unsafe_reason(info.filename)
            if reason:
                raise _refuse(archive, info.filename, reason)
        zf.extractall(staging)


def _extract_tar(archive: Path, staging: Path) -> None:
    """Stream members (one pass, even for a large .tar.gz), refusing unsafe ones before anything is written for them.

    The standard library's ``data`` filter runs as well: it resolves link chains on disk, which a check of names
    alone cannot.
    """
    with tarfile.open(archive, "r:*") as tar:
        try:
            tar.extractall(staging, members=_checked_members(archive, tar), filter="data")
        except tarfile.FilterError as exc:
            member = exc.tarinfo.name if getattr(exc, "tarinfo", None) else "?"
            raise _refuse(archive, member, f"is unsafe ({exc})") from exc


def _checked_members(archive: Path, tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Yield the tar's members, raising DownloadError at the first one that would write outside the destination."""
    for member in tar:
        reason = _unsafe_reason(member.name) or _unsafe_link_reason(member)
        if reason:
            raise _refuse(archive, member.name, reason)
        yield member


def _unsafe_link_reason(member: tarfile.TarInfo) -> str | None:
    """Links must point inside: symlinks relative to their own folder, hard links relative to the archive root."""
    if member.issym():
        if _is_absolute(member.linkname):
            return f"is a symlink to the absolute path {member.linkname!r}"
        base = posixpath.dirname(member.name.replace("\\", "/"))
        if _unsafe_reason(posixpath.join(base, member.linkname)):
            return f"is a symlink pointing outside the destination ({member.linkname!r})"
    elif member.islnk() and _unsafe_reason(member.linkname):
        return f"is a hard link pointing outside the destination ({member.linkname!r})"
    elif member.isdev() or member.isfifo():
        return "is a device or fifo, not a regular file"
    return None
