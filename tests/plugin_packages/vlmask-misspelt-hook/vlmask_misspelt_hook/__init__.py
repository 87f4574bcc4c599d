"""A plugin whose after-step hook is misspelt: pluggy alone would register it and never call it."""

from vlmask import hookimpl


@hookimpl
def vlmask_register_plugins(register):
    register("masker", "never_clamped", object)


@hookimpl
def vlmask_after_optimiser_step(step):
    raise AssertionError("never called: the hook is vlmask_after_optimizer_step")
