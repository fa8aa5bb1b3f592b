"""The run plumbing of every recipe, written once: the run directory, resume, the training
clock and time budget, progress, validation and checkpoint cadence, fault points, the end.

A recipe's outer loop reads::

    loop = RunLoop(cfg, "GRPO")                      # seed, run directory, resolved config, metrics sink
    ...load data, policy, optimizer, generator...
    loop.attach(policy, optimizer, tokenizer=tokenizer, generator=generator)  # what checkpoints hold; restored on resume
    for step in loop.steps(cfg.n_grpo_steps, eval_every=cfg.eval_every, evaluate=validate_subset):
        ...the algorithm's phases...
        loop.end_of_step(summary)                    # everything below, in this order
    return loop.finish(policy, tokenizer, final_metrics)

``end_of_step`` closes a step:

  clock       the step's seconds join the training clock (up to ``stop_clock``, which the recipe
              calls before logging; validation and logging are never counted)
  progress    progress bar, ETA, the step's log line
  fault       the fault-injection point of the kill-and-resume tests
  validate    every ``eval_every`` steps, except after the last (the recipe validates at the end)
              and once the time budget has run out
  checkpoint  every ``control.checkpoint_every`` steps, after the last step, when the budget runs out
  budget      the loop stops once the training clock reaches ``control.time_budget``

Also here: ``nonfinite`` (skip or stop on a NaN loss or gradient), ``grading`` (count and
report grader timeouts), ``validate`` (in-loop evaluation into <run>/eval/).

A resumed run continues after its last complete checkpoint with the same counters, RNG
states and metrics.jsonl (cut back to that moment), so it writes what an uninterrupted run
writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from ..checkpoint import (
    Checkpointer,
    NoIntactCheckpoint,
    NonFiniteError,
    Progress,
    RunControl,
    fault_point,
    format_seconds,
    refuse_foreign,
    start_fresh,
    truncate_metrics,
)
from ..config import ConfigError, dump_yaml
from ..console import lines_above_bars
from ..data import Example, format_prompts
from ..distributed import (
    DistContext,
    DistributedError,
    all_reduce,
    close_distributed,
    gather,
    gathered_model,
    init_distributed,
    on_main,
    padded_share,
    world_size,
)
from ..errors import UserError
from ..evaluate import evaluate, evaluation_metrics, write_evaluation
from ..export import export_dtype, save_model_folder
from ..generation import Generator, SamplingParams
from ..generation.vllm_backend import import_vllm
from ..models import autocast, check_model_options, resolve_device
from ..rewards import GraderFailures, grader_failures
from ..run_dir import (
    MetricsSink,
    RunDir,
    RunLock,
    atomic_write_text,
    checked_out_dir,
    claim_directory,
    read_jsonl,
)
from .common import LoadedData, check_model_path, seed_everything

__all__ = [
    "EVAL_KEYS",
    "FIXED_FIELDS",
    "FREE_FIELDS",
    "STEP_COUNT_FIELDS",
    "ConfigChange",
    "Interrupted",
    "RunLoop",
    "RunState",
    "collective_timeout",
    "resume_config_changes",
]


EVAL_KEYS = (
    "accuracy", "format_accuracy", "answer_accuracy", "mean_token_entropy", "mean_response_length",
    "mean_response_length_correct", "mean_response_length_incorrect", "truncated_fraction", "n_examples",
)  # the summary of a validation that goes into metrics.jsonl (with n_samples, pass@1..pass@k, maj@k when k >= 2)


# How each config field may change when a run is resumed. Every field of the SFT, EI and GRPO
# configs is in exactly one set (tests/test_recipe_parts.py enumerates them): a field added later
# must be classified here.
FREE_FIELDS = frozenset({  # how the run is watched, placed or fitted in memory: may change
    "out", "device", "generator_device", "gradient_checkpointing", "attn_implementation", "use_liger_kernel", "export_dtype",
    "logprob_chunk_size", "length_grouping",
    "max_num_seqs", "kv_cache_memory_fraction", "gpu_memory_utilization", "micro_batch_size",
    "gradient_accumulation_steps", "eval_every", "eval_at_start", "n_eval_examples", "eval_seed", "final_eval_full",
    "log_rollout_examples", "eval_max_tokens", "eval_n_samples", "log_entropy", "wandb_project", "run_name", "trackers",
    "control.resume", "control.checkpoint_every", "control.keep_last", "control.time_budget", "control.budget_clock",
    "control.skip_nonfinite", "control.progress", "control.overwrite", "control.allow_config_change",
    "reference_device", "log_kl",
})
STEP_COUNT_FIELDS = frozenset({"n_grpo_steps", "n_ei_steps", "epochs", "max_steps"})  # only with a constant learning rate
FIXED_FIELDS = frozenset({  # what the completed steps computed with: refused unless control.allow_config_change
    "model", "seed", "warmup_ratio", "answers", "data.train", "data.val", "data.prompt", "data.reward", "data.reward_in_process",
    "data.task_knobs",
    "data.n_task_train",
    "data.n_task_val", "learning_rate", "warmup_steps", "schedule", "weight_decay", "betas", "max_grad_norm",
    "advantage_eps", "rollout_batch_size", "group_size", "sampling_temperature", "sampling_min_tokens",
    "sampling_max_tokens", "epochs_per_rollout_batch", "train_batch_size", "loss_type", "use_std_normalization",
    "length_normalization", "cliprange", "backend", "n_examples", "filter_correct", "batch_size", "max_seq_len",
    "normalize", "normalize_constant", "batch_questions", "rollouts_per_question", "dedupe_correct", "sft_epochs",
    "fresh_optimizer", "async_rollouts", "max_staleness", "tis_cap", "cliprange_low", "cliprange_high",
    "overlong_filter", "kl_coef", "kl_estimator", "reference_dtype", "drop_all_equal_groups", "max_resample_rounds",
    "overlong_buffer", "overlong_penalty", "preset", "train_filter.min_pass", "train_filter.max_pass", "curriculum",
    "pass_rate_samples", "pass_rates",
})


class Interrupted(UserError):
    """The run stopped at a Ctrl-C (SIGINT) or SIGTERM after finishing its step and checkpointing it."""

    exit_code = 130  # the shell's code for SIGINT (143 for SIGTERM: 128 + the signal's number)

    def __init__(self, message: str, checkpoint: Path | None, signum: int = signal.SIGINT):
        super().__init__(message)
        self.checkpoint = checkpoint  # where --resume continues from
        self.exit_code = 128 + int(signum)


@dataclass
class ConfigChange:
    """One field whose value on ``--resume`` differs from the run's own config."""

    field: str  # dotted name ("control.time_budget")
    old: Any  # the run's value (config.yaml)
    new: Any  # the value asked for now


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key in ("data", "control"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_config_changes(saved: dict[str, Any], cfg: Any) -> tuple[list[ConfigChange], list[ConfigChange]]:
    """(accepted, refused) differences between a run's saved config and ``cfg`` on ``--resume``.

    Free fields are accepted; the number of steps is accepted when the learning rate does not
    depend on it (a constant schedule); every other field is refused (accepted with
    ``control.allow_config_change``). ``control.resume`` itself is not a change, nor a field the
    saved config lacks (added to the package since the run began) that holds its default.
    """
    old, new = _flatten(saved), _flatten(yaml.safe_load(dump_yaml(cfg)))  # both as YAML reads them
    defaults = _flatten(yaml.safe_load(dump_yaml(type(cfg)())))  # a field added since the run began: its default ran
    constant_lr = getattr(cfg, "schedule", "constant") == "constant" and not getattr(cfg, "warmup_ratio", 0)
    accepted, refused = [], []
    for name in sorted(set(old) | set(new)):
        if name == "control.resume" or old.get(name) == new.get(name):
            continue
        if name not in old and new.get(name) == defaults.get(name):  # a run from before the field existed
            continue
        change = ConfigChange(name, old.get(name), new.get(name))
        free = name in FREE_FIELDS or (name in STEP_COUNT_FIELDS and constant_lr)
        (accepted if free or cfg.control.allow_config_change else refused).append(change)
    return accepted, refused


@dataclass
class RunState:
    """The loop's counters: what a checkpoint restores besides weights, optimizer and RNG states."""

    step: int = 0  # steps done: GRPO or EI steps, SFT optimizer steps
    optimizer_step: int = 0  # optimizer steps: taken (GRPO), or attempted including skipped ones (SFT, EI)
    train_clock: float = 0.0  # seconds of training so far (validation excluded)
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    metrics_bytes: int = 0  # length of metrics.jsonl when the state was saved
    wall_clock: float = 0.0  # seconds of wall clock since the run started (validation and start-up included)

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> RunState:
        """The state a checkpoint holds (also the earlier spelling "next_step" for ``step``)."""
        saved = {"step": saved.get("next_step", 0), **saved}
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


def _check_before_the_run(cfg: Any) -> None:
    """Refuse (exit 2) what would otherwise fail only after the run directory exists: no model
    or one that is not a model, a generator on another device with several processes,
    flash-attn, liger-kernel or vLLM selected but missing, a tracker (wandb, trackio,
    tensorboard; wandb also through wandb_project) turned on but not installed."""
    from ..trackers import check_trackers

    check_model_path(cfg.model)
    if world_size() > 1 and getattr(cfg, "generator_device", "same") != "same":
        raise DistributedError(f"field 'generator_device': {cfg.generator_device!r} with {world_size()} processes; each rank "
                               "generates on its own device: set generator_device: same")
    check_model_options(attn_implementation=cfg.attn_implementation, liger_kernel=cfg.use_liger_kernel,
                        device=resolve_device(cfg.device))
    if getattr(cfg, "backend", "native") == "vllm":
        import_vllm()
    check_trackers(getattr(cfg, "trackers", ()), wandb_project=cfg.wandb_project)


class RunLoop:
    """A recipe's run: its directory, metrics sink, device and checkpoints, and the plumbing of
    its outer loop (see the module docstring).

    Args:
        cfg: the recipe's config; reads model, out, seed, device, control, wandb_project, run_name.
        recipe: the recipe's name in messages ("GRPO", "SFT", "EI").
    """

    def __init__(self, cfg: Any, recipe: str):
        _check_before_the_run(cfg)
        self._session_start = time.monotonic()  # the wall clock of this session starts here
        self._wall_before = 0.0  # wall-clock seconds of the sessions before this one (up to their checkpoint)
        self._owns_group = not dist.is_initialized()  # close_distributed at the end only if we joined here
        self.ctx: DistContext = init_distributed(cfg.device, timeout_s=collective_timeout())  # world size 1: no group
        seed_everything(cfg.seed)
        self.recipe = recipe
        self.control: RunControl = cfg.control
        self.device = self.ctx.device
        self.lock: RunLock | None = None
        self.run: RunDir | None = None
        self.sink: MetricsSink | _NoSink | None = None
        self._console = contextlib.ExitStack()  # log lines above the progress bars while the run is open
        self._owned = contextlib.ExitStack()  # what the run closes at its end (own())
        self.checkpoints = Checkpointer(checked_out_dir(cfg.out), cfg.control.keep_last)
        try:  # rank 0 alone opens the run directory; every rank learns which checkpoint to resume, or its error
            self._latest: Path | None = on_main(lambda: self._open_run_dir(cfg), self.ctx)
        except BaseException:
            self.close()
            raise
        if not self.ctx.is_main:
            self.logger = _rank_logger(self.ctx.rank)
            self.sink = _NoSink()
        self.state = RunState()
        self.saved_state: dict[str, Any] = {}  # the checkpoint's trainer state when resuming (attach)
        self._extra_state: Callable[[], dict[str, Any]] | None = None
        self._policy: torch.nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._tokenizer: Any = None
        self._export_dtype = export_dtype(cfg.export_dtype, self.device)  # the final model/'s
        self._total = 0
        self._eval_every = 0
        self._evaluate: Callable[[int], Any] | None = None
        self._progress: Progress | None = None
        self._clock_at_start = 0.0
        self._step_start = time.perf_counter()
        self._step_end: float | None = None
        self._out_of_time = False
        self._interrupted = False  # a first Ctrl-C or SIGTERM arrived (on any rank): stop after this step, checkpointed
        self._signal = signal.SIGINT  # which one (another rank's: SIGINT)
        self._final_examples = 0  # size of the final validation (steps())
        self._eval_seconds_per_example: float | None = None  # pace of the latest validation

    def _open_run_dir(self, cfg: Any) -> Path | None:
        """Rank 0's part of starting a run: lock the directory, find the checkpoint to resume (or
        clear an earlier attempt), open the log and metrics, check a resumed config. Returns the
        checkpoint to resume from (None: a new run). On an error the directory is left as found."""
        out = checked_out_dir(cfg.out)
        if not cfg.control.resume and not (out / RunLock.FILE).exists():
            refuse_foreign(out, cfg.control)  # a directory that was never a run's: refused before a lock file is made
        self.lock = claim_directory(out)  # before anything in the directory is read or written
        try:
            skipped: list[str] = []  # corrupt checkpoints moved aside
            latest = self.checkpoints.latest_intact(warn=skipped.append) if cfg.control.resume else None
            notes = []
            if latest is None and not skipped:  # a new run: refuse another's directory, clear an earlier attempt
                notes = start_fresh(out, cfg.control, model=cfg.model if cfg.model != "tiny" else "")
            self.run = RunDir(out)
            self.logger = self.run.logger
            logging.getLogger("cs336_alignment").addHandler(self.run.file_handler)  # the package's warnings (rewards, backend)
            package = logging.getLogger("cs336_alignment")  # its warnings too, unless the root logger prints them already
            self._console.enter_context(lines_above_bars(self.logger, *([] if logging.getLogger().handlers else [package])))
            self.run.files.record("checkpoints/")  # the run's own, with everything in it
            for note in skipped + notes:
                self.logger.warning(note)
            if latest is None and skipped:
                raise NoIntactCheckpoint(f"--resume: no checkpoint in {self.checkpoints.root} is intact (see the warnings above)")
            self._latest = latest
            if latest is None:
                self.run.save_config(cfg)  # config.yaml: what produced step 1, never rewritten on resume
            else:
                self._check_resume_config(cfg)
            self.sink = MetricsSink(self.run, wandb_project=cfg.wandb_project or None, run_name=cfg.run_name or None,
                                    config=cfg, resume=latest is not None, clock=self.wall_clock,
                                    trackers=getattr(cfg, "trackers", ()))
            if self.ctx.world_size > 1:
                self.logger.info("%d processes (torchrun), %s on %s: rank 0 writes the run's files",
                                 self.ctx.world_size, "nccl" if self.device.type == "cuda" else "gloo", self.device.type)
        except BaseException:
            self._close_run_dir()
            raise
        return latest

    def _check_resume_config(self, cfg: Any) -> None:
        """Refuse a resume whose config changes what the completed steps computed with (one line,
        exit 2); append every accepted change to resumes.jsonl."""
        config_path = self.run.path / RunDir.CONFIG
        saved = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.exists() else None
        if not isinstance(saved, dict):
            self.run.save_config(cfg)  # a run from before config.yaml existed: nothing to compare
            return
        effective = _flatten(saved)  # step 1's config with the changes earlier resumes accepted
        for change in read_jsonl(self.run.path / "resumes.jsonl"):
            effective[change["field"]] = change["new"]
        accepted, refused = resume_config_changes(effective, cfg)
        if refused:
            fields = ", ".join(f"{c.field} {c.old!r} -> {c.new!r}" for c in refused)
            raise ConfigError(
                f"--resume with a changed config: {fields}; the completed steps used the run's own config.yaml. "
                "Resume with it, or set control.allow_config_change=true to go on and record the change"
            )
        from_step = int(self._latest.name.removeprefix("step_"))
        if accepted:
            self.run.files.record("resumes.jsonl")
        for change in accepted:
            with open(self.run.path / "resumes.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": time.time(), "from_step": from_step, **asdict(change)}, default=str) + "\n")
            self.logger.info("resumed with %s changed: %r -> %r", change.field, change.old, change.new)

    def __enter__(self) -> RunLoop:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def own(self, resource: Any) -> Any:
        """Close ``resource`` (anything with ``close()``, e.g. a generator process) when the run
        ends, however it ends; returns it."""
        self._owned.callback(resource.close)
        return resource

    def close(self) -> None:
        """Close what the run owns, the metrics sink and the log, release the directory's lock,
        and leave the process group this run joined (idempotent)."""
        self._owned.close()
        self._close_run_dir()
        if self._owns_group:
            close_distributed(self.ctx)
            self._owns_group = False

    def _close_run_dir(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
        self._console.close()
        if self.run is not None:
            logging.getLogger("cs336_alignment").removeHandler(self.run.file_handler)
            self.run.close()
        if self.lock is not None:
            self.lock.release()

    @property
    def resuming(self) -> bool:
        """Whether this run continues from a checkpoint."""
        return self._latest is not None

    def attach(
        self,
        policy: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        *,
        tokenizer: Any = None,
        generator: Generator | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
    ) -> RunState:
        """Name the model, its tokenizer and the optimizer (None: not checkpointed) that
        checkpoints hold (a checkpoint's model/ is a Hugging Face folder of them). When
        resuming, restore them, every RNG state and the counters from the latest checkpoint,
        cut metrics.jsonl back to its length at that moment, and load the restored weights into
        ``generator`` (when given). ``extra_state()`` (plain values) joins every checkpoint's
        trainer state; on resume the whole saved state is :attr:`saved_state`."""
        self._policy, self._optimizer, self._tokenizer = policy, optimizer, tokenizer
        self._extra_state = extra_state
        if self._latest is not None:
            self.saved_state = self.checkpoints.load(self._latest, policy, optimizer, ctx=self.ctx)
            self.state = RunState.from_saved(self.saved_state)
            self._wall_before = self.state.wall_clock
            if self.ctx.is_main:
                truncate_metrics(self.run.metrics_path, self.state.metrics_bytes)
            if generator is not None:
                generator.load_weights(policy)
            self.logger.info("resumed from %s: continuing after %s step %d", self._latest, self.recipe, self.state.step)
        return self.state

    # ---------------------------------------------------------------------------- the loop

    def steps(
        self, total: int, *, eval_every: int = 0, evaluate: Callable[[int], Any] | None = None, final_examples: int = 0
    ) -> Iterator[int]:
        """The 0-based indices of the steps still to run, from where the run stands, until
        ``total`` steps are done or the time budget is spent. Every step's body must end with
        :meth:`end_of_step`, which calls ``evaluate(steps_done)`` every ``eval_every`` steps.
        On the wall clock, the budget keeps back the time the final validation of
        ``final_examples`` examples will take (at the pace of the latest validation), so that it
        too ends within the budget."""
        self._total, self._eval_every, self._evaluate = total, eval_every, evaluate
        self._final_examples = final_examples
        budget = self.control.budget_seconds
        if budget is not None and self._agree(self._budget_spent() >= budget):  # a resumed run whose budget ran out
            self.logger.info("time budget already spent (%s on the %s clock): skipping to the final validation",
                             format_seconds(self._budget_spent()), self.control.budget_clock)
            return
        self._progress = Progress(total, start=self.state.step, enabled=self.control.progress and self.ctx.is_main,
                                  desc=self.recipe.lower())
        self._clock_at_start = self.state.train_clock
        on_main_thread = threading.current_thread() is threading.main_thread()  # only there can signals be handled
        handled = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; torchrun, SLURM (preemption, time limit) and kill send SIGTERM
        previous = {signum: signal.signal(signum, self._on_signal) for signum in handled} if on_main_thread else {}
        try:
            while self.state.step < total and not self._out_of_time:
                step = self.state.step
                self._step_start, self._step_end = time.perf_counter(), None
                yield step
                if self.state.step != step + 1:
                    raise RuntimeError(f"{self.recipe} step {step + 1} ended without loop.end_of_step()")
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._progress.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        """The first Ctrl-C (SIGINT) or SIGTERM lets the running step finish and be checkpointed
        (end_of_step then raises Interrupted); a second one stops at once (KeyboardInterrupt)."""
        if self._interrupted:
            raise KeyboardInterrupt
        self._interrupted, self._signal = True, signum
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.logger.warning("%s: stopping once the running %s step is done and checkpointed (%s again stops at once)",
                            what, self.recipe, what)

    def wall_clock(self) -> float:
        """Seconds of wall clock since the run started: this session's since RunLoop was made, plus
        the earlier sessions' up to the checkpoint this one resumed from. Logged with every record."""
        return self._wall_before + time.monotonic() - self._session_start

    def _kept_back(self) -> float:
        """Seconds a wall-clock budget keeps for the final validation (see :meth:`steps`); 0 on the train clock."""
        if self.control.budget_clock == "train":
            return 0.0
        return self._final_examples * (self._eval_seconds_per_example or 0.0)

    def _budget_spent(self) -> float:
        """The reading of the clock ``control.budget_clock`` names, plus :meth:`_kept_back`."""
        if self.control.budget_clock == "train":
            return self.state.train_clock
        return self.wall_clock() + self._kept_back()

    def stop_clock(self) -> float:
        """Stop the running step's clock (before its metrics are logged) and return the training
        clock: seconds of training so far, this step included, validation and logging excluded.
        Later calls in the same step return the same reading."""
        if self._step_end is None:
            self._step_end = time.perf_counter()
        return self.state.train_clock + self._step_end - self._step_start

    def end_of_step(self, summary: str = "", *, log: bool = True, **progress: float) -> None:
        """Close the running step: clock, progress and log line (``summary``; ``progress``
        values go on the bar), fault point, validation cadence, checkpoint cadence, budget."""
        s, control = self.state, self.control
        s.train_clock = self.stop_clock()
        s.step += 1
        eta = self._progress.update(s.step, s.train_clock - self._clock_at_start, **progress)
        if log:
            self.logger.info("%s step %d/%d: %s%s", self.recipe, s.step, self._total, f"{summary}, " if summary else "", eta)
        fault_point("step", s.step)
        budget = control.budget_seconds
        self._out_of_time = self._agree(budget is not None and self._budget_spent() >= budget)  # every rank stops together
        self._interrupted = self._agree(self._interrupted)
        last = s.step == self._total
        if self._eval_every and s.step % self._eval_every == 0 and not last and not self._out_of_time:
            self._evaluate(s.step)
        saved = None
        cadence = bool(control.checkpoint_every) and s.step % control.checkpoint_every == 0
        if self._out_of_time or last or self._interrupted or cadence:
            saved = self.save_checkpoint()
        if self._interrupted:
            raise Interrupted(f"interrupted: stopped after {self.recipe} step {s.step}/{self._total}, checkpoint {saved}", saved,
                              self._signal)
        if self._out_of_time:
            self.logger.info("time budget %s (%s clock) reached after %d %s steps (%s of training, %s of wall clock, "
                             "%s kept for the final validation)", control.time_budget, control.budget_clock, s.step,
                             self.recipe, format_seconds(s.train_clock), format_seconds(self.wall_clock()),
                             format_seconds(self._kept_back()))

    def save_checkpoint(self) -> Path:
        """Checkpoint the attached model and optimizer, the RNG states and the counters, atomically."""
        s = self.state
        if self.ctx.is_main:  # the state rank 0 saves is the one that counts
            s.metrics_bytes = self.run.metrics_path.stat().st_size if self.run.metrics_path.exists() else 0
        s.wall_clock = self.wall_clock()
        extra = self._extra_state() if self._extra_state is not None else {}
        return self.checkpoints.save(s.step, model=self._policy, optimizer=self._optimizer, state={**asdict(s), **extra},
                                     tokenizer=self._tokenizer, ctx=self.ctx)

    def _agree(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (a collective at several processes): decisions that
        change which collectives follow (stop, checkpoint) are taken by all ranks together."""
        if self.ctx.world_size == 1:
            return bool(flag)
        return all_reduce({"flag": float(flag)}, self.ctx, op="max")["flag"] > 0

    def nonfinite(self, error: NonFiniteError) -> None:
        """A NaN or infinite loss or gradient: with ``control.skip_nonfinite`` the optimizer step
        is skipped and counted; otherwise the run stops with ``error``."""
        if not self.control.skip_nonfinite:
            error = NonFiniteError(f"{error} (last checkpoint: {self.checkpoints.latest() or 'none'})")
            self.logger.error("%s", error)
            raise error
        self.state.skipped_steps += 1
        self.logger.warning("skipped an optimizer step of %s step %d (%d skipped so far): %s", self.recipe,
                            self.state.step + 1, self.state.skipped_steps, error)

    @contextlib.contextmanager
    def grading(self) -> Iterator[GraderFailures]:
        """Count the grader timeouts and errors of the block (each scored as a wrong answer,
        never fatal), summed over the ranks; warn in the log when there were any."""
        with grader_failures() as failures:
            yield failures
        if self.ctx.world_size > 1:  # each rank grades its own share: the counts of the whole batch
            counts = all_reduce({"timeouts": failures.timeouts, "errors": failures.errors}, self.ctx, op="sum")
            failures.timeouts, failures.errors = int(counts["timeouts"]), int(counts["errors"])
        if (failures.timeouts or failures.errors) and self.ctx.is_main:
            self.logger.warning("%s step %d: %d grader timeouts, %d grader errors (scored as wrong)", self.recipe,
                                self.state.step + 1, failures.timeouts, failures.errors)

    # ---------------------------------------------------------------------------- validation and the end

    def validate(
        self,
        generator: Generator,
        policy: torch.nn.Module,
        *,
        data: LoadedData,
        examples: Sequence[Example],
        sampling: SamplingParams,
        step: int,
        tag: str,
        n_logged: int = 0,
    ) -> dict[str, Any]:
        """Evaluate ``policy`` through ``generator`` (which must hold its weights) on ``examples``.

        Writes <run>/eval/<tag>_stepNNNNN/{generations.jsonl,metrics.json}, logs an eval record
        (:data:`EVAL_KEYS`, split, seconds; with ``sampling.n`` = k >= 2 samples per question also
        ``n_samples``, ``pass@1`` .. ``pass@k`` and ``maj@k``, see
        :func:`~cs336_alignment.evaluate.sampling_metrics`) and ``n_logged`` example rollouts;
        returns the record.
        """
        t0 = time.perf_counter()
        mine, n_real = padded_share(examples, self.ctx)  # several processes: each validates its share, in step
        offset = self.ctx.rank * len(mine)  # sampling streams are keyed on the global prompt index
        with autocast(self.device):
            metrics, records = evaluate(
                generator, data.reward_fn, format_prompts(data.template, mine), ground_truths=[ex.ground_truth for ex in mine],
                sampling=dataclasses.replace(sampling, prompt_offset=offset), policy=policy,
                progress=self.control.progress and self.ctx.is_main,  # a bar below the step bar, gone when done
            )
        policy.train()
        if self.ctx.world_size > 1:  # every rank's real records, in order, on every rank
            records = gather([dataclasses.replace(r, prompt_index=offset + r.prompt_index) for r in records
                              if r.prompt_index < n_real], self.ctx)
            seconds = all_reduce({"generation": metrics["generation_seconds"], "scoring": metrics["scoring_seconds"]},
                                 self.ctx, op="max")  # the slowest rank's
            metrics = evaluation_metrics(records, sampling, generation_seconds=seconds["generation"],
                                         scoring_seconds=seconds["scoring"])
        sampled = {k: v for k, v in metrics.items() if k == "n_samples" or k.startswith(("pass@", "maj@"))}  # k >= 2
        record = {k: metrics[k] for k in EVAL_KEYS} | sampled | {"split": tag, "seconds": time.perf_counter() - t0}
        self._eval_seconds_per_example = record["seconds"] / max(1, len(examples))
        if not self.ctx.is_main:
            return record
        out_dir = f"eval/{tag}_step{step:05d}/"
        self.run.files.record(out_dir)
        write_evaluation(self.run.path / out_dir, metrics, records)
        self.sink.log("eval", step, record)
        for r in records[:n_logged]:
            self.logger.info("eval step %d example: reward=%s | %r -> %r", step, r.reward, r.prompt[-80:], r.generation[:300])
        k = sampled.get("n_samples")
        shown = ("pass@1", f"pass@{k}", f"maj@{k}") if k else ()
        extra = "".join(f", {name} {sampled[name]:.4f}" for name in shown if name in sampled)
        self.logger.info("eval step %d (%s): accuracy %.4f, format %.4f%s", step, tag, record["accuracy"],
                         record["format_accuracy"], extra)
        return record

    def finish(self, policy: torch.nn.Module, tokenizer: Any, final: dict[str, Any]) -> dict[str, Any]:
        """Save the final model (in the config's ``export_dtype``) and tokenizer, write final.json
        (which marks the run complete), close the sinks; returns ``final``. Several processes:
        the sharded policy is gathered into one plain model, which rank 0 saves."""
        model = gathered_model(policy, self.ctx)  # ``policy`` itself at world size 1; None on ranks > 0
        if self.ctx.is_main:
            out = self.run.path
            self._save_model(model, tokenizer)
            self.logger.info("saved model (%s) and tokenizer to %s", str(self._export_dtype).removeprefix("torch."),
                             out / "model")
            self.run.files.record("final.json")
            atomic_write_text(out / "final.json", json.dumps(final, indent=2, default=str) + "\n")
        self.close()
        return final

    def _save_model(self, policy: torch.nn.Module, tokenizer: Any) -> None:
        """Save the model and tokenizer into <run>/model/ file by file: each is written into a
        temporary folder, recorded in the run's manifest, then renamed into place; files in
        model/ that this run did not write are left alone."""
        tmp = f".model.tmp-{os.getpid()}/"
        self.run.files.record(tmp)
        staging, model_dir = self.run.path / tmp, self.run.path / "model"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            written = save_model_folder(policy, tokenizer, staging, dtype=self._export_dtype)
            self.run.files.record(*(f"model/{p.relative_to(staging).as_posix()}" for p in written))
            for p in written:
                target = model_dir / p.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def collective_timeout() -> float:
    """Seconds a collective may wait for every rank before the run fails with an error instead of
    hanging: CS336_ALIGNMENT_COLLECTIVE_TIMEOUT, else 2 hours (longer than the longest step or
    validation share: the full MATH validation split over the ranks)."""
    return float(os.environ.get("CS336_ALIGNMENT_COLLECTIVE_TIMEOUT", 2 * 3600))


class _NoSink:
    """The metrics sink of ranks > 0: rank 0 alone writes metrics.jsonl and the trackers."""

    def log(self, kind: str, step: int, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _rank_logger(rank: int) -> logging.Logger:
    """The log of a rank > 0: nothing goes to the run's log (rank 0 writes it); warnings and errors
    go to stderr, marked with the rank."""
    logger = logging.getLogger(f"cs336_alignment.run.rank{rank}")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    return logger
