"""The native engine in a process of its own, holding numbered versions of the policy's weights.

    process = GeneratorProcess(policy.config, tokenizer, device="cpu")
    process.push_weights(0, policy)                    # version 0: the starting weights
    process.request(0, prompts, sampling, version=0)   # batch 0, sampled with version 0
    results, version, seconds = process.result(0)      # waits for it
    process.close()

The child applies the pushed versions in order, each only when a request asks for it, so a batch
is always sampled with exactly the version it names, whatever the timing: runs reproduce. It
talks to the parent over three queues (requests, weights, results); a weights push waits while
``max_pending_weights`` versions are queued. The child ignores SIGINT (the parent decides when to
stop) and exits when the parent is gone (it checks once a second), so that a parent killed with
SIGKILL leaves no orphan. A child that dies makes the parent's next call raise
:class:`GeneratorDied` (one line); an exception in the child reaches the parent with its traceback.

Glossary: none; weights are named tensors, results :class:`~cs336_alignment.generation.types.GenerationResult`.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import UserError
from .types import GenerationResult, SamplingParams

__all__ = [
    "GeneratorDied",
    "GeneratorProcess",
]

_POLL_S = 1.0  # how often a waiting side checks that the other is still there


class GeneratorDied(UserError, RuntimeError):
    """The generator process ended while the run needed it (killed, out of memory, ...)."""

    exit_code = 1  # a failure mid-run: --resume continues from the last checkpoint


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
    ):
        mp = torch.multiprocessing.get_context("spawn")
        self._requests = mp.Queue()
        self._weights = mp.Queue(maxsize=max_pending_weights)
        self._results = mp.Queue()
        device = torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self._dtype = dtype  # weights travel in the engine's dtype: half the bytes of fp32 master weights in bf16
        self._process = mp.Process(
            target=_serve, name="cs336-generator", daemon=True,
            args=(model_config, tokenizer, str(device), dtype, max_num_seqs, kv_cache_memory_fraction, threads,
                  self._requests, self._weights, self._results, os.getpid()),
        )
        self._process.start()
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def push_weights(self, version: int, policy: torch.nn.Module) -> None:
        """Queue ``policy``'s current weights as ``version`` (a CPU copy in the engine's dtype,
        gathered when sharded); waits while ``max_pending_weights`` versions are queued."""
        from ..distributed import full_weights

        state = {name: tensor.detach().to("cpu", dtype=self._dtype if tensor.is_floating_point() else None, copy=True)
                 for bucket in full_weights(policy) for name, tensor in bucket}
        self._put(self._weights, (version, state))

    def request(self, batch: int, prompts: Sequence[str], sampling: SamplingParams, *, version: int) -> None:
        """Ask for ``sampling.n`` completions of each prompt, sampled with weights ``version`` (the
        child waits for that version's push); results come back in request order."""
        self._put(self._requests, (batch, list(prompts), sampling, version))

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
        """Stop the child (idempotent): asked first, then terminated, then killed."""
        if self._closed:
            return
        self._closed = True
        if self._process.is_alive():
            try:
                self._requests.put(None)
            except (OSError, ValueError):
                pass
            self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.terminate()
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
    threads: int | None, requests: Any, weights: Any, results: Any, parent: int,
) -> None:
    """The child's loop: build the engine, then answer requests in order until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
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
        version = -1
        while True:
            message = _get(requests, parent)
            if message is None:
                return
            batch, prompts, sampling, wanted = message
            fault_point("generator", batch)  # the kill tests: the child dies before sampling this batch
            while version < wanted:  # versions arrive in order; apply each up to the one asked for
                version, state = _get(weights, parent)
                with torch.no_grad():
                    model.load_state_dict(state)
            if version != wanted:
                raise RuntimeError(f"batch {batch} asks for weights version {wanted}, but version {version} is loaded")
            t0 = time.perf_counter()
            out = engine.generate(prompts, sampling)
            results.put(("ok", batch, version, out, time.perf_counter() - t0))
    except BaseException:  # noqa: BLE001 - the parent raises it, with this traceback
        results.put(("error", traceback.format_exc()))


def _get(q: Any, parent: int) -> Any:
    """The next item of ``q``; exits the process when the parent is gone."""
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            if os.getppid() != parent:  # reparented: the parent died (even by SIGKILL)
                os._exit(0)
