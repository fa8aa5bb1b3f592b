"""The vLLM backend: an in-process ``vllm.LLM`` behind the :class:`Generator` interface.

vLLM is imported only inside the functions here, never at package import. Two engine
generations are handled, picked by looking at the running ``LLM`` object, not by a
version table:

- **V0** (vLLM 0.7.2, the course's pin; V0 exists until 0.10.x): the model lives in the
  process at ``llm.llm_engine.model_executor.driver_worker.model_runner.model`` and its
  ``load_weights(iterable of (name, tensor))`` is called directly. Building the engine on
  a second GPU next to a training process needs the course's two patches (world size 1,
  no memory-profiling assertion), applied only while ``LLM(...)`` is constructed.
- **V1** (default from 0.8, the only engine from 0.11): the model sits inside a worker.
  We register :class:`WeightSyncExtension` as the engine's ``worker_extension_cls`` and
  call it with ``llm.collective_rpc``; with ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set
  here by default) the engine core runs in this process and tensors are passed by
  reference, not serialised.

After each weight load the prefix cache is reset: cached prompt keys/values were
computed with the old weights.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import random
import re
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from types import ModuleType
from typing import Any, Literal
from unittest import mock

import torch

from ..console import bars_enabled
from ..errors import UserError
from ..models import model_folder
from .types import Completion, GenerationResult, SamplingParams

__all__ = [
    "BackendUnavailable",
    "VLLMGenerator",
    "WeightSyncExtension",
    "build_llm",
    "engine_args_fields",
    "engine_kind",
    "from_vllm_sampling",
    "import_vllm",
    "load_policy_weights",
    "load_vllm_generator",
    "parse_version",
    "policy_weights",
    "to_completion",
    "to_vllm_sampling_kwargs",
]

MIN_VLLM_VERSION = (0, 7, 2)
EXTENSION_CLS = f"{__name__}.WeightSyncExtension"
_RPC_METHOD = "cs336_load_weights"
_INSTALL_HINT = "pip install 'cs336-alignment[vllm]' (needs a CUDA GPU), or use backend: native"


class BackendUnavailable(UserError, RuntimeError):
    """The vLLM backend was selected but cannot run here (not installed, or unsupported version)."""

    exit_code = 2  # a missing optional extra: found before the run starts


# --------------------------------------------------------------------------- import and versions


def parse_version(text: str) -> tuple[int, int, int]:
    """'0.7.2' / '0.10.1.1' / '0.8.5.post1' / '0.11.0rc2.dev3+g..' -> (major, minor, patch)."""
    parts = [int(m) for m in re.findall(r"\d+", text.split("+")[0])[:3]]
    return tuple((parts + [0, 0, 0])[:3])  # type: ignore[return-value]


def import_vllm() -> ModuleType:
    """Import vllm or raise :class:`BackendUnavailable` with a one-line, actionable message."""
    try:
        vllm = importlib.import_module("vllm")
    except ImportError as e:  # also covers sys.modules["vllm"] = None
        raise BackendUnavailable(f"vLLM backend selected but vllm is not installed: {_INSTALL_HINT}") from e
    version = getattr(vllm, "__version__", "0")
    if parse_version(version) < MIN_VLLM_VERSION:
        need = ".".join(map(str, MIN_VLLM_VERSION))
        raise BackendUnavailable(
            f"vLLM backend selected but vllm {version} is not supported: install vllm>={need} (0.7.2 is the course's pin), "
            "or use backend: native"
        )
    return vllm


def engine_args_fields(vllm: ModuleType) -> set[str]:
    """Names of the keyword arguments ``vllm.LLM`` forwards to its ``EngineArgs``."""
    arg_utils = importlib.import_module("vllm.engine.arg_utils")
    return {f.name for f in dataclasses.fields(arg_utils.EngineArgs)}


def engine_kind(llm: Any) -> Literal["v0", "v1"]:
    """Which engine an ``LLM`` runs: the V1 engine's classes live under ``vllm.v1``."""
    return "v1" if type(llm.llm_engine).__module__.startswith("vllm.v1") else "v0"


