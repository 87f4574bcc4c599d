"""vlmask's first-party plugins, registered through the public ``vlmask`` entry-point group
exactly like third-party ones (see ``vlmask_plugins.builtin``)."""
