"""Data parallelism over several processes on PyTorch's own engine: FSDP2, collectives, DCP checkpoints.

Launched by ``torchrun --nproc-per-node N ...``, each process (rank) holds one shard of the fp32
master weights, their gradients and the optimizer state (``fully_shard``, "FSDP2": each parameter
becomes a ``DTensor`` sharded on dim 0 over a 1-D device mesh). Forward and backward all-gather a
layer's weights just in time; backward reduce-scatters the gradients. We make that reduction a
*sum* (FSDP's default is the mean): a rank then computes the loss of each of its micro-batches
exactly as one process would (same normaliser: the global batch's sequence or token count), and
the summed gradient is the single-process one. So the recipes' loss arithmetic is the same at
every world size; only which micro-batches a rank runs changes (:func:`share`, :func:`padded_share`).

Without torchrun (or with one process) nothing here does anything: no process group, no mesh,
the model and the lists pass through unchanged, and the single-process path stays exactly as it
was.

Every rank must call the collective functions here (``all_reduce``, ``gather``, ``barrier``,
``full_weights``, ``save_sharded``, ``load_sharded``, and the model's forward/backward) in the same
order; a mismatch fails after ``init_distributed``'s timeout with an error instead of hanging.

DCP checkpoints (``save_sharded`` / ``load_sharded``) hold the full model and optimizer state, each
rank writing its shard; they load at any world size (resharding), including one process without a
process group.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from .errors import UserError
from .models import resolve_device

__all__ = [
    "ONE",
    "DistContext",
    "DistributedError",
    "RankError",
    "all_reduce",
    "barrier",
    "close_distributed",
    "copy_full_into",
    "full_weights",
    "gather",
    "gathered_model",
    "init_distributed",
    "is_sharded",
    "load_full_optimizer_state",
    "load_sharded",
    "on_main",
    "padded_share",
    "refuse_several_processes",
    "save_sharded",
    "shard_policy",
    "share",
    "world_size",
]

# Oldest torch whose FSDP2 works on each device type: the public ``torch.distributed.fsdp.fully_shard``
# and DCP's ``get_state_dict`` arrived in 2.6; gloo (CPU) learnt the averaging reduce-scatter in 2.8.
MIN_TORCH = {"cuda": (2, 6), "cpu": (2, 8)}
T = TypeVar("T")
_DCP_QUIET = "torch.distributed is disabled, unavailable or uninitialized"  # DCP's warning without a process group


class DistributedError(UserError, RuntimeError):
    """Several processes cannot run as asked: torch too old, a batch that does not split evenly, ..."""

    exit_code = 2  # found before training starts


class RankError(UserError, RuntimeError):
    """A user error that rank 0 found (a busy run directory, a refused resume, ...), raised on every
    other rank with the same message and exit code, so that all ranks stop together."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class DistContext:
    """Where this process stands among the ranks of a run.

    ``rank`` in [0, world_size); ``local_rank`` its index on this machine (its GPU); ``device`` this
    rank's device (``cuda:<local_rank>`` on GPUs); ``mesh`` the 1-D device mesh over all ranks that
    ``fully_shard`` shards over, None at world size 1 (no process group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Any = None  # torch.distributed.device_mesh.DeviceMesh, or None at world size 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs, metrics and run files."""
        return self.rank == 0


ONE = DistContext()  # one process on the CPU: the default of phase functions that take a ``ctx``


def world_size() -> int:
    """How many processes this run has: torchrun's ``WORLD_SIZE``, 1 without torchrun. Known before
    any process group exists, so that a batch that cannot be split is refused first."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def refuse_several_processes(command: str) -> None:
    """Refuse (DistributedError, exit 2) to run ``command``, which has no multi-process path, under
    torchrun with several processes: every rank would write the same files."""
    if world_size() > 1:
        raise DistributedError(f"{command} runs in one process, not under torchrun with {world_size()} processes; "
                               "start it with python -m cs336_alignment")


def _check_torch(device_type: str) -> None:
    need = MIN_TORCH.get(device_type, MIN_TORCH["cuda"])
    have = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if have < need or not dist.is_available():
        raise DistributedError(f"torch {torch.__version__} is too old for FSDP2 on {device_type} (needs >= {need[0]}.{need[1]} "
                               f"with torch.distributed); upgrade torch or run one process")


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> DistContext:
    """Join the run's process group when launched by torchrun with several processes.

    Reads torchrun's ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``. At world size > 1: checks the torch
    version (:class:`DistributedError`), binds ``cuda:<LOCAL_RANK>`` (nccl) or uses the CPU (gloo),
    initialises the default process group with ``timeout_s`` (a collective that some rank never
    joins fails after that long, with a message) and builds the 1-D mesh for that device type
    (explicitly: the default mesh would follow the accelerator even for a CPU run). At world size 1
    (no torchrun, or one process) it touches nothing: ``device`` resolves as it always did
    ("auto" -> cuda when available, else cpu).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(device=resolve_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device_type = resolve_device(device).type
    _check_torch(device_type)
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank} wants cuda:{local_rank}, but this machine has {torch.cuda.device_count()} "
                                   "GPUs; start at most one process per GPU")
        where = torch.device("cuda", local_rank)
        torch.cuda.set_device(where)
    else:
        where = torch.device(device_type)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=where if device_type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=where, mesh=mesh)


