"""The `advbench` command line (typer + rich).

Every command turns bad input (an AdvbenchError, or a usage error) into one line on stderr,
``error: ...``, and exit code 2 - never a traceback. This is the only module that knows flag names:
a library SettingError names a parameter (``epochs``) and is reported with the command's flag for it
(``--epochs``, see flag_for).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
import typer.core
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import AdvbenchError, SettingError

try:  # typer >= 0.24 vendors click
    from typer._click.globals import get_current_context
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on real click
    from click import get_current_context
    from click.exceptions import UsageError

    NoArgsIsHelpError = ()  # type: ignore[assignment]

# under torchrun only rank 0 talks (errors: every rank); RANK read here to keep torch out of start-up
console = Console(soft_wrap=True, quiet=os.environ.get("RANK", "0") != "0")
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print ``error: message`` as one line on stderr and return the Exit to raise."""
    msg = " ".join(str(message).split())  # one line, whatever the message held
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster job preempted, `kill`): raised by the CLI's handler so that a run stops
    like on Ctrl-C, saying what it kept; exit code 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _resume_command(argv: List[str], run_id: str) -> str:
    """The command line that continues an interrupted run: `attack ... --resume RUN_ID`, `run ... --resume`."""
    import shlex

    suite = argv[:1] == ["run"]
    args = _without(argv, {"--resume": not suite})  # attack's --resume takes a value, run's is a flag
    args += ["--resume"] if suite else ["--resume", run_id]
    return shlex.join(["advbench", *args])


def interrupted(exc: KeyboardInterrupt, argv: List[str]) -> "typer.Exit":
    """One stderr line for Ctrl-C (exit 130) or SIGTERM (143), saying what an interrupted run kept."""
    from .runfolder import RunInterrupted

    term = isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated)
    what = "terminated (SIGTERM)" if term else "interrupted"
    code = 143 if term else 130
    if isinstance(exc, RunInterrupted) and argv[:1] in (["attack"], ["run"]):
        return fail(f"{what}; {exc.kept()}: resume with `{_resume_command(argv, exc.run_id)}`", code)
    if isinstance(exc, RunInterrupted):  # e.g. train-robust's final evaluation: its --resume evaluates afresh
        return fail(f"{what}; the evaluation (run {exc.run_id}) was not finished", code)
    return fail(what, code)


def flag_for(group, command: Optional[str], setting: str) -> str:
    """The flag that sets the library parameter ``setting``: the invoked command's own option of that
    name (``n_eval`` -> ``--n-eval``), else any command's, else ``--`` + the name with dashes."""
    commands = [group.commands[command]] if command in group.commands else []
    for cmd in commands + [c for c in group.commands.values() if c not in commands]:
        for param in cmd.params:
            longs = [o for o in getattr(param, "opts", ()) if o.startswith("--")]
            if param.name == setting and longs:
                return longs[0]
    return "--" + setting.replace("_", "-")


