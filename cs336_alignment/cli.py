"""Command line: ``python -m cs336_alignment <command> --help``.

Each command is a thin wrapper: it parses options, loads a config, and calls one function
of the package. Heavy imports happen inside the commands, so ``--help`` is instant. The
recipe commands (sft, ei, grpo) are registered from one table; every command reports errors
through :func:`_user_errors`: a :class:`~cs336_alignment.errors.UserError` (bad config, bad
data, busy run directory, ...) prints one line and exits with its ``exit_code``, anything else
keeps its traceback.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer

from .config import load_config
from .console import set_quiet
from .errors import UserError

__all__ = [
    "RECIPE_COMMANDS",
    "app",
    "main",
]


app = typer.Typer(
    name="cs336_alignment",
    help="SFT, expert iteration and GRPO for small reasoning models (CS336 assignment 5).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def info() -> None:
    """Print versions of the package and its main dependencies, and the devices torch sees."""
    import importlib.metadata as md
    import platform

    import torch

    from . import __version__

    typer.echo(f"cs336_alignment {__version__}")
    typer.echo(f"python {platform.python_version()}")
    optional = ("vllm", "wandb", "trackio", "tensorboard", "liger-kernel", "flash-attn")
    for name in ("torch", "transformers", "tokenizers", "safetensors", "sympy", "math-verify", *optional):
        try:
            typer.echo(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            typer.echo(f"{name} (not installed)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            typer.echo(f"cuda:{i} {props.name} {props.total_memory / 2**30:.1f} GiB")
    else:
        typer.echo("cuda: not available (CPU only)")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory."),
    quick: bool = typer.Option(False, "--quick", help="The reduced size the test suite runs (about a minute)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="DemoConfig fields as key=value (e.g. grpo_steps=100)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars; only warnings and errors on the console."),
    asynchronous: bool = typer.Option(
        False, "--async", help="GRPO with asynchronous rollouts: a generator process samples the next batch with "
        "one-step-old weights while the trainer trains (max_staleness 1, tis_cap 2.0; half the CPU threads each)."),
) -> None:
    """The main job: SFT then GRPO on a tiny model, on CPU, showing validation reward rise (about 2 minutes)."""
    from .config import to_dict
    from .demo import DemoConfig, format_summary, run_demo

    set_quiet(quiet)
    base = DemoConfig.quick(str(out)) if quick else DemoConfig(out=str(out))
    base.async_rollouts = asynchronous
    with _user_errors():
        cfg = load_config(DemoConfig, None, [f"{k}={v}" for k, v in to_dict(base).items()] + list(overrides or []))
        summary = run_demo(cfg)
    typer.echo(format_summary(summary))


@app.command("tiny-model")
def tiny_model(
    out: Path = typer.Option(..., "--out", help="Directory to write the model and tokenizer to."),
    seed: int = typer.Option(0, help="Initialisation seed."),
    hidden_size: int = typer.Option(64, help="Width of the tiny model."),
    num_layers: int = typer.Option(2, help="Number of transformer blocks."),
) -> None:
    """Write a random-init tiny Qwen2 model and its tokenizer to a directory (loadable with from_pretrained)."""
    from .tiny import save_tiny_model

    path = save_tiny_model(out, seed=seed, hidden_size=hidden_size, num_hidden_layers=num_layers)
    typer.echo(f"wrote tiny model and tokenizer to {path}")


@app.command("eval")
def eval_command(
    model: Optional[str] = typer.Option(None, "--model", help="Model directory (or 'tiny')."),
    data: Optional[str] = typer.Option(None, "--data", help="JSONL file (MATH, GSM8K or sft format) or 'task:arithmetic'."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt template name (r1_zero, question_only) or file."),
    out: Optional[str] = typer.Option(None, "--out", help="Output directory."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N examples."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampling seed."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Maximum new tokens per response."),
    n_samples: Optional[int] = typer.Option(
        None, "--n-samples", help="Samples per prompt (EvalConfig n); 2 or more also reports pass@1..pass@N and maj@N."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with EvalConfig fields."),
    overrides: Optional[list[str]] = typer.Argument(None, help="More EvalConfig fields as key=value."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars; only warnings and errors on the console."),
) -> None:
    """Zero-shot evaluation: generate, grade, write generations.jsonl and metrics.json."""
    from .recipes.eval import EvalConfig, run_evaluation

    set_quiet(quiet)
    flags = {"model": model, "data": data, "prompt": prompt, "out": out, "limit": limit, "seed": seed, "max_tokens": max_tokens,
             "n": n_samples}
    extra = [f"{k}={v}" for k, v in flags.items() if v is not None]
    with _user_errors():
        cfg = load_config(EvalConfig, config, extra + list(overrides or []))
        metrics = run_evaluation(cfg)
    sampled = [k for k in metrics if k.startswith(("pass@", "maj@"))]  # with n >= 2 samples per prompt
    keys = ("n_examples", "accuracy", "format_accuracy", "answer_accuracy", "truncated_fraction",
            "mean_response_length", "mean_token_entropy", "generation_tokens_per_second",
            *(["n_samples", *sampled] if sampled else []))
    for key in keys:
        value = metrics.get(key)
        typer.echo(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    typer.echo(f"wrote {Path(cfg.out) / 'generations.jsonl'} and {Path(cfg.out) / 'metrics.json'}")


@app.command("export")
def export_command(
    checkpoint: str = typer.Argument(..., help="A checkpoint (<run>/checkpoints/step_N), a finished run, or a model folder."),
    out: Path = typer.Option(..., "--out", help="Directory to write; must not exist or be empty."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="Weights' dtype: bfloat16, float16 or float32."),
) -> None:
    """Write a servable Hugging Face folder (safetensors in --dtype, tokenizer, generation config) from any checkpoint."""
    from .export import export_model

    with _user_errors():
        path = export_model(checkpoint, out, dtype=dtype)
    typer.echo(f"wrote {path} ({dtype}): load it with from_pretrained, vLLM, or eval --model {path}")


RECIPE_COMMANDS = {  # command -> its help; the config class and entry function come from experiments.recipe_classes
    "sft": "Supervised fine-tuning on (prompt, response) pairs (sft.jsonl or a built-in task's traces).",
    "ei": "Expert iteration: sample, keep the rewarded responses, fine-tune on them, repeat.",
    "grpo": "GRPO (and its ablations: loss_type, length normalisation, std normalisation, off-policy epochs).",
}


def _register_recipe_command(recipe: str, help_text: str) -> None:
    def command(
        config: Optional[Path] = typer.Option(None, "--config", help="YAML file with the recipe's config fields."),
        overrides: Optional[list[str]] = typer.Argument(None, help="Config fields as key=value (nested: data.train=...)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint in the run directory."),
        time_budget: Optional[str] = typer.Option(None, "--time-budget", help="Stop training after this long (e.g. 4h, 90m)."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Resolve and check the config, print it, run nothing."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars; only warnings and errors on the console."),
    ) -> None:
        from .experiments import recipe_classes

        set_quiet(quiet)
        with _user_errors():
            cls, train = recipe_classes(recipe)
            cfg = load_config(cls, config, list(overrides or []) + _control_flags(resume, time_budget), recipe=recipe)
            if dry_run:
                _echo_dry_run(recipe, cfg)
                return
            _echo_metrics(train(cfg))

    app.command(recipe, help=help_text)(command)


for _recipe, _help in RECIPE_COMMANDS.items():
    _register_recipe_command(_recipe, _help)


@app.command("run")
def run_command(
    config: Path = typer.Argument(..., help="A study config (configs/*.yaml) with a 'recipe:' key."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Config fields as key=value."),
    smoke: bool = typer.Option(False, "--smoke", help="Tiny model, built-in task, CPU, one step: checks the config runs."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint."),
    time_budget: Optional[str] = typer.Option(None, "--time-budget", help="Stop training after this long (e.g. 4h)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Resolve and check the config, print it, run nothing."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars; only warnings and errors on the console."),
) -> None:
    """Run one study config (eval, sft, ei or grpo, as its 'recipe:' key says)."""
    from .experiments import load_study, run_study

    set_quiet(quiet)
    with _user_errors():
        study = load_study(config, list(overrides or []) + _control_flags(resume, time_budget), smoke=smoke)
        if dry_run:
            _echo_dry_run(study.recipe, study.config)
            return
        _echo_metrics(run_study(study))


@app.command("sweep")
def sweep_command(
    sweep: Path = typer.Argument(..., help="A sweep file (configs/sweeps/*.yaml): base, out pattern, grid."),
    smoke: bool = typer.Option(False, "--smoke", help="Run every grid point under the smoke overlay."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs without running them."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars; only warnings and errors on the console."),
) -> None:
    """Run a grid of overrides one run after another, skipping runs already complete."""
    from .experiments import run_sweep

    set_quiet(quiet)
    with _user_errors():
        run_sweep(sweep, smoke=smoke, dry_run=dry_run, echo=typer.echo)


@app.command("config")
def config_command(
    recipe: str = typer.Argument(..., help="eval, sft, ei or grpo."),
    config: Optional[Path] = typer.Option(None, "--config", help="Start from this YAML file."),
    overrides: Optional[list[str]] = typer.Argument(None, help="Fields as key=value."),
) -> None:
    """Print a recipe's resolved config as YAML, every field with its default and meaning."""
    from .config import commented_yaml
    from .experiments import recipe_classes

    with _user_errors():
        cls, _ = recipe_classes(recipe)
        cfg = load_config(cls, config, list(overrides or []), recipe=recipe)
    typer.echo(f"# python -m cs336_alignment {recipe} --config FILE, or: run FILE with 'recipe: {recipe}' added")
    typer.echo(commented_yaml(cfg), nl=False)


