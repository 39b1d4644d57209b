"""The evaluator: clean accuracy, per-attack robust accuracy and the worst case over attacks.

    result = evaluate(model, x, y, ["fgsm", "bim", "pgd"], ThreatModel("linf", 8/255))
    result.clean_acc, result.threats[0].robust_acc("pgd"), result.threats[0].worst_case_acc

What is measured, per threat model (one, or an eps sweep):
- clean accuracy (computed once; it does not depend on the threat model);
- per attack, its robust accuracy, in one of two modes:
  per-attack (default): the attack runs on every clean-correct sample, so each number is the one a
    paper would report for that attack alone;
  cascade (``cascade=True``; AutoAttack's run_standard_evaluation): attack k runs only on the
    samples every earlier attack failed to fool, and its number is the robust accuracy after
    attacks 1..k ("robust accuracy after APGD-T" in AutoAttack's log); far cheaper when the first
    attack fools most samples;
  plus its success rate (fooled / attacked), the mean and max perturbation norm of its successful
  adversarial examples (in the threat norm), seconds and images/s (attack time only, on the
  samples it attacked);
- the worst case over all attacks: a sample is robust only if it survives every attack it met.
  The two modes give the same worst case, because attacks are deterministic per sample
  (randomness is keyed by sample id) and do not depend on each other: a sample fooled by attack j
  is fooled whether or not later attacks run on it. It is a reportable robust accuracy only when
  the attacks cover AutoAttack's standard set (EvalResult.evaluation, specs.evaluation_kind);
  otherwise it is an upper bound from weak attacks.
- per-sample outcomes: sample id, label, clean prediction, and per attack the adversarial
  prediction, whether it fooled the model and the perturbation norm (empty where the attack did
  not run on the sample).

Safety: every adversarial batch is checked with ThreatModel.violations; an attack that returns a
sample outside the eps-ball or outside [0, 1] makes the evaluation fail with an AdvbenchError (no
result is recorded). A model whose outputs are NaN or infinite is an AdvbenchError too.

Attacks are called with ``sample_ids`` (dataset indices), so results do not depend on batching or
on how the data is sharded: each DDP rank can evaluate its shard, and ``EvalResult.merge`` (per
sample data, concatenated) combines the shards.

Interrupted evaluations: with a ``Journal`` every finished (threat, attack, batch) is saved as it
finishes, one small file each, and an evaluation given the same journal (same data, batch size and
attacks) loads those batches instead of attacking them again: the result is the uninterrupted one.
In a cascade the samples of attack k follow from the batches of attacks 1..k-1, saved ones
included, so a resumed cascade attacks exactly the samples an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch

from attacks.engine import attack_mode, check_images

from .data import StreamedImages, batches_of
from .errors import AdvbenchError, SettingError
from .fileio import atomic_write
from .runtime import check_positive, resolve_device
from .specs import (CASCADE, DEFAULT_ATTACKS, WEAK, build_attacks, evaluation_kind, mode_name, parse_attack_specs,
                    resolve_threats)
from .threat import ThreatModel, format_eps

ProgressFn = Callable[[ThreatModel, str, int, int], None]  # (threat, attack label, done, total)


# --- results ---------------------------------------------------------------------------------
@dataclass
class AttackResult:
    """One attack under one threat model. Per-sample tensors are aligned with EvalResult.sample_ids;
    samples it did not attack (clean-misclassified ones; in a cascade also those an earlier attack
    fooled) have adv_pred -1, fooled False, dist nan."""

    label: str
    name: str
    config: Dict[str, Any]
    adv_pred: torch.Tensor
    fooled: torch.Tensor
    dist: torch.Tensor
    seconds: float
    stats: Dict[str, int] = field(default_factory=dict)

    @property
    def attacked(self) -> torch.Tensor:
        """The samples this attack ran on."""
        return self.adv_pred >= 0

    @property
    def n_attacked(self) -> int:
        return int(self.attacked.sum())

    @property
    def n_fooled(self) -> int:
        return int(self.fooled.sum())

    @property
    def success_rate(self) -> float:
        """Fooled / attacked (the clean-correct samples; in a cascade the survivors of the earlier attacks)."""
        return self.n_fooled / self.n_attacked if self.n_attacked else 0.0

    @property
    def mean_norm(self) -> Optional[float]:
        """Mean perturbation norm of the successful adversarial examples (None if none)."""
        return float(self.dist[self.fooled].mean()) if self.n_fooled else None

    @property
    def max_norm(self) -> Optional[float]:
        return float(self.dist[self.fooled].max()) if self.n_fooled else None

    @property
    def images_per_s(self) -> float:
        return self.n_attacked / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ThreatResult:
    """The attacks (in the order they ran) under one threat model; ``cascade``: each ran on the
    samples every earlier one failed to fool."""

    threat: ThreatModel
    attacks: Dict[str, AttackResult]
    clean_correct: torch.Tensor
    cascade: bool = False

    @property
    def n_total(self) -> int:
        return int(self.clean_correct.numel())

    def robust_mask(self, label: Optional[str] = None) -> torch.Tensor:
        """Samples that are clean-correct and survive attack ``label`` (in a cascade: the attacks up to
        and including ``label``, as AutoAttack reports "robust accuracy after" each), or every attack
        (None: the worst case)."""
        ok = self.clean_correct.clone()
        for lab, res in self.attacks.items():
            if label is None or self.cascade or lab == label:
                ok &= ~res.fooled
            if lab == label:
                break
        return ok

    def robust_acc(self, label: str) -> float:
        if label not in self.attacks:
            raise KeyError(label)
        return int(self.robust_mask(label).sum()) / max(1, self.n_total)

    @property
    def worst_case_acc(self) -> float:
        return int(self.robust_mask().sum()) / max(1, self.n_total)

    @property
    def seconds(self) -> float:
        return sum(r.seconds for r in self.attacks.values())

    def summary(self) -> Dict[str, Any]:
        return {
            "norm": self.threat.norm, "eps": self.threat.eps, "eps_label": format_eps(self.threat.eps),
            "attacks": {lab: {
                "attack": r.name, "robust_acc": self.robust_acc(lab), "success_rate": r.success_rate,
                "n_attacked": r.n_attacked, "n_fooled": r.n_fooled, "mean_norm": r.mean_norm,
                "max_norm": r.max_norm, "seconds": r.seconds, "images_per_s": r.images_per_s,
                "config": r.config, "stats": r.stats,
            } for lab, r in self.attacks.items()},
            "worst_case": {"robust_acc": self.worst_case_acc, "n_robust": int(self.robust_mask().sum()),
                           "seconds": self.seconds},
        }


@dataclass
class EvalResult:
    sample_ids: torch.Tensor
    labels: torch.Tensor
    clean_pred: torch.Tensor
    threats: List[ThreatResult]
    seed: int = 0
    device: str = "cpu"

    @property
    def n_total(self) -> int:
        return int(self.labels.numel())

    @property
    def clean_correct(self) -> torch.Tensor:
        return self.clean_pred == self.labels

    @property
    def n_clean_correct(self) -> int:
        return int(self.clean_correct.sum())

    @property
    def clean_acc(self) -> float:
        return self.n_clean_correct / max(1, self.n_total)

    @property
    def attack_labels(self) -> List[str]:
        return list(self.threats[0].attacks) if self.threats else []

    @property
    def mode(self) -> str:
        """How the attacks ran: specs.CASCADE or specs.PER_ATTACK."""
        return mode_name(bool(self.threats) and self.threats[0].cascade)

    @property
    def evaluation(self) -> str:
        """What the worst case is (specs.evaluation_kind): the reportable suite the attacks cover
        (standard, autoattack), or WEAK: an upper bound from weak attacks only."""
        return evaluation_kind(r.config for r in self.threats[0].attacks.values()) if self.threats else WEAK

    @property
    def reportable(self) -> bool:
        return self.evaluation != WEAK

    def threat(self, threat: ThreatModel) -> ThreatResult:
        for t in self.threats:
            if t.threat == threat:
                return t
        raise KeyError(str(threat))

    def cumulative(self) -> "EvalResult":
        """The result as checks that compare attacks sample by sample read it (masking.py): in a
        cascade, attack k's ``fooled`` widened to every sample attacks 1..k fooled (what its robust
        accuracy counts; its other per-sample data stay its own); a per-attack result as it is."""
        if self.mode != CASCADE:
            return self
        threats = [ThreatResult(t.threat, {lab: replace(r, fooled=t.clean_correct & ~t.robust_mask(lab))
                                           for lab, r in t.attacks.items()}, t.clean_correct)
                   for t in self.threats]
        return replace(self, threats=threats)

    def summary(self) -> Dict[str, Any]:
        """JSON-able summary (no per-sample data)."""
        return {"n_examples": self.n_total, "n_clean_correct": self.n_clean_correct, "clean_acc": self.clean_acc,
                "seed": self.seed, "device": self.device, "mode": self.mode, "evaluation": self.evaluation,
                "worst_case_kind": "reportable" if self.reportable else "upper-bound",
                "threats": [t.summary() for t in self.threats]}

    def outcome_rows(self) -> List[Dict[str, Any]]:
        """Per-sample outcomes, one row per (sample, threat model); an attack's cells are empty for the
        samples it did not run on (clean-misclassified ones; in a cascade also those an earlier
        attack fooled)."""
        rows: List[Dict[str, Any]] = []
        ids, labels, clean = self.sample_ids.tolist(), self.labels.tolist(), self.clean_pred.tolist()
        for t in self.threats:
            cols = {lab: (r.attacked.tolist(), r.adv_pred.tolist(), r.fooled.tolist(), r.dist.tolist())
                    for lab, r in t.attacks.items()}
            robust = t.robust_mask().tolist()
            for i in range(self.n_total):
                row: Dict[str, Any] = {"sample_id": ids[i], "label": labels[i], "clean_pred": clean[i],
                                       "norm": t.threat.norm, "eps": t.threat.eps}
                for lab, (attacked, pred, fooled, dist) in cols.items():
                    row[f"{lab}_pred"] = pred[i] if attacked[i] else ""
                    row[f"{lab}_fooled"] = int(fooled[i]) if attacked[i] else ""
                    row[f"{lab}_dist"] = f"{dist[i]:.6g}" if attacked[i] else ""
                row["worst_case_robust"] = int(robust[i])
                rows.append(row)
        return rows

    @classmethod
    def merge(cls, parts: Sequence["EvalResult"]) -> "EvalResult":
        """Combine results of disjoint shards (e.g. DDP ranks): samples sorted by id; attack
        seconds are the slowest shard's (shards run in parallel)."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to merge")
        if len(parts) == 1:
            return parts[0]
        ids = torch.cat([p.sample_ids for p in parts])
        order = ids.argsort()
        if len(torch.unique(ids)) != len(ids):
            raise ValueError("shards overlap: a sample id appears twice")

        def cat(ts):
            return torch.cat(list(ts))[order]

        threats = []
        for k, t0 in enumerate(parts[0].threats):
            attacks_out = {}
            for lab, r0 in t0.attacks.items():
                rs = [p.threats[k].attacks[lab] for p in parts]
                stats: Dict[str, int] = {}
                for r in rs:
                    for s, v in r.stats.items():
                        stats[s] = stats.get(s, 0) + v
                attacks_out[lab] = AttackResult(lab, r0.name, r0.config, cat(r.adv_pred for r in rs),
                                                cat(r.fooled for r in rs), cat(r.dist for r in rs),
                                                max(r.seconds for r in rs), stats)
            threats.append(ThreatResult(t0.threat, attacks_out, cat(p.threats[k].clean_correct for p in parts),
                                        t0.cascade))
        return cls(ids[order], cat(p.labels for p in parts), cat(p.clean_pred for p in parts), threats,
                   parts[0].seed, parts[0].device)


