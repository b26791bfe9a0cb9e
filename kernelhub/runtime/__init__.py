"""What runs a bound model: the loader (`from_pretrained`, `explain`), generation, sampling,
continuous batching, compiled steps, kept caches, export and tensor parallelism."""

from kernelhub.declare.serving import provide
from kernelhub.runtime.batching import generate_batch
from kernelhub.runtime.generate import generate

provide(generate=generate, generate_batch=generate_batch)
