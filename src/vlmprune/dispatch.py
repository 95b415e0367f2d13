"""Models dispatched across devices by accelerate's big-model loading (``--device-map``).

``from_pretrained(device_map=...)`` places each module on a GPU, the CPU or disk; modules offloaded
to the CPU (when GPUs compute) or to disk keep their parameters on the meta device and accelerate's
hooks bring the weights in for each forward and drop them after. This module knows those hooks:
where inputs go, which weights are offloaded, how to see a weight while its module runs (Taylor
scores need the gradient of the weight actually used), and how to bring every weight into memory
once before the plan is cut and saved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from vlmprune.errors import VlmpruneError


def is_dispatched(model: nn.Module) -> bool:
    return bool(getattr(model, "hf_device_map", None))


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: the first accelerator in its device map (CPU when it has none), else
    the device of its first parameter."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        for device in device_map.values():
            if isinstance(device, int):
                return torch.device(torch.accelerator.current_accelerator().type, device)
            if device not in ("cpu", "disk", "meta"):
                return torch.device(device)
        return torch.device("cpu")
    return next(model.parameters()).device


def _align_hooks(module: nn.Module) -> list:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def offloaded(model: nn.Module) -> bool:
    """Whether some weights live outside the model (CPU or disk offload: parameters on meta)."""
    return any(p.device.type == "meta" for p in model.parameters())


@contextlib.contextmanager
def on_placed_weights(modules: list[nn.Module], callback: Callable[[nn.Module, str, nn.Parameter], None]
                      ) -> Iterator[None]:
    """Call ``callback(module, name, param)`` each time an offload hook puts a weight of one of
    ``modules`` in place for a forward (the tensor autograd will use); a no-op for resident weights."""
    patched = []
    for module in modules:
        for hook in _align_hooks(module):
            if not getattr(hook, "offload", False):
                continue
            original = hook.pre_forward

            def pre_forward(mod, *args, _original=original, **kwargs):
                result = _original(mod, *args, **kwargs)
                for name, param in mod.named_parameters(recurse=False):
                    callback(mod, name, param)
                return result

            hook.pre_forward = pre_forward
            patched.append((hook, original))
    try:
        yield
    finally:
        for hook, original in patched:
            hook.pre_forward = original


def materialize_(model: nn.Module) -> nn.Module:
    """Bring every offloaded weight into memory on its module's execution device and remove the
    dispatch hooks, so the model can be cut and saved like any other (it then holds one copy)."""
    from accelerate.hooks import remove_hook_from_submodules
    from accelerate.utils import set_module_tensor_to_device

    if not is_dispatched(model):
        return model
    for module in model.modules():
        for hook in _align_hooks(module):
            if not getattr(hook, "offload", False) or hook.weights_map is None:
                continue
            recurse = getattr(hook, "place_submodules", False)
            names = [n for n, p in module.named_parameters(recurse=recurse) if p.device.type == "meta"]
            names += [n for n, b in module.named_buffers(recurse=recurse) if b.device.type == "meta"]
            for name in names:
                set_module_tensor_to_device(module, name, hook.execution_device, value=hook.weights_map[name])
    remove_hook_from_submodules(model)
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise VlmpruneError(f"{len(left)} weights could not be brought back from offload ({', '.join(left[:3])})")
    del model.hf_device_map
    return model