class AdvbenchGroup(typer.core.TyperGroup):
    """Turns AdvbenchError and click usage errors into one stderr line and exit code 2, and Ctrl-C /
    SIGTERM into one line saying what was kept (exit 130 / 143)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SettingError as exc:
            raise fail(exc.render(lambda s: flag_for(self, ctx.invoked_subcommand, s))) from None
        except AdvbenchError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt as exc:  # typer would turn it into a silent exit 130
            raise interrupted(exc, (ctx.obj or {}).get("argv", [])) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        import signal

        args = list(sys.argv[1:] if args is None else args)
        extra.setdefault("obj", {"argv": args})
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
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
        except KeyboardInterrupt as exc:
            rv = interrupted(exc, args).exit_code
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
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
    """List registered models, datasets, attacks, attack suites, activations and defenses."""
    import attacks
    from defenses.activations import ACTIVATIONS
    from defenses.methods import METHODS
    from .data import DATASETS
    from .models import MODELS
    from .specs import ATTACK_SUITES, mode_name

    suites = [(name, f"{s.description} [{mode_name(s.cascade)}]") for name, s in ATTACK_SUITES.items()]
    for title, rows in (("models", MODELS.describe()), ("datasets", DATASETS.describe()),
                        ("attacks", attacks.ATTACKS.describe()), ("attack suites (--suite)", suites),
                        ("activations", ACTIVATIONS.describe()), ("defenses", METHODS.describe())):
        t = Table(title=title, title_justify="left")
        t.add_column("name", style="bold")
        t.add_column("description")
        for name, doc in rows:
            t.add_row(name, doc)
        console.print(t)


# --- train ------------------------------------------------------------------------------------
_BATCH_HELP = "Global batch size: under torchrun each process takes its share of every batch."
_SCHEDULE_HELP = "cosine, step, cyclic (fast AT's triangle: 0 -> --lr at 2/5 -> 0) or constant."
# the options both training commands take alike (the CUDA fast paths each a flag, also accepted on CPU)
_TRAIN = dict(
    model=typer.Option("smallcnn", "--model", "-m", help="Model name (see `advbench list`)."),
    dataset=typer.Option("mnist-5k", "--dataset", "-d", help="Dataset name or npz:PATH."),
    data_dir=typer.Option(None, "--data-dir", help="Where torchvision datasets live."),
    download=typer.Option(False, "--download", help="Download torchvision datasets if missing."),
    schedule=typer.Option("cosine", "--schedule", help=_SCHEDULE_HELP),
    augment=typer.Option(False, "--augment/--no-augment", help="Random crop (+ flip for colour)."),
    activation=typer.Option("relu", "--activation", help="Activation (see `advbench list`)."),
    seed=typer.Option(0, "--seed"),
    n_train=typer.Option(None, "--n-train", help="Train on a seeded subset of this size."),
    resume=typer.Option(False, "--resume", help="Continue from --out's last epoch."),
    device=typer.Option("auto", "--device", help="auto, cpu or cuda."),
    amp=typer.Option(None, "--amp", help="bf16: forward passes (inner attack included) under torch.autocast."),
    channels_last=typer.Option(False, "--channels-last", help="NHWC memory format (faster convs on GPU)."),
    compile=typer.Option(False, "--compile", help="torch.compile the model for the training steps."),
)


@app.command("train")
def train_cmd(
    model: str = _TRAIN["model"],
    dataset: str = _TRAIN["dataset"],
    data_dir: Optional[str] = _TRAIN["data_dir"],
    download: bool = _TRAIN["download"],
    epochs: int = typer.Option(3, "--epochs"),
    batch_size: int = typer.Option(64, "--batch-size", help=_BATCH_HELP),
    lr: float = typer.Option(0.05, "--lr"),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd or adam."),
    schedule: str = _TRAIN["schedule"],
    weight_decay: float = typer.Option(5e-4, "--weight-decay"),
    augment: bool = _TRAIN["augment"],
    activation: str = _TRAIN["activation"],
    seed: int = _TRAIN["seed"],
    n_train: Optional[int] = _TRAIN["n_train"],
    out: Optional[str] = typer.Option(None, "--out", help="Checkpoint path (default: the zoo entry in "
                                                          "$ADVBENCH_HOME/models, ~/.cache/advbench/models)."),
    results_dir: str = typer.Option("results", "--results-dir", hidden=True,
                                    help="Unused: the zoo is $ADVBENCH_HOME/models, shared by all results dirs."),
    resume: bool = _TRAIN["resume"],
    device: str = _TRAIN["device"],
    amp: Optional[str] = _TRAIN["amp"],
    channels_last: bool = _TRAIN["channels_last"],
    compile: bool = _TRAIN["compile"],
):
    """Standard (non-adversarial) training with a progress bar, per-epoch test accuracy and checkpoints."""
    from dataclasses import replace

    from .data import load_dataset
    from .models import model_for_dataset
    from .runtime import FastPaths
    from .training import TrainConfig, train
    from .zoo import zoo_path

    cfg = TrainConfig(model=model, dataset=dataset, epochs=epochs, batch_size=batch_size, lr=lr,
                      optimizer=optimizer, schedule=schedule, weight_decay=weight_decay, augment=augment,
                      seed=seed, activation=activation, out=str(Path(out)) if out else "", resume=resume, device=device,
                      n_train=n_train, fast=FastPaths(amp, channels_last, compile))
    ds = load_dataset(dataset, data_dir=data_dir, download=download)
    model_for_dataset(model, ds, activation)  # a model that cannot take these images: refused before any file
    if not out:
        cfg = replace(cfg, out=str(zoo_path(model, ds, "standard", activation)))
    console.print(f"training {model} on {ds.name} ({len(ds.y_train)} train / {len(ds.y_test)} test, "
                  f"{'x'.join(map(str, ds.input_shape))}) for {epochs} epochs -> {cfg.out}")
    res = train(cfg, dataset=ds, narrator=narrator(console))
    last = res.metrics[-1] if res.metrics else {}
    if last:
        console.print(f"done: test accuracy {last['test_acc']:.2%}; checkpoint {cfg.out}")


# --- train-robust -----------------------------------------------------------------------------
@app.command("train-robust")
def train_robust_cmd(
    model: str = _TRAIN["model"],
    dataset: str = _TRAIN["dataset"],
    data_dir: Optional[str] = _TRAIN["data_dir"],
    download: bool = _TRAIN["download"],
    method: str = typer.Option("pgd-at", "--method",
                               help="Defense: pgd-at, fgsm-rs, trades, mix (see `advbench list`)."),
    eps: Optional[str] = typer.Option(None, "--eps", help="Training budget in pixel units (default: 0.3 for "
                                                         "grey-scale datasets, 8/255 for colour ones)."),
    norm: str = typer.Option("linf", "--norm", help="linf or l2."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Inner attack steps (default: 7 for pgd-at and "
                                                              "trades, 1 for fgsm-rs and mix)."),
    alpha: Optional[str] = typer.Option(None, "--alpha", help="Inner step size (default: 2.5*eps/steps; "
                                                              "fgsm-rs 1.25*eps; mix eps)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="TRADES robustness weight (default 6)."),
    mix_weight: Optional[float] = typer.Option(None, "--mix-weight", help="mix: weight of the clean loss "
                                                                         "(default 0.5)."),
    bn_mode: str = typer.Option("eval", "--bn-mode", help="BatchNorm mode during the inner attack: eval or train."),
    eps_warmup: Optional[int] = typer.Option(None, "--eps-warmup",
                                             help="Ramp eps linearly (per step) over this many first epochs "
                                                  "(default: 2 when --epochs >= 5, else 1)."),
    activation: str = _TRAIN["activation"],
    smooth_backward: Optional[str] = typer.Option(None, "--smooth-backward",
                                                  help="Keep ReLU forward, use this activation's derivative "
                                                       "backward."),
    swa_start: Optional[int] = typer.Option(None, "--swa-start", help="SWA: average the weights from this epoch on."),
    swa_lr: Optional[float] = typer.Option(None, "--swa-lr", help="SWA: constant learning rate from --swa-start on."),
    ema: Optional[float] = typer.Option(None, "--ema", help="EMA of the weights with this decay (e.g. 0.999)."),
    val_size: int = typer.Option(500, "--val-size", help="Training examples held out for robust early stopping "
                                                         "(0: none)."),
    val_steps: int = typer.Option(10, "--val-steps", help="PGD steps of the per-epoch validation."),
    epochs: int = typer.Option(10, "--epochs"),
    batch_size: int = typer.Option(32, "--batch-size", help=_BATCH_HELP),
    lr: float = typer.Option(0.001, "--lr"),
    optimizer: str = typer.Option("adam", "--optimizer", help="sgd or adam."),
    schedule: str = _TRAIN["schedule"],
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    augment: bool = _TRAIN["augment"],
    seed: int = _TRAIN["seed"],
    n_train: Optional[int] = _TRAIN["n_train"],
    out: Optional[str] = typer.Option(None, "--out", help="Checkpoint of the last epoch (default: the zoo entry "
                                                          "MODEL-DATASET-METHOD[-ACT].pt); the best epoch goes "
                                                          "to the same name with .best.pt, metrics to "
                                                          ".metrics.csv."),
    results_dir: str = typer.Option("results", "--results-dir"),
    resume: bool = _TRAIN["resume"],
    device: str = _TRAIN["device"],
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate the final and best models with PGD "
                                                                "and record them in the leaderboard."),
    eval_steps: int = typer.Option(20, "--eval-steps", help="PGD steps of the final evaluation."),
    n_eval: Optional[int] = typer.Option(1000, "--n-eval", help="Test examples of the final evaluation."),
    amp: Optional[str] = _TRAIN["amp"],
    channels_last: bool = _TRAIN["channels_last"],
    compile: bool = _TRAIN["compile"],
):
    """Adversarial training (PGD-AT, fast FGSM-RS, TRADES, Goodfellow mix) with smooth activations, SWA/EMA,
    robust early stopping on a held-out split, exact resume, and a final PGD evaluation in the leaderboard."""
    from defenses.methods import MethodConfig
    from .runs import RobustTraining, run_robust_training
    from .runtime import FastPaths
    from .threat import format_eps, parse_eps
    from .training import TrainConfig

    loop = TrainConfig(model=model, dataset=dataset, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                       schedule=schedule, weight_decay=weight_decay, augment=augment, seed=seed, activation=activation,
                       smooth_backward=smooth_backward, out=str(Path(out)) if out else "", resume=resume,
                       device=device, n_train=n_train, val_size=val_size, swa_start=swa_start, swa_lr=swa_lr, ema=ema,
                       fast=FastPaths(amp, channels_last, compile))
    defense = MethodConfig(method, steps=steps, alpha=parse_eps(alpha, setting="alpha") if alpha is not None else None,
                           beta=beta, mix_weight=mix_weight, bn_mode=bn_mode, eps_warmup=eps_warmup, seed=seed)
    rt = RobustTraining(loop, defense, eps=eps, norm=norm, data_dir=data_dir, download=download, val_steps=val_steps,
                        evaluate=evaluate, eval_steps=eval_steps, n_eval=n_eval, results_dir=results_dir)
    report = run_robust_training(rt, narrator(console))
    if report.evaluation_skipped:
        console.print(f"evaluate it again with `advbench attack --checkpoint {report.out} --eps "
                      f"{format_eps(report.threat.eps)}`", markup=False, highlight=False)


# --- attack / leaderboard / run (the evaluator) --------------------------------------------------
def narrator(out: Console):
    """The library's Narrator for the running command: lines on ``out``, progress and notices on
    stderr, settings shown as this command's flags."""
    from .runtime import Narrator

    ctx = get_current_context()
    group = ctx.parent.command if ctx.parent is not None else None
    name = ctx.info_name

    def show(setting: str) -> str:
        return flag_for(group, name, setting) if group is not None else "--" + setting.replace("_", "-")

    return Narrator(out, err_console, show=show, help_hint="see `advbench attack --help`")


