"""A ``transformers.Trainer`` whose loss is a weighted sum of SFT and distillation terms.

Plain ``transformers.Trainer`` rather than TRL's ``SFTTrainer``: the batches come from
vlmprune's own :class:`~vlmprune.data.Collator` (answer-only labels found from the chat
template), and the loss needs a teacher forward and layer hooks, so SFTTrainer's dataset
preparation and loss would both be replaced; what is left (optimizer, schedule, accumulation,
checkpoints, resume, logging, accelerate/DDP/FSDP/DeepSpeed) is the Trainer's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import transformers
from torch import nn

from vlmprune.calibrate import layer_output
from vlmprune.checkpoint import check_finite
from vlmprune.config import LossOptions
from vlmprune.data import IGNORE_INDEX, token_masks
from vlmprune.errors import VlmpruneError
from vlmprune.recover.distributed import ModalityGroupedSampler
from vlmprune.recover.losses import LossInputs, get_loss, losses


@contextlib.contextmanager
def layer_outputs(layers: Sequence[nn.Module]) -> Iterator[list]:
    """Collect each module's own output (first element when it returns a tuple) during one forward.

    The hooks exist only inside the block, so a gradient-checkpointing recomputation in the
    backward pass does not overwrite (or keep alive) what was collected.
    """
    outputs: list = [None] * len(layers)

    def hook(index: int):
        def keep(module, args, output):
            outputs[index] = layer_output(output)
        return keep

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def save_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], output_dir: str) -> None:
    """Write a gathered full state dict as ``model.safetensors`` (tied duplicates once) plus the model's config.

    ``save_pretrained`` cannot be used here: it inspects the model's own parameters, which under
    FSDP are DTensor shards. Peft models write their (full) state under peft's names.
    """
    from pathlib import Path

    from safetensors.torch import save_file

    from vlmprune.errors import VlmpruneError

    bad = [k for k, t in state_dict.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise VlmpruneError(f"refusing to write a checkpoint: {len(bad)} weight tensor(s) hold NaN or inf values "
                            f"({', '.join(bad[:3])}); the run diverged: lower the learning rate")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: dict[tuple, str] = {}
    tensors = {}
    for key, tensor in state_dict.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if ident in seen:  # a tied weight: stored once, like save_pretrained does
            continue
        seen[ident] = key
        tensors[key] = tensor.detach().cpu().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(out)


class _ReduceUnusedParams(transformers.TrainerCallback):
    """FSDP2: reduce-scatter zeros for parameters a process did not use this step.

    A text-only micro-batch leaves the projector without a gradient on that process while the
    other has one; FSDP2 would then reduce-scatter different sets of gradients and the processes'
    collectives stop matching (gloo aborts). With this, every process reduces the same set.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            model.set_reduce_scatter_unused_params(True)


