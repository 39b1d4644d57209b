"""Per-sample bookkeeping of a walk, one helper for the engine (attacks.engine) and APGD (attacks.apgd).

``Kept`` holds, per sample of the whole batch (N,), the iterate kept so far, its loss, whether it
fools the model and the model's prediction on it (from the forward pass that evaluated it; -1
where none is known). A walk works on a ``WorkingBatch``: the samples it still attacks (their
``rows`` in the whole batch), its per-sample state tensors (the fields a walk's subclass declares)
and the iterate each of them keeps in this walk, started from its Kept entry. Per iterate the walk

  offer(iterate, loss, fool, pred)   records the iterate per the keep rule (below)
  drop_fooled()                      stores the fooled samples into Kept and removes them from every
                                     state tensor at once (early stopping: the batch shrinks; one host sync)
  store()                            writes the samples still in the batch into Kept

Keep rules (the engine's ``keep``):

  first-fool  the first iterate that fools the sample, else the highest-loss iterate
  best-loss   the highest-loss iterate that fools the sample, else the highest-loss iterate
  last        the last iterate offered

``fooled`` is always whether the KEPT iterate fools, so a sample counted fooled is returned with
a point that fools, and a sample whose kept iterate does not fool gets its restarts (keep="last":
a sample whose last iterate does not fool is not fooled, whatever an earlier iterate did). A walk
runs on samples that no earlier walk has fooled (restarts, APGD-T's targets), and since its kept
iterates start from Kept, a restart replaces a sample's result only with a higher-loss or a
fooling iterate (first-fool, best-loss).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``v`` (n,) shaped to broadcast over the sample dimensions of ``like`` (n, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


@dataclass(eq=False)
class Kept:
    """Per sample of the whole batch: the kept iterate, its loss (-inf before any), whether it fools
    and the model's prediction on it (-1: not known)."""

    iterate: torch.Tensor
    loss: torch.Tensor
    fooled: torch.Tensor
    pred: torch.Tensor

    @classmethod
    def start(cls, iterate: torch.Tensor) -> "Kept":
        """Every sample keeps ``iterate`` (its starting point) with loss -inf, not fooled, prediction unknown."""
        n, dev = iterate.shape[0], iterate.device
        return cls(iterate, torch.full((n,), float("-inf"), device=dev), torch.zeros(n, dtype=torch.bool, device=dev),
                   torch.full((n,), -1, dtype=torch.long, device=dev))

    def unfooled(self) -> torch.Tensor:
        """The rows no iterate has fooled yet (a host sync)."""
        return (~self.fooled).nonzero().reshape(-1)


@dataclass(eq=False)
class WorkingBatch:
    """The samples a walk still attacks; a walk subclasses it with its own per-sample tensors as
    fields, all indexed together when fooled samples leave (see the module docstring)."""

    rows: torch.Tensor  # (n,) the samples' rows in the whole batch
    kept: torch.Tensor  # (n, ...) the iterate each keeps
    kept_loss: torch.Tensor  # (n,) its loss
    kept_pred: torch.Tensor  # (n,) the model's prediction on it (-1: not known)
    fooled: torch.Tensor  # (n,) whether the kept iterate fools it
    into: Kept  # the whole batch's results
    keep: str  # the keep rule

    @classmethod
    def start(cls, into: Kept, rows: torch.Tensor, keep: str, **state):
        """The batch of ``rows`` (none of them fooled yet), keeping their Kept iterates for now."""
        return cls(rows=rows, kept=into.iterate[rows], kept_loss=into.loss[rows], kept_pred=into.pred[rows],
                   fooled=torch.zeros(rows.numel(), dtype=torch.bool, device=rows.device), into=into, keep=keep,
                   **state)

    def offer(self, iterate: torch.Tensor, loss: torch.Tensor, fool: torch.Tensor, pred: torch.Tensor) -> None:
        """Per sample, ``iterate`` (with its loss, whether it fools and the prediction on it) replaces
        the kept one per the keep rule."""
        if self.keep == "last":
            self.kept, self.kept_loss, self.kept_pred, self.fooled = iterate, loss, pred, fool
            return
        take = loss > self.kept_loss
        if self.keep == "first-fool":
            take = ~self.fooled & (fool | take)
        else:  # best-loss: a fooling iterate beats one that does not fool, else the higher loss wins
            take = (fool & ~self.fooled) | ((fool == self.fooled) & take)
        self.kept = torch.where(per_sample(take, iterate), iterate, self.kept)
        self.kept_loss = torch.where(take, loss, self.kept_loss)
        self.kept_pred = torch.where(take, pred, self.kept_pred)
        self.fooled = torch.where(take, fool, self.fooled)  # the kept iterate's (first-fool: once fooled, kept)

    def store(self) -> None:
        """Write the batch's kept iterates into Kept (no host sync: the rows are known)."""
        self.into.iterate.index_copy_(0, self.rows, self.kept)
        self.into.loss.index_copy_(0, self.rows, self.kept_loss)
        self.into.fooled.index_copy_(0, self.rows, self.fooled)
        self.into.pred.index_copy_(0, self.rows, self.kept_pred)

    def drop_fooled(self) -> bool:
        """Store the fooled samples and remove them from the batch (the host sync of a step).
        False when no sample is left."""
        alive = (~self.fooled).nonzero().reshape(-1)
        if alive.numel() == self.fooled.numel():
            return True
        self.store()  # the leavers' results (the others' are overwritten later)
        if alive.numel() == 0:
            return False
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                setattr(self, f.name, value[alive])
        return True
