"""Retrieval at scale: the caption datastore's faiss search on a synthetic 1,000,000-entry datastore.

The datastore is ``clipcap.modeling.retrieval.CaptionDatastore`` as captioners use it: above
``approximate_above`` entries an ``IVF<nlist>,PQ<m>x4fsr`` index (inverted lists of 4-bit product
codes of the residuals, scanned with SIMD lookups) proposes candidates, which are re-scored exactly
against the stored float32 embeddings. Measured on this machine, in one run, with torch and faiss
limited to ``--threads`` (default: the cores this process may use; the index's training runs on one
thread, as the datastore does it):

- build time of the approximate index (k-means and product-quantiser training + adding every entry), the bytes it takes
  (in memory, and as the ``datastore.faiss`` file a saved captioner keeps beside its embeddings),
  the time to write and read that file, and the growth of the process's resident memory;
- per-image query time of ``nearest(queries, k)`` (the full call: faiss search, exact re-scoring,
  caption walk) for one image at a time and for batches of 64;
- recall@k of those captions against exact search (``faiss.knn`` over all entries: the kernel of
  ``IndexFlatIP`` without copying the 5 GB of vectors into an index), over ``--queries`` queries,
  for several ``nprobe`` (the default marked), with the raw IVF ranking (no re-scoring) beside it;
- exact search time at one million entries and at the default ``approximate_above`` (a slice of
  the same vectors), batch 1 and 64: what the exact index would cost, and why the threshold is where it is.

The vectors are **clustered**, not uniform: each is a mix of a direction shared by all (image
embeddings are anisotropic), one of N/10,000 topics, a point of that topic's own 8-dimensional
subspace (entries vary continuously within a topic: crowded neighbourhoods, cut by the inverted
lists) and isotropic noise, normalised to unit length; the queries are new draws from the same
mixture (new images of known kinds). The report gives the similarities this yields. (The vectors
are generated on one torch thread: small threaded operations crawl where the cores are shared.)
Uniform random unit vectors have no neighbourhoods (a query's nearest entry is hardly nearer than
any other), the worst case for every approximate index; ``--uniform-entries`` measures that case
on a smaller store for contrast.

Usage (from the repository root, in the project's environment)::

    python benchmarks/retrieval_speed.py            # 1,000,000 x 1280: ~6 min and ~6 GB on 2 cores
    python benchmarks/retrieval_speed.py --smoke    # 20,000 x 64: checks the script end to end

Results go to ``benchmarks/results/retrieval-<machine>.json`` and ``.md`` (``-smoke`` files for --smoke).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()

import faiss  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clipcap.modeling.retrieval import (  # noqa: E402
    APPROXIMATE_ABOVE, FEW_QUERIES, INDEX_FILE, NPROBE, RERANK, CaptionDatastore, one_faiss_thread,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_speed import cpu_model, slug, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_MS, TARGET_RECALL = 20.0, 0.95
PER_TOPIC, RANK = 10_000, 8


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Mixture:
    """Clustered unit vectors (see the module docstring): ``shared + topic + latent + noise``, normalised.

    Each topic has its own ``RANK``-dimensional subspace in which its entries vary continuously (a
    Gaussian latent), so a topic is a smooth, crowded patch rather than a point; with ~``PER_TOPIC``
    entries a topic the inverted lists (about sqrt(N)) cut each one into ~10 pieces, and a query's
    neighbours lie across the cuts. Isotropic noise of a per-topic size is added on top.
    """

    def __init__(self, dim: int, topics: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
        self.dim, self.shared, self.topics, self.basis = dim, unit(dim), unit(topics, dim), unit(topics, RANK, dim)
        self.noise = 0.25 + 0.2 * torch.rand(topics, generator=g)

    def draw(self, n: int, seed: int) -> torch.Tensor:
        """``n`` entries, topic by topic, at random rows of one preallocated (n, dim) tensor."""
        g = torch.Generator().manual_seed(seed)
        out = torch.empty(n, self.dim)
        topics = len(self.topics)
        counts = torch.bincount(torch.randint(topics, (n,), generator=g), minlength=topics).tolist()
        rows, start = torch.randperm(n, generator=g), 0
        for topic, count in enumerate(counts):
            x = torch.randn(count, self.dim, generator=g).mul_(float(self.noise[topic]) / self.dim ** 0.5)
            x += 0.5 * self.shared + 0.6 * self.topics[topic]
            x += (0.6 / RANK ** 0.5) * torch.randn(count, RANK, generator=g) @ self.basis[topic]
            out[rows[start:start + count]] = F.normalize(x, dim=-1)
            start += count
        return out


def uniform(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def exact_topk(queries: torch.Tensor, vectors: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sims, rows = faiss.knn(queries.numpy(), vectors.numpy(), k, metric=faiss.METRIC_INNER_PRODUCT)
    return torch.from_numpy(sims), torch.from_numpy(rows)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def exact_ms(queries: torch.Tensor, vectors: torch.Tensor, k: int, batch: int, limit: int) -> float:
    """Milliseconds per image of exact search, in batches of ``batch``, over the first ``limit`` queries
    (a few queries on one thread, as the datastore searches)."""
    times = []
    with one_faiss_thread() if batch < FEW_QUERIES else nullcontext():
        for start in range(0, limit, batch):
            times.append(timed(exact_topk, queries[start:start + batch], vectors, k)[1] / batch)
    return 1000 * statistics.median(times)


def exact_store_ms(queries: torch.Tensor, vectors: torch.Tensor, k: int) -> dict:
    """ms per image of an exact (``IndexFlatIP``) datastore's ``nearest``, batch 1 and 64."""
    store = CaptionDatastore(vectors.clone(), [str(r) for r in range(len(vectors))],
                             [str(r) for r in range(len(vectors))], len(vectors))
    return {"entries": len(vectors), "index": store.index_kind,
            "ms_batch1": query_ms(store, queries, k, 1, 64)[0], "ms_batch64": query_ms(store, queries, k, 64, 256)[0]}