# --- the journal of an evaluation ---------------------------------------------------------------
@dataclass
class BatchResult:
    """One attacked batch: per-sample results (tensors aligned with ``sample_ids``; on the device
    where they were computed, on the CPU once saved), the attack time and the attack's counters."""

    sample_ids: torch.Tensor
    adv_pred: torch.Tensor
    fooled: torch.Tensor
    dist: torch.Tensor
    seconds: float
    stats: Dict[str, int] = field(default_factory=dict)


class Journal:
    """The finished (threat, attack, batch) results of an evaluation, one file per batch in
    ``folder``, each written atomically (a kill at any point leaves whole files only) and read back
    with torch.load(weights_only=True). A batch is named by its threat model, attack label and
    first position in the list of samples that attack attacks; ``total`` is the number of batches
    of the whole evaluation once evaluate() knows it, ``exact`` False when it is an upper bound (a
    cascade's later attacks run on the survivors of the earlier ones, not known ahead)."""

    SUFFIX = ".pt"

    def __init__(self, folder: Union[str, Path]):
        self.folder = Path(folder)
        self.total: Optional[int] = None
        self.exact = True

    def path(self, threat: ThreatModel, label: str, start: int) -> Path:
        key = hashlib.sha256(f"{threat.norm}:{threat.eps!r}:{label}".encode()).hexdigest()[:12]
        return self.folder / f"{threat.norm}-{format_eps(threat.eps).replace('/', '_')}-{key}-{start:08d}{self.SUFFIX}"

    def done(self, threat: ThreatModel, label: str, start: int) -> bool:
        return self.path(threat, label, start).is_file()

    def record(self, threat: ThreatModel, label: str, start: int, batch: BatchResult) -> None:
        payload = {"sample_ids": batch.sample_ids.cpu(), "adv_pred": batch.adv_pred.cpu(), "fooled": batch.fooled.cpu(),
                   "dist": batch.dist.cpu(), "seconds": float(batch.seconds), "stats": dict(batch.stats)}
        try:
            atomic_write(self.path(threat, label, start), lambda f: torch.save(payload, f))
        except OSError as exc:
            raise AdvbenchError(f"cannot save a finished batch in {self.folder}: {exc.strerror or exc}") from None

    def load(self, threat: ThreatModel, label: str, start: int) -> BatchResult:
        path = self.path(threat, label, start)
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            return BatchResult(d["sample_ids"], d["adv_pred"], d["fooled"], d["dist"], float(d["seconds"]),
                               {str(k): int(v) for k, v in d["stats"].items()})
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem
            raise AdvbenchError(f"saved batch {path} is unreadable ({type(exc).__name__}); delete it to attack "
                                f"that batch again") from None

    def count(self) -> int:
        """Batches saved so far."""
        return len(list(self.folder.glob(f"*{self.SUFFIX}"))) if self.folder.is_dir() else 0


