"""Errors meft-convert reports to its users; the CLI turns each into one line and an exit code."""


class MeftConvertError(Exception):
    """A conversion or its verification failed (exit code 1)."""

    exit_code = 1


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
