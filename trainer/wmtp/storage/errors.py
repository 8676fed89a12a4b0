"""Storage failures as one line each, with the exit code (`wmtp.contract.ExitCode`) that classifies them."""

from __future__ import annotations

from wmtp.contract import ExitCode

_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
           "ExpiredToken", "InvalidToken", "AccountProblem"}  # fmt: skip
_TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
              "ServiceUnavailable", "500", "502", "503", "504"}  # fmt: skip


class StorageError(Exception):
    """A storage failure to report as one line, with the exit code that classifies it."""

    def __init__(self, message: str, code: int = ExitCode.ERROR) -> None:
        super().__init__(" ".join(message.split()))
        self.code = code


def error_code(err: Exception) -> str:
    """The S3 error code of a botocore ClientError ("" for anything else)."""
    response = getattr(err, "response", None)
    return str((response or {}).get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def is_transient(err: Exception) -> bool:
    """Whether S3 answered with a throttling or server error that a later try may not meet."""
    return error_code(err) in _TRANSIENT


def describe_error(err: Exception, uri: str) -> StorageError:
    """One line naming `uri` and what went wrong, classified: missing, denied, unreachable or failed."""
    from botocore.exceptions import (
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    code = error_code(err)
    if code:
        message = err.response.get("Error", {}).get("Message") or code  # type: ignore[attr-defined]
        if code == "NoSuchBucket":
            return StorageError(f"{uri}: the bucket does not exist", ExitCode.NOT_FOUND)
        if code in _NOT_FOUND:
            return StorageError(f"{uri}: no such object or prefix", ExitCode.NOT_FOUND)
        if code in _DENIED:
            return StorageError(f"{uri}: access denied ({code}: {message})", ExitCode.DENIED)
        if code == "PreconditionFailed":
            return StorageError(f"{uri}: the object changed in S3 while it was read; run it again")
        return StorageError(f"{uri}: S3 error {code}: {message}")
    if isinstance(err, NoCredentialsError | PartialCredentialsError):
        return StorageError(f"{uri}: no usable AWS credentials in the environment or config files", ExitCode.DENIED)
    if isinstance(err, EndpointConnectionError | ConnectTimeoutError):
        return StorageError(f"{uri}: cannot reach the S3 endpoint ({err})", ExitCode.UNREACHABLE)
    return StorageError(f"{uri}: {type(err).__name__}: {err}")


class UnsafePath(StorageError):
    """A key or local path that would put a file outside its folder, or write through a link (bad input)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ExitCode.BAD_INPUT)
