"""Speed of clipcap's model core against a 2021-reference-style baseline, on this machine, in one run.

Both sides use the same sizes: GPT-2 small (random weights), K = clip_length = 10, 512-d image
embeddings (CLIP ViT-B/32). Four comparisons:

- training, transformer mapper + frozen LM, and MLP mapper + LM tuning (samples/s = pairs/s):
  ``clipcap.training.loop.train_model`` vs the reference loop of ``reference.py``;
- greedy and beam-5 decoding of 20 new tokens (captions/s = images/s): batched
  ``clipcap.modeling.decode.generate_token_ids`` vs the reference's one image at a time without KV cache.

Usage (from the repository root, in the project's environment)::

    python benchmarks/model_speed.py            # full size, --device auto
    python benchmarks/model_speed.py --smoke    # tiny LM, checks the script end to end

Results go to ``benchmarks/results/<device>.json`` and ``.md`` (``-smoke`` files for --smoke).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()

import reference  # noqa: E402  (benchmarks/reference.py)
import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from clipcap.training.batches import CaptionPairs  # noqa: E402
from clipcap.config import DecodingConfig, MapperConfig, TrainConfig  # noqa: E402
from clipcap.modeling.decode import generate_token_ids  # noqa: E402
from clipcap.modeling.model import ClipCap  # noqa: E402
from clipcap.training.loop import train_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMOKE_LM = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128, "vocab_size": 1000, "bos_token_id": 999,
            "eos_token_id": 999}
DEVICE_DEFAULTS = {  # flags left unset
    "cpu": {"batch_size": 40, "warmup_steps": 1, "steps": 3, "images": 4, "decode_batch_size": 64,
            "decode_batches": 1, "compile": False},
    "cuda": {"batch_size": 256, "warmup_steps": 10, "steps": 30, "images": 16, "decode_batch_size": 256,
             "decode_batches": 4, "compile": True},
}
SMOKE_DEFAULTS = {"batch_size": 8, "warmup_steps": 1, "steps": 2, "images": 2, "decode_batch_size": 8,
                  "decode_batches": 1}
HEADER = ["what", "unit", "baseline", "clipcap", "ratio", "target", "result"]


@dataclass(frozen=True)
class Target:
    """A speed-up over the baseline (``ratio``) or an absolute rate (``absolute``)."""

    kind: str
    value: float

    def __str__(self) -> str:
        return f">= {self.value:g}x" if self.kind == "ratio" else f">= {self.value:,.0f}/s"


TARGETS = {  # the project's speed targets; CUDA ones: the goals for one H100 (DESIGN.md section 6)
    "cpu": {"train transformer+frozen": Target("ratio", 3), "train mlp+tuning": Target("ratio", 2),
            "greedy": Target("ratio", 20)},
    "cuda": {"train transformer+frozen": Target("absolute", 11_000), "train mlp+tuning": Target("absolute", 12_000),
             "greedy": Target("absolute", 2_500), "beam-5": Target("absolute", 1_000)},
}


@dataclass(frozen=True)
class Settings:
    device: str
    smoke: bool
    lm: dict                    # GPT2Config overrides ({} = GPT-2 small); EOS must be the last id
    batch_size: int             # clipcap training
    warmup_steps: int           # untimed training steps, both sides
    steps: int                  # timed training steps, both sides
    images: int                 # timed images of the one-at-a-time baseline decoding
    decode_batch_size: int      # clipcap decoding
    decode_batches: int         # timed clipcap decoding batches
    precision: str              # clipcap: resolved "fp32" | "bf16" (the baseline is always fp32)
    compile: bool               # clipcap training: TrainConfig.compile
    baseline_batch_size: int = 40
    prefix_length: int = 10
    clip_length: int = 10
    mapper_layers: int = 8      # the paper's transformer mapper (the reference side has 8)
    dim_embedding: int = 512
    new_tokens: int = 20
    num_beams: int = 5
    lr: float = 2e-5
    seed: int = 0

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


@dataclass
class Row:
    """One comparison; a side that failed to run is ``None``, its error in ``details``."""

    what: str
    unit: str
    baseline: float | None
    clipcap: float | None
    target: Target | None
    details: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return None if self.baseline is None or self.clipcap is None else self.clipcap / self.baseline

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        value = self.ratio if self.target.kind == "ratio" else self.clipcap
        return value is not None and value >= self.target.value

    def cells(self) -> list[str]:
        verdict = {True: "PASS", False: "FAIL", None: "-"}[self.passed]
        if self.clipcap is None or (self.baseline is None and (self.target is None or self.target.kind == "ratio")):
            verdict = "ERROR"
        return [self.what, self.unit, _number(self.baseline), _number(self.clipcap),
                "-" if self.ratio is None else f"{self.ratio:.1f}x", str(self.target or "-"), verdict]


def _number(value: float | None) -> str:
    return "error" if value is None else f"{value:,.1f}"


def attempt(what: str, details: dict, key: str, fn: Callable[[], object]) -> object | None:
    """``fn()``, or None with the error recorded under ``details[key]``: one failing measurement
    (say, ``torch.compile`` on an unfamiliar machine) must not cost the other rows."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001  (any failure is reported, not raised)
        message = f"{type(err).__name__}: {err}".strip()
        details[key] = message[:2000]
        print(f"ERROR in {what} ({key}): {message[:2000]}", flush=True)
        traceback.print_exc()
        free_memory()
        return None