def recall(found: list[list[str]], truth: torch.Tensor) -> float:
    k = truth.shape[1]
    return sum(len({int(c) for c in f} & set(t.tolist())) for f, t in zip(found, truth)) / (k * len(truth))


def query_ms(store: CaptionDatastore, queries: torch.Tensor, k: int, batch: int, limit: int
             ) -> tuple[float, float, list[list[str]]]:
    """(median ms per image, p95 ms per image, captions) of ``store.nearest`` in batches of ``batch``."""
    store.nearest(queries[:batch], k)                                   # warm-up
    times, found = [], []
    for start in range(0, limit, batch):
        out, seconds = timed(store.nearest, queries[start:start + batch], k)
        times.append(1000 * seconds / batch)
        found += out
    p95 = sorted(times)[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    return statistics.median(times), p95, found


def sweep(store: CaptionDatastore, queries: torch.Tensor, truth: torch.Tensor, k: int, nprobes: list[int],
          single: int) -> list[dict]:
    rows, default = [], store.nprobe
    ivf = store._ivf()
    for nprobe in nprobes:
        store.nprobe = nprobe
        ms1, p95_1, _ = query_ms(store, queries, k, 1, single)
        ms64, _, found = query_ms(store, queries, k, 64, len(queries))
        _, raw = store.index.search(queries.numpy(), k, params=faiss.SearchParametersIVF(nprobe=nprobe))
        raw_recall = sum(len(set(r.tolist()) & set(t.tolist())) for r, t in zip(raw, truth)) / truth.numel()
        rows.append({"nprobe": nprobe, "default": nprobe == default, "lists": ivf.nlist, "ms_batch1": ms1,
                     "ms_batch1_p95": p95_1, "ms_batch64": ms64, "recall": recall(found, truth),
                     "recall_ivf_ranking": raw_recall})
        print(f"  nprobe {nprobe:4d}: {ms1:7.2f} ms/image (batch 1, p95 {p95_1:.2f}), {ms64:7.2f} ms/image "
              f"(batch 64), recall@{k} {rows[-1]['recall']:.4f} (IVF ranking alone {raw_recall:.4f})", flush=True)
    store.nprobe = default
    return rows


def index_bytes(store: CaptionDatastore) -> int:
    """What the approximate index holds in memory: codes + ids of every entry, centroids, quantiser ranges."""
    ivf = store._ivf()
    return ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4 + 2 * ivf.d * 4


def measure(args: argparse.Namespace) -> dict:
    threads = args.threads
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    n, dim, k = args.entries, args.dim, args.k
    rss0, load_before = rss_bytes(), os.getloadavg()
    torch.set_num_threads(1)
    topics = max(1, n // PER_TOPIC)
    mixture = Mixture(dim, topics)
    vectors, gen_s = timed(mixture.draw, n, 1)
    queries = mixture.draw(args.queries, 2)
    torch.set_num_threads(threads)
    rss_vectors = rss_bytes()
    print(f"{n:,} x {dim} clustered unit vectors in {gen_s:.1f} s ({(rss_vectors - rss0) / 1e9:.2f} GB)", flush=True)

    truth_sims, truth = exact_topk(queries, vectors, k)                 # also warms the BLAS threads
    exact = {"entries": n, "ms_batch64": exact_ms(queries, vectors, k, 64, len(queries)),
             "ms_batch1": exact_ms(queries, vectors, k, 1, args.exact_single)}
    at = min(n, APPROXIMATE_ABOVE)
    threshold = exact_store_ms(queries, vectors[:at], k)
    print(f"exact search: {exact['ms_batch1']:.1f} ms/image (batch 1), {exact['ms_batch64']:.1f} (batch 64) at "
          f"{n:,}; {threshold['ms_batch1']:.2f} / {threshold['ms_batch64']:.2f} at {at:,}", flush=True)
    sample = torch.randint(n, (args.queries,), generator=torch.Generator().manual_seed(3))
    similarities = {"query_to_nearest_mean": float(truth_sims[:, 0].mean()),
                    f"query_to_kth_nearest_mean(k={k})": float(truth_sims[:, -1].mean()),
                    "query_to_random_entry_mean": float((queries * vectors[sample]).sum(-1).mean())}

    captions = [str(row) for row in range(n)]
    rss_before = rss_bytes()
    store, build_s = timed(CaptionDatastore, vectors, captions, [f"img{row}" for row in range(n)],
                           args.approximate_above, args.nprobe)
    gc.collect()
    rss_built = rss_bytes()
    print(f"built {store.index_kind} in {build_s:.1f} s: {index_bytes(store) / 1e9:.2f} GB index, resident "
          f"memory +{(rss_built - rss_before) / 1e9:.2f} GB", flush=True)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        path = Path(scratch) / INDEX_FILE
        _, write_s = timed(faiss.write_index, store.index, str(path))
        file_bytes = path.stat().st_size
        loaded, read_s = timed(faiss.read_index, str(path))
        del loaded
    print(f"{INDEX_FILE}: {file_bytes / 1e9:.2f} GB, written in {write_s:.1f} s, read in {read_s:.1f} s", flush=True)

    ms1, p95_1, found1 = query_ms(store, queries, k, 1, len(queries))
    ms64, p95_64, found64 = query_ms(store, queries, k, 64, len(queries))
    approx = {"index": store.index_kind, "nprobe": store.nprobe, "ms_batch1": ms1, "ms_batch1_p95": p95_1,
              "ms_batch64": ms64, "ms_batch64_p95": p95_64, "recall_batch1": recall(found1, truth),
              "recall_batch64": recall(found64, truth)}
    print(f"approximate nearest(): {ms1:.2f} ms/image (batch 1, p95 {p95_1:.2f}), {ms64:.2f} (batch 64); "
          f"recall@{k} {approx['recall_batch1']:.4f}", flush=True)
    nprobes = sorted({max(1, args.nprobe // 4), max(1, args.nprobe // 2), args.nprobe, 2 * args.nprobe,
                      4 * args.nprobe})
    sweep_rows = sweep(store, queries, truth, k, nprobes, min(64, len(queries)))
    peak = rss_bytes("VmHWM")
    memory = {"embeddings_bytes": vectors.numel() * 4, "index_bytes": index_bytes(store),
              "index_file_bytes": file_bytes, "rss_growth_build_bytes": rss_built - rss_before,
              "rss_vectors_bytes": rss_vectors - rss0, "peak_rss_bytes": peak}
    del store, vectors
    gc.collect()

    uniform_result = None
    if args.uniform_entries:
        u = uniform(args.uniform_entries, dim, 4)
        uq = uniform(args.queries, dim, 5)
        _, utruth = exact_topk(uq, u, k)
        ustore = CaptionDatastore(u, [str(r) for r in range(len(u))], [str(r) for r in range(len(u))],
                                  min(args.approximate_above, len(u) // 2), args.nprobe)
        ums64, _, ufound = query_ms(ustore, uq, k, 64, len(uq))
        uniform_result = {"entries": len(u), "index": ustore.index_kind, "nprobe": ustore.nprobe,
                          "recall": recall(ufound, utruth), "ms_batch64": ums64}
        print(f"uniform random vectors, {len(u):,} entries, {ustore.index_kind} nprobe {ustore.nprobe}: recall@{k} "
              f"{uniform_result['recall']:.4f}", flush=True)

    return {"data": {"entries": n, "dim": dim, "kind": "clustered", "topics": topics, "topic_rank": RANK,
                     "queries": args.queries, "seconds": gen_s, **similarities},
            "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
            "build_seconds": build_s, "index_write_seconds": write_s, "index_read_seconds": read_s,
            "memory": memory, "approximate": approx, "nprobe_sweep": sweep_rows, "exact": exact,
            "exact_at_threshold": threshold, "uniform": uniform_result,
            "targets": {"ms_per_image": TARGET_MS, "recall": TARGET_RECALL,
                        "met": max(ms1, ms64) <= TARGET_MS and min(approx["recall_batch1"],
                                                                   approx["recall_batch64"]) >= TARGET_RECALL}}


def machine_info(threads: int) -> dict:
    commit = os.environ.get("CLIPCAP_COMMIT") or subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False,
        cwd=Path(__file__).parent).stdout.strip()
    return {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "threads": threads,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
            "commit": commit or None}


def gb(value: int) -> str:
    return f"{value / 1e9:.2f} GB"


def markdown(r: dict, machine: dict, settings: dict, date: str) -> str:
    a, m, d, k = r["approximate"], r["memory"], r["data"], settings["k"]
    ok = lambda good: "yes" if good else "**no**"  # noqa: E731
    width = " (the default encoder's width)" if d["dim"] == 1280 else ""
    load = r["load_average_1_5_15min"]
    lines = [
        f"# clipcap retrieval at scale ({date})", "",
        "machine: " + ", ".join(f"{key} {v}" for key, v in machine.items() if v is not None), "",
        "settings: " + ", ".join(f"{key}={v}" for key, v in settings.items()), "",
        f"The {machine['cores']} cores were shared with other work: load average (1, 5, 15 min) "
        f"{', '.join(f'{v:.1f}' for v in load['before'])} before the run, "
        f"{', '.join(f'{v:.1f}' for v in load['after'])} after; the times are upper bounds.", "",
        f"Datastore: {d['entries']:,} entries x {d['dim']} float32{width}, **clustered** "
        f"synthetic unit vectors ({d['topics']:,} topics, each a {d['topic_rank']}-dimensional patch; "
        f"mean cosine of a query to its nearest entry {d['query_to_nearest_mean']:.3f}, to its {k}rd nearest "
        f"{d[f'query_to_kth_nearest_mean(k={k})']:.3f}, to a random entry {d['query_to_random_entry_mean']:.3f}); "
        f"{d['queries']} queries drawn from the same mixture.", "",
        f"| measure | {a['index']}, nprobe {a['nprobe']}, {RERANK} candidates re-scored exactly | target | met |",
        "|---|---|---|---|",
        f"| per-image query, batch 1 (median; p95) | {a['ms_batch1']:.2f} ms; {a['ms_batch1_p95']:.2f} ms | "
        f"<= {TARGET_MS:g} ms | {ok(a['ms_batch1'] <= TARGET_MS)} |",
        f"| per-image query, batch 64 (median) | {a['ms_batch64']:.2f} ms | <= {TARGET_MS:g} ms | "
        f"{ok(a['ms_batch64'] <= TARGET_MS)} |",
        f"| recall@{k} vs exact search ({d['queries']} queries) | {a['recall_batch1']:.4f} | >= {TARGET_RECALL} | "
        f"{ok(a['recall_batch1'] >= TARGET_RECALL)} |",
        f"| index memory (codes + ids + centroids) | {gb(m['index_bytes'])} | | |",
        f"| `{INDEX_FILE}` on disk; write, read | {gb(m['index_file_bytes'])}; {r['index_write_seconds']:.1f} s, "
        f"{r['index_read_seconds']:.1f} s | | |",
        f"| resident memory growth while building | {gb(m['rss_growth_build_bytes'])} | | |",
        f"| build (k-means and product-quantiser training + adding every entry) | {r['build_seconds']:.1f} s | | |",
        f"| the float32 embeddings themselves (kept for re-scoring) | {gb(m['embeddings_bytes'])} | | |",
        f"| peak resident memory of the benchmark | {gb(m['peak_rss_bytes'])} | | |", "",
        f"Exact search (`faiss.knn`, the `IndexFlatIP` kernel): {r['exact']['ms_batch1']:.1f} ms per image one at "
        f"a time, {r['exact']['ms_batch64']:.1f} ms per image in batches of 64 at {r['exact']['entries']:,} entries; "
        f"an exact datastore (`nearest()` through `IndexFlatIP`) of {r['exact_at_threshold']['entries']:,} entries "
        f"(`approximate_above`: exact up to there) takes {r['exact_at_threshold']['ms_batch1']:.2f} ms per image one "
        f"at a time, {r['exact_at_threshold']['ms_batch64']:.2f} in batches of 64. Searches of fewer than "
        f"{FEW_QUERIES} queries run on one faiss thread, as the datastore runs them.", "",
        f"| nprobe | lists | ms/image batch 1 (p95) | ms/image batch 64 | recall@{k} | recall@{k} of the index's own "
        f"top {k} (no re-scoring) |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["nprobe_sweep"]:
        mark = " (default)" if row["default"] else ""
        lines.append(f"| {row['nprobe']}{mark} | {row['lists']} | {row['ms_batch1']:.2f} "
                     f"({row['ms_batch1_p95']:.2f}) | {row['ms_batch64']:.2f} | {row['recall']:.4f} | {row['recall_ivf_ranking']:.4f} |")
    u = r["uniform"]
    if u:
        lines += ["", f"Worst case, for contrast: uniform random unit vectors (no neighbourhoods), {u['entries']:,} "
                  f"entries, {u['index']} nprobe {u['nprobe']}: recall@{k} {u['recall']:.4f}. Real image embeddings "
                  "are clustered; a store of unstructured vectors would need many more lists and candidates, "
                  "or exact search."]
    return "\n".join(lines) + "\n"


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=1280, help="embedding width (default: the default encoder's)")
    p.add_argument("--queries", type=int, default=256, help="queries for recall and batch timings (>= 200)")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--threads", type=int, default=cores)
    p.add_argument("--approximate-above", type=int, default=APPROXIMATE_ABOVE)
    p.add_argument("--nprobe", type=int, default=NPROBE)
    p.add_argument("--exact-single", type=int, default=8, help="queries timed one at a time by exact search")
    p.add_argument("--uniform-entries", type=int, default=100_000, help="0: skip the uniform-vector contrast")
    p.add_argument("--scratch", default=None, help="folder for the index file (default: the system's temp)")
    p.add_argument("--smoke", action="store_true", help="20,000 x 64: checks the script end to end")
    args = p.parse_args()
    if args.smoke:
        args.entries, args.dim, args.uniform_entries, args.approximate_above = 20_000, 64, 4000, 5000
    machine = machine_info(args.threads)
    results = measure(args)
    date = datetime.now(UTC).isoformat(timespec="seconds")
    settings = {key: v for key, v in vars(args).items() if key not in ("scratch",)}
    stem = RESULTS / (f"retrieval-cpu-{slug(machine['cpu'])}-{machine['cores']}c" + ("-smoke" if args.smoke else ""))
    write_result(stem, {"date": date, "machine": machine, "settings": settings, "results": results},
                 markdown(results, machine, settings, date))
    print(f"\nwrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
