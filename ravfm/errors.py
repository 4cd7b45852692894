"""The one exception type for mistakes a user can make (bad path, bad row, bad config).

The CLI prints its message as one line and exits with status 2; anything else is a bug and
keeps its traceback.
"""

__all__ = ["UserError"]


class UserError(ValueError):
    """A problem with the user's input, phrased as one line naming the input and the fix."""