# ---------------------------------------------------------------- helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def dynamo_frames() -> int:
    """Frames torch.compile has compiled so far in this process (grows on every (re)compilation)."""
    return int(torch._dynamo.utils.counters["frames"]["total"])


class StepTimer:
    """Wall time of each step after the first ``warmup``; call ``tick`` after every step (it is
    also a ``train_model`` ``on_step`` callback). A timed step during which ``torch.compile``
    compiled (a recompilation for a caption length not seen in the warm-up) is set apart:
    ``rate`` leaves such steps out, ``window_rate`` counts every timed step."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup, self.step = device, warmup, 0
        self.last, self.frames = 0.0, dynamo_frames()
        self.steady: list[float] = []     # durations of timed steps without compilation
        self.compiling: list[float] = []  # durations of timed steps that compiled

    def tick(self, record: dict | None = None) -> None:
        synchronize(self.device)
        self.step = record["step"] if record else self.step + 1
        now, frames = time.perf_counter(), dynamo_frames()
        if self.step > self.warmup:
            (self.compiling if frames != self.frames else self.steady).append(now - self.last)
        self.last, self.frames = now, frames

    def rate(self, items_per_step: int) -> float:
        if not self.steady:  # every timed step compiled
            return self.window_rate(items_per_step)
        return len(self.steady) * items_per_step / sum(self.steady)

    def window_rate(self, items_per_step: int) -> float:
        return (len(self.steady) + len(self.compiling)) * items_per_step / (sum(self.steady) + sum(self.compiling))


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def build_lm(s: Settings) -> GPT2LMHeadModel:
    torch.manual_seed(s.seed)
    return GPT2LMHeadModel(GPT2Config(**s.lm))


def synthetic_pairs(s: Settings, count: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Random image embeddings and captions of COCO-like GPT-2 BPE lengths (~11.5 tokens + EOS)."""
    generator = torch.Generator().manual_seed(s.seed)
    eos = GPT2Config(**s.lm).eos_token_id
    lengths = (torch.randn(count, generator=generator) * 2.5 + 11.5).round().clamp(7, 39).long().tolist()
    token_ids = [[*torch.randint(1, eos, (n,), generator=generator).tolist(), eos] for n in lengths]
    return torch.randn(count, s.dim_embedding, generator=generator), token_ids


# ---------------------------------------------------------------- training


def train_baseline(s: Settings, mapper: str, finetune: bool) -> tuple[float, int]:
    """(samples/s, parameters updated by the optimizer)"""
    lm = build_lm(s)
    model = reference.ReferenceClipCap(
        reference.mapper(mapper, s.dim_embedding, lm.config.n_embd, s.prefix_length, s.clip_length), lm,
        s.prefix_length, frozen_lm=not finetune).to(s.torch_device)
    params = model.optimized_parameters()
    optimizer = torch.optim.AdamW(params, lr=s.lr)
    batch, total = s.baseline_batch_size, s.warmup_steps + s.steps
    embeddings, token_ids = synthetic_pairs(s, batch * total)
    tokens, mask = reference.pad_tokens(token_ids, s.prefix_length)
    timer = StepTimer(s.torch_device, s.warmup_steps)
    model.train()
    for start in tqdm(range(0, batch * total, batch), desc="reference train", unit="step"):
        part = slice(start, start + batch)
        reference.train_step(model, optimizer, tokens[part].to(s.device), embeddings[part].to(s.device),
                             mask[part].to(s.device))
        timer.tick()
    return timer.rate(batch), sum(p.numel() for p in params)


