"""The one exception type for bad input a user can fix.

Every stage raises `UserInputError` with a message naming the file, value or step at fault; the
CLI prints it as one line and exits 2, and the Prefect flow fails the stage with the same text.
"""


class UserInputError(Exception):
    """Bad input (missing path, wrong value, unschedulable request): fix the input and rerun."""