def _print_json(obj) -> None:
    import json

    from .leaderboard import jsonable

    typer.echo(json.dumps(jsonable(obj), indent=2))


CASCADE_CAPTION = "cascade: each attack ran on the samples the ones above it failed to fool; accuracy after it"
UPPER_BOUND = "≤ "  # before a worst case from weak attacks only (as in the markdown leaderboard)


def result_tables(record) -> list:
    """Rich tables for a run (runs.RunRecord): per threat model, clean / each attack (in a cascade, the
    accuracy after it) / worst case with success rate, perturbation norm, seconds and img/s; plus an
    attack x eps table for a sweep. A worst case from weak attacks only is marked as an upper bound (≤)."""
    from rich.markup import escape

    from .runtime import pct
    from .threat import format_eps

    res, info = record.result, record.info
    bound = "" if res.reportable else UPPER_BOUND
    out = []
    for t in res.threats:
        tab = Table(title=escape(f"{info['model']} on {info['dataset']} · {t.threat} · n={res.n_total} · "
                                 f"run {record.run_id}"),
                    title_justify="left", caption=CASCADE_CAPTION if t.cascade else None, caption_justify="left")
        for col, just in (("", "left"), ("accuracy", "right"), ("success rate", "right"),
                          ("mean ‖δ‖", "right"), ("seconds", "right"), ("img/s", "right")):
            tab.add_column(col, justify=just)
        tab.add_row("clean", pct(res.clean_acc), "", "", "", "")
        for k, (lab, r) in enumerate(t.attacks.items()):
            tab.add_row(escape(_row_label(lab, k, t.cascade)), pct(t.robust_acc(lab)), pct(r.success_rate),
                        "–" if r.mean_norm is None else f"{r.mean_norm:.4g}", f"{r.seconds:.2f}",
                        f"{r.images_per_s:.0f}")
        n_att = max(1, res.n_clean_correct)
        tab.add_row("worst case", bound + pct(t.worst_case_acc), pct(1 - int(t.robust_mask().sum()) / n_att), "",
                    f"{t.seconds:.2f}", "", style="bold")
        out.append(tab)
    if len(res.threats) > 1:
        tab = Table(title=escape(f"robust accuracy: attack x eps ({info['model']} on {info['dataset']}, "
                                 f"n={res.n_total})"),
                    title_justify="left", caption=CASCADE_CAPTION if res.threats[0].cascade else None,
                    caption_justify="left")
        tab.add_column("attack")
        for t in res.threats:
            tab.add_column(f"{t.threat.norm} {format_eps(t.threat.eps)}", justify="right")
        tab.add_row("clean", *[pct(res.clean_acc)] * len(res.threats))
        for k, lab in enumerate(res.attack_labels):
            tab.add_row(escape(_row_label(lab, k, res.threats[0].cascade)),
                        *[pct(t.robust_acc(lab)) for t in res.threats])
        tab.add_row("worst case", *[bound + pct(t.worst_case_acc) for t in res.threats], style="bold")
        out.append(tab)
    return out


