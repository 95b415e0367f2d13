"""The words option values are made of, written once.

A choice that both a config (the command line's check, before anything loads) and the module that acts
on it need is defined here, where neither has to import the other: the config checks and lists it, the
owner dispatches on it, and a new word is added in one place. Imports nothing, so ``vlmprune --help``
stays fast.
"""

from __future__ import annotations

# --dtype of every command that loads a model: a torch dtype's name, passed as it is to checkpoint.load
# (and from there to from_pretrained); auto is the checkpoint's own dtype
DTYPES = ("float32", "float16", "bfloat16", "auto")

# prune --method: drop whole decoder layers, heads and MLP channels, or search the mix
PRUNE_METHODS = ("layer", "width", "auto")

# prune --tokens: the positions the calibration statistics use (vlmprune.calibrate.select_tokens)
TOKENS = ("all", "text", "image", "answer")

# prune --attention (width): whole kv groups, q heads inside every group, or attention left whole
# (vlmprune.planning.solve)
ATTENTION_MODES = ("groups", "heads", "none")

# prune --compensate: what a cut's kept weights take over (vlmprune.surgery.compensate); auto (the default) is
# ls when the prune reads calibration data, none when it reads none
COMPENSATE_FITS = ("none", "ls", "bias")
COMPENSATE_MODES = ("auto", *COMPENSATE_FITS)
# prune --compensate-layers: what stands in for a run of dropped layers under --compensate ls
COMPENSATE_LAYERS = ("map", "scale", "map+scale")

# convert --from: the original checkpoints vlmprune converts to native ones (vlmprune.convert.FAMILIES)
CONVERT_FAMILIES = ("bunny", "internvl-chat")

# the built-in data sets: `vlmprune data` writes them (vlmprune.demo.datasets), and their test.json files are
# evaluate's built-in tasks (vlmprune.evaluate.tasks)
DATASETS = ("easyvqa", "digits")