def train_clipcap(s: Settings, mapper: str, finetune: bool, compile: bool) -> tuple[float, int, dict]:
    """(samples/s over the timed steps that did not compile, parameters updated by the optimizer,
    details: the rate over all timed steps and how many of them recompiled)"""
    model = ClipCap(MapperConfig(type=mapper, prefix_length=s.prefix_length, clip_length=s.clip_length,
                                 num_layers=s.mapper_layers),
                    s.dim_embedding, build_lm(s), finetune_lm=finetune)
    total = s.warmup_steps + s.steps
    embeddings, token_ids = synthetic_pairs(s, s.batch_size * total)
    pairs = CaptionPairs(embeddings, list(range(len(token_ids))), token_ids)
    cfg = TrainConfig(seed=s.seed, epochs=1, batch_size=s.batch_size, lr=s.lr, warmup_steps=0, device=s.device,
                      precision=s.precision, compile=compile)
    timer = StepTimer(s.torch_device, s.warmup_steps)
    train_model(model, pairs, None, cfg, pad_token_id=model.lm.config.eos_token_id, on_step=timer.tick)
    if timer.step != total:
        raise RuntimeError(f"train_model ran {timer.step} steps, expected {total}")
    details = {"clipcap_recompiling_steps": len(timer.compiling),
               "clipcap_rate_all_timed_steps": round(timer.window_rate(s.batch_size), 1),
               "clipcap_seconds_in_recompiling_steps": round(sum(timer.compiling), 1)}
    return timer.rate(s.batch_size), sum(p.numel() for p in model.trainable_parameters()), details


def measure_training(s: Settings, mapper: str, finetune: bool) -> Row:
    """If ``torch.compile`` fails, the error is recorded and clipcap is measured again without it
    (``details["clipcap_compiled"]`` says which)."""
    what = f"train {mapper}+{'tuning' if finetune else 'frozen'}"
    print(f"\n== {what}", flush=True)
    details: dict = {}
    baseline = attempt(what, details, "baseline_error", lambda: train_baseline(s, mapper, finetune))
    free_memory()
    torch._dynamo.reset()  # each row compiles its own graphs, none left from the row before
    ours = attempt(what, details, "clipcap_error", lambda: train_clipcap(s, mapper, finetune, s.compile))
    details["clipcap_compiled"] = s.compile
    if ours is None and s.compile:
        details["compile_error"] = details.pop("clipcap_error")
        torch._dynamo.reset()
        print(f"{what}: measuring clipcap again without torch.compile", flush=True)
        ours = attempt(what, details, "clipcap_error", lambda: train_clipcap(s, mapper, finetune, False))
        details["clipcap_compiled"] = False
    free_memory()
    if baseline is not None:
        details["baseline_params_updated"] = baseline[1]
    if ours is not None:
        details["clipcap_params_updated"] = ours[1]
        details |= ours[2]
    return Row(what, "samples/s", baseline and baseline[0], ours and ours[0], TARGETS[s.torch_device.type].get(what),
               details)


# ---------------------------------------------------------------- decoding


def decode_baseline(s: Settings, model: reference.ReferenceClipCap, decode_one: Callable) -> float:
    prefixes = torch.randn(s.images + 1, s.dim_embedding, device=s.device)
    decode_one(model, prefixes[:1], s.new_tokens)  # warm-up
    images = tqdm(prefixes[1:].split(1), desc="reference decode", unit="image")
    return s.images / seconds(lambda: [decode_one(model, prefix, s.new_tokens) for prefix in images], s.torch_device)


