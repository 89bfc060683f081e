"""The one exception type for mistakes a user can fix (bad recipe, missing file, corrupt image).

The CLI prints a ``UserError`` as one line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in the user's input: the message names the key or path and says what to do."""
