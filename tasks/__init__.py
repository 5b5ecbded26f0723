"""Prefect tasks: thin wrappers that give each pipeline step retries, logs and artifacts.

The logic lives in the `obliviate` package and is tested without Prefect.
"""

from prefect.cache_policies import NONE


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry I/O failures, but not a user error (missing file, bad params): retrying cannot help."""
    from obliviate.errors import ObliviateError

    return not isinstance(state.result(raise_on_failure=False), ObliviateError)


# Tasks pass configs and arrays around inside one flow run; hashing them for a cache is wasted.
NO_CACHE = {"cache_policy": NONE}
