"""A template kernelhub plugin: one attention backend, published through an entry point."""