def _seed_everything(vllm: ModuleType, seed: int) -> None:
    """vLLM's own ``set_random_seed`` (its location moved between versions), else the same by hand."""
    for module_name in ("vllm.model_executor", "vllm.utils.torch_utils", "vllm.utils"):
        try:
            fn = getattr(importlib.import_module(module_name), "set_random_seed", None)
        except ImportError:
            fn = None
        if fn is not None:
            fn(seed)
            return
    import numpy as np  # vLLM's dependency, imported only where vLLM runs

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _v0_placement_patches(stack: ExitStack) -> None:
    """The course's patches for building a V0 engine beside a training process (0.7.2 layout).

    ``torch.distributed.get_world_size`` returns 1 so vLLM does not see the trainer's
    process group, and the worker's check that profiling increased GPU memory (false when
    another process already holds memory on that GPU) is skipped.
    """
    try:
        worker_module = importlib.import_module("vllm.worker.worker")
    except ImportError:
        return  # no V0 worker in this version
    worker = getattr(worker_module, "Worker", None)
    if worker is None or not hasattr(worker, "_assert_memory_footprint_increased_during_profiling"):
        return
    stack.enter_context(mock.patch("torch.distributed.get_world_size", return_value=1))
    stack.enter_context(
        mock.patch.object(worker, "_assert_memory_footprint_increased_during_profiling", return_value=None)
    )


