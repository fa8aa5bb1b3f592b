"""Command line: ``python -m cs336_alignment <command> --help``.

Each command is a thin wrapper: it parses options, loads a config, and calls one function
of the package. Heavy imports happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

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
    for name in ("torch", "transformers", "tokenizers", "sympy", "math-verify", "vllm", "wandb", "liger-kernel"):
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
