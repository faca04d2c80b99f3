"""The one error type for user mistakes: the CLI prints its message as one line and exits 1."""


class UserError(Exception):
    """Bad input, missing component, mismatched CLIP... anything the user can fix."""
