"""`Unsupported`: the one "this cannot run here" exception of the harness.

Whatever cannot be done on this machine or kernel (a backing kind, a hugepage pool, a mount, a guest
mode, a capability) raises a subclass of it with the reason as its message. The pytest layer turns it
into a skip carrying that message, in one place (harness/pytest/core.py); everything below pytest
only raises it, so this module must never import pytest.
"""

from __future__ import annotations

from harness.kvm.errors import HarnessError


class Unsupported(HarnessError):
    """This cannot run here; str(e) is the reason a case skips with."""


__all__ = ["Unsupported"]
