"""Recovery losses as pure tensor functions (no model code, hand-checkable).

Conventions. Every loss here takes tensors that are already aligned: ``logits[b, k]`` is the
prediction scored against ``targets[b, k]`` (or compared with ``teacher[b, k]``), and a boolean
``mask[b, k]`` says which positions count. The trainer does the next-token shift (labels and
masks from :func:`vlmprune.data.token_masks` are in input positions; see :func:`next_token`).
Every loss is a sum over the selected positions divided by their number, never by the batch
size, and is an exact 0 (still attached to the graph) when nothing is selected.

The registry. A loss that ``--loss NAME=W`` can name is one decorated function of a
:class:`LossInputs`::

    @register_loss("l1_logits", needs_teacher=True, positions=lambda x: x.targets != IGNORE_INDEX)
    def l1_logits(x: LossInputs) -> torch.Tensor:   # a docstring's first line describes the loss
        return (x.student_logits - x.teacher_logits).abs().mean()

``needs_teacher`` runs the teacher on the batch; ``reads`` names what the loss reads: ``"logits"``
(at the input positions ``positions(x)`` selects, a bool [B, T] mask; all real tokens when None)
and/or ``"hidden_states"`` (the outputs of the paired decoder layers, ``--hidden-layers``). Options
are read from ``x.options`` (during ``vlmprune recover``, the :class:`~vlmprune.config.RecoverConfig`).
The trainer adds ``weight * fn(x)`` for every weighted loss; the built-ins are ``sft``, ``logits``
and ``hidden`` below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from vlmprune.data import IGNORE_INDEX
from vlmprune.errors import VlmpruneError
from vlmprune.planning.plan import PruningPlan


def next_token(mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, T] mask of the positions whose prediction scores a selected next token.

    ``mask`` is in input positions (token t selected); the prediction at position t scores
    token t + 1, so the result is ``mask`` moved one step left, with the last position empty.
    """
    shifted = torch.zeros_like(mask)
    shifted[:, :-1] = mask[:, 1:]
    return shifted


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``per_position`` [B, K] over ``mask`` [B, K], divided by the number selected."""
    n = mask.sum()
    return (per_position * mask).sum() / n.clamp(min=1)


def sft_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` [B, K, V] against ``targets`` [B, K] (-100: ignored), per token."""
    mask = targets != IGNORE_INDEX
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets.masked_fill(~mask, 0), reduction="none")  # [B, K]
    return _masked_mean(ce, mask)


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
             temperature: float = 2.0) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened distributions times T^2, per selected token.

    ``student``/``teacher``: logits [B, K, V]; ``mask``: bool [B, K]. The T^2 factor keeps the
    gradient scale independent of T (Hinton et al.).
    """
    if temperature <= 0:
        raise VlmpruneError(f"temperature must be > 0, got {temperature}")
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # [B, K]
    return _masked_mean(kl, mask) * temperature**2


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """MSE between paired hidden states [B, T, D], normalised per token, averaged over the pairs.

    A token's error is the mean over D of the squared difference divided by the mean over D of the
    teacher state's square (a relative error: 0 when equal, 1 when the student outputs zeros); the
    loss of one pair is the sum of its tokens' errors divided by the number of selected tokens; pairs
    count equally. Normalising per token matters on real models: their hidden states carry
    "massive activations" (a few tokens and channels hundreds of times larger than the rest; the
    raw MSE of the pruned demo model was ~80 against an SFT loss below 1), which would otherwise turn
    any sft+hidden mix into hidden-only training dominated by those few tokens.
    Positions are not shifted: student and teacher states of the same input token are compared.
    """
    if len(student) != len(teacher) or not student:
        raise VlmpruneError(f"hidden_mse needs equally many (>0) states, got {len(student)} and {len(teacher)}")
    losses = []
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise VlmpruneError(f"student and teacher hidden states differ in shape: {tuple(s.shape)} vs "
                                f"{tuple(t.shape)}")
        t = t.float()
        per_token = (s.float() - t).pow(2).mean(-1) / (t.pow(2).mean(-1) + 1e-6)  # [B, T]
        losses.append(_masked_mean(per_token, mask))
    return torch.stack(losses).mean()


def layer_map(
    student_layers: int, teacher_layers: int, plan: PruningPlan | None, which: str | list[int] = "all"
) -> list[tuple[int, int]]:
    """Pairs (student layer j, teacher layer) whose outputs the hidden loss compares.

    After layerwise pruning student layer j is teacher layer ``plan.kept_layers(n)[j]``; without
    a plan the two models must have the same depth (identity). ``which`` names student layers:
    ``"all"``, ``"last"``, or a list / comma-separated string of indices.
    """
    if plan is not None:
        kept = plan.kept_layers(teacher_layers)
        if len(kept) != student_layers:
            raise VlmpruneError(
                f"the student's pruning plan keeps {len(kept)} of the teacher's {teacher_layers} layers, but the "
                f"student has {student_layers}: the teacher is not the model this student was pruned from"
            )
    elif student_layers != teacher_layers:
        raise VlmpruneError(
            f"the student has {student_layers} decoder layers and the teacher {teacher_layers}, and the student has no "
            f"pruning_plan.json saying which teacher layers it kept; hidden-state distillation needs that mapping. "
            f"Put the plan `vlmprune prune` wrote into the student directory, or drop the 'hidden' loss"
        )
    else:
        kept = list(range(teacher_layers))
    if which == "all":
        chosen = list(range(student_layers))
    elif which == "last":
        chosen = [student_layers - 1]
    else:
        try:
            chosen = [int(i) for i in which.split(",")] if isinstance(which, str) else [int(i) for i in which]
        except ValueError:
            raise VlmpruneError(f"--hidden-layers is all, last or comma-separated student layer indices, "
                                f"got {which!r}") from None
        bad = [j for j in chosen if not 0 <= j < student_layers]
        if bad or not chosen:
            raise VlmpruneError(f"--hidden-layers {which!r}: the student has layers 0..{student_layers - 1}")
        chosen = sorted(set(chosen))
    return [(j, kept[j]) for j in chosen]


# --------------------------------------------------------------------------- the registry

READS = ("logits", "hidden_states")


@dataclass
class LossInputs:
    """What a loss reads on one micro-batch.

    ``masks``: :func:`vlmprune.data.token_masks` of the batch (input positions: ``all``, ``text``,
    ``image``, ``answer``); ``targets`` [B, T]: the next token each position predicts (``IGNORE_INDEX``
    where no answer token follows); ``options``: the loss options (:class:`vlmprune.config.LossOptions`:
    ``temperature``, ``kd_tokens``, ``hidden_tokens``, and any a registered loss adds). After the forward
    passes: ``positions`` [K], the positions whose logits were computed; ``student_logits`` /
    ``teacher_logits`` [B, K, V];
    ``student_hidden`` / ``teacher_hidden``: the paired decoder layers' outputs [B, T, D].
    """

    masks: dict[str, torch.Tensor]
    targets: torch.Tensor
    options: Any
    positions: torch.Tensor | None = None
    student_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    student_hidden: list[torch.Tensor] = field(default_factory=list)
    teacher_hidden: list[torch.Tensor] = field(default_factory=list)

    def kept(self, mask: torch.Tensor) -> torch.Tensor:
        """A [B, T] mask (or targets) cut to the positions whose logits were computed: [B, K]."""
        return mask[:, self.positions]


@dataclass(frozen=True)
class Loss:
    name: str
    fn: Callable[[LossInputs], torch.Tensor]
    needs_teacher: bool = False
    reads: tuple[str, ...] = ("logits",)
    positions: Callable[[LossInputs], torch.Tensor] | None = None
    doc: str = ""

    def __call__(self, inputs: LossInputs) -> torch.Tensor:
        return self.fn(inputs)

    def logit_positions(self, inputs: LossInputs) -> torch.Tensor:
        """Bool [B, T]: the positions whose logits this loss reads (none when it reads no logits)."""
        if "logits" not in self.reads:
            return torch.zeros_like(inputs.targets, dtype=torch.bool)
        if self.positions is None:
            return next_token(inputs.masks["all"])
        return self.positions(inputs)


_REGISTRY: dict[str, Loss] = {}


def register_loss(name: str, *, needs_teacher: bool = False, reads: str | Iterable[str] = "logits",
                  positions: Callable[[LossInputs], torch.Tensor] | None = None):
    """Register ``fn(inputs: LossInputs) -> scalar tensor`` as loss ``name``; returns ``fn`` unchanged."""
    reads = (reads,) if isinstance(reads, str) else tuple(reads)
    bad = [r for r in reads if r not in READS]
    if bad or not reads:
        raise VlmpruneError(f"a loss reads {' and/or '.join(READS)}, got {list(reads)!r}")

    def register(fn):
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = Loss(name, fn, needs_teacher, reads, positions, doc)
        return fn

    return register


def losses() -> list[Loss]:
    """The registered losses, built-ins first."""
    return list(_REGISTRY.values())


def get_loss(name: str) -> Loss:
    """The loss ``name``, with a message listing the choices."""
    found = _REGISTRY.get(name)
    if found is None:
        raise VlmpruneError(f"unknown loss {name!r}; choose from {', '.join(_REGISTRY)}")
    return found


def reading(weights: Iterable[str], what: str, teacher: bool | None = None) -> list[str]:
    """The names among ``weights`` whose loss reads ``what`` (and needs a teacher, when ``teacher`` is given)."""
    return [n for n in weights if what in get_loss(n).reads and teacher in (None, get_loss(n).needs_teacher)]


def _kd_mask(x: LossInputs) -> torch.Tensor:
    return next_token(x.masks[x.options.kd_tokens] & x.masks["all"])


@register_loss("sft", positions=lambda x: x.targets != IGNORE_INDEX)
def _sft(x: LossInputs) -> torch.Tensor:
    """next-token cross-entropy on the answer tokens"""
    return sft_loss(x.student_logits, x.kept(x.targets))


@register_loss("logits", needs_teacher=True, positions=_kd_mask)
def _logits(x: LossInputs) -> torch.Tensor:
    """logit distillation: KL of temperature-softened distributions (--kd-tokens, --temperature)"""
    return logit_kd(x.student_logits, x.teacher_logits, x.kept(_kd_mask(x)), x.options.temperature)


@register_loss("hidden", needs_teacher=True, reads="hidden_states")
def _hidden(x: LossInputs) -> torch.Tensor:
    """hidden-state distillation: per-token relative MSE of paired layers (--hidden-layers, --hidden-tokens)"""
    return hidden_mse(x.student_hidden, x.teacher_hidden, x.masks[x.options.hidden_tokens] & x.masks["all"])
