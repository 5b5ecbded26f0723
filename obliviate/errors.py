"""One exception family for problems a user can fix; the CLI prints their message, no traceback."""


class ObliviateError(Exception):
    """Bad input or state. The message is one sentence naming the problem and the fix."""


class ConfigError(ObliviateError):
    """params.yaml has an unknown key, a wrong type or an impossible value."""


class DataError(ObliviateError):
    """A data source is missing, corrupt or unsuitable."""


class PartitionError(ObliviateError):
    """The requested block partition is impossible or failed its quality gate."""


class StoreError(ObliviateError):
    """The parameter store is missing, incomplete or was built with other params."""


class RequestError(ObliviateError):
    """A deletion request names unknown, duplicated or already forgotten samples, or is unsafe."""


def shown_path(path: object, width: int = 80) -> str:
    """A path from the command line as a message shows it: control characters escaped (the
    message stays one line) and a long path cut to its last ``width`` characters (its name)."""
    text = str(path).encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= width else f"...{text[-width:]}"


def shown_id(sample_id: str, width: int = 60) -> str:
    """A sample id as a message shows it: control characters escaped (a newline cannot split the
    sentence) and a long id cut to ``width`` characters."""
    text = sample_id.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= width else f"{text[:width]}... ({len(sample_id)} characters)"
