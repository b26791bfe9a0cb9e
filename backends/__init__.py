"""kernelhub.backends: attention backends, masks, KV caches and the declaration API models use."""
