"""The native engine in a process of its own, holding numbered versions of the policy's weights.

    process = GeneratorProcess(policy.config, tokenizer, device="cpu")
    process.push_weights(0, policy)                    # version 0: the starting weights
    process.request(0, prompts, sampling, version=0)   # batch 0, sampled with version 0
    results, version, seconds = process.result(0)      # waits for it
    process.close()

The child applies the pushed versions in order, each only when a request asks for it, so a batch
is always sampled with exactly the version it names, whatever the timing: runs reproduce. It
talks to the parent over three queues (requests, weights, results); a weights push (one flat
buffer per dtype, so a version costs a few shared-memory files, not one per tensor) waits while
``max_pending_weights`` versions are queued. The child ignores SIGINT and SIGTERM from birth (they
reach the whole process group; the parent decides when to stop) and dies with its parent (Linux's
parent-death signal, and a check between batches elsewhere), so that a parent killed with SIGKILL
leaves no orphan. A child that dies makes the parent's next call raise :class:`GeneratorDied` (one
line); an exception in the child reaches the parent with its traceback.

With a :class:`Refill` (and a ``reward`` factory at construction) a request carries DAPO's dynamic
sampling to the child: after the batch it grades the responses and samples further rounds of
questions, with the same weights, until enough groups have rewards that differ; their results come
back after the batch's, in the same message, so the trainer never waits for them.

Glossary: none; weights are named tensors, results :class:`~cs336_alignment.generation.types.GenerationResult`.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from .types import GenerationResult, SamplingParams

__all__ = [
    "GeneratorDied",
    "GeneratorProcess",
    "Refill",
]

_POLL_S = 1.0  # how often a waiting side checks that the other is still there


class GeneratorDied(UserError, RuntimeError):
    """The generator process ended while the run needed it (killed, out of memory, ...)."""

    exit_code = 1  # a failure mid-run: --resume continues from the last checkpoint


@dataclass
class Refill:
    """Dynamic sampling in the child for one request: after its prompts, the extra ``rounds``
    (each the prompts of as many questions, their ground truths and sampling) in order, until
    ``wanted`` groups (one prompt's completions) have rewards that are not all equal, or the
    rounds run out. The results of every round sampled follow the request's, in order."""

    ground_truths: list[Any]  # of the request's prompts, in order
    rounds: list[tuple[list[str], list[Any], SamplingParams]]  # each extra round: prompts, ground truths, sampling
    wanted: int  # groups with unequal rewards wanted


class GeneratorProcess:
    """A :class:`~cs336_alignment.generation.NativeEngine` in a child process (spawned).

    Args:
        model_config: the policy's ``PretrainedConfig`` (the child builds the same architecture).
        tokenizer: the policy's tokenizer (pickled to the child).
        device: the child's device ("cpu", "cuda:1", ...).
        dtype: the engine's weights dtype (default: bf16 on CUDA, fp32 on CPU).
        max_num_seqs, kv_cache_memory_fraction: the engine's sizes.
        max_pending_weights: weight versions that may wait in the queue before a push blocks.
        threads: torch threads in the child (None: torch's default).
        reward: a picklable factory of the reward function, called in the child (needed by a
            :class:`Refill`); e.g. ``functools.partial(recipes.common.data_reward, cfg.data)``.
    """

    def __init__(
        self,
        model_config: Any,
        tokenizer: Any,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_num_seqs: int = 256,
        kv_cache_memory_fraction: float = 0.3,
        max_pending_weights: int = 2,
        threads: int | None = None,
        reward: Callable[[], Callable[[str, Any], dict[str, float]]] | None = None,
    ):
        mp = torch.multiprocessing.get_context("spawn")
        self._requests = mp.Queue()
        self._weights = mp.Queue(maxsize=max_pending_weights)
        self._results = mp.Queue()
        self._stop = mp.Event()  # set by close(): the child answers no further request
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self._dtype = dtype  # weights travel in the engine's dtype: half the bytes of fp32 master weights in bf16
        self._process = mp.Process(
            target=_serve, name="cs336-generator", daemon=True,
            args=(model_config, tokenizer, str(device), dtype, max_num_seqs, kv_cache_memory_fraction, threads,
                  self._requests, self._weights, self._results, self._stop, os.getpid(), reward),
        )
        with _stop_signals_ignored():  # inherited from birth: a Ctrl-C or SIGTERM while the child imports is the parent's
            self._process.start()
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def push_weights(self, version: int, policy: torch.nn.Module) -> None:
        """Queue ``policy``'s current weights as ``version`` (a CPU copy in the engine's dtype,
        gathered when sharded); waits while ``max_pending_weights`` versions are queued."""
        from ..distributed import full_weights

        self._put(self._weights, (version, _pack(full_weights(policy), self._dtype)))

    def request(
        self, batch: Any, prompts: Sequence[str], sampling: SamplingParams, *, version: int, refill: Refill | None = None
    ) -> None:
        """Ask for ``sampling.n`` completions of each prompt, sampled with weights ``version`` (the
        child waits for that version's push); results come back in request order. With ``refill``,
        the results of the extra rounds the child sampled follow those of ``prompts``."""
        self._put(self._requests, (batch, list(prompts), sampling, version, refill))

    def result(self, batch: int) -> tuple[list[GenerationResult], int, float]:
        """The results of the oldest request, which must be ``batch``: (results, the weights version
        they were sampled with, the child's seconds of generation). Waits; raises
        :class:`GeneratorDied` when the child is gone."""
        while True:
            try:
                message = self._results.get(timeout=_POLL_S)
                break
            except queue.Empty:
                self._check_alive(f"while sampling batch {batch}")
        if message[0] == "error":
            raise RuntimeError(f"the generator process failed while sampling batch {batch}:\n{message[1]}")
        _, got, version, results, seconds = message
        if got != batch:
            raise RuntimeError(f"the generator process answered batch {got} where batch {batch} was expected")
        return results, version, seconds

    def close(self) -> None:
        """Stop the child (idempotent): asked to (it finishes the batch it is sampling, if any,
        and answers no further request), killed after 5 s (it ignores SIGTERM)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._process.is_alive():
            try:
                self._requests.put(None)
            except (OSError, ValueError):
                pass
            self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        for q in (self._requests, self._weights, self._results):
            q.cancel_join_thread()  # unread items (a pushed version) must not hold this process at exit
            q.close()

    def __enter__(self) -> GeneratorProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _put(self, q: Any, item: Any) -> None:
        while True:
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                self._check_alive("while the run handed it weights")

    def _check_alive(self, doing: str) -> None:
        if not self._process.is_alive():
            code = self._process.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise GeneratorDied(f"the generator process died ({how}) {doing}; the last checkpoint is intact: "
                                "continue with --resume")


# ---------------------------------------------------------------------------- the child


def _serve(
    model_config: Any, tokenizer: Any, device: str, dtype: torch.dtype, max_num_seqs: int, kv_cache_memory_fraction: float,
    threads: int | None, requests: Any, weights: Any, results: Any, stop: Any, parent: int,
    reward: Callable[[], Callable[[str, Any], dict[str, float]]] | None = None,
) -> None:
    """The child's loop: build the engine, then answer requests in order until told to stop."""
    for signum in (signal.SIGINT, signal.SIGTERM):  # sent to the whole process group (Ctrl-C, SLURM): the parent decides
        signal.signal(signum, signal.SIG_IGN)
    _die_with_parent(parent)
    if threads:
        torch.set_num_threads(threads)
    try:
        from transformers import AutoModelForCausalLM

        from ..checkpoint import fault_point
        from .native import NativeEngine

        with torch.device(device):
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        engine = NativeEngine(model, tokenizer, device=device, dtype=dtype, copy_weights=False, max_num_seqs=max_num_seqs,
                              kv_cache_memory_fraction=kv_cache_memory_fraction)
        reward_fn = reward() if reward is not None else None
        version = -1
        while True:
            message = _get(requests, parent)
            if message is None or stop.is_set():
                return
            batch, prompts, sampling, wanted, refill = message
            fault_point("generator", batch)  # the kill tests: the child dies before sampling this batch
            while version < wanted:  # versions arrive in order; apply each up to the one asked for
                version, packed = _get(weights, parent)
                with torch.no_grad():
                    model.load_state_dict(_unpack(packed))
            if version != wanted:
                raise RuntimeError(f"batch {batch} asks for weights version {wanted}, but version {version} is loaded")
            t0 = time.perf_counter()
            out = engine.generate(prompts, sampling)
            if refill is not None:
                out = out + _refilled(engine, out, refill, reward_fn)
            results.put(("ok", batch, version, out, time.perf_counter() - t0))
    except BaseException:  # noqa: BLE001 - the parent raises it, with this traceback
        results.put(("error", traceback.format_exc()))


def _refilled(engine: Any, first: list[GenerationResult], refill: Refill, reward_fn: Any) -> list[GenerationResult]:
    """The results of the extra rounds dynamic sampling takes after ``first``: round after round
    until ``refill.wanted`` groups have rewards that are not all equal (the decision the trainer's
    :func:`~cs336_alignment.recipes.grpo.dynamic_sampling` takes on the same rewards)."""
    if reward_fn is None:
        raise RuntimeError("a Refill needs the generator process to be made with a reward factory")
    from ..advantages import all_equal_groups
    from ..rewards import score_pairs

    def informative(out: list[GenerationResult], truths: list[Any]) -> int:  # groups whose rewards differ
        texts = [c.text for r in out for c in r.completions]
        scores = score_pairs(reward_fn, texts, [t for r, t in zip(out, truths) for _ in r.completions])
        rewards = torch.tensor([float(s["reward"]) for s in scores], dtype=torch.float32)  # (B*G,) as the trainer reads them
        return int((~all_equal_groups(rewards, len(out[0].completions))).sum()) if out else 0

    found, extra = informative(first, refill.ground_truths), []
    for prompts, truths, sampling in refill.rounds:
        if found >= refill.wanted:
            break
        out = engine.generate(prompts, sampling)
        found += informative(out, truths)
        extra += out
    return extra


def _get(q: Any, parent: int) -> Any:
    """The next item of ``q``; exits the process when the parent is gone."""
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            if os.getppid() != parent:  # reparented: the parent died (even by SIGKILL)
                os._exit(0)


@contextlib.contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """SIGINT and SIGTERM ignored in this process for the block (on the main thread; elsewhere
    nothing changes): a process started inside inherits the ignored dispositions through exec,
    so it never dies of a signal meant for the run, not even before its own code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), even mid-batch; exit now
    if the parent is already gone. Elsewhere the child checks its parent between batches only."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


def _pack(buckets: Iterator[list[tuple[str, torch.Tensor]]], dtype: torch.dtype) -> tuple[dict[Any, torch.Tensor], list]:
    """Named tensors as one flat CPU buffer per dtype (floating ones cast to ``dtype``) and an
    index of (name, dtype, offset, shape): a version crosses the queue as a few shared-memory
    files instead of one per tensor (a 1.5B model has about 340). Tied tensors are stored once."""
    index, flat_parts, sizes, seen = [], {}, {}, {}
    for bucket in buckets:
        for name, tensor in bucket:
            key = id(tensor)
            if key in seen:
                index.append((name, *seen[key]))
                continue
            t = tensor.detach().to("cpu", dtype=dtype if tensor.is_floating_point() else None).reshape(-1)
            offset = sizes.get(t.dtype, 0)
            flat_parts.setdefault(t.dtype, []).append(t)
            sizes[t.dtype] = offset + t.numel()
            seen[key] = (t.dtype, offset, tuple(tensor.shape))
            index.append((name, *seen[key]))
    return {d: torch.cat(parts) for d, parts in flat_parts.items()}, index


def _unpack(packed: tuple[dict[Any, torch.Tensor], list]) -> dict[str, torch.Tensor]:
    """The named tensors of :func:`_pack`, as views into its buffers."""
    buffers, index = packed
    return {name: buffers[d][offset:offset + math.prod(shape)].view(shape) for name, d, offset, shape in index}
