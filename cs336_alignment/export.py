"""Model folders the ecosystem opens: written from a live policy, and exported from any checkpoint.

Every checkpoint holds a Hugging Face folder of the fp32 master weights (``<checkpoint>/model/``,
what resume loads); what is served is usually smaller. Two paths, kept apart so that sharded
distributed checkpoints can later feed the second one:

- :func:`save_model_folder` writes a model, its tokenizer and generation config with
  ``save_pretrained`` (safetensors, tied weights stored once), optionally cast to another dtype
  tensor by tensor on the CPU (no second copy on the GPU), then makes the folder loadable by
  transformers 4.x as well as 5.x (:func:`~cs336_alignment.hf_compat.make_compatible`). The
  checkpoint writer and a run's final ``model/`` use it.
- :func:`export_model` (the ``export`` command) reads a checkpoint, a finished run or a model
  folder and writes a servable folder in ``dtype`` (bfloat16 by default) next to nothing it
  would overwrite.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .hf_compat import make_compatible
from .models import SHARDED_DIR, is_sharded_checkpoint, model_folder
from .run_dir import umask_mode

__all__ = [
    "EXPORT_DTYPES",
    "ExportError",
    "export_dtype",
    "export_model",
    "save_model_folder",
]

EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ExportError(UserError, RuntimeError):
    """The export's source is no model, or its destination holds files."""

    exit_code = 2  # found before anything is written


def export_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a run's final model is written in: ``name`` from :data:`EXPORT_DTYPES`, or "auto":
    bfloat16 for a run on a GPU (the dtype it is served in), the training dtype (float32) on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return EXPORT_DTYPES[name]


def save_model_folder(model: Any, tokenizer: Any, folder: Path, *, dtype: torch.dtype | None = None) -> list[Path]:
    """Write ``model`` (a ``PreTrainedModel``; any other module: its weights only, as
    model.safetensors) and ``tokenizer`` (None: none) into ``folder`` (created); returns the
    files written. ``dtype``: cast every floating-point tensor to it on the CPU, tensor by tensor
    (tied tensors stay tied, so they are stored once) and record it in config.json; None keeps
    the model's own. Files get the mode the umask allows (safetensors writes 0o600)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not hasattr(model, "save_pretrained"):
        _save_tensors(_cast(model.state_dict(), dtype), folder)
    else:
        recorded = model.config.dtype  # save_pretrained overwrites it with the parameters' dtype: restored below
        try:
            if dtype is None or dtype == model.dtype:
                with _quiet():
                    model.save_pretrained(folder)
            else:
                with _quiet():
                    model.save_pretrained(folder, state_dict=_cast(model.state_dict(), dtype))
                model.config.dtype = str(dtype).removeprefix("torch.")  # what the file holds
                model.config.save_pretrained(folder)
        finally:
            model.config.dtype = recorded
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if (folder / "config.json").exists():
        make_compatible(folder)
    written = sorted(p for p in folder.rglob("*") if p.is_file())
    for p in written:
        p.chmod(umask_mode())
    return written


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No "Writing model shards" progress bar in the run's log at every checkpoint."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``state_dict`` on the CPU with its floating-point tensors cast to ``dtype`` (None: kept);
    tensors that share memory (tied embeddings) map to one tensor, so they are still seen as tied."""
    cast: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}
    out = {}
    for name, t in state_dict.items():
        key = (t.data_ptr(), tuple(t.shape))
        if key not in cast:
            cast[key] = t.detach().to("cpu", dtype) if dtype and t.is_floating_point() else t.detach().cpu()
        out[name] = cast[key]
    return out


def _save_tensors(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """model.safetensors of a plain module (no save_pretrained), each shared tensor once."""
    from safetensors.torch import save_file

    unique, seen = {}, set()
    for name, t in tensors.items():  # safetensors refuses aliased tensors: keep the first name of each
        if id(t) not in seen:
            seen.add(id(t))
            unique[name] = t.contiguous()
    save_file(unique, str(folder / "model.safetensors"), metadata={"format": "pt"})


def export_model(source: str | Path, out: str | Path, *, dtype: str = "bfloat16") -> Path:
    """Write a servable Hugging Face folder ``out`` (model in ``dtype``, tokenizer, generation
    config) from ``source``: a checkpoint directory (``<run>/checkpoints/step_N``, also a
    multi-process run's sharded one), a finished run, or a model folder. ``out`` must not exist
    or be empty (ExportError, exit 2, before anything is written); the folder is written beside it
    and renamed into place, so a failed export leaves nothing half-written. Returns ``out``."""
    from .distributed import refuse_several_processes

    refuse_several_processes("export")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    sharded = is_sharded_checkpoint(source)  # weights in shards, config and tokenizer in model/
    folder = Path(source) / "model" if sharded else Path(model_folder(str(source)))
    if not (folder / "config.json").is_file():
        raise ExportError(f"{source} is no checkpoint, finished run or model folder (no config.json in it or in its model/)")
    out = Path(out)
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise ExportError(f"--out {out} already exists and is not an empty directory; choose a new one (nothing was written)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if sharded:
        from transformers import AutoConfig

        from .distributed import load_sharded

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
        load_sharded(Path(source) / SHARDED_DIR, model, None)  # every shard, gathered into one plain model
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # the master weights as saved
    tokenizer = AutoTokenizer.from_pretrained(folder)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed export to the same destination
        shutil.rmtree(stale, ignore_errors=True)
    try:
        save_model_folder(model, tokenizer, staging, dtype=EXPORT_DTYPES[dtype])
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
