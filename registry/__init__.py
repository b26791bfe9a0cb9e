"""kernelhub.registry: hook specs, plugin manager, backends as data, resolver, binding plans."""
