"""A served model under attack, within its own limits: does a normal request still get through, does the
memory come back, does SIGTERM stop it promptly?

    python benchmarks/serve_load.py [--model models:/clipcap-tuxpaint@champion] [--tracking-uri URI]

Serves the model with ``clipcap serve`` on 127.0.0.1 (the project's champion by default: run
``bash scripts/run.sh`` first; a model registered before clipcap serve's limits existed serves with the
pyfunc code it was logged with), then:
- idle: resident memory after a warm-up request; a normal request (one stamp, base64 PNG) timed 3 times;
- skew: eight transparent stamps captioned over HTTP and by ``clipcap caption``'s path with the same model;
- attack: six parallel requests of 64 white 6,324 x 6,324 PNGs (~130 KB each, 40 M pixels: inside every
  per-image bound), while a normal request is sent every 0.25 s until all six are answered;
  ``normal_during_attack_s`` is the slowest of those normal requests;
- after: resident memory 3 s after the attack over the idle figure (``memory_after_attack_ratio``);
- SIGTERM under load: four requests of 16 stamps with 8 beams and 64 new tokens in flight, then SIGTERM;
  ``sigterm_under_load_s`` is how long the server took to exit.
Writes benchmarks/results/serve-load-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from clipcap.environment import apply_offline_env

apply_offline_env()
from model_speed import cpu_model, save_report  # noqa: E402  (benchmarks/model_speed.py)
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAMPS = sorted(Path("/usr/share/tuxpaint/stamps/animals").rglob("*.png"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def frame(images: list[str], params: dict | None = None) -> bytes:
    body = {"dataframe_split": {"columns": ["image"], "data": [[image] for image in images]}}
    return json.dumps(body | ({"params": params} if params else {})).encode()


def post(base: str, data: bytes, timeout: float = 600) -> tuple[int, float, str]:
    """(status, seconds, body); status 0 when the connection failed."""
    started = time.monotonic()
    request = urllib.request.Request(f"{base}/invocations", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, time.monotonic() - started, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, time.monotonic() - started, err.read().decode()
    except OSError as err:
        return 0, time.monotonic() - started, str(err)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def white_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (6324, 6324), (255, 255, 255)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def start(model: str, tracking_uri: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "clipcap.cli", "serve", "--model", model, "--tracking-uri",
                                tracking_uri, "--port", str(port)], cwd=ROOT, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2):
                return process, base
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"clipcap serve {model} exited with {process.returncode}: is it registered? "
                                 "(bash scripts/run.sh registers the champion)")
            time.sleep(0.25)
    raise SystemExit("clipcap serve did not answer /ping within 5 minutes")


def transparent_stamps(count: int = 8) -> list[Path]:
    """The first ``count`` stamps (in name order, across categories) with transparent pixels."""
    found = []
    for path in sorted(Path("/usr/share/tuxpaint/stamps").rglob("*.png")):
        with Image.open(path) as image:
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                found.append(path)
        if len(found) == count:
            break
    return found


def served_against_cli(base: str, model: str, tracking_uri: str) -> dict:
    """Each transparent stamp's caption over HTTP beside what ``clipcap caption`` gives with the same model."""
    from clipcap.modeling.captioner import Captioner
    from clipcap.pipeline.registry import download_captioner

    stamps = transparent_stamps()
    status, _, body = post(base, frame([b64(p.read_bytes()) for p in stamps]))
    assert status == 200, body
    served = json.loads(body)["predictions"]
    cli = Captioner.load(download_captioner(model, tracking_uri)).caption([str(p) for p in stamps])
    rows = [{"stamp": str(p.relative_to("/usr/share/tuxpaint/stamps")), "served": s, "cli": c}
            for p, s, c in zip(stamps, served, cli)]
    return {"served_vs_cli": rows, "served_equals_cli": sum(r["served"] == r["cli"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/clipcap-tuxpaint@champion")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    args = parser.parse_args()

    normal = frame([b64(STAMPS[0].read_bytes())])
    process, base = start(args.model, args.tracking_uri)
    result: dict = {"machine": cpu_model(), "cpus": os.cpu_count(), "date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "model": args.model}
    try:
        status, _, body = post(base, normal)
        assert status == 200, body
        result["normal_idle_s"] = sorted(post(base, normal)[1] for _ in range(3))[1]
        result["idle_rss_mb"] = rss_mb(process.pid)
        result |= served_against_cli(base, args.model, args.tracking_uri)
        print(f"transparent stamps: the served caption equals clipcap caption's for {result['served_equals_cli']} of "
              f"{len(result['served_vs_cli'])}", flush=True)
        print(f"idle: {result['idle_rss_mb']:.0f} MB, a normal request {result['normal_idle_s']:.2f} s", flush=True)

        attack = frame([b64(white_png())] * 64)
        result["attack_request_mb"] = len(attack) / 1e6
        peak, during = result["idle_rss_mb"], []
        with ThreadPoolExecutor(6) as pool:
            started = time.monotonic()
            attacks = [pool.submit(post, base, attack) for _ in range(6)]
            while not all(a.done() for a in attacks):
                status, seconds, _ = post(base, normal)
                during.append((status, seconds))
                peak = max(peak, rss_mb(process.pid))
                time.sleep(0.25)
            answers = [a.result() for a in attacks]
        result["attack_s"] = time.monotonic() - started
        result["attack_statuses"] = sorted(status for status, _, _ in answers)
        result["attack_message"] = json.loads(answers[0][2]).get("message") if answers[0][0] != 200 else None
        result["normal_during_attack"] = len(during)
        result["normal_during_attack_statuses"] = sorted({status for status, _ in during})
        result["normal_during_attack_s"] = max((s for _, s in during), default=0.0)
        result["peak_rss_mb"] = peak
        time.sleep(3)
        result["after_rss_mb"] = rss_mb(process.pid)
        result["memory_after_attack_ratio"] = result["after_rss_mb"] / result["idle_rss_mb"]
        print(f"attack: {result['attack_statuses']} in {result['attack_s']:.1f} s; {len(during)} normal requests "
              f"during it, slowest {result['normal_during_attack_s']:.2f} s; memory {result['idle_rss_mb']:.0f} -> "
              f"peak {peak:.0f} -> {result['after_rss_mb']:.0f} MB", flush=True)

        heavy = frame([b64(p.read_bytes()) for p in STAMPS[:16]], {"num_beams": 8, "max_new_tokens": 64})
        with ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(post, base, heavy)
            time.sleep(2)
            os.killpg(process.pid, signal.SIGTERM)
            started = time.monotonic()
            process.wait(timeout=300)
            result["sigterm_under_load_s"] = time.monotonic() - started
        print(f"SIGTERM under load: exited in {result['sigterm_under_load_s']:.1f} s", flush=True)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    save_report("serve-load", result, markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    return "\n".join([
        f"# A served model under attack on {r['machine']} ({r['cpus']} CPUs), {r['date']}", "",
        f"`python benchmarks/serve_load.py --model {r['model']}` (clipcap serve, the model's default serve limits)", "",
        "| figure | value |", "|---|---|",
        f"| a normal request, idle (median of 3) | {r['normal_idle_s']:.2f} s |",
        f"| six parallel requests of 64 white 6,324^2 PNGs ({r['attack_request_mb']:.1f} MB each): statuses | "
        f"{r['attack_statuses']} in {r['attack_s']:.1f} s |",
        f"| their refusal | {r['attack_message']} |",
        f"| **slowest normal request during the attack** ({r['normal_during_attack']} sent, statuses "
        f"{r['normal_during_attack_statuses']}) | **{r['normal_during_attack_s']:.2f} s** |",
        f"| resident memory idle / peak / 3 s after | {r['idle_rss_mb']:.0f} / {r['peak_rss_mb']:.0f} / "
        f"{r['after_rss_mb']:.0f} MB |",
        f"| **memory after the attack / idle** | **{r['memory_after_attack_ratio']:.2f}** |",
        f"| **SIGTERM with four heavy requests in flight: exit after** | **{r['sigterm_under_load_s']:.1f} s** |", "",
        f"Transparent stamps, served (HTTP) against `clipcap caption` with the same model: "
        f"{r['served_equals_cli']} of {len(r['served_vs_cli'])} the same.", "",
        "| stamp | served | clipcap caption |", "|---|---|---|",
        *[f"| {row['stamp']} | {row['served']} | {row['cli']} |" for row in r["served_vs_cli"]], "",
    ])


if __name__ == "__main__":
    main()