class RecoveryTrainer(transformers.Trainer):
    """Trainer for a pruned student, optionally distilled from its unpruned teacher.

    Args (beyond the Trainer's):
        teacher: the unpruned model, or None for SFT alone. It is moved to the training device
            (unless :func:`~vlmprune.recover.teacher.place_teacher` sharded or offloaded it), put in
            eval mode, frozen, run under ``no_grad`` on the same batch (its own vision tower and
            projector), and never saved: it is not part of ``self.model``.
        weights: loss name -> weight, names registered with :func:`vlmprune.recover.losses.register_loss`.
        image_token_id: the processor's image token, to tell image from text positions.
        options: the losses' options (``x.options`` of :class:`~vlmprune.recover.losses.LossInputs`: a
            :class:`~vlmprune.config.LossOptions`, the ``objective`` group of ``vlmprune recover``'s config).
            Without it, ``temperature`` / ``kd_tokens`` (logit KD temperature, ``answer`` or ``text``
            targets) and ``hidden_tokens`` (``all``, ``text`` or ``answer``) make one.
        student_layers / teacher_layers: paired decoder-layer modules for losses that read hidden states.
        group_by_modality: train every optimizer step on samples of one kind (all with images, or
            all text-only; :class:`~vlmprune.recover.distributed.ModalityGroupedSampler`).

    Each loss is a per-token mean over one micro-batch (``loss_is_scaled_for_ga = False``, so the
    Trainer divides by the accumulation steps). Unweighted terms are logged as ``loss_<name>``.
    """

    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher: nn.Module | None = None, weights: dict[str, float], image_token_id: int,
                 temperature: float = 2.0, kd_tokens: str = "answer", student_layers: Sequence[nn.Module] = (),
                 teacher_layers: Sequence[nn.Module] = (), hidden_tokens: str = "all", group_by_modality: bool = False,
                 options=None, **kwargs):
        self.group_by_modality = group_by_modality
        super().__init__(*args, **kwargs)
        self.weights = dict(weights)
        distilled = [name for name in self.weights if get_loss(name).needs_teacher]  # unknown names fail here
        if distilled and teacher is None:
            raise VlmpruneError(f"the losses {distilled} distil from a teacher: pass one")
        self.image_token_id = image_token_id
        self.options = options if options is not None else LossOptions(
            loss=dict(weights), temperature=temperature, kd_tokens=kd_tokens, hidden_tokens=hidden_tokens)
        self.student_layers = list(student_layers)
        self.teacher_layers = list(teacher_layers)
        self.teacher = teacher
        if teacher is not None:
            from vlmprune.recover.teacher import is_placed

            if not is_placed(teacher):  # a sharded or offloaded teacher stays where place_teacher put it
                teacher.to(self.args.device)
            teacher.eval().requires_grad_(False)
        self._sums: dict[str, torch.Tensor] = {}
        self._calls = 0
        if self.is_fsdp_enabled:
            self.add_callback(_ReduceUnusedParams())

    def _get_train_sampler(self, train_dataset=None):
        if not self.group_by_modality:
            return super()._get_train_sampler(train_dataset)
        dataset = self.train_dataset if train_dataset is None else train_dataset
        args = self.args
        unit = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
        return ModalityGroupedSampler([bool(s.images) for s in dataset], unit,
                                      args.seed if args.data_seed is None else args.data_seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Weighted sum of the configured losses on one micro-batch (registry order)."""
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        labels = inputs["labels"]
        targets = torch.full_like(labels, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]  # the prediction at t scores token t + 1
        x = LossInputs(token_masks(inputs, self.image_token_id), targets, self.options)
        chosen = [loss for loss in losses() if loss.name in self.weights]
        # Logits only where a loss reads them: the LM head over a large vocabulary at every
        # position is the costliest part of a small model's step.
        wanted = torch.zeros_like(targets, dtype=torch.bool)
        for loss in chosen:
            wanted |= loss.logit_positions(x)
        x.positions = wanted.any(0).nonzero().squeeze(1)  # [K]

        with layer_outputs(self.student_layers) as student_hidden:
            outputs = model(**model_inputs, logits_to_keep=x.positions)
        x.student_logits, x.student_hidden = outputs.logits, student_hidden
        if self.teacher is not None and any(loss.needs_teacher for loss in chosen):
            with torch.no_grad(), layer_outputs(self.teacher_layers) as teacher_hidden:
                x.teacher_logits = self.teacher(**model_inputs, logits_to_keep=x.positions).logits
            x.teacher_hidden = teacher_hidden
        values = {loss.name: loss(x) for loss in chosen}
        loss = sum(self.weights[name] * value for name, value in values.items())
        if not torch.isfinite(loss.detach()).all():
            terms = ", ".join(f"{name}={float(value.detach()):.4g}" for name, value in values.items())
            raise VlmpruneError(f"the training loss is not finite at step {self.state.global_step} ({terms}); "
                                f"training stopped and nothing was saved: lower --learning-rate, check the --loss "
                                f"weights, or use float32 instead of --bf16")
        if model.training:
            for name, value in values.items():
                self._sums[name] = self._sums.get(name, 0.0) + value.detach()
            self._calls += 1
        return (loss, outputs) if return_outputs else loss

    # Resuming under FSDP: accelerate's full-state-dict loaders broadcast from rank 0 and hung over
    # gloo (accelerate 1.16, torch 2.13); every process reads the full files itself instead and keeps its shard.
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from pathlib import Path

        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from vlmprune.recover.distributed import check_gathered_keys

        target = model if model is not None else self.model
        state = load_file(str(Path(resume_from_checkpoint) / "model.safetensors"))
        result = set_model_state_dict(target, state, options=StateDictOptions(full_state_dict=True, strict=False))
        check_gathered_keys(self.accelerator.unwrap_model(target), result.missing_keys, result.unexpected_keys)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if not (self.is_fsdp_enabled and checkpoint):
            return super()._load_optimizer_and_scheduler(checkpoint)
        import warnings
        from pathlib import Path

        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper
        state = torch.load(Path(checkpoint) / "optimizer.bin", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint) / "scheduler.pt", weights_only=True))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP, gather the full weights ourselves (one tensor at a time) before ``_save``."""
        if self.is_fsdp_enabled:
            from vlmprune.recover.distributed import gathered_state_dict

            self._save(output_dir, state_dict=gathered_state_dict(self) or {})
            return
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write checkpoints under the model's own parameter names.

        ``save_pretrained`` renames keys to the original hub layout by default (LLaVA:
        ``language_model.model.*``), but resuming loads a checkpoint with a plain
        ``load_state_dict``, which then matches nothing and only warns (transformers 5.24).
        Peft models save their adapters under peft's names and keep the Trainer's own path.
        """
        model = self.accelerator.unwrap_model(self.model)
        if self.is_fsdp_enabled:
            # Every process reaches here with the gathered full state dict (empty off the main process);
            # the shards are resumed from pytorch_model_fsdp.bin, this file is the readable copy.
            if self.args.should_save and state_dict:
                save_state_dict(model, state_dict, output_dir or self.args.output_dir)
            return
        check_finite(model)  # a checkpoint is only as good as its weights: never write a diverged one
        if not isinstance(model, transformers.PreTrainedModel):
            super()._save(output_dir, state_dict)
        elif self.args.should_save:
            model.save_pretrained(output_dir or self.args.output_dir, state_dict=state_dict, save_original_format=False)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add each loss term's mean since the last log (averaged over processes) to training logs."""
        if "loss" in logs and self._calls:
            names = list(self._sums)
            local = torch.stack([self._sums[n] / self._calls for n in names]).to(self.args.device)
            means = self.accelerator.gather(local[None]).mean(0)
            logs.update({f"loss_{n}": round(float(v), 6) for n, v in zip(names, means)})
            self._sums, self._calls = {}, 0
        super().log(logs, start_time)
