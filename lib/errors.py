"""The one exception type for problems with the user's input (config, data files, model folders).

Scripts catch `UserError` and print its message as one paragraph with exit code 2 — no traceback.
Bugs in our own code stay ordinary exceptions (and asserts) so they do show a traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message names the file:line or config key and what was expected."""
