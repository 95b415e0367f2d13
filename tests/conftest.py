import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory):
    """A saved tiny LLaVA (with processor), a LLaVA-format data set and a task file beside its images."""
    import shutil
    from types import SimpleNamespace

    from tiny_data import tiny_llava_processor, write_llava_dataset
    from tiny_models import build_tiny

    root = tmp_path_factory.mktemp("tiny-repo")
    model_dir = root / "model"
    build_tiny("llava_llama_gqa").save_pretrained(model_dir)
    tiny_llava_processor().save_pretrained(model_dir)
    data = write_llava_dataset(root / "data", 12)
    images = root / "data" / "images"
    task_file = images / "test.json"  # task files resolve images beside themselves
    shutil.copy(data, task_file)
    return SimpleNamespace(model=model_dir, data=data, images=images, task_file=task_file)
