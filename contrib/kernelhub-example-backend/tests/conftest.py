import os

os.environ.setdefault("KERNELHUB_DISABLE_PLUGIN_AUTOLOAD", "1")  # tests opt in with scoped_registry(autoload=True)