def close_distributed(ctx: DistContext) -> None:
    """Leave the process group (if this process joined one); a no-op at world size 1."""
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard_policy(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """Shard ``model`` over ``ctx.mesh`` in place and return it; without a mesh (world size 1, no
    process group) return it untouched.

    ``fully_shard`` on each decoder layer (``model.model.layers``: one all-gather / reduce-scatter
    per layer), then on the root (embeddings, tied LM head, final norm). Parameters stay fp32 (the
    master weights; bf16 autocast applies on top as before) and become ``DTensor`` shards, so build
    the optimizer *after* this call: its state is then sharded too. Gradients are *summed* over
    ranks (divide factor 1; see the module docstring). ``model`` should already be on ``ctx.device``.
    """
    if ctx.mesh is None:
        return model
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from .logprobs import CHUNKED_FORWARD

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"shard_policy expects a decoder model with model.model.layers; got {type(model).__name__}")
    for module in [*layers, model]:
        # The root too reshards after its forward (its default keeps embeddings and head gathered until the
        # backward): after a forward without a backward (validation, old log-probs) model.parameters() would
        # otherwise be the gathered copies, and an optimizer made then (EI's fresh_optimizer) would miss them.
        fully_shard(module, mesh=ctx.mesh, reshard_after_forward=True)
        module.set_gradient_divide_factor(1.0)  # sum, not mean: each rank's loss is normalised globally
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum; NCCL: zero-copy)
    # The chunked log-probs run the body and then the head's weight outside ``model.forward``: as a
    # registered forward method the root's own parameters are gathered around them too.
    setattr(model, CHUNKED_FORWARD, types.MethodType(_chunked_forward, model))
    register_fsdp_forward_method(model, CHUNKED_FORWARD)
    return model


def _chunked_forward(model: torch.nn.Module, *args: Any) -> dict[str, torch.Tensor]:
    """The chunked log-probs of a sharded model, each output its own tensor (FSDP2 warns about a
    returned view, whose in-place update would bypass its backward hook)."""
    from .logprobs import chunked_response_log_probs

    out = chunked_response_log_probs(model, *args)
    return {k: v.clone() if v._base is not None else v for k, v in out.items()}  # (B, T) each


