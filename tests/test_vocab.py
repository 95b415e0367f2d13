"""One vocabulary for option values (vlmprune.vocab): the configs list and check the same words their
owners act on, and the module imports nothing."""

from __future__ import annotations

import ast
import inspect

import pytest

from vlmprune import calibrate, config, convert, vocab
from vlmprune.demo import datasets
from vlmprune.errors import VlmpruneError
from vlmprune.planning import solve
from vlmprune.surgery import compensate


def choices(cls, key: str):
    return next(o.field for o in config.options_of(cls) if o.key == key).metadata["choices"]


def test_configs_offer_the_vocabulary():
    assert choices(config.PruneConfig, "tokens") is vocab.TOKENS
    assert choices(config.PruneConfig, "attention") is vocab.ATTENTION_MODES
    assert choices(config.PruneConfig, "compensate") is vocab.COMPENSATE_MODES
    assert choices(config.PruneConfig, "method") is vocab.PRUNE_METHODS
    for cls in (config.PruneConfig, config.QuantizeConfig, config.EvalConfig):
        assert choices(cls, "dtype") is vocab.DTYPES, cls
    assert choices(config.ConvertConfig, "family") is vocab.CONVERT_FAMILIES
    assert choices(config.DataConfig, "dataset") is vocab.DATASETS
    assert config.BUILTIN_TASKS is vocab.DATASETS


def test_owners_act_on_the_vocabulary():
    assert calibrate.TOKEN_CHOICES is vocab.TOKENS
    assert solve.ATTENTION_MODES is vocab.ATTENTION_MODES
    assert compensate.MODES is vocab.COMPENSATE_FITS
    assert vocab.COMPENSATE_MODES == ("auto", *vocab.COMPENSATE_FITS)
    assert tuple(convert.FAMILIES) == vocab.CONVERT_FAMILIES
    assert "DATASETS" in inspect.getsource(datasets.demo_data)


@pytest.mark.parametrize("cls, field, bad", [
    (config.PruneConfig, "tokens", "everything"),
    (config.PruneConfig, "attention", "kv"),
    (config.PruneConfig, "compensate", "lsq"),
])
def test_a_word_outside_the_vocabulary_is_refused_with_the_list(cls, field, bad):
    values = {"model": "m", "output": "o", "method": "width", "ratio": 0.2, "calibration": "d", field: bad}
    with pytest.raises(VlmpruneError, match=", ".join(getattr(vocab, {
            "tokens": "TOKENS", "attention": "ATTENTION_MODES", "compensate": "COMPENSATE_MODES"}[field]))):
        config.build(cls, values)


def test_vocab_imports_nothing():
    tree = ast.parse(inspect.getsource(vocab))
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [getattr(n, "module", None) for n in imports] == ["__future__"]
