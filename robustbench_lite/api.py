"""The Python API, as RobustBench users call it: ``robustbench_lite.benchmark``.

    import robustbench_lite
    record = robustbench_lite.benchmark(model, dataset="cifar10", eps="8/255", norm="linf", suite="standard",
                                        n_examples=1000, device="cuda")
    record.clean_acc, record.robust_acc, record.worst_case_acc

One evaluation run (runs.execute_run: the same checks, evaluation, gradient-masking checks and
records as `advbench attack`) of a model built in Python (a torch.nn.Module taking images in
[0, 1], normalisation inside), a zoo / registry model name, or a checkpoint file. Recorded in a
run folder and the leaderboard only when ``results_dir`` is given; silent unless ``verbose``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .errors import SettingError
from .runs import RunRecord, RunSpec, execute_run
from .runtime import SILENT, Narrator
from .specs import DEFAULT_ATTACKS, attack_suite, parse_attack_specs, resolve_threats

Eps = Union[str, float, Sequence[Union[str, float]]]


def benchmark(model: Union[torch.nn.Module, str, None] = None, dataset: Optional[str] = None, *, eps: Eps,
              norm: str = "linf", suite: Optional[str] = "standard", attacks=None, n_examples: Optional[int] = 1000,
              batch_size: int = 256, device: str = "auto", seed: int = 0, data_dir: Optional[str] = None,
              download: bool = False, image_size: Optional[int] = None, checkpoint: Optional[str] = None,
              model_name: Optional[str] = None, masking_checks: bool = True, results_dir: Optional[str] = None,
              verbose: bool = False) -> RunRecord:
    """Evaluate ``model`` on ``dataset``'s test split under ``norm`` / ``eps`` (one eps or a list) and
    return the run's record: ``clean_acc``, ``robust_acc`` (attack label -> robust accuracy at the first
    eps), ``worst_case_acc``, ``evaluation`` (the reportable suite the attacks cover, or weak: an
    upper bound) and ``result`` (the whole EvalResult: every eps, per-sample outcomes).

    ``model``: a torch.nn.Module (inputs in [0, 1], NCHW; ``model_name`` names it in the leaderboard,
    default its class name), a model name (the zoo baseline; see `advbench list`), or None with
    ``checkpoint``. ``dataset``: a dataset name (mnist-5k, cifar10, imagenet, imagefolder:PATH,
    npz:PATH, ...; default: the checkpoint's, else mnist-5k). ``suite``: a named attack suite
    (standard: AutoAttack's, as a cascade); ``attacks``: an attack list instead (``suite=None``),
    e.g. ``["fgsm", "pgd"]``, default fgsm, bim, pgd. ``n_examples``: a seeded subset of the test
    split (None: all of it). ``results_dir``: record the run there (run folder + leaderboard rows);
    None records nothing."""
    if isinstance(model, torch.nn.Module):
        network, name = model, model_name
    elif model is None or isinstance(model, str):
        if model_name is not None:
            raise SettingError("{model_name} names a model built in Python; a named model keeps its name",
                               "model_name")
        network, name = None, model
    else:
        raise SettingError(f"{{model}} must be a torch.nn.Module or a model name (got {type(model).__name__})",
                           "model")
    if suite is not None and attacks is not None:
        raise SettingError("{suite} and {attacks} conflict: a suite fixes its attacks (pass suite=None to choose "
                           "attacks yourself)", "suite", "attacks")
    if suite is not None:
        chosen = attack_suite(suite)
        specs, cascade = chosen.specs(), chosen.cascade
    else:
        specs, cascade = parse_attack_specs(attacks if attacks is not None else DEFAULT_ATTACKS), False
    spec = RunSpec(model=name, checkpoint=checkpoint, dataset=dataset, threats=resolve_threats(eps=eps, norm=norm),
                   attacks=specs, cascade=cascade, n_examples=n_examples, batch_size=batch_size, device=device,
                   seed=seed, results_dir=results_dir, data_dir=data_dir, download=download, image_size=image_size,
                   source="robustbench_lite.benchmark", flags=(f"attack-suite={suite}",) if suite else (),
                   masking_checks=masking_checks, network=network)
    return execute_run(spec, Narrator() if verbose else SILENT)