def decode_clipcap(s: Settings, model: ClipCap, decoding: DecodingConfig) -> tuple[float, int]:
    """(captions/s, fewest new tokens of a batch): the EOS id is outside the vocabulary, so every
    caption runs the full ``max_new_tokens`` like the baseline."""
    config = model.lm.config
    dtype = next(model.parameters()).dtype
    embeddings = torch.randn(s.decode_batches, s.decode_batch_size, s.dim_embedding, device=s.device, dtype=dtype)

    def run(batch: torch.Tensor) -> int:
        return generate_token_ids(model, batch, eos_token_id=config.vocab_size, pad_token_id=config.eos_token_id,
                                  decoding=decoding).shape[1]

    run(embeddings[0])  # warm-up, at the timed batch size (kernels and allocations of that shape)
    new_tokens: list[int] = []
    elapsed = seconds(lambda: new_tokens.extend(map(run, tqdm(embeddings, desc="clipcap decode", unit="batch"))),
                      s.torch_device)
    return s.decode_batches * s.decode_batch_size / elapsed, min(new_tokens)


def measure_decoding(s: Settings) -> list[Row]:
    """Greedy and beam-5 on the paper's default model (transformer mapper, frozen LM)."""
    dtype = torch.bfloat16 if s.precision == "bf16" else torch.float32
    lm = build_lm(s)
    baseline = reference.ReferenceClipCap(
        reference.mapper("transformer", s.dim_embedding, lm.config.n_embd, s.prefix_length, s.clip_length), lm,
        s.prefix_length, frozen_lm=True).to(s.device).eval()
    ours = ClipCap(MapperConfig(prefix_length=s.prefix_length, clip_length=s.clip_length,
                                num_layers=s.mapper_layers), s.dim_embedding,
                   build_lm(s)).to(s.device, dtype).eval()
    strategies = [
        ("greedy", reference.greedy, DecodingConfig(strategy="greedy", max_new_tokens=s.new_tokens,
                                                    no_repeat_ngram_size=0)),  # the reference blocks nothing
        (f"beam-{s.num_beams}", reference.beam,
         DecodingConfig(strategy="beam", num_beams=s.num_beams, max_new_tokens=s.new_tokens,
                        no_repeat_ngram_size=0)),
    ]
    rows = []
    for what, decode_one, decoding in strategies:
        print(f"\n== {what}", flush=True)
        details: dict = {"baseline_new_tokens": s.new_tokens}
        baseline_rate = attempt(what, details, "baseline_error", lambda: decode_baseline(s, baseline, decode_one))
        ours_result = attempt(what, details, "clipcap_error", lambda: decode_clipcap(s, ours, decoding))
        our_rate = None
        if ours_result is not None:
            our_rate, details["clipcap_new_tokens"] = ours_result
            if details["clipcap_new_tokens"] != s.new_tokens:
                print(f"WARNING: clipcap generated only {details['clipcap_new_tokens']} new tokens, not "
                      f"{s.new_tokens}", flush=True)
        rows.append(Row(what, "captions/s", baseline_rate, our_rate, TARGETS[s.torch_device.type].get(what), details))
    return rows


# ---------------------------------------------------------------- reporting


VECTOR_EXTENSIONS = (("avx512f", "AVX-512"), ("avx2", "AVX2"))   # the widest first


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's name and its widest vector extension, "AMD EPYC (AVX-512)" (``cpuinfo``: the text of
    /proc/cpuinfo, read when None). Hosts that report one name can differ in it, and with it in speed and
    in the order of floating-point sums: the paper configuration scored 0.579 on one "AMD EPYC" and 0.831
    on another (docs/experiments/reference-runs.md)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    widest = next((label for flag, label in VECTOR_EXTENSIONS if flag in flags), None)
    return f"{name} ({widest})" if widest else name


