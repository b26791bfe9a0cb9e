"""kernelhub.registry: plugins, capabilities and modes as data, the one request grammar and
chooser, binding plans and bind; Hub kernels in `kernelhub.registry.hub`."""
