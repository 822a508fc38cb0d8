"""The one exception a user can fix: the command line prints it as one line (exit 2)."""


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback. ``quiet``: another
    process (rank 0 under torchrun) reports it; this one only exits non-zero."""

    quiet = False