def full_weights(model: torch.nn.Module, bucket_bytes: int = 1 << 30) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The full parameters and persistent buffers of ``model``, gathered, in buckets.

    Yields lists of ``(name, tensor)``; the names and shapes are those of the plain (unsharded)
    model's ``state_dict()`` (torch.compile's ``_orig_mod.`` and DDP's ``module.`` prefixes dropped),
    tied weights under each of their names (gathered once). Each bucket holds at most
    ``bucket_bytes`` of distinct tensors, or one tensor larger than that. A sharded parameter
    is all-gathered (``DTensor.full_tensor()``) onto its device in its dtype; on a plain model the
    tensors are the model's own, detached (copy them, don't modify them). On a sharded model every
    rank must run the iterator to its end, in step: each gather is a collective.
    """
    from torch.distributed.tensor import DTensor

    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    state = model.state_dict(keep_vars=True)
    names_of: dict[int, int] = {}  # id of a parameter object -> how many names it has (tied weights: 2)
    for value in state.values():
        names_of[id(value)] = names_of.get(id(value), 0) + 1
    tied: dict[int, torch.Tensor] = {}  # only tensors with a name still to come are kept: peak ~ one bucket
    for name, value in state.items():
        name = name.removeprefix("_orig_mod.").removeprefix("module.")
        full = tied.get(id(value))
        if full is None:  # first name of this tensor: gather it, and count it towards the bucket
            with torch.no_grad():  # not around the yield: grad mode would stay off in the caller between buckets
                full = (value.full_tensor() if isinstance(value, DTensor) else value).detach()
            nbytes = full.numel() * full.element_size()
            if bucket and size + nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            size += nbytes
        names_of[id(value)] -= 1
        if names_of[id(value)] > 0:
            tied[id(value)] = full
        else:
            tied.pop(id(value), None)  # its last name: from here on only the bucket holds it
        bucket.append((name, full))
    if bucket:
        yield bucket


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (``DTensor``), i.e. it went through :func:`shard_policy`."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the whole tensor ``full`` into ``target``, a plain tensor or this rank's shard of a
    ``DTensor`` (sliced locally: every rank holds ``full``, so nothing is communicated)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        full = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements,
                                 src_data_rank=None)
    target.copy_(full)


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a one-process ``optimizer.state_dict()`` (parameters by index, full tensors) into the
    optimizer of the sharded ``model``, each rank keeping its slices. The index order is that of
    ``[p for p in model.parameters() if p.requires_grad]``, which ``make_optimizer`` used."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    by_name = {
        "state": {names[int(i)]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def gathered_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module | None:
    """One plain copy of a sharded ``model`` (fp32, on the CPU) on rank 0, None on the others;
    ``model`` itself when it is not sharded. Every rank must call it (each parameter is gathered
    in turn, :func:`full_weights`). What rank 0 saves as the run's final model."""
    if not is_sharded(model):
        return model
    plain = None
    if ctx.is_main:
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        plain.generation_config = model.generation_config
        own = plain.state_dict()
    for bucket in full_weights(model):
        if plain is not None:
            with torch.no_grad():
                for name, tensor in bucket:
                    own[name].copy_(tensor)
    return plain


def all_reduce(values: dict[str, float], ctx: DistContext, op: Literal["mean", "sum", "max"] = "mean") -> dict[str, float]:
    """The mean (or sum, or max) over ranks of each value, in one collective; every rank passes the
    same keys. At world size 1 the values come back as floats, unchanged.
    """
    if op not in ("mean", "sum", "max"):
        raise ValueError(f"op must be 'mean', 'sum' or 'max', not {op!r}")
    if ctx.world_size == 1:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)  # the same order on every rank, whatever the insertion order
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= ctx.world_size
    reduced = dict(zip(keys, t.tolist()))
    return {k: reduced[k] for k in values}


def share(items: Sequence, ctx: DistContext) -> list:
    """This rank's contiguous share of ``items`` (the same sequence on every rank): items
    ``[rank * n / world_size, (rank + 1) * n / world_size)``. Every rank gets as many, so all
    run the same number of micro-batches; ``len(items)`` must divide by the world size
    (:class:`DistributedError` otherwise)."""
    n = len(items)
    if n % ctx.world_size:
        raise DistributedError(f"cannot split {n} items evenly over {ctx.world_size} processes; "
                               f"make the batch a multiple of {ctx.world_size}")
    per = n // ctx.world_size
    return list(items[ctx.rank * per:(ctx.rank + 1) * per])


