"""Build: the package as pure Python, with the modules of ``farm/compiled.py`` compiled by
mypyc (a C compiler and Python's headers needed; ``FARM_PURE_PYTHON=1`` skips them)."""

import os
import runpy

from setuptools import setup


def compiled_modules() -> list:
    if os.environ.get("FARM_PURE_PYTHON"):
        return []
    from mypyc.build import mypycify

    modules = runpy.run_path(os.path.join("farm", "compiled.py"))["MODULES"]
    return mypycify(list(modules), opt_level="3", group_name="farm_compiled")


setup(ext_modules=compiled_modules())