def build_llm(
    model_id: str,
    device: str | torch.device = "cuda",
    seed: int = 0,
    gpu_memory_utilization: float = 0.85,
    **llm_kwargs: Any,
) -> Any:
    """An in-process ``vllm.LLM`` for ``model_id`` on ``device`` (bf16, prefix caching on).

    Passes ``device`` where the installed vLLM still accepts it (0.7.2 to 0.10.x). Newer
    versions always use the first visible GPU for an in-process engine; asking for another
    one there raises a ``ValueError`` saying to use ``CUDA_VISIBLE_DEVICES`` instead.
    ``llm_kwargs`` go to ``vllm.LLM`` unchanged (e.g. ``max_model_len``, ``enforce_eager``).

    Under torchrun with several processes (``WORLD_SIZE`` > 1) every rank builds its own engine
    in vLLM's torchrun mode: ``distributed_executor_backend="external_launcher"`` with
    ``data_parallel_size`` = the world size, so vLLM joins the launcher's ranks instead of
    starting workers, and places each engine on its rank's GPU (``LOCAL_RANK``); each rank then
    samples its own share of the prompts. Needs a vLLM with that mode (>= 0.8 for the launcher,
    >= 0.10 for its data-parallel size).
    """
    vllm = import_vllm()
    fields = engine_args_fields(vllm)
    device = torch.device(device)
    kwargs: dict[str, Any] = dict(
        model=model_id,
        dtype=torch.bfloat16,
        enable_prefix_caching=True,
        gpu_memory_utilization=gpu_memory_utilization,
        seed=seed,
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # one engine per rank, on the rank's own GPU
        if parse_version(vllm.__version__) < (0, 10, 0) or not {"distributed_executor_backend", "data_parallel_size"} <= fields:
            raise BackendUnavailable(f"vllm {vllm.__version__} has no torchrun (external_launcher) data-parallel mode for "
                                     f"{world_size} processes (vllm >= 0.10): upgrade vllm, or use backend: native")
        kwargs.update(distributed_executor_backend="external_launcher", data_parallel_size=world_size)
        if "worker_extension_cls" in fields:
            kwargs["worker_extension_cls"] = EXTENSION_CLS
        kwargs.update(llm_kwargs)
        _seed_everything(vllm, seed)
        return vllm.LLM(**kwargs)
    if "device" in fields:
        kwargs["device"] = str(device)
    elif device.type == "cuda" and (device.index or 0) != 0:
        raise ValueError(
            f"vllm {vllm.__version__} always puts an in-process engine on the first visible GPU and cannot be asked "
            f"for {device}: start Python with CUDA_VISIBLE_DEVICES listing the vLLM GPU first "
            "(e.g. CUDA_VISIBLE_DEVICES=1,0 puts vLLM on physical GPU 1 and the policy on cuda:1 = physical GPU 0)"
        )
    if "worker_extension_cls" in fields:
        kwargs["worker_extension_cls"] = EXTENSION_CLS
        # Run the V1 engine core in this process: collective_rpc then hands tensors over by reference.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    kwargs.update(llm_kwargs)
    _seed_everything(vllm, seed)
    with ExitStack() as stack:
        _v0_placement_patches(stack)
        return vllm.LLM(**kwargs)


# --------------------------------------------------------------------------- sampling


def to_vllm_sampling_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """Our :class:`SamplingParams` -> keyword arguments for ``vllm.SamplingParams``.

    ``top_k`` off is -1 (accepted as "off" from 0.7.2, where 0 is an error, to today, where
    0 is the default); ``logprobs=1`` makes vLLM return the sampled token's log-prob at
    every step (the sampled token is always among the returned ones).
    """
    return dict(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        max_tokens=sampling.max_tokens,
        min_tokens=sampling.min_tokens,
        stop=list(sampling.stop),
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        ignore_eos=sampling.ignore_eos,
        seed=sampling.seed,
        logprobs=1,
    )


def from_vllm_sampling(params: Any) -> SamplingParams:
    """A ``vllm.SamplingParams`` (or anything with its attribute names) -> our :class:`SamplingParams`."""
    if isinstance(params, SamplingParams):
        return params
    max_tokens = getattr(params, "max_tokens", None)
    if max_tokens is None:
        raise ValueError("the vLLM SamplingParams need an explicit max_tokens (e.g. 1024)")
    stop = getattr(params, "stop", None) or ()
    top_k = getattr(params, "top_k", 0) or 0
    return SamplingParams(
        temperature=float(getattr(params, "temperature", 1.0)),
        top_p=float(getattr(params, "top_p", 1.0)),
        top_k=max(int(top_k), 0),
        max_tokens=int(max_tokens),
        min_tokens=int(getattr(params, "min_tokens", 0) or 0),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        include_stop_str_in_output=bool(getattr(params, "include_stop_str_in_output", False)),
        n=int(getattr(params, "n", 1)),
        seed=getattr(params, "seed", None),
        ignore_eos=bool(getattr(params, "ignore_eos", False)),
    )


def to_completion(output: Any) -> Completion:
    """One vLLM ``CompletionOutput`` -> :class:`Completion`.

    vLLM says ``finish_reason='stop'`` both for a stop string (``stop_reason`` is the
    string) and for EOS or a stop token id (``stop_reason`` None or an int): the latter is
    our "eos"; the EOS id stays in ``token_ids`` as in the native engine.
    """
    token_ids = [int(t) for t in output.token_ids]
    reason, stop_str = output.finish_reason, None
    if reason == "stop":
        if isinstance(output.stop_reason, str):
            stop_str = output.stop_reason
        else:
            reason = "eos"
    elif reason != "length":
        raise RuntimeError(f"vLLM finished a completion with reason {reason!r} (expected 'stop' or 'length')")
    logprobs: list[float] = []
    if output.logprobs is not None:
        logprobs = [float(step[tok].logprob) for step, tok in zip(output.logprobs, token_ids)]
    return Completion(text=output.text, token_ids=token_ids, finish_reason=reason, logprobs=logprobs, stop_str=stop_str)


# --------------------------------------------------------------------------- weights


def policy_weights(policy: Any, dtype: torch.dtype = torch.bfloat16) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of ``policy`` as vLLM's ``load_weights`` expects them.

    Names lose the ``_orig_mod.`` / ``module.`` prefixes of ``torch.compile`` / DDP;
    floating tensors are cast to ``dtype`` one at a time. With tied embeddings
    ``lm_head.weight`` is left out: vLLM's tied models have no separate ``lm_head``
    parameter (Qwen2 skips it; other architectures would fail on it), and the embedding
    carries the same values. Untied models must have ``lm_head.weight``.
    """
    from ..distributed import full_weights

    config = getattr(policy, "config", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = [k.removeprefix("_orig_mod.").removeprefix("module.") for k in policy.state_dict()]
    if not tied and config is not None and "lm_head.weight" not in names and "model.embed_tokens.weight" in names:
        raise KeyError("the policy's embeddings are not tied but its state dict has no lm_head.weight")
    for bucket in full_weights(policy):  # a sharded (FSDP2) policy is gathered in buckets; every rank iterates
        for name, tensor in bucket:
            if not (tied and name == "lm_head.weight"):
                yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def _chunks(weights: Iterator[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    chunk: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in weights:
        chunk.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class WeightSyncExtension:
    """Mixed into vLLM's V1 GPU worker (``worker_extension_cls``); called by ``collective_rpc``.

    vLLM refuses extensions whose attribute names clash with the worker's, hence the prefix.
    """

    def cs336_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """Load ``(name, tensor)`` pairs into this worker's model; returns how many were given."""
        getter = getattr(self, "get_model", None)
        model = getter() if callable(getter) else self.model_runner.model  # type: ignore[attr-defined]
        model.load_weights(weights=weights)
        return len(weights)


def load_policy_weights(llm: Any, policy: Any, chunk_bytes: int = 1 << 30) -> None:
    """Copy ``policy``'s current weights into ``llm`` (V0 directly, V1 via ``collective_rpc``), then reset its prefix cache."""
    weights = policy_weights(policy)
    if engine_kind(llm) == "v0":
        model = llm.llm_engine.model_executor.driver_worker.model_runner.model
        model.load_weights(weights)
    else:
        if not hasattr(llm, "collective_rpc"):
            raise BackendUnavailable("this vLLM V1 engine has no collective_rpc: upgrade vllm, or set VLLM_USE_V1=0")
        for chunk in _chunks(weights, chunk_bytes):
            try:
                llm.collective_rpc(_RPC_METHOD, args=(chunk,))
            except AttributeError as e:
                raise BackendUnavailable(
                    f"vLLM's worker has no {_RPC_METHOD}: build the LLM with worker_extension_cls={EXTENSION_CLS!r} "
                    "(init_vllm / load_vllm_generator do this; vllm < 0.8 has no extensions: set VLLM_USE_V1=0)"
                ) from e
    reset = getattr(llm, "reset_prefix_cache", None)
    if callable(reset):
        reset()


# --------------------------------------------------------------------------- the generator


class VLLMGenerator:
    """:class:`~cs336_alignment.generation.Generator` over a ``vllm.LLM``.

    Prompts given as text are tokenized here (``add_special_tokens=False``, as the native
    engine does) and passed as token ids, so every backend sees identical prompt ids.
    """

    def __init__(self, llm: Any, tokenizer: Any | None = None, chunk_bytes: int = 1 << 30):
        self.llm = llm
        self.tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        self.chunk_bytes = chunk_bytes

    def generate(
        self, prompts: Sequence[str] | Sequence[Sequence[int]], sampling: SamplingParams, progress: bool = False
    ) -> list[GenerationResult]:
        """Sample ``sampling.n`` completions per prompt with vLLM; one result per prompt, in order."""
        if len(prompts) == 0:
            return []
        vllm = import_vllm()
        texts = [p if isinstance(p, str) else None for p in prompts]
        prompt_ids = [
            self.tokenizer.encode(p, add_special_tokens=False) if isinstance(p, str) else [int(t) for t in p] for p in prompts
        ]
        params = vllm.SamplingParams(**to_vllm_sampling_kwargs(sampling))
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=bars_enabled(progress))
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [
            GenerationResult(prompt=text, prompt_token_ids=ids, completions=[to_completion(o) for o in out.outputs])
            for text, ids, out in zip(texts, prompt_ids, outputs)
        ]

    def load_weights(self, policy: Any) -> None:
        """Make later calls sample from ``policy``'s current weights."""
        load_policy_weights(self.llm, policy, self.chunk_bytes)


def load_vllm_generator(
    model_id: str,
    *,
    device: str | torch.device = "cuda",
    seed: int = 0,
    gpu_memory_utilization: float = 0.85,
    tokenizer: Any | None = None,
    **llm_kwargs: Any,
) -> VLLMGenerator:
    """Build the vLLM backend for ``model_id`` (a model folder, checkpoint or finished run, see
    :func:`~cs336_alignment.models.model_folder`) on ``device``; raises :class:`BackendUnavailable` without vLLM."""
    llm = build_llm(model_folder(model_id), device, seed, gpu_memory_utilization, **llm_kwargs)
    return VLLMGenerator(llm, tokenizer)
