import os

os.environ.setdefault("KERNELHUB_FLEX_COMPILE", "0")  # the uncompiled flex path: no compile time in tests
os.environ.setdefault("KERNELHUB_DISABLE_PLUGIN_AUTOLOAD", "1")
