"""Small fake ``vllm`` packages for testing the vLLM backend without vLLM or a GPU.

``make_fake_vllm("v0")`` is laid out like vLLM 0.7.2 (V0 engine: the model at
``llm.llm_engine.model_executor.driver_worker.model_runner.model``, ``vllm.worker.worker.Worker``
with the memory-profiling assertion, ``EngineArgs.device``); ``make_fake_vllm("v1")`` like the
current V1 API (engine classes under ``vllm.v1``, no ``device`` engine argument, a
``worker_extension_cls`` mixed into the worker, ``LLM.collective_rpc``).

Both return ``(modules, state)``: the modules to place in ``sys.modules`` and a
:class:`FakeState` that records what the code under test did. The fake model is a real
(bf16) transformers model built from the model directory's config, whose
``load_weights`` behaves like vLLM's Qwen2 one at the level of names: ``lm_head.*`` is
skipped when embeddings are tied, unknown names are an error, values are copied (cast)
into the parameters.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any, Callable

import torch


@dataclass
class FakeState:
    events: list[Any] = field(default_factory=list)  # ("seed", s), ("LLM", kwargs), "reset_prefix_cache", ("rpc", method, n)
    llm_kwargs: dict[str, Any] | None = None
    world_size_at_init: Any = None  # torch.distributed.get_world_size() while LLM(...) ran ("error" if it raised)
    profiling_assert_patched_at_init: bool | None = None
    multiprocessing_env_at_init: str | None = None
    generate_calls: list[dict[str, Any]] = field(default_factory=list)
    loaded: list[tuple[str, torch.dtype]] = field(default_factory=list)  # (name, dtype) received by load_weights
    model: Any = None  # the fake engine's model
    script: Callable[[list[int], Any, int], Any] | None = None  # (prompt ids, params, sample index) -> CompletionOutput


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


def default_script(prompt_ids: list[int], params: Any, i: int) -> CompletionOutput:
    """Three tokens, ending at the stop string."""
    tokens = [10 + i, 11, 12]
    lps = None
    if params.logprobs is not None:
        lps = [{t: Logprob(-0.25 * (k + 1)), 0: Logprob(-9.0)} for k, t in enumerate(tokens)]
    return CompletionOutput(i, f"<answer>{i}</answer>", tokens, None, lps, "stop", "</answer>")


class FakeEngineModel(torch.nn.Module):
    """A bf16 transformers model with a vLLM-like ``load_weights``."""

    def __init__(self, model_dir: str, state: FakeState):
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        self.config = AutoConfig.from_pretrained(model_dir)
        self.inner = AutoModelForCausalLM.from_config(self.config, dtype=torch.bfloat16)
        self._state = state

    def load_weights(self, weights):
        params = dict(self.inner.named_parameters(remove_duplicate=False))
        loaded = set()
        for name, tensor in weights:
            self._state.loaded.append((name, tensor.dtype))
            if self.config.tie_word_embeddings and name.startswith("lm_head."):
                continue
            if name not in params:
                raise ValueError(f"There is no module or parameter named {name!r} in the model")
            with torch.no_grad():
                params[name].data.copy_(tensor)
            loaded.add(name)
        return loaded


def _module(name: str, **attrs: Any) -> ModuleType:
    mod = ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def make_fake_vllm(layout: str, version: str | None = None) -> tuple[dict[str, ModuleType], FakeState]:
    """Fake vllm modules laid out like 0.7.2 (``"v0"``) or the current V1 API (``"v1"``)."""
    if layout not in ("v0", "v1"):
        raise ValueError(layout)
    state = FakeState()
    v0 = layout == "v0"
    version = version or ("0.7.2" if v0 else "0.11.0")

    common = dict(model=str, dtype="auto", seed=0, gpu_memory_utilization=0.9, enable_prefix_caching=False,
                  max_model_len=None, enforce_eager=False)
    extra = dict(device="auto") if v0 else dict(worker_extension_cls="", distributed_executor_backend=None, data_parallel_size=1)
    EngineArgs = dataclasses.make_dataclass(
        "EngineArgs", [(k, Any, dataclasses.field(default=v)) for k, v in {**common, **extra}.items()]
    )

    class Worker:
        def _assert_memory_footprint_increased_during_profiling(self):
            raise AssertionError("Error in memory profiling")

    original_assert = Worker.__dict__["_assert_memory_footprint_increased_during_profiling"]

    class SamplingParams:
        def __init__(self, **kwargs: Any):
            defaults = dict(n=1, temperature=1.0, top_p=1.0, top_k=-1 if v0 else 0, max_tokens=16, min_tokens=0,
                            stop=None, include_stop_str_in_output=False, ignore_eos=False, seed=None, logprobs=None)
            unknown = set(kwargs) - set(defaults)
            if unknown:
                raise TypeError(f"SamplingParams got unexpected keyword arguments {sorted(unknown)}")
            self.__dict__.update({**defaults, **kwargs})
            if v0 and (self.top_k < -1 or self.top_k == 0):
                raise ValueError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
            if not v0 and self.top_k < -1:
                raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")

    class LLMEngine:
        pass

    LLMEngine.__module__ = "vllm.engine.llm_engine" if v0 else "vllm.v1.engine.llm_engine"

    class FakeGPUWorker:  # the V1 worker the extension is mixed into
        def __init__(self, model):
            self.model_runner = SimpleNamespace(model=model)

        def get_model(self):
            return self.model_runner.model

    class LLM:
        def __init__(self, **kwargs: Any):
            names = {f.name for f in dataclasses.fields(EngineArgs)}
            unknown = set(kwargs) - names
            if unknown:
                raise TypeError(f"EngineArgs.__init__() got unexpected keyword arguments {sorted(unknown)}")
            state.llm_kwargs = dict(kwargs)
            state.events.append(("LLM", dict(kwargs)))
            try:
                state.world_size_at_init = torch.distributed.get_world_size()
            except Exception:
                state.world_size_at_init = "error"
            state.profiling_assert_patched_at_init = (
                Worker.__dict__["_assert_memory_footprint_increased_during_profiling"] is not original_assert
            )
            state.multiprocessing_env_at_init = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
            self._model_dir = kwargs["model"]
            state.model = FakeEngineModel(self._model_dir, state)
            self.llm_engine = LLMEngine()
            if v0:
                self.llm_engine.model_executor = SimpleNamespace(
                    driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=state.model))
                )
            else:
                ext_name = kwargs.get("worker_extension_cls") or ""
                bases: tuple[type, ...] = (FakeGPUWorker,)
                if ext_name:
                    module_name, _, cls_name = ext_name.rpartition(".")
                    bases += (getattr(importlib.import_module(module_name), cls_name),)
                self._worker = type("Worker", bases, {})(state.model)

        def get_tokenizer(self):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self._model_dir)

        def generate(self, prompts, sampling_params=None, use_tqdm=True, **kwargs):
            state.generate_calls.append(dict(prompts=prompts, params=sampling_params, use_tqdm=use_tqdm, kwargs=kwargs))
            script = state.script or default_script
            out = []
            for r, p in enumerate(prompts):
                ids = list(p["prompt_token_ids"])
                outs = [script(ids, sampling_params, i) for i in range(sampling_params.n)]
                out.append(RequestOutput(str(r), None, ids, outs))
            return out

        def reset_prefix_cache(self):
            state.events.append("reset_prefix_cache")
            return True

        if not v0:

            def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
                state.events.append(("rpc", method, len(args[0]) if args else 0))
                return [getattr(self._worker, method)(*args, **(kwargs or {}))]

    def set_random_seed(seed: int) -> None:
        state.events.append(("seed", seed))

    modules = {
        "vllm": _module("vllm", __version__=version, LLM=LLM, SamplingParams=SamplingParams),
        "vllm.engine": _module("vllm.engine"),
        "vllm.engine.arg_utils": _module("vllm.engine.arg_utils", EngineArgs=EngineArgs),
        "vllm.outputs": _module("vllm.outputs", RequestOutput=RequestOutput, CompletionOutput=CompletionOutput),
    }
    if v0:
        modules["vllm.engine.llm_engine"] = _module("vllm.engine.llm_engine", LLMEngine=LLMEngine)
        modules["vllm.worker"] = _module("vllm.worker")
        modules["vllm.worker.worker"] = _module("vllm.worker.worker", Worker=Worker)
        modules["vllm.model_executor"] = _module("vllm.model_executor", set_random_seed=set_random_seed)
    else:
        modules["vllm.v1"] = _module("vllm.v1")
        modules["vllm.v1.engine"] = _module("vllm.v1.engine")
        modules["vllm.v1.engine.llm_engine"] = _module("vllm.v1.engine.llm_engine", LLMEngine=LLMEngine)
        modules["vllm.utils"] = _module("vllm.utils")
        modules["vllm.utils.torch_utils"] = _module("vllm.utils.torch_utils", set_random_seed=set_random_seed)
    state.worker_cls = Worker  # type: ignore[attr-defined]
    state.original_assert = original_assert  # type: ignore[attr-defined]
    return modules, state


def install(monkeypatch: Any, layout: str, version: str | None = None) -> FakeState:
    """Place a fake vllm into ``sys.modules`` for one test (restored afterwards); drop any real vllm modules."""
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    modules, state = make_fake_vllm(layout, version)
    for name, mod in modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return state
