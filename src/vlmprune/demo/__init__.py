"""The embedded demo model and its data (assets), and the resolver that turns ``demo`` into their paths."""

from __future__ import annotations

from pathlib import Path

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
# Reduced mode (tests, a first look): a few images per dataset, a few samples and steps, and no recovery
# checkpoint (save_steps past the 2 steps: each would be ~1.4 GB of weights and optimizer state).
QUICK = ["demo_data_limit=12", "calibration.num_samples=4", "calibration.batch_size=2", "evaluation.limit=4",
         "evaluation.batch_size=4", "recovery.max_steps=2", "recovery.per_device_train_batch_size=2",
         "recovery.save_steps=100", "recovery.logging_steps=1"]


def resolve_demo(config: dict) -> dict:
    """A study config with ``teacher: demo`` / ``train_data: demo`` replaced by the demo model's and
    data's paths (built on first use), so the study itself only ever sees paths."""
    config = dict(config)
    if config.get("teacher") == "demo":
        from vlmprune.demo.assemble import build_demo_model

        config["teacher"] = str(build_demo_model())
    if config.get("train_data") == "demo":
        from vlmprune.demo.datasets import demo_data

        paths = demo_data(limit=config.get("demo_data_limit"))
        config["train_data"], config["image_folder"] = str(paths["train"]), str(paths["root"])
        data_dir = config["evaluation"].get("data_dir") or str(paths["root"])
        config["evaluation"] = {**config["evaluation"], "data_dir": data_dir}
    return config
