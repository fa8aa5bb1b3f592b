"""Models: which device, how a model and its tokenizer load, and the precision policy.

A model is named by a directory: a ``save_pretrained`` folder, a checkpoint (``<run>/checkpoints/step_N``)
or a finished run (``<run>``), whose ``model/`` folder is used (:func:`model_folder`), or "tiny".

Precision policy: training keeps fp32 master weights and optimizer state and runs forward and
backward under bf16 autocast on GPU (pure-bf16 AdamW drops updates at lr 1e-5); evaluation-only
models load in bf16 on GPU; everything is fp32 on CPU. Generators sample from their own copy
(see ``generation``).
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .tiny import build_tiny_model, build_tiny_tokenizer

__all__ = [
    "SHARDED_DIR",
    "MissingPackage",
    "autocast",
    "check_model_options",
    "enable_gradient_checkpointing",
    "is_sharded_checkpoint",
    "free_cuda_cache",
    "load_model_and_tokenizer",
    "load_policy",
    "model_folder",
    "resolve_device",
    "use_liger_kernel",
]

SHARDED_DIR = "dcp"  # a multi-process run's checkpoint: model and optimizer state, sharded (torch.distributed.checkpoint)


class MissingPackage(UserError, RuntimeError):
    """An option needs a package that is not installed."""

    exit_code = 2  # found before the run starts


def model_folder(path: str) -> str:
    """The ``save_pretrained`` folder ``path`` names: ``path`` itself when it holds config.json;
    else the ``model/`` folder of a complete checkpoint (its fp32 master weights) or of a finished
    run (final.json: its final model, in the run's ``export_dtype``); else ``path`` unchanged
    ("tiny", a hub id, or a path the caller refuses). A run still going, or one that stopped
    before finishing, is not taken for its stale or partial model/."""
    if path == "tiny" or (Path(path) / "config.json").is_file():
        return path
    inner = Path(path) / "model"
    done = (Path(path) / "COMPLETE").is_file() or (Path(path) / "final.json").is_file()
    return str(inner) if done and not is_sharded_checkpoint(path) and (inner / "config.json").is_file() else path


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a multi-process run's checkpoint: its weights are shards in ``dcp/``, and
    its ``model/`` holds only config and tokenizer (``export`` makes a model folder of it)."""
    return (Path(path) / SHARDED_DIR).is_dir()


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else as torch reads it ("cuda:1")."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_model_options(
    *, attn_implementation: str = "sdpa", liger_kernel: bool = False, device: torch.device | None = None
) -> None:
    """Refuse (MissingPackage, one line) an option whose package is not installed, or that cannot
    run on ``device`` (flash-attn and Liger's Triton kernels need CUDA), before a run starts."""
    gpu_only = [name for name, on in (("attn_implementation=flash_attention_2", attn_implementation == "flash_attention_2"),
                                      ("use_liger_kernel=true", liger_kernel)) if on]
    if gpu_only and device is not None and device.type != "cuda":
        field = gpu_only[0].split("=")[0]
        raise MissingPackage(f"field '{field}': {gpu_only[0]} runs on CUDA only, and this run is on {device}; turn it off")
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise MissingPackage("field 'attn_implementation': flash_attention_2 needs the flash-attn package "
                             "(pip install flash-attn --no-build-isolation), or set attn_implementation=sdpa")
    if liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise MissingPackage("field 'use_liger_kernel': needs the liger-kernel package (pip install liger-kernel), "
                             "or set use_liger_kernel=false")


def load_model_and_tokenizer(
    path: str, device: torch.device, dtype: torch.dtype | None = None, seed: int = 0, attn_implementation: str = "sdpa"
) -> tuple[Any, Any]:
    """A model directory (see :func:`model_folder`; or "tiny") -> (model on ``device`` in eval
    mode, tokenizer).

    ``dtype`` defaults to bf16 on CUDA and fp32 on CPU. "tiny" builds the offline tiny model
    with initialisation seed ``seed``. ``attn_implementation``: "sdpa" (torch's fused attention),
    "eager", or "flash_attention_2" (needs the flash-attn package and a GPU).
    """
    check_model_options(attn_implementation=attn_implementation)
    path = model_folder(path)
    if path == "tiny":
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_model(tokenizer, seed=seed)
        model.set_attn_implementation(attn_implementation)
    else:
        # transformers takes seconds to import: only when a model directory is loaded, so that
        # `config`, `run --help` and `sweep --dry-run` (which import the recipes) stay quick
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(path).exists():
            raise FileNotFoundError(f"model directory {path} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return model.to(device, dtype).eval(), tokenizer


def load_policy(
    path: str,
    device: torch.device,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    *,
    attn_implementation: str = "sdpa",
    liger_kernel: bool = False,
) -> tuple[Any, Any]:
    """The trainable policy in fp32 (master weights), in train mode, and its tokenizer; with
    ``liger_kernel``, its RoPE, RMSNorm and SwiGLU run Liger's fused kernels (:func:`use_liger_kernel`)."""
    model, tokenizer = load_model_and_tokenizer(
        path, device, dtype=torch.float32, seed=seed, attn_implementation=attn_implementation
    )
    if liger_kernel:
        use_liger_kernel(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model.train(), tokenizer


def use_liger_kernel(model: Any) -> None:
    """Swap ``model``'s RoPE, RMSNorm and SwiGLU for Liger's fused Triton kernels, in place (the
    H100 baselines in the README: +21-33% training tokens/s). The fused linear cross-entropy
    stays off: our log-probs need the logits. liger-kernel is imported only here; without it, or
    for a model type it has no kernels for, a one-line MissingPackage."""
    try:
        import liger_kernel.transformers as liger
    except ImportError as e:
        raise MissingPackage(f"field 'use_liger_kernel': needs the liger-kernel package, which cannot be imported ({e}); "
                             "pip install liger-kernel, or set use_liger_kernel=false") from None
    model_type = getattr(model.config, "model_type", "?")
    apply = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if apply is None:
        raise MissingPackage(f"field 'use_liger_kernel': liger-kernel has no kernels for model type {model_type!r}; "
                             "set use_liger_kernel=false")
    apply(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in the backward instead of keeping them."""
    # renamed in transformers 5.2x; older versions have only the second name
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.config.use_cache = False


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for forward and backward on GPU (fp32 master weights); nothing on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def free_cuda_cache(device: torch.device) -> None:
    """Return cached blocks between phases when generator and policy share a GPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
