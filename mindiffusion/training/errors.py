"""The one exception a user meets: a mistake in the command line or the data.

Every command of the project prints it as one sentence and exits with status 2,
without a traceback.
"""


class UserError(Exception):
    """A mistake in the command line or the data, explained in one sentence."""
