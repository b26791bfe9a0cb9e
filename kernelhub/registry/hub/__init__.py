"""Kernels from the Hugging Face Hub and local directories, under kernelhub's policy.

A reference is parsed (`ref`), trusted (`trust`), fetched within the bind's deadline
(`fetch`, whose requests `transport` bounds, cancels and caps; `cache_check` refuses damaged
files in the shared cache), read and hashed once (`snapshot`), compared with the lock
(`lockfile`), checked field by field (`metadata`), and only then, with its whole dependency
closure (`depends`: each kernel once, chains bounded), imported from a private verified copy
(`store`, `importer`). `loader` runs that sequence; `locking` writes and checks locks;
`layers` and `attention` adapt what was imported to kernelhub's contracts.
"""
