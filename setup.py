"""Build: the package as pure Python, with the modules of ``farm/compiled.py`` compiled by
mypyc (a C compiler and Python's headers needed; ``FARM_PURE_PYTHON=1`` skips them)."""

import glob
import os
import runpy

from setuptools import setup

MODULES = runpy.run_path(os.path.join("farm", "compiled.py"))["MODULES"]
GROUP = "farm_compiled"


def compiled_modules() -> list:
    if os.environ.get("FARM_PURE_PYTHON"):
        # An editable install builds in place: a compiled module left from an earlier build
        # would be imported before its .py.
        for source in MODULES:
            for built in glob.glob(source.removesuffix(".py") + ".*.so"):
                os.remove(built)
        for built in glob.glob(GROUP + "__mypyc.*.so"):
            os.remove(built)
        return []
    from mypyc.build import mypycify

    return mypycify(list(MODULES), opt_level="3", group_name=GROUP)


setup(ext_modules=compiled_modules())
