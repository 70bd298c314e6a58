"""The one exception type that means "the user gave bad input" (exit status 2)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the problem and the fix, on one line.

    The command line turns it into ``error: <message>`` on stderr and exit status 2.
    """

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        message = problem.rstrip(".")
        if fix:
            message = f"{message}; {fix}"
        super().__init__(message.replace("\n", " "))