@app.command("schedule")
def schedule_command(
    configs: Path = typer.Option(Path("configs"), "--configs", help="Folder of study configs, with sweeps/ inside."),
    val_size: Optional[int] = typer.Option(None, "--val-size", min=1, help="Validation examples (default 5,000)."),
    train_size: Optional[int] = typer.Option(None, "--train-size", min=1, help="MATH train questions (default 7,500)."),
    sft_size: Optional[int] = typer.Option(None, "--sft-size", min=1, help="sft.jsonl examples (default 4,800)."),
    sft_filtered_size: Optional[int] = typer.Option(
        None, "--sft-filtered-size", min=1, help="sft.jsonl examples that earn reward 1 (default 3,600)."
    ),
    markdown: bool = typer.Option(False, "--markdown", help="A Markdown table (the one in configs/README.md)."),
) -> None:
    """Optimizer steps, validations, peak learning rate and deliverable of every study config and sweep point."""
    from .schedule import DatasetSizes, format_markdown, format_text, schedule_rows

    given = {"val": val_size, "train": train_size, "sft": sft_size, "sft_filtered": sft_filtered_size}
    with _user_errors():
        sizes = DatasetSizes(**{k: v for k, v in given.items() if v is not None})
        rows = schedule_rows(configs, sizes)
    typer.echo((format_markdown if markdown else format_text)(rows, sizes), nl=False)


