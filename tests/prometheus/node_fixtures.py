"""tests/node/conftest.py loaded as the module "bio_node_conftest".

Not as "conftest": pytest imports tests/prometheus/conftest.py under that name too (in its
default prepend import mode), so `from conftest import *` would find the wrong module (or the
one being imported) depending on what else the session collects.
"""
import importlib.util
import os
import sys

NAME = "bio_node_conftest"
PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "node", "conftest.py")


def load():
    if NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(NAME, os.path.abspath(PATH))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[NAME] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[NAME]
            raise
    return sys.modules[NAME]


node = load()
