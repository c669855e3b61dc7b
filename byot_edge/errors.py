"""The one exception type for errors a user can cause and fix."""


class ByotError(Exception):
    """A problem with the user's input, files or environment.

    The message must say what was wrong and what to do about it; the CLI prints it without
    a traceback and exits non-zero, the server answers it with a 4xx status.
    """


def missing_dependency(package: str, extra: str | None = None, purpose: str = "") -> ByotError:
    """An error for an optional library that is not installed, with the command that fixes it."""
    hint = f"pip install 'byot-edge[{extra}]'" if extra else f"pip install {package}"
    what = f" (needed {purpose})" if purpose else ""
    return ByotError(f"{package} is not installed{what}. Install it with: {hint}")


class RequestError(ByotError):
    """A request a server refuses, with the HTTP status to answer (4xx, or 503 with the
    seconds after which to retry). Raised by framework-free code (request decoding, the
    server's admission); the web layer turns it into the response."""

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