@dataclass
class _BatchProgress:
    """The attack's per-step hook during one batch: reports the samples done before the batch plus
    the batch's fraction done, so that bars move per step rather than per batch."""

    report: ProgressFn
    threat: ThreatModel
    label: str
    before: int
    size: int
    total: int

    def __call__(self, fraction: float) -> None:
        self.report(self.threat, self.label, self.before + self.size * fraction, self.total)


# --- evaluation ------------------------------------------------------------------------------
def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _check_finite(logits: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(logits).all(dim=1)
    if bool(bad.any()):
        kind = "NaN" if bool(torch.isnan(logits).any()) else "inf"
        raise AdvbenchError(f"model outputs {kind} on {int(bad.sum())} of {len(bad)} {what}; "
                            f"the checkpoint is broken or diverged, nothing was recorded")


@torch.no_grad()
def predict(model, x: Union[torch.Tensor, StreamedImages], batch_size: int = 500, what: Optional[str] = None,
            device: Optional[torch.device] = None) -> torch.Tensor:
    """The model's predictions (argmax of float32 logits) for x (a tensor, or images streamed from
    files), in batches, in eval mode with frozen parameters (attack_mode: the model's modes are
    restored after, also on error), on ``device`` (default: where x is). ``what`` names the inputs for
    the check that the logits are finite (an AdvbenchError otherwise); None skips the check. The one
    prediction loop of the project."""
    preds = []
    with attack_mode(model, "eval"):
        chunks = [slice(i, i + batch_size) for i in range(0, x.shape[0], batch_size)]
        for xb in batches_of(x, chunks, device):
            logits = model(xb).float()
            if what is not None:
                _check_finite(logits, what)
            preds.append(logits.argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=device or x.device)


def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
             device: Optional[torch.device] = None) -> torch.Tensor:
    """How many of (x, y) the model classifies correctly: a 0-d int64 tensor on the prediction device
    (no host sync; ``int(...)`` or ``.item()`` to read it)."""
    pred = predict(model, x, batch_size, device=device)
    return (pred == y.to(pred.device)).sum()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_inputs(x: Union[torch.Tensor, StreamedImages], y: torch.Tensor, sample_ids: Optional[torch.Tensor]) -> None:
    if isinstance(x, StreamedImages):  # pixels in [0, 1] by construction; the counts are all there is to check
        if y.reshape(-1).numel() != len(x):
            raise AdvbenchError(f"{y.numel()} labels for {len(x)} images")
        if sample_ids is not None and torch.as_tensor(sample_ids).reshape(-1).numel() != len(x):
            raise AdvbenchError(f"{torch.as_tensor(sample_ids).numel()} sample ids for {len(x)} images")
        return
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise AdvbenchError("images must be a float tensor in [0, 1]")
    if x.dim() < 2:
        raise AdvbenchError(f"images must be batched (N, C, H, W); got shape {tuple(x.shape)}")
    if y.reshape(-1).numel() != x.shape[0]:
        raise AdvbenchError(f"{y.numel()} labels for {x.shape[0]} images")
    if sample_ids is not None and torch.as_tensor(sample_ids).reshape(-1).numel() != x.shape[0]:
        raise AdvbenchError(f"{torch.as_tensor(sample_ids).numel()} sample ids for {x.shape[0]} images")
    check_images(x)  # the attacks' own check (every attack call runs it too)


