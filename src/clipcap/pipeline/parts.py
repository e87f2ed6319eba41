"""Work split in N parts that need not talk to each other: ``clipcap embed --part I/N`` and ``clipcap
evaluate --part I/N`` each take the images whose id falls in part I (ids are content hashes, so the parts
come out even and every process agrees on them). ``flows/parts.py`` runs the N parts at once."""

from __future__ import annotations

import hashlib

from clipcap.errors import ClipcapError


def parse_part(text: str) -> tuple[int, int]:
    """``"I/N"`` (1 <= I <= N) -> (I - 1, N)."""
    try:
        number, count = (int(x) for x in text.split("/"))
    except ValueError:
        number = count = 0
    if not 1 <= number <= count:
        raise ClipcapError(f"--part {text!r}: expected I/N with 1 <= I <= N, e.g. 1/2")
    return number - 1, count


def in_part(image_id: str, part: tuple[int, int]) -> bool:
    """Whether part ``(index, count)`` takes ``image_id``."""
    return int(hashlib.sha256(image_id.encode()).hexdigest()[:8], 16) % part[1] == part[0]


def part_name(part: tuple[int, int]) -> str:
    """``part2of4``: how a part names what it writes."""
    return f"part{part[0] + 1}of{part[1]}"
