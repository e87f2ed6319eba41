"""The import rules of the library, read from the source."""

from __future__ import annotations

import pytest
from architecture import PACKAGE, closure, direct_imports, module_name

from clipcap.pipeline.registry import INFERENCE_CODE

MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))
LAYERS = ("modeling", "training", "pipeline", "data")
ALLOWED = {  # which layers each layer may import (the top-level modules are open to all)
    "modeling": set(),
    "data": set(),
    "training": {"modeling"},
    "pipeline": {"modeling", "training", "data"},
}


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else None


@pytest.mark.parametrize("name", [m for m in MODULES if layer(m)])
def test_layers_import_only_what_they_may(name):
    own = layer(name)
    wrong = sorted(m for m in direct_imports(name) if layer(m) not in {None, own, *ALLOWED[own]})
    assert not wrong, f"{name} ({own}/) imports {wrong}: {own}/ may use only {sorted(ALLOWED[own]) or 'no other layer'}"


def test_top_level_modules_import_no_layer():
    """config, errors, fileio, images, environment are shared by all; only the CLI composes layers."""
    for name in MODULES:
        if layer(name) is None and name not in ("clipcap.cli",):
            assert not {layer(m) for m in direct_imports(name)} - {None}, name


def test_the_served_model_ships_what_inference_imports():
    """The pyfunc model's code (registry.INFERENCE_CODE) holds everything the inference API and the
    pyfunc entry point import, and nothing of the pipeline or the data layer."""
    needed = closure("clipcap.modeling.captioner", "clipcap.modeling.interpret", "clipcap.pipeline.pyfunc")
    needed.discard("clipcap.pipeline.pyfunc")          # logged as the model's code file itself
    needed -= {"clipcap.pipeline"}                     # its package: not imported when served from code
    shipped = {n.removesuffix(".py") for n in INFERENCE_CODE}
    outside = sorted(m for m in needed - {"clipcap"} if m.split(".")[1] not in shipped)
    assert not outside, f"the served model imports {outside}, which INFERENCE_CODE does not ship"
    assert not any(layer(m) in ("pipeline", "data", "training") for m in needed - {"clipcap.pipeline"})


def test_architecture_reader_sees_lazy_imports():
    """A check of the checker: imports inside functions count (except the CLI's)."""
    assert "clipcap.pipeline.registry" not in direct_imports("clipcap.cli")   # lazy, in `caption`
    assert "clipcap.pipeline" in direct_imports("clipcap.cli")
    assert "clipcap.data.formats" in direct_imports("clipcap.data.collect")


def test_the_served_model_declares_every_package_its_code_imports():
    """Each third-party import of the shipped code (registry.INFERENCE_CODE + the pyfunc entry point) comes
    from a distribution in registry.SERVING_PACKAGES (MLflow itself is added by MLflow)."""
    import ast
    import sys
    from importlib.metadata import packages_distributions

    from clipcap.pipeline.registry import SERVING_PACKAGES

    files = [PACKAGE / "pipeline" / "pyfunc.py"]
    for name in INFERENCE_CODE:
        path = PACKAGE / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.suffix == ".py" else []
    roots = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots.add(node.module.split(".")[0])
    third_party = roots - set(sys.stdlib_module_names) - {"clipcap", "__future__", "mlflow"}
    providers = packages_distributions()
    declared = {p.lower().replace("_", "-") for p in SERVING_PACKAGES}
    undeclared = {root: providers.get(root) for root in third_party
                  if not {d.lower().replace("_", "-") for d in providers.get(root, [root])} & declared}
    assert not undeclared, f"the served model imports {undeclared} but SERVING_PACKAGES does not declare them"