def evaluate(model, x: Union[torch.Tensor, StreamedImages], y: torch.Tensor,
             attacks: Union[str, Iterable[Any], None] = DEFAULT_ATTACKS,
             threats: Union[ThreatModel, Sequence[ThreatModel], None] = None, *,
             eps: Union[str, float, Sequence[Union[str, float]], None] = None, norm: str = "linf",
             batch_size: int = 256, device: Union[str, torch.device, None] = None, seed: int = 0,
             sample_ids: Optional[torch.Tensor] = None, cascade: bool = False,
             on_progress: Optional[ProgressFn] = None, journal: Optional[Journal] = None) -> EvalResult:
    """Evaluate ``model`` on (x, y) under every attack and threat model; see the module docstring.

    ``x``: a float tensor in [0, 1] (moved to the device whole), or a data.StreamedImages (an image
    folder's images, loaded batch by batch by DataLoader workers: the clean pass streams them all,
    each attack only the batches it attacks and the journal does not hold).

    ``attacks``: names / specs (see parse_attack_specs). ``threats``: a ThreatModel or a list, or
    ``eps`` (+ ``norm``) for a sweep. ``sample_ids``: dataset indices of the samples; they key the
    attacks' randomness. The default 0..N-1 restarts at 0 on every call: when you evaluate a dataset
    in pieces, pass the dataset indices, or every piece gets the same random starts. ``device``:
    where to run (default: the model's). ``cascade``: each attack runs only on the samples every
    earlier attack failed to fool, and its robust accuracy is the one after attacks 1..k (False:
    every attack on every clean-correct sample).
    ``on_progress(threat, label, done, total)`` is called as the attacks advance (``done`` in
    samples, fractional within a batch). ``journal``: save each finished batch there, and load
    the batches it already holds instead of attacking them (None: everything in memory)."""
    check_positive("batch_size", batch_size)
    if not isinstance(cascade, bool):
        raise SettingError(f"{{cascade}} must be True or False (got {cascade!r})", "cascade")
    specs = parse_attack_specs(attacks)
    threat_list = resolve_threats(threats, eps=eps, norm=norm)
    built = build_attacks(specs, threat_list, seed)
    y = torch.as_tensor(y)
    check_inputs(x, y, sample_ids)
    dev = _model_device(model) if device is None else device if isinstance(device, torch.device) \
        else resolve_device(device)
    model.to(dev)
    if not isinstance(x, StreamedImages):
        x = x.detach().to(dev)
    y = y.reshape(-1).long().to(dev)
    ids = (torch.arange(x.shape[0]) if sample_ids is None
           else torch.as_tensor(sample_ids).reshape(-1).long()).to(dev)

    clean_pred = predict(model, x, batch_size, "clean inputs", device=dev)
    correct = clean_pred == y
    attacked = _Attacked(model, x, y, ids, correct, batch_size, journal, on_progress, cascade)
    if journal is not None:
        journal.total = len(threat_list) * len(specs) * attacked.batches(attacked.todo)
        journal.exact = not cascade  # a cascade's later attacks may need fewer batches
    threat_results = [attacked.threat(t, [(s, built[(t, s.label)]) for s in specs]) for t in threat_list]
    return EvalResult(ids.cpu(), y.cpu(), clean_pred.cpu(), threat_results, seed, str(dev))


