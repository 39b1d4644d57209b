"""The `advbench` command line (typer + rich).

Every command turns bad input (an AdvbenchError, or a usage error) into one line on stderr,
``error: ...``, and exit code 2 - never a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
import typer.core
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import AdvbenchError

try:  # typer >= 0.24 vendors click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on real click
    from click.exceptions import UsageError

    NoArgsIsHelpError = ()  # type: ignore[assignment]

console = Console(soft_wrap=True)
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print ``error: message`` as one line on stderr and return the Exit to raise."""
    msg = " ".join(str(message).split())  # one line, whatever the message held
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


class AdvbenchGroup(typer.core.TyperGroup):
    """Turns AdvbenchError and click usage errors into one stderr line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AdvbenchError as exc:
            raise fail(str(exc)) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except NoArgsIsHelpError as exc:
            exc.show()
            rv = 0
        except UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            typer.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
            rv = 2
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            rv = 130
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            rv = 130
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=AdvbenchGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="advbench: adversarial robustness benchmarks and robust training for image classifiers.")


def _version_callback(value: bool):
    if value:
        console.print(f"advbench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                       help="Show the version and exit.")):
    pass


# --- list -------------------------------------------------------------------------------------
@app.command("list")
def list_cmd():
    """List registered models, datasets, attacks, activations and defenses."""
    import attacks
    import defenses
    from .data import DATASETS
    from .models import MODELS
    from .registry import ACTIVATIONS

    for title, reg in (("models", MODELS), ("datasets", DATASETS), ("attacks", attacks.ATTACKS),
                       ("activations", ACTIVATIONS), ("defenses", defenses.METHODS)):
        t = Table(title=title, title_justify="left")
        t.add_column("name", style="bold")
        t.add_column("description")
        for name, doc in reg.describe():
            t.add_row(name, doc)
        console.print(t)


# --- train ------------------------------------------------------------------------------------
def _train_options_doc() -> str:
    return "Standard (non-adversarial) training with a progress bar, per-epoch test accuracy and checkpoints."


@app.command("train", help=_train_options_doc())
def train_cmd(
    model: str = typer.Option("smallcnn", "--model", "-m", help="Model name (see `advbench list`)."),
    dataset: str = typer.Option("mnist-5k", "--dataset", "-d", help="Dataset name or npz:PATH."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Where torchvision datasets live."),
    download: bool = typer.Option(False, "--download", help="Download torchvision datasets if missing."),
    epochs: int = typer.Option(3, "--epochs"),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(0.05, "--lr"),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd or adam."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine, step or constant."),
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    augment: bool = typer.Option(False, "--augment/--no-augment", help="Random crop (+ flip for colour)."),
    activation: str = typer.Option("relu", "--activation", help="Activation (see `advbench list`)."),
    seed: int = typer.Option(0, "--seed"),
    n_train: Optional[int] = typer.Option(None, "--n-train", help="Train on a seeded subset of this size."),
    out: Optional[str] = typer.Option(None, "--out", help="Checkpoint path (default: the zoo entry)."),
    results_dir: str = typer.Option("results", "--results-dir"),
    resume: bool = typer.Option(False, "--resume", help="Continue from --out's last epoch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
):
    from .data import load_dataset
    from .models import MODELS, activation_factory
    from .training import TrainConfig, train
    from .zoo import zoo_path

    MODELS.canonical(model)
    activation_factory(activation)
    ds = load_dataset(dataset, data_dir=data_dir, download=download)
    path = Path(out) if out else zoo_path(model, dataset, "standard", results_dir, activation)
    cfg = TrainConfig(model=model, dataset=dataset, epochs=epochs, batch_size=batch_size, lr=lr,
                      optimizer=optimizer, schedule=schedule, weight_decay=weight_decay, augment=augment,
                      seed=seed, activation=activation, out=str(path), resume=resume, device=device,
                      n_train=n_train)
    console.print(f"training {model} on {ds.name} ({len(ds.y_train)} train / {len(ds.y_test)} test, "
                  f"{'x'.join(map(str, ds.input_shape))}) for {epochs} epochs -> {path}")
    res = train(cfg, dataset=ds, console=console)
    last = res.metrics[-1] if res.metrics else {}
    if last:
        console.print(f"done: test accuracy {last['test_acc']:.2%}; checkpoint {path}")


def main(argv: Optional[List[str]] = None) -> None:
    app(args=argv, prog_name="advbench")


if __name__ == "__main__":  # pragma: no cover
    main()