def _row_label(label: str, k: int, cascade: bool) -> str:
    """An attack's row: in a cascade, the attacks after the first read ``+ label`` (accuracy after it too)."""
    return f"+ {label}" if cascade and k else label


def _report_run(record, out: Console) -> None:
    for t in result_tables(record):
        out.print(t)
    if not record.result.reportable:
        out.print(f"≤: the worst case is an upper bound (weak attacks only: {', '.join(record.result.attack_labels)} "
                  f"do not include AutoAttack's standard set); for a reportable robust accuracy run "
                  f"`{_reportable_command(record)}`", markup=False, highlight=False)
    out.print(f"run {record.run_id}: {record.run_dir}; leaderboard "
              f"{Path(record.run_dir).parent.parent / 'leaderboard.csv'}", markup=False, highlight=False)


# attack's options that choose the attacks or the output (True: the option takes a value)
_ATTACK_CHOICE = {"--attack": True, "-a": True, "--suite": True, "--steps": True, "--alpha": True,
                  "--restarts": True, "--loss": True, "--cascade": False, "--per-attack": False, "--json": False,
                  "--resume": True}


def _reportable_command(record) -> str:
    """The command that evaluates the run's model with `--suite standard`: this `attack` command with
    its choice of attacks replaced, or for a suite's run (`advbench run`) one built from the run."""
    import shlex

    from .threat import format_eps

    argv = (get_current_context().obj or {}).get("argv", [])
    if argv[:1] == ["attack"]:
        args = _without(argv, _ATTACK_CHOICE)
    else:
        from .sources import is_pretrained, kind

        res, info = record.result, record.info
        eps = ",".join(format_eps(t.threat.eps) for t in res.threats)
        source = info.get("model_source") or {}
        model = str(info.get("model") or "")
        named = ["--model", model] if source or kind(model) != "registry" else []
        loaded = [] if is_pretrained(model, source.get("weights")) else ["--checkpoint", str(info["checkpoint"])]
        options = [a for k, v in source.items() for a in ("--" + k.replace("_", "-"), str(v))]
        args = ["attack", *named, *loaded, *options, "--dataset", str(info["dataset"]), "--norm",
                res.threats[0].threat.norm, "--eps", eps, "-n", str(res.n_total)]
    return shlex.join(["advbench", *args, "--suite", "standard"])


