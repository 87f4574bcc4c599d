"""vlmask: masked video-language self-supervised pretraining with interchangeable plugins."""

import pluggy

__version__ = "0.1.0"

#: Marks a plugin's hook implementations: ``@hookimpl def vlmask_register_plugins(register): ...``
hookimpl = pluggy.HookimplMarker("vlmask")

__all__ = ["hookimpl", "__version__"]
