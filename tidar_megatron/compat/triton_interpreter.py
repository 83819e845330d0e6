"""Triton's CPU interpreter (TRITON_INTERPRET=1) under numpy >= 2.5 with Triton < 3.7 (3.6.0 tested).

Triton 3.6's interpreter turns a tensor into a Python int with `int(ndarray)`; a scalar load gives a
1-element array, which numpy >= 2.5 refuses to convert, so the kernels' `range(0, tl.load(count))` loops
fail there (the GPU compiler is not affected; Triton 3.7+ squeezes the array first).  This is the
interpreter of the GPU node's stack (torch 2.11, Triton 3.6, numpy 2.5), which the dry run of the GPU
suite runs on a CPU.  Remove once Triton 3.6 is unsupported.
"""

from __future__ import annotations

import os


def patch_scalar_index():
    """Make the interpreter's `tensor.__index__` squeeze its array, as Triton 3.7+ does (idempotent; a no-op
    unless TRITON_INTERPRET=1 and the installed interpreter lacks the squeeze)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_tidar_squeezed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._tidar_squeezed = True
    interpreter._patch_lang_tensor = patched
