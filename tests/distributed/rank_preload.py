"""Imported by the forkserver of forked.py, and only there (`set_forkserver_preload`): what a `cogtune`
process imports, imported as a command imports it (collection off, then frozen: cogtune.startup). Nothing
runs. Not the engine: the launch hooks patch it in each process (launch_hooks/sitecustomize.py)."""

import gc
import importlib

from cogtune import startup

gc.disable()
for _name in (*startup.LIBRARIES, "cogtune.cli.app"):
    importlib.import_module(_name)
gc.freeze()
gc.enable()
