"""The core runs without the extras; apps that need one say which; moved names still resolve, with a warning."""

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from llava_manager import extras

HERE = Path(__file__).parent


def test_the_core_patches_runs_saves_and_loads_with_every_extra_hidden():
    # a fresh interpreter: the modules only extras bring are made unimportable before llava_manager is imported
    result = subprocess.run(
        [sys.executable, str(HERE / "bare_install.py"), "--block"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bare install: OK" in result.stdout
    assert "llava-manager[train]" in result.stdout + result.stderr


def test_a_missing_module_is_named_with_the_extra_that_brings_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    assert extras.missing_modules("train") == ["peft"]
    with pytest.raises(ImportError, match=r"peft.*pip install 'llava-manager\[train\]'"):
        extras.require_extra("train", "training")
    extras.require_extra("plot", "plots")  # matplotlib is installed for the tests: no error


def test_every_extra_named_in_extras_py_is_declared_in_setup_cfg():
    import configparser

    setup = configparser.ConfigParser()
    setup.read(HERE.parent / "setup.cfg")
    declared = set(setup["options.extras_require"])
    assert set(extras.EXTRA_MODULES) <= declared


@pytest.mark.parametrize(
    "old_module, name, new_module",
    [
        ("llava_manager.hub", "from_pretrained", "llava_manager.checkpoint.loading"),
        ("llava_manager.hub", "check_weights", "llava_manager.checkpoint.weights"),
        ("llava_manager.convert", "load_original", "llava_manager.checkpoint.original"),
        ("llava_manager.tiny", "tiny_model", "llava_manager.testing.tiny"),
        ("llava_manager.inspect_weights", "plot_loss_curves", "llava_manager.demo.plots"),
    ],
)
def test_a_moved_name_resolves_to_its_new_home_with_a_deprecation_warning(old_module, name, new_module):
    module = importlib.import_module(old_module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = getattr(module, name)
    assert found is getattr(importlib.import_module(new_module), name)
    assert [w.category for w in caught] == [DeprecationWarning]
    assert new_module in str(caught[0].message)
    with pytest.raises(AttributeError, match="no attribute"):
        _ = module.not_a_name_that_ever_lived_here
