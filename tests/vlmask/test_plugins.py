"""Plugin loading: built-ins through the entry point, real third-party distributions, failures."""


from pathlib import Path

import pytest

from vlmask import hookimpl, hookspecs
from vlmask.plugins import BLOCK_ENV, DISABLE_AUTOLOAD_ENV, PluginError, load_plugins


def test_builtins_come_through_the_public_entry_point():
    plugins = load_plugins()
    assert plugins.distributions["builtin"].startswith("vlmask ")
    assert plugins.registry.get("masker", "tube").provider.startswith("vlmask ")


def test_third_party_package_registers_and_broken_one_is_skipped(plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    plugins = load_plugins()
    entry = plugins.registry.get("masker", "grid")
    assert entry.provider == "vlmask-grid-masker 0.1.0"
    [failure] = [f for f in plugins.failures if f.plugin == "broken"]
    assert failure.distribution == "vlmask-broken-plugin"
    assert "vlmask_dependency_that_does_not_exist" in failure.error
    assert plugins.registry.get("masker", "tube")  # the rest keeps working


def test_autoload_switch_and_block_list(plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    plugins = load_plugins()
    assert ("masker", "grid") not in plugins.registry and not plugins.failures
    assert ("masker", "tube") in plugins.registry, "vlmask's own plugins still load"
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV)
    monkeypatch.setenv(BLOCK_ENV, "vlmask-broken-plugin, grid_masker")
    plugins = load_plugins()
    assert ("masker", "grid") not in plugins.registry and not plugins.failures
    assert set(plugins.blocked) == {"broken", "grid_masker"}


class DuplicateTube:
    @staticmethod
    @hookimpl
    def vlmask_register_plugins(register):
        register("masker", "tube", object)


class FailingRegistration:
    @staticmethod
    @hookimpl
    def vlmask_register_plugins(register):
        raise RuntimeError("boom")


def test_duplicate_name_is_an_error_naming_both_providers():
    with pytest.raises(PluginError, match=r"masker 'tube' is registered twice: by vlmask 0\.1\.0 and by dup \(in-process\)"):
        load_plugins(extra=[("dup", DuplicateTube())])


def test_a_plugin_whose_registration_raises_is_reported_and_skipped():
    plugins = load_plugins(extra=[("failing", FailingRegistration())])
    [failure] = plugins.failures
    assert failure.plugin == "failing" and "RuntimeError: boom" in failure.error


def test_a_misspelt_hook_is_reported_naming_the_nearest_hook_and_the_plugin_skipped(misspelt_plugin_site, monkeypatch):
    monkeypatch.syspath_prepend(str(misspelt_plugin_site))
    plugins = load_plugins()
    [failure] = [f for f in plugins.failures if f.plugin == "misspelt"]
    assert failure.distribution.startswith("vlmask-misspelt-hook")
    assert "vlmask_after_optimiser_step" in failure.error and "did you mean vlmask_after_optimizer_step?" in failure.error
    assert ("masker", "never_clamped") not in plugins.registry  # skipped whole, like a plugin that fails to import
    assert "misspelt" not in {plugins.manager.get_name(p) for p in plugins.manager.get_plugins()}


def test_vlmask_plugins_and_run_report_a_misspelt_hook(misspelt_plugin_site, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(misspelt_plugin_site), os.environ.get("PYTHONPATH", "")])}
    listing = subprocess.run([sys.executable, "-m", "vlmask", "plugins"], env=env, capture_output=True, text=True)
    assert listing.returncode == 0
    assert "vlmask-misspelt-hook" in listing.stderr and "did you mean vlmask_after_optimizer_step?" in listing.stderr
    # run reports it before anything else (this run then stops on its bad batch size, before training)
    run = subprocess.run([sys.executable, "-m", "vlmask", "run", "recipes/mae.yaml", "train.batch_size=0",
                          f"run.dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parents[2])
    assert "did you mean vlmask_after_optimizer_step?" in run.stderr, run.stderr
    assert "train.batch_size" in run.stderr and run.returncode != 0


def test_a_hook_marked_optional_is_not_reported():
    class Optional:
        @staticmethod
        @hookimpl(optionalhook=True)
        def vlmask_some_future_hook():
            pass

    plugins = load_plugins(extra=[("optional", Optional())])
    assert not [f for f in plugins.failures if f.plugin == "optional"]


def test_every_hook_is_documented():
    for name in hookspecs.HOOKS:
        spec = getattr(hookspecs, name)
        doc = spec.__doc__ or ""
        assert len(doc.split()) > 15, f"{name} needs a real docstring"
        assert "called" in doc.lower(), f"{name}'s docstring must say how many implementations are called"
    declared = {n for n in dir(hookspecs) if n.startswith("vlmask_")}
    assert declared == set(hookspecs.HOOKS)