def slug(name: str) -> str:
    name = re.sub(r"\((R|TM)\)|@.*|\bCPU\b|\bProcessor\b|\b\d+-Core\b", " ", name, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_result(stem: Path, result: dict, text: str) -> Path:
    """Write ``result`` to ``<stem>.json`` and its Markdown ``text`` to ``<stem>.md``; the stem. A dot in the
    stem stays in the names ("runs/novel-c0.6" -> "runs/novel-c0.6.json", not "runs/novel-c0.json")."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    Path(f"{stem}.md").write_text(text)
    return stem


def save_report(kind: str, result: dict, text: str) -> Path:
    """Write ``result`` and its Markdown ``text`` to ``results/<kind>-<this CPU>.json`` and ``.md``; the stem."""
    return write_result(RESULTS / f"{kind}-{slug(cpu_model())}", result, text)


def machine_info(device: torch.device) -> dict:
    commit = os.environ.get("CLIPCAP_COMMIT") or subprocess.run(  # a copied tree's .git may be stale
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False,
        cwd=Path(__file__).parent).stdout.strip()
    return {
        "cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "commit": commit or None,
    }


def result_stem(machine: dict, smoke: bool) -> str:
    stem = f"cuda-{slug(machine['gpu'])}" if machine["gpu"] else f"cpu-{slug(machine['cpu'])}-{machine['cores']}c"
    return stem + ("-smoke" if smoke else "")


def markdown(rows: list[Row], machine: dict, s: Settings, date: str) -> str:
    lines = [f"# clipcap model speed vs the 2021 reference ({date})", "",
             "machine: " + ", ".join(f"{k} {v}" for k, v in machine.items() if v is not None), "",
             "settings: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(s).items()), "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    lines += ["", *(f"- {row.what}: " + ", ".join(f"{k} {_detail(v)}" for k, v in row.details.items()) for row in rows)]
    return "\n".join(lines) + "\n"


def _detail(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def write_results(rows: list[Row], machine: dict, s: Settings) -> Path:
    date = datetime.now(UTC).isoformat(timespec="seconds")
    results = [dataclasses.asdict(row) | {"ratio": row.ratio, "passed": row.passed} for row in rows]
    payload = {"date": date, "machine": machine, "settings": dataclasses.asdict(s), "results": results}
    return write_result(RESULTS / result_stem(machine, s.smoke), payload, markdown(rows, machine, s, date))


def print_table(rows: list[Row]) -> None:
    table = [HEADER, *(row.cells() for row in rows)]
    widths = [max(map(len, column)) for column in zip(*table, strict=True)]
    for line in table:
        first, *rest = line
        print(first.ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(rest, widths[1:], strict=True)), sep="  ")


# ---------------------------------------------------------------- main


def parse_settings() -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny GPT-2 and sizes: checks the script in seconds")
    parser.add_argument("--batch-size", type=int, help="clipcap training batch (cpu 40, cuda 256)")
    parser.add_argument("--warmup-steps", type=int, help="untimed training steps (cpu 1, cuda 10)")
    parser.add_argument("--steps", type=int, help="timed training steps (cpu 3, cuda 30)")
    parser.add_argument("--images", type=int, help="timed images of the per-image baseline decoding (cpu 4, cuda 16)")
    parser.add_argument("--decode-batch-size", type=int, help="clipcap decoding batch (cpu 64, cuda 256)")
    parser.add_argument("--decode-batches", type=int, help="timed clipcap decoding batches (cpu 1, cuda 4)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="clipcap training (TrainConfig.precision) and decoding weights; auto: bf16 on CUDA")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="TrainConfig.compile (default: on for CUDA, off for CPU)")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sizes = DEVICE_DEFAULTS[device] | (SMOKE_DEFAULTS if args.smoke else {})
    chosen = {key: getattr(args, key) for key in sizes if getattr(args, key) is not None}
    precision = args.precision if args.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    return Settings(device=device, smoke=args.smoke, lm=SMOKE_LM if args.smoke else {}, precision=precision,
                    **(sizes | chosen))


def main() -> None:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    s = parse_settings()
    machine = machine_info(s.torch_device)
    print(f"machine: {machine}\nsettings: {dataclasses.asdict(s)}", flush=True)
    # decoding first (no compilation, quick), then the two trainings; the results files are
    # rewritten after each, so a run stopped part-way still leaves the rows it finished
    training: list[Row] = []
    decoding = measure_decoding(s)
    stem = write_results(decoding, machine, s)
    for mapper, finetune in (("transformer", False), ("mlp", True)):
        training.append(measure_training(s, mapper, finetune))
        stem = write_results(training + decoding, machine, s)
    print()
    print_table(training + decoding)
    print(f"\nwrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