@dataclass
class _Attacked:
    """The clean-correct samples of an evaluation (``correct``; ``todo``: their positions in x),
    attacked batch by batch by one attack after the other (as a ``cascade``: each on the survivors
    of the earlier ones); batches come from the journal when it holds them. ``x``: on the device, or
    streamed (data.batches_of)."""

    model: Any
    x: Union[torch.Tensor, StreamedImages]
    y: torch.Tensor
    ids: torch.Tensor
    correct: torch.Tensor
    batch_size: int
    journal: Optional[Journal]
    on_progress: Optional[ProgressFn]
    cascade: bool = False

    def __post_init__(self):
        self.todo = self.correct.nonzero().reshape(-1)

    def batches(self, todo: torch.Tensor) -> int:
        return -(-int(todo.numel()) // self.batch_size)

    def threat(self, threat: ThreatModel, pairs) -> ThreatResult:
        """Every (spec, attack) of ``pairs``, in order, under ``threat``: on every clean-correct sample,
        or as a cascade, each attack on the samples that every earlier one failed to fool. Which
        samples those are follows from the earlier attacks' batches (saved ones included), so a
        resumed cascade attacks the same samples as an uninterrupted one."""
        todo, results = self.todo, {}
        for k, (spec, atk) in enumerate(pairs):
            results[spec.label] = res = self.run(atk, spec, threat, todo)
            if self.cascade:
                survivors = todo[~res.fooled.to(todo.device)[todo]]
                if self.journal is not None:  # the later attacks of this threat need fewer batches
                    self.journal.total -= (len(pairs) - 1 - k) * (self.batches(todo) - self.batches(survivors))
                todo = survivors
        return ThreatResult(threat, results, self.correct.cpu(), self.cascade)

    def run(self, atk, spec, threat: ThreatModel, todo: torch.Tensor) -> AttackResult:
        """Attack the samples at positions ``todo`` batch by batch with ``atk`` (the attack of ``spec``
        under ``threat``); per-sample results for all N samples (the others unattacked)."""
        n, dev = self.x.shape[0], self.y.device
        adv_pred = torch.full((n,), -1, dtype=torch.long, device=dev)
        fooled = torch.zeros(n, dtype=torch.bool, device=dev)
        dist = torch.full((n,), math.nan, dtype=torch.float32, device=dev)
        seconds, stats = 0.0, {}
        self._progress(threat, spec.label, 0, todo)
        starts = range(0, int(todo.numel()), self.batch_size)
        saved = {s for s in starts if self.journal is not None and self.journal.done(threat, spec.label, s)}
        # the images of the batches to attack, in order (streamed ones load while the previous batch is attacked)
        images = batches_of(self.x, [todo[s:s + self.batch_size] for s in starts if s not in saved], dev)
        for start in starts:
            sel = todo[start:start + self.batch_size]
            batch = self._batch(atk, spec.label, threat, start, sel, todo, None if start in saved else images)
            seconds += batch.seconds
            for k, v in batch.stats.items():
                stats[k] = stats.get(k, 0) + v
            adv_pred[sel], fooled[sel], dist[sel] = batch.adv_pred.to(dev), batch.fooled.to(dev), batch.dist.to(dev)
            self._progress(threat, spec.label, min(start + self.batch_size, int(todo.numel())), todo)
        atk.on_step = None
        return AttackResult(spec.label, spec.name, atk.config(), adv_pred.cpu(), fooled.cpu(), dist.cpu(), seconds,
                            stats)

    def _batch(self, atk, label: str, threat: ThreatModel, start: int, sel: torch.Tensor,
               todo: torch.Tensor, images) -> BatchResult:
        """The batch at ``start`` of ``todo``: loaded from the journal when saved there (``images``
        None), else attacked on the next of ``images`` (and saved)."""
        journal = self.journal
        if images is None:
            batch = journal.load(threat, label, start)
            _check_saved_batch(batch, self.ids[sel], journal.path(threat, label, start))
            return batch
        if self.on_progress is not None:
            atk.on_step = _BatchProgress(self.on_progress, threat, label, start, len(sel), int(todo.numel()))
        batch = _attack_batch(self.model, atk, label, threat, (next(images), self.y[sel], self.ids[sel]),
                              self.batch_size)
        if journal is not None:
            journal.record(threat, label, start, batch)
        return batch

    def _progress(self, threat: ThreatModel, label: str, done: int, todo: torch.Tensor) -> None:
        if self.on_progress is not None:
            self.on_progress(threat, label, done, int(todo.numel()))


def _attack_batch(model, atk, label: str, threat: ThreatModel, batch, predict_batch_size: int) -> BatchResult:
    """Attack one batch ``(x, y, sample ids)``, check the adversarial examples against the threat
    model and take their float32 predictions (adversarial_predictions)."""
    xb, yb, ib = batch
    _sync(xb.device)
    t0 = time.perf_counter()
    xa = atk(model, xb, yb, sample_ids=ib)
    _sync(xb.device)
    seconds = time.perf_counter() - t0
    stats = {k: int(v) for k, v in (getattr(atk, "last_stats", None) or {}).items()}
    if xa.shape != xb.shape:
        raise AdvbenchError(f"attack {label!r} returned shape {tuple(xa.shape)} for inputs "
                            f"{tuple(xb.shape)}; refusing to record the result")
    _verify(threat, label, xa, xb)
    pred = adversarial_predictions(model, atk, xa, predict_batch_size, label)
    return BatchResult(ib, pred, pred != yb, threat.distance(xa, xb).float(), seconds, stats)


def adversarial_predictions(model, atk, x_adv: torch.Tensor, batch_size: int, label: str) -> torch.Tensor:
    """The float32 predictions of ``x_adv``, the adversarial examples ``atk`` just returned: the
    attack's own verdicts when it computed them in float32 on exactly these points
    (attacks.Attack.verdicts: no second forward of the same points), else ``predict`` (an attack
    under amp, an attack plugin without verdicts, non-finite logits: the check of predict)."""
    verdicts = getattr(atk, "verdicts", None)
    pred = verdicts(x_adv) if callable(verdicts) else None
    if pred is None:
        return predict(model, x_adv, batch_size, f"adversarial examples of {label!r}")
    return pred


def _check_saved_batch(batch: BatchResult, ids: torch.Tensor, path: Path) -> None:
    """A saved batch must hold exactly the samples this evaluation would attack in it."""
    if not torch.equal(batch.sample_ids.cpu(), ids.cpu()):
        raise AdvbenchError(f"saved batch {path} holds other samples than this evaluation attacks there (the "
                            f"model's clean predictions or the data changed); it cannot be resumed")


def _verify(threat: ThreatModel, label: str, x_adv: torch.Tensor, x: torch.Tensor) -> None:
    bad = threat.violations(x_adv, x)
    if not bool(bad.any()):
        return
    d = threat.distance(x_adv[bad], x[bad])
    worst = float(d.max()) if bool(torch.isfinite(d).all()) else float("nan")
    flat = x_adv[bad].detach().flatten(1)
    box = bool(((flat < 0) | (flat > 1) | ~torch.isfinite(flat)).any())
    parts = [f"worst {threat.norm} norm {worst:.6g} > eps {threat.eps:.6g}" if worst > threat.eps
             else f"worst {threat.norm} norm {worst:.6g}"]
    if box:
        parts.append("pixels outside [0, 1] or not finite")
    raise AdvbenchError(f"attack {label!r} violated the threat model {threat} on {int(bad.sum())} samples "
                        f"({'; '.join(parts)}); refusing to record the result")