def _without(argv: List[str], options) -> List[str]:
    """``argv`` without the ``options`` (name -> whether it takes a value), in both forms
    (``--opt value`` and ``--opt=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in options:
            skip = options[a]
        elif not any(a.startswith(f"{o}=") for o in options if options[o]):
            out.append(a)
    return out


@app.command("attack")
def attack_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Model name; without --checkpoint its zoo baseline is used "
                                             "(trained and cached when missing). Your own: file:PATH.py:NAME "
                                             "(runs your code) with --checkpoint; pretrained: tv:NAME / timm:NAME "
                                             "with --weights, rb:NAME (RobustBench) with --model-dir."),
    eps: str = typer.Option(..., "--eps", help="Budget in pixel units (8/255, 0.3), or a sweep: 2/255,4/255,8/255."),
    norm: str = typer.Option("linf", "--norm", help="linf or l2."),
    attack: Optional[str] = typer.Option(None, "--attack", "-a",
                                         help="Comma-separated attacks (default fgsm,bim,pgd: weak attacks, their "
                                              "worst case is an upper bound; see --suite standard)."),
    suite: Optional[str] = typer.Option(None, "--suite", help="A named attack suite instead of --attack: standard "
                                                             "(AutoAttack's standard version on our engine, as a "
                                                             "cascade: the reportable worst case), rand (apgd-ce + "
                                                             "apgd-dlr with EOT over 20 gradient samples: randomised "
                                                             "defences), quick (fgsm + "
                                                             "pgd-20) or autoattack (the reference implementation: "
                                                             "pip install 'advbench[autoattack]'); `advbench list` "
                                                             "describes each."),
    cascade: bool = typer.Option(False, "--cascade", help="Each attack only on the samples every earlier one failed "
                                                          "to fool (AutoAttack's cascade; the accuracy after each is "
                                                          "reported). The default of --suite standard."),
    per_attack: bool = typer.Option(False, "--per-attack", help="Each attack on all clean-correct samples: every "
                                                                "attack's own robust accuracy. The default of "
                                                                "--attack lists."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Steps of the iterative attacks (default per attack: "
                                                              "bim 10, pgd 10, apgd-* 100, square 5000 queries; see `advbench list`)."),
    alpha: Optional[str] = typer.Option(None, "--alpha", help="Step size of the iterative attacks, e.g. 2/255 "
                                                              "(default per attack: bim 1.25*eps/steps, pgd "
                                                              "2.5*eps/steps, apgd-* 2*eps then adaptive)."),
    restarts: Optional[int] = typer.Option(None, "--restarts", help="Random restarts of the random-start attacks "
                                                                    "(default per attack: pgd 1, apgd-* 1, square 1)."),
    loss: Optional[str] = typer.Option(None, "--loss", help="ce, margin, dlr, ... (default per attack: ce; apgd-dlr "
                                                            "dlr, apgd-t dlr-targeted, square margin)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d",
                                          help="Dataset name, npz:PATH, imagenet or imagefolder:PATH. Default: the "
                                               "checkpoint's dataset, else "
                                               "mnist-5k (MNIST digits, 1x28x28) whatever the model: "
                                               "`--model resnet18` alone evaluates MNIST; give --dataset cifar10 "
                                               "(with --data-dir/--download) for colour images."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Where torchvision datasets live; imagenet: its "
                                                                    "validation folder (SYNSET/IMAGE.JPEG)."),
    download: bool = typer.Option(False, "--download", help="Download torchvision datasets and model weights "
                                                           "(--weights, rb:NAME) if missing."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c",
                                             help="Checkpoint to evaluate: an advbench checkpoint, or a plain "
                                                  "state_dict of --model (e.g. file:net.py:Net; also nested under "
                                                  "state_dict / model / net, DataParallel's module. stripped)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Pretrained weights of a tv:NAME or timm:NAME "
                                                                  "model: DEFAULT, a torchvision weights name "
                                                                  "(IMAGENET1K_V1) or a file; their preprocessing "
                                                                  "becomes the model's Normalize layer."),
    model_dir: Optional[str] = typer.Option(None, "--model-dir", help="Where rb:NAME models (RobustBench's zoo) "
                                                                      "keep their weights, in RobustBench's layout "
                                                                      "DIR/<dataset>/<Linf|L2|corruptions>/NAME.pt "
                                                                      "(default: ./models)."),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="MEAN/STD (e.g. 0.5/0.25 or one value per "
                                                                      "channel, comma-separated) or a dataset name "
                                                                      "(cifar10, imagenet): the normalisation the "
                                                                      "network of --checkpoint / --weights expects "
                                                                      "(default: a file: model takes the [0, 1] "
                                                                      "images as they are)."),
    n_examples: str = typer.Option("1000", "--n-examples", "-n",
                                   help="Test examples (seeded subset; imagenet with robustbench installed: the "
                                        "first N of RobustBench's 5,000), or all: the whole test split."),
    image_size: Optional[int] = typer.Option(None, "--image-size",
                                             help="imagenet / imagefolder:PATH: resize to SIZE*256/224, centre-crop "
                                                  "SIZE (default: the checkpoint's input size, else 224)."),
    batch_size: int = typer.Option(256, "--batch-size"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed"),
    results_dir: str = typer.Option("results", "--results-dir"),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable summary (only) on stdout."),
    amp: Optional[str] = typer.Option(None, "--amp", help="bf16: attack forward passes under torch.autocast "
                                                          "(gradients and losses stay float32)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="NHWC memory format (faster convs on GPU)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (dynamic shapes)."),
    masking_checks: bool = typer.Option(True, "--masking-checks/--no-masking-checks",
                                        help="Gradient-masking sanity checks after the evaluation (a quick extra "
                                             "PGD/FGSM on <= 100 samples); warnings go to the terminal, "
                                             "summary.json and the leaderboard's flags."),
    resume: Optional[str] = typer.Option(None, "--resume", metavar="RUN_ID",
                                         help="Continue an interrupted run (its id, or a unique prefix) with the "
                                              "same options: its finished batches are kept, the rest is attacked."),
):
    """Accuracy under attack (default FGSM / BIM / PGD; --suite standard: AutoAttack's): clean, per attack,
    worst case; recorded in the leaderboard."""
    from .runs import RunSpec, execute_run
    from .runtime import FastPaths
    from .specs import resolve_threats

    threats = resolve_threats(eps=eps, norm=norm)
    specs, cascade = _attack_choice(suite, attack, dict(steps=steps, alpha=alpha, restarts=restarts, loss=loss),
                                    amp, cascade, per_attack)
    spec = RunSpec(model=model, checkpoint=checkpoint, dataset=dataset, threats=threats, attacks=specs, cascade=cascade,
                   n_examples=parse_n_examples(n_examples), batch_size=batch_size, device=device, seed=seed,
                   results_dir=results_dir, data_dir=data_dir, download=download, image_size=image_size,
                   fast=FastPaths(channels_last=channels_last, compile=compile),
                   flags=[f"attack-suite={suite.strip().lower()}"] if suite else [],
                   masking_checks=masking_checks, resume=resume, weights=weights, model_dir=model_dir,
                   normalize=normalize)
    out = err_console if json_out else console
    record = execute_run(spec, narrator(out))
    if not record.run_id:  # a DDP rank other than 0: rank 0 reports
        return
    if json_out:
        _print_json(record.summary())
    else:
        _report_run(record, out)


def parse_n_examples(value: str) -> Optional[int]:
    """--n-examples: a count, or all (None: the whole test split)."""
    text = str(value).strip().lower()
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise AdvbenchError(f"--n-examples must be a number of test examples or all (got {value!r})") from None


def _attack_choice(suite: Optional[str], attack: Optional[str], settings, amp: Optional[str], cascade: bool,
                   per_attack: bool):
    """(attack specs, cascade?) of `attack`: a named suite (its own settings, a cascade when the suite
    runs as one) or an attack list with the settings given once for all (per attack unless --cascade)."""
    from .runtime import parse_amp
    from .specs import attack_suite, with_overrides

    if cascade and per_attack:
        raise AdvbenchError("--cascade and --per-attack conflict: choose one (a cascade attacks only the samples "
                            "the earlier attacks failed to fool; --per-attack attacks all clean-correct samples)")
    if suite is None:
        specs = with_overrides(attack or "fgsm,bim,pgd", amp=parse_amp(amp), **settings)
        return specs, cascade
    clash = [f"--{k}" for k, v in (("attack", attack), *settings.items()) if v is not None]
    if clash:
        raise AdvbenchError(f"--suite {suite} and {', '.join(clash)} conflict: a suite fixes its attacks and "
                            f"their settings (drop --suite to choose attacks yourself)")
    chosen = attack_suite(suite)
    return chosen.specs(amp=parse_amp(amp)), cascade or (chosen.cascade and not per_attack)


@app.command("leaderboard")
def leaderboard_cmd(
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Only this dataset."),
    norm: Optional[str] = typer.Option(None, "--norm", help="Only this norm (linf, l2)."),
    eps: Optional[str] = typer.Option(None, "--eps", help="Only this eps (e.g. 8/255)."),
    fmt: str = typer.Option("md", "--format", "-f", help="md, csv, json or html (one self-contained page: "
                                                         "sortable tables and robustness curves)."),
    out: Optional[str] = typer.Option(None, "--out", help="Write it to this file (atomically) instead of stdout."),
    results_dir: str = typer.Option("results", "--results-dir"),
):
    """Print the leaderboard (results/leaderboard.csv), optionally filtered."""
    from . import leaderboard as lb
    from .fileio import atomic_write_text, check_not_directory
    from .threat import parse_eps

    fmt = fmt.strip().lower()
    renderers = {"md": lb.render_markdown, "csv": lb.render_csv, "json": lb.render_json, "html": lb.render_html}
    if fmt not in renderers:
        raise AdvbenchError(f"invalid --format {fmt!r}: expected md, csv, json or html")
    if out is not None:
        check_not_directory(out, "--out")
    eps_v = parse_eps(eps) if eps is not None else None
    full = lb.read(results_dir)
    if dataset and not (full["dataset"].str.lower() == dataset.strip().lower()).any():
        from .data import DATASETS

        DATASETS.canonical(dataset)  # a typo is an unknown dataset (with a suggestion), not "no results"
    df = lb.filter_rows(full, dataset=dataset, norm=norm, eps=eps_v)
    if df.empty:
        what = "matching these filters " if (dataset or norm or eps) else ""
        typer.echo(f"no results yet {what}in {lb.csv_path(results_dir)} (run `advbench attack` first)", err=True)
        if out is None:
            if fmt == "json":
                typer.echo("[]")
            return
    text = renderers[fmt](df).rstrip("\n")
    if out is None:
        typer.echo(text)
        return
    try:
        atomic_write_text(out, text + "\n")
    except OSError as exc:
        raise AdvbenchError(f"cannot write {out}: {exc.strerror or exc}") from None
    console.print(f"wrote {out}", markup=False, highlight=False)


@app.command("run")
def run_cmd(
    suite: str = typer.Argument(..., help="Suite file (YAML): models x threat models x attacks."),
    results_dir: Optional[str] = typer.Option(None, "--results-dir", help="Overrides the suite's results_dir."),
    device: Optional[str] = typer.Option(None, "--device", help="Overrides the suite's device."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the suite and list its runs; run nothing."),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable summary (only) on stdout."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted `run` of this suite: models whose "
                                                       "run is complete are skipped, an unfinished run resumes."),
):
    """Run a benchmark suite (YAML); every model's results go to the same leaderboard."""
    import json
    from dataclasses import replace

    from .runfolder import latest_suite_run, suite_key
    from .runs import execute_run
    from .runtime import env_rank
    from .suite import load_suite

    s = load_suite(suite)
    runs = s.runs(results_dir=results_dir, device=device)
    out = err_console if json_out else console
    if env_rank() != 0:  # under torchrun only rank 0 talks
        out, json_out = Console(quiet=True), False
    out.print(f"suite {s.name}: {len(runs)} model(s) x {len(s.threats)} threat model(s) x {len(s.attacks)} "
              f"attack(s)", markup=False, highlight=False)
    if dry_run:
        for r in runs:
            out.print(f"  {r.model or ''} {r.checkpoint or '(zoo)'} on {r.dataset or 'default dataset'}: "
                      f"{', '.join(a.label for a in r.attacks)} x {', '.join(str(t) for t in r.threats)}",
                      markup=False, highlight=False)
        if json_out:
            _print_json({"suite": s.name, "runs": len(runs), "dry_run": True})
        return
    key = suite_key(s.path)
    summaries = []
    for i, r in enumerate(runs):
        r = replace(r, suite_entry=f"{key}:{i}")  # stored in the run's config.yaml: how --resume finds it
        previous = latest_suite_run(r.results_dir, r.suite_entry) if resume else None
        if previous is not None and previous.is_complete():
            out.print(f"model {i + 1} of {len(runs)}: run {previous.run_id} is complete (skipped)", markup=False,
                      highlight=False)
            summaries.append(json.loads((previous.path / "summary.json").read_text(encoding="utf-8")))
            continue
        record = execute_run(replace(r, resume=previous.run_id if previous is not None else None), narrator(out))
        if not record.run_id:  # a DDP rank other than 0: rank 0 reports
            continue
        summaries.append(record.summary())
        if not json_out:
            _report_run(record, out)
    if json_out:
        _print_json({"suite": s.name, "runs": summaries})


@app.command("report")
def report_cmd(
    run_id: str = typer.Argument(..., help="Run id (a unique prefix is enough), see results/runs/."),
    results_dir: str = typer.Option("results", "--results-dir"),
    training_csv: Optional[str] = typer.Option(None, "--training-csv",
                                               help="Training metrics CSV for the training curves (default: the "
                                                    "checkpoint's .metrics.csv when present)."),
    robustbench_json: Optional[str] = typer.Option(None, "--robustbench-json",
                                                   help="Also write the RobustBench-style JSON here (it is always "
                                                        "written as robustbench.json in the run folder)."),
    n_images: int = typer.Option(8, "--n-images", help="Samples in the example grid (the strongest attack is re-run "
                                                       "on them)."),
    device: str = typer.Option("cpu", "--device", help="Where to re-run the attack for the examples."),
):
    """Write report.md and report.html (one self-contained page), PNG plots (robustness curve, adversarial
    examples, training curves) and robustbench.json into the run folder."""
    from .report import write_report
    from .runtime import check_positive, resolve_device

    check_positive("n_images", n_images)
    out = write_report(run_id, results_dir, training_csv=training_csv, robustbench_json=robustbench_json,
                       n_images=n_images, device=str(resolve_device(device)))
    for note in out["notes"]:
        err_console.print(f"[yellow]warning: {note}[/yellow]", highlight=False)
    for f in out["files"]:
        console.print(f"wrote {f}", markup=False, highlight=False)


def main(argv: Optional[List[str]] = None) -> None:
    try:
        app(args=argv, prog_name="advbench")
    finally:
        if "robustbench_lite.distributed" in sys.modules:
            sys.modules["robustbench_lite.distributed"].shutdown()


if __name__ == "__main__":  # pragma: no cover
    main()
