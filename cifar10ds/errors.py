"""User errors: the run stops before any work with one line naming the cause and the fix.

Anything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2
EXIT_UNSTABLE = 3  # the stability doctor stopped the run (non-finite values, or stuck at chance)
DOCTOR_STOPS = ("nonfinite", "stuck")  # the stop reasons that end a run with EXIT_UNSTABLE


class UserError(Exception):
    """A problem the user can fix (config, data, paths). Printed as one line, exit code 2."""

    kind = "error"

    def __str__(self) -> str:
        return " ".join(str(self.args[0]).split()) if self.args else self.kind


class ConfigError(UserError):
    kind = "config error"


class DataError(UserError):
    kind = "data error"


class DiskFullError(UserError):
    """No space left (or the quota used up) where a checkpoint is written: the run stops on every rank."""

    kind = "disk full"


def print_line(line: str) -> None:
    """Write one line to stderr in a single write(2) call.

    print() issues the text and the newline as two writes, so lines from several ranks sharing the
    launcher's pipe can interleave ("...either[rank 1] ..."); one write of at most PIPE_BUF bytes
    (4096 on Linux) to a pipe is atomic.
    """
    import os
    import sys

    sys.stderr.flush()
    data = (line.rstrip("\n") + "\n").encode("utf-8", "replace")
    while data:
        data = data[os.write(2, data):]
