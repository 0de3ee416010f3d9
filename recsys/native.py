"""Loading the package's compiled helper (``recsys.data._segments``): plain C built with the
package as an optional extension, called through ctypes.

A helper is used only when it was built, loads, and reports the calling convention its
Python side expects (an older in-place build would read and write the wrong arguments);
otherwise, or with ``RECSYS_NATIVE=0``, the caller runs its NumPy path.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os


def load(module: str, abi_function: str, abi: int) -> ctypes.CDLL | None:
    """The compiled ``module`` when it is built, loadable, and ``abi_function()`` returns
    ``abi``; None otherwise."""
    if os.environ.get("RECSYS_NATIVE", "1") == "0":
        return None
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return None
    try:
        library = ctypes.CDLL(spec.origin)
        reported = getattr(library, abi_function)
        reported.restype = ctypes.c_int64
        if reported() != abi:  # a stale build: its functions take other arguments
            return None
    except (OSError, AttributeError):  # not loadable, or built before the ABI was reported
        return None
    return library
