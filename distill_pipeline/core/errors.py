"""The one exception type for mistakes in what a user gave: a path, a column, a value, a file.

Domain code raises :class:`UsageError` (or a subclass named after its stage) with a message that
names the problem and how to fix it; the command line prints that message as one line and exits
with status 2. Anything else that escapes is a bug, and is shown as one.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A mistake the user can fix; the message says what is wrong and what to do instead."""
