"""Not part of the package (that is fusedaccum/ below this file).

Python runs this file only when the directory that holds this clone is on sys.path (the current
directory, typically) and the clone is named fusedaccum: the clone folder then comes first, ahead
of the installed package (an editable install puts its finder after the folders on sys.path).
Without this file that folder became an empty namespace package (``AttributeError: module
'fusedaccum' has no attribute 'GradAccumulator'``; ``python -m fusedaccum bench`` failed with an
ImportError). This file hands the import over to this clone's package instead."""

import importlib.util as _util
import os as _os
import sys as _sys

if __name__ == "fusedaccum":
    _root = _os.path.dirname(_os.path.abspath(__file__))
    _pkg = _os.path.join(_root, "fusedaccum")
    # _root second: fusedaccum.kernels is the clone's top-level kernels/ (as pyproject maps it).
    _spec = _util.spec_from_file_location(__name__, _os.path.join(_pkg, "__init__.py"),
                                          submodule_search_locations=[_pkg, _root])
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module      # what `import fusedaccum` returns once this file has run
    _spec.loader.exec_module(_module)
