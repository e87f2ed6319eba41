"""Speed and memory of the embed stage against its limits, on this machine, in one run.

Three rates over the same images, with the same DataLoader workers and batch size:

- decode: decoding + resizing alone (the DataLoader of the stage, no encoder): the I/O limit;
- encode: the encoder alone on already-preprocessed batches: the compute limit;
- stage: ``clipcap.pipeline.stages.embed.embed_missing`` into a fresh store (decode, encode, shard writes).

The stage overlaps decoding with encoding, so it should reach close to the lower of the two
limits. The issue's target compares the stage with the decode limit (>= 80%), which holds
where the encoder is faster than decoding (a GPU); on a small CPU the encoder is the limit.
``--peak-memory`` also embeds the images in a child process and reports its peak resident
memory (main process and DataLoader workers), to show memory does not grow with the dataset.

    python benchmarks/embed_speed.py                       # 512 generated 640x480 JPEGs, cpu
    python benchmarks/embed_speed.py --images 10000 --peak-memory --skip-rates
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from clipcap.modeling.encoders import ImageDataset, build_encoder  # noqa: E402
from clipcap.pipeline.embedding_store import EmbeddingStore  # noqa: E402
from clipcap.pipeline.stages.embed import embed_missing  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_STAGE_VS_DECODE = 0.8  # the stage >= 80% of the decode + resize rate (DESIGN.md section 6; meant for a GPU)


@dataclass(frozen=True)
class Settings:
    images: int
    width: int
    height: int
    encoder: str
    device: str
    batch_size: int
    workers: int


def _generate_image(path: Path, i: int, width: int, height: int) -> None:
    """Image ``i``: a smooth colour field (shifted by i) plus noise seeded by i."""
    base = np.random.default_rng(0).integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
    field = Image.fromarray(np.roll(base, i, axis=1)).resize((width, height), Image.Resampling.BILINEAR)
    noise = np.random.default_rng((0, i)).integers(-12, 12, (height, width, 3))
    Image.fromarray(np.clip(np.asarray(field, dtype=np.int16) + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def generate_images(folder: Path, count: int, width: int, height: int) -> list[str]:
    """Photo-like JPEGs (smooth colour fields plus noise, so they compress like photos), made in
    parallel on all cores; images already in ``folder`` are kept."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:06d}.jpg" for i in range(count)]
    todo = [i for i, path in enumerate(paths) if not path.exists()]
    with ProcessPoolExecutor(len(os.sched_getaffinity(0)), mp_context=multiprocessing.get_context("fork")) as pool:
        jobs = [pool.submit(_generate_image, paths[i], i, width, height) for i in todo]
        for job in tqdm(as_completed(jobs), total=len(jobs), desc="generate", unit="img"):
            job.result()
    return [str(path) for path in paths]


def rate(count: int, seconds: float) -> float:
    return count / seconds


def decode_rate(s: Settings, paths: list[str], preprocess) -> float:
    loader = DataLoader(ImageDataset(paths, preprocess), batch_size=s.batch_size, num_workers=s.workers,
                        prefetch_factor=4 if s.workers else None)
    start = time.perf_counter()
    for _ in tqdm(loader, desc="decode only", unit="batch"):
        pass
    return rate(len(paths), time.perf_counter() - start)


@torch.inference_mode()
def encode_rate(s: Settings, encoder, batches: int) -> float:
    pixels = torch.randn(s.batch_size, 3, 224, 224, device=s.device)
    encoder(pixels)  # warm-up
    sync = torch.cuda.synchronize if s.device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in tqdm(range(batches), desc="encode only", unit="batch"):
        encoder(pixels)
    sync()
    return rate(batches * s.batch_size, time.perf_counter() - start)


def stage_rate(s: Settings, paths: list[str], encoder, store_dir: Path) -> float:
    store = EmbeddingStore(store_dir, encoder.key)
    start = time.perf_counter()
    stats = embed_missing([Path(p).stem for p in paths], paths, encoder, store, batch_size=s.batch_size,
                           num_workers=s.workers)
    elapsed = time.perf_counter() - start
    assert stats.encoded == len(paths), stats
    return rate(len(paths), elapsed)


def peak_memory_mib(s: Settings, image_dir: Path, store_dir: Path) -> dict:
    """Embed every image of ``image_dir`` in a child process; its peak RSS and its workers'."""
    code = (
        "import json, resource, sys; from pathlib import Path\n"
        "from clipcap.pipeline.stages.embed import embed_missing; from clipcap.pipeline.embedding_store import EmbeddingStore\n"
        "from clipcap.modeling.encoders import build_encoder\n"
        f"paths = sorted(str(p) for p in Path({str(image_dir)!r}).glob('*.jpg'))\n"
        f"encoder = build_encoder({s.encoder!r}).to({s.device!r})\n"
        f"stats = embed_missing([Path(p).stem for p in paths], paths, encoder, "
        f"EmbeddingStore({str(store_dir)!r}, encoder.key), batch_size={s.batch_size}, num_workers={s.workers})\n"
        "print(json.dumps({'encoded': stats.encoded, 'main_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,"
        " 'largest_worker_mib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))\n"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1]) | {"seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", default="640x480", help="generated image size WxH (COCO-like)")
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--peak-memory", action="store_true", help="also measure the peak memory of embedding all")
    parser.add_argument("--skip-rates", action="store_true", help="only the peak memory")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "clipcap-embed-bench")
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    s = Settings(args.images, width, height, args.encoder, args.device, args.batch_size, args.workers)
    paths = generate_images(args.workdir / f"images-{width}x{height}-{s.images}", s.images, width, height)
    gpu = torch.cuda.get_device_name() if s.device.startswith("cuda") else None
    commit = os.environ.get("CLIPCAP_COMMIT") or subprocess.run(  # a copied tree's .git may be stale
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False,
        cwd=Path(__file__).parent).stdout.strip()
    result: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "settings": asdict(s),
                    "machine": {"cpu_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "gpu": gpu,
                                "commit": commit or None}}
    if not args.skip_rates:
        encoder = build_encoder(s.encoder).to(s.device)
        with tempfile.TemporaryDirectory(dir=args.workdir) as store_dir:
            rates = {"decode": decode_rate(s, paths, encoder.preprocess),
                     "encode": encode_rate(s, encoder, max(2, min(20, s.images // s.batch_size))),
                     "stage": stage_rate(s, paths, encoder, Path(store_dir))}
        rates |= {"stage_vs_decode": rates["stage"] / rates["decode"],
                  "stage_vs_slower_limit": rates["stage"] / min(rates["decode"], rates["encode"])}
        result["images_per_second"] = rates
        result["target"] = {"stage_vs_decode": TARGET_STAGE_VS_DECODE,
                            "passed": rates["stage_vs_decode"] >= TARGET_STAGE_VS_DECODE}
        print("\n" + "\n".join(f"{k:>22}: {v:,.2f}" for k, v in rates.items()))
        print(f"target stage >= {TARGET_STAGE_VS_DECODE:.0%} of decode: {'PASS' if result['target']['passed'] else 'FAIL'}")
    if args.peak_memory:
        with tempfile.TemporaryDirectory(dir=args.workdir) as store_dir:
            result["peak_memory"] = peak_memory_mib(s, Path(paths[0]).parent, Path(store_dir))
        print("peak memory:", result["peak_memory"])
    RESULTS.mkdir(exist_ok=True)
    device = f"cuda-{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}" if gpu else s.device.split(":")[0]
    name = f"embed-{device}-{s.images}img{'-memory' if args.skip_rates else ''}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
