"""kernelhub.models: the model architectures, one per file, and what they share (decoder skeleton,
rope, outputs, loss). Checkpoint reading lives in `kernelhub.checkpoint`, generation in `kernelhub.runtime`."""