def padded_share(items: Sequence, ctx: DistContext) -> tuple[list, int]:
    """This rank's share of ``items`` when they may not split evenly: ``(mine, n_real)``.

    Every rank gets ``ceil(n / world_size)`` items, so every rank runs as many forward passes
    (each a collective on a sharded model); the first ``n_real`` are its real share (contiguous,
    in order, as :func:`share`), the rest repeat its last real item (or the last item of
    ``items`` when it has none) and are to be weighted 0 or dropped. With no items, ``([], 0)``.
    """
    n, ws = len(items), ctx.world_size
    if n == 0:
        return [], 0
    per = -(-n // ws)
    mine = list(items[min(n, ctx.rank * per):min(n, (ctx.rank + 1) * per)])
    filler = mine[-1] if mine else items[-1]
    return mine + [filler] * (per - len(mine)), len(mine)


def on_main(fn: Callable[[], T], ctx: DistContext) -> T:
    """``fn()`` run on rank 0 alone, its result (picklable) returned on every rank.

    When ``fn`` raises a :class:`UserError` (bad input found on rank 0: a busy run directory, a
    refused resume), every rank raises it: rank 0 the original, the others a :class:`RankError`
    with the same message and exit code, so all stop together instead of waiting in the next
    collective. Any other exception on rank 0 propagates there with its traceback; the other ranks
    raise a RankError naming it. At world size 1, just ``fn()``.
    """
    if ctx.world_size == 1:
        return fn()
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if ctx.is_main:
        try:
            outcome = [("ok", fn())]
        except BaseException as e:  # noqa: BLE001 - every rank learns of it below
            error = e
            code = e.exit_code if isinstance(e, UserError) else 1
            outcome = [("error", (f"{e}" if isinstance(e, UserError) else f"rank 0 failed: {type(e).__name__}: {e}", code))]
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if kind == "ok":
        return value
    if error is not None:
        raise error
    raise RankError(*value)


def gather(items: list, ctx: DistContext) -> list:
    """Every rank's ``items`` (picklable), concatenated in rank order, on every rank:
    ``gather(share(xs, ctx), ctx) == list(xs)``. At world size 1, ``list(items)``."""
    if ctx.world_size == 1:
        return list(items)
    shares: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(shares, list(items))
    return [item for part in shares for item in part]


def barrier(ctx: DistContext) -> None:
    """Wait until every rank gets here; a no-op at world size 1."""
    if ctx.world_size == 1:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


# ---------------------------------------------------------------------------- DCP checkpoints

def _states(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The state dicts DCP saves or loads in place: ``{"model": ...}``, and ``"optimizer"`` unless
    ``optimizer`` is None."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Write ``model``'s and ``optimizer``'s full state to the folder ``path`` (created; must be
    empty or absent), every rank writing its own shard: plain files ``__<rank>_0.distcp`` and rank
    0's ``.metadata``, fsynced. All ranks call it with the same ``path`` (a filesystem they share).

    Keys are parameter names (``get_state_dict``), so :func:`load_sharded` reshards to any world
    size. An optimizer that is None or has not stepped yet (no state) is left out: DCP would fill
    an empty one by taking a zero-learning-rate step on it, changing its step count and so every
    later update; a checkpoint without optimizer state loads as a fresh optimizer, as in one process.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty; save a sharded checkpoint into a fresh folder "
                              "(stale shards of another world size would sit beside the new ones)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DCP_QUIET)
        stepped = optimizer if optimizer is not None and optimizer.state else None  # see above: never step it here
        dcp.save(_states(model, stepped), storage_writer=dcp.FileSystemWriter(path, sync_files=True),
                 no_dist=not dist.is_initialized())


_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")} | {
    (module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "WindowsPath", "PurePosixPath")}


class _SafeMetadata(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file, allowing only DCP's own metadata classes, torch dtypes,
    memory formats and ``torch.Size``, and paths; a module outside that list is not even imported."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _METADATA_MODULES or module == "torch" or (module, name) in _METADATA_GLOBALS:
            found = super().find_class(module, name)
            if (module, name) in _METADATA_GLOBALS \
                    or (module in _METADATA_MODULES and isinstance(found, type) and found.__module__ == module) \
                    or (module == "torch" and isinstance(found, (torch.dtype, torch.memory_format))):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata")


def _safe_planner() -> Any:
    """DCP's default load planner, except that the non-tensor values (optimizer hyperparameters)
    must load with ``weights_only=True``: DCP itself unpickles them with ``weights_only=False``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            torch.load(value, weights_only=True)  # raises pickle.UnpicklingError on anything else
            value.seek(0)
            super().load_bytes(read_item, value)

    return SafePlanner()


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a :func:`save_sharded` folder into ``model`` and ``optimizer`` in place, at any world
    size (each rank reads the slices of its own shards; at world size 1 a plain model and optimizer
    get the full tensors). ``optimizer`` is built over ``model``'s parameters (after
    :func:`shard_policy`); its hyperparameters (lr, betas, ...) come from the checkpoint. None:
    the model's weights only (``export``).

    Like ``torch.load(weights_only=True)``, it refuses (``pickle.UnpicklingError``) a checkpoint
    whose metadata or values are anything but DCP's metadata, tensors and plain values: DCP
    itself would unpickle them freely. A missing or mismatched tensor raises DCP's error.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    with open(path / ".metadata", "rb") as f:
        metadata = _SafeMetadata(f).load()
    if not any(key.startswith("optimizer.") for key in metadata.state_dict_metadata):
        optimizer = None  # saved without optimizer state (before its first step): it stays as it is (fresh)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        states = _states(model, None)
    else:
        states = _states(model, optimizer)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_DCP_QUIET)
        dcp.load(states, storage_reader=dcp.FileSystemReader(path), planner=_safe_planner(),
                 no_dist=not dist.is_initialized())
    if optimizer is None:
        set_model_state_dict(model, states["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])
