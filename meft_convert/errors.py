"""Errors meft-convert reports to its users; the CLI turns each into one line and an exit code."""


class MeftConvertError(Exception):
    """A conversion or its verification failed (exit code 1).

    `cli_message`, where given, is the same message in the command line's terms (flags such
    as --no-exact instead of the Python API's exact=False); the CLI prints it instead."""

    exit_code = 1

    def __init__(self, message: str = "", *, cli_message: str | None = None):
        super().__init__(message)
        self.cli_message = cli_message


class BadInputError(MeftConvertError):
    """The model, the output folder or an option cannot be used as given (exit code 2)."""

    exit_code = 2


class HubAccessError(MeftConvertError):
    """The hub could not be reached, or refused access (exit code 1: the input may be right)."""


class VerificationError(MeftConvertError):
    """The converted model does not reconstruct or differentiate as it must (exit code 1)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