@app.command("report")
def report_command(
    runs: list[Path] = typer.Argument(..., help="Run directories (training runs or eval outputs)."),
    out: Path = typer.Option(..., "--out", help="Directory for report.md and the PNG plots."),
    label: Optional[list[str]] = typer.Option(None, "--label", help="A label per run (default: the config keys that differ)."),
) -> None:
    """Plots (accuracy vs step and wall-clock, reward, entropy, length, grad norm, clip fraction) and a Markdown report."""
    from .report import report_main

    with _user_errors():
        path = report_main(list(runs), out, list(label) if label else None)
    typer.echo(f"wrote {path}")


@app.command("download")
def download_command(
    name: str = typer.Argument(..., help="gsm8k, math or math500."),
    out: Path = typer.Option(
        Path("data"), "--out", help="Directory: math -> train.jsonl, validation.jsonl; gsm8k/, math500/ subfolders.",
    ),
    split: Optional[str] = typer.Option(None, "--split", help="One split (default: all of the dataset's splits)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N examples per split."),
    force: bool = typer.Option(False, "--force", help="Overwrite files that already exist."),
) -> None:
    """Download a public dataset from the Hugging Face hub into our JSONL form (needs the 'datasets' extra)."""
    from .download import download_main

    with _user_errors():
        download_main(name, out, split=split, limit=limit, force=force)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """The one error path of every command, with one exit-code convention:

    2    input found bad before the run: config, data, paths, a directory held by another run,
         a missing optional extra, an unsafe checkpoint;
    1    a failure mid-run (non-finite loss, a failed checkpoint write), naming the last checkpoint;
    130  interrupted (Ctrl-C): after the step was checkpointed, with the command that resumes it;
    143  the same after a SIGTERM (kill, torchrun passing one on, SLURM preemption or time limit).

    Each prints ``error: <where>: <what>`` on one line, without a traceback. Anything else is a
    bug and keeps its traceback.
    """
    try:
        yield
    except UserError as e:
        message = f"error: {e}"
        if getattr(e, "checkpoint", None) is not None:  # Interrupted: say how to go on
            message += f"; continue with: {_resume_command()}"
        typer.echo(message, err=True)
        raise typer.Exit(e.exit_code) from None
    except FileNotFoundError as e:  # a path given on the command line or in a config
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training steps
        resumable = sys.argv[1:2] and sys.argv[1] in ("run", "sweep", *RECIPE_COMMANDS)
        hint = f"; to continue from the last checkpoint: {_resume_command()}" if resumable else ""
        typer.echo(f"error: interrupted{hint}", err=True)
        raise typer.Exit(130) from None


def _resume_command() -> str:
    """This process's command line, with --resume added for a recipe or a study (a sweep
    resumes its runs by itself)."""
    args = sys.argv[1:]
    if args and args[0] in ("run", *RECIPE_COMMANDS) and "--resume" not in args:
        args = [*args, "--resume"]
    return shlex.join(["python", "-m", "cs336_alignment", *args])


def _control_flags(resume: bool, time_budget: Optional[str]) -> list[str]:
    flags = ["control.resume=true"] if resume else []
    return flags + ([f"control.time_budget={time_budget}"] if time_budget else [])


def _echo_dry_run(recipe: str, cfg: object) -> None:
    """What --dry-run prints: the resolved config, as `config` prints it, and that nothing ran."""
    from .config import commented_yaml

    typer.echo(f"# dry run: {recipe} with this config; nothing was run or written")
    typer.echo(commented_yaml(cfg), nl=False)


def _echo_metrics(metrics: dict) -> None:
    for key, value in metrics.items():
        typer.echo(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
