"""kernelhub.models: one model per file, checkpoint loading and generation."""
