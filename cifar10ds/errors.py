"""User errors: the run stops before any work with one line naming the cause and the fix.

Anything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix (config, data, paths). Printed as one line, exit code 2."""

    kind = "error"

    def __str__(self) -> str:
        return " ".join(str(self.args[0]).split()) if self.args else self.kind


class ConfigError(UserError):
    kind = "config error"


class DataError(UserError):
    kind = "data error"
