"""User errors: the run stops before any work with one line per problem naming the cause and the fix.

Anything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2
EXIT_UNSTABLE = 3  # the stability doctor stopped the run (non-finite values, or stuck at chance)
DOCTOR_STOPS = ("nonfinite", "stuck")  # the stop reasons that end a run with EXIT_UNSTABLE


class UserError(Exception):
    """Problems the user can fix (config, data, paths), one per argument: each printed as one line, exit code 2.

    ``ConfigError("a")`` is one problem; ``ConfigError("a", "b")`` two (e.g. every key DeepSpeed refuses at once).
    Whitespace inside a problem, newlines included, is folded: one problem never spans two lines.
    """

    kind = "error"

    @property
    def problems(self) -> list[str]:
        return [" ".join(str(a).split()) for a in self.args] or [self.kind]

    def __str__(self) -> str:
        return "\n".join(self.problems)

    def report(self, prefix: str = "") -> str:
        """The lines to print: ``{prefix}{kind}: {problem}`` for each problem."""
        return "\n".join(f"{prefix}{self.kind}: {problem}" for problem in self.problems)


class ConfigError(UserError):
    kind = "config error"


class DataError(UserError):
    kind = "data error"


class DiskFullError(UserError):
    """No space left (or the quota used up) where a checkpoint is written: the run stops on every rank."""

    kind = "disk full"


def print_line(line: str) -> None:
    """Write one line (or one message of several lines) to stderr in a single write(2) call.

    print() issues the text and the newline as two writes, so lines from several ranks sharing the
    launcher's pipe can interleave ("...either[rank 1] ..."); one write of at most PIPE_BUF bytes
    (4096 on Linux) to a pipe is atomic, so a rank's lines stay together.
    """
    import os
    import sys

    sys.stderr.flush()
    data = (line.rstrip("\n") + "\n").encode("utf-8", "replace")
    while data:
        data = data[os.write(2, data):]
