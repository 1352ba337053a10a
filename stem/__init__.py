"""Stem for Python: an asyncio-native, Celery-style background task framework.

Quick start::

    import stem

    app = stem.Stem("shop")              # SQLite default; or broker="redis://..."

    @app.task(max_retries=3)
    async def send_email(ctx: stem.TaskContext, to: str) -> str:
        return f"sent to {to}"

    task_id = await send_email.enqueue("a@example.com")
    result = await send_email.wait(task_id, timeout=10)
    task_id = send_email.delay("a@example.com")        # from sync code
"""

from typing import TYPE_CHECKING, Any

from stem._default import (
    default_app,
    enqueue,
    enqueue_sync,
    get_result,
    set_default_app,
    wait,
    wait_sync,
)
from stem.app import Stem
from stem.config import StemConfig
from stem.context import TaskContext
from stem.encoding import (
    AesGcmPayloadEncoder,
    GzipJsonPayloadEncoder,
    JsonPayloadEncoder,
    TaskPayloadEncoder,
    TaskPayloadEncoderRegistry,
)
from stem.envelope import Envelope
from stem.errors import (
    ConfigurationError,
    EnvelopeDecodeError,
    PayloadEncodingError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    SoftTimeLimitExceeded,
    StemError,
    SyncCallInLoopError,
    TaskArgumentError,
    TaskFailedError,
    TaskNotFoundError,
    TaskRevokedError,
    TimeLimitExceeded,
    UnknownTaskError,
    UnsettledDeliveriesError,
    WaitTimeoutError,
    WorkerLostError,
)
from stem.retry import (
    ExponentialJitterRetryStrategy,
    NonRetryableError,
    Reject,
    Retry,
    RetryPolicy,
    RetryStrategy,
)
from stem.signing import SigningConfig
from stem.status import TaskError, TaskResult, TaskState, TaskStatus
from stem.task import AsyncTaskDefinition, SyncTaskDefinition, TaskCall, TaskDefinition, TaskOptions
from stem.tls import TlsConfig

if TYPE_CHECKING:
    from stem.canvas import Signature, chain, chord, group

__version__ = "0.1.0"

#: Names imported on first use (``stem.Signature``, ``from stem import chain``): a worker
#: or a producer that never builds a canvas does not import it.
_LAZY = {"Signature": "stem.canvas", "chain": "stem.canvas", "chord": "stem.canvas",
         "group": "stem.canvas"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

__all__ = [
    "AesGcmPayloadEncoder",
    "AsyncTaskDefinition",
    "ConfigurationError",
    "Envelope",
    "EnvelopeDecodeError",
    "ExponentialJitterRetryStrategy",
    "GzipJsonPayloadEncoder",
    "JsonPayloadEncoder",
    "NonRetryableError",
    "PayloadEncodingError",
    "PayloadTooLargeError",
    "Reject",
    "Retry",
    "RetryPolicy",
    "RetryStrategy",
    "ServiceUnavailableError",
    "Signature",
    "SigningConfig",
    "SoftTimeLimitExceeded",
    "Stem",
    "StemConfig",
    "StemError",
    "SyncCallInLoopError",
    "SyncTaskDefinition",
    "TaskArgumentError",
    "TaskCall",
    "TaskContext",
    "TaskDefinition",
    "TaskError",
    "TaskFailedError",
    "TaskNotFoundError",
    "TaskOptions",
    "TaskPayloadEncoder",
    "TaskPayloadEncoderRegistry",
    "TaskResult",
    "TaskRevokedError",
    "TaskState",
    "TaskStatus",
    "TimeLimitExceeded",
    "TlsConfig",
    "UnknownTaskError",
    "UnsettledDeliveriesError",
    "WaitTimeoutError",
    "WorkerLostError",
    "__version__",
    "chain",
    "chord",
    "default_app",
    "enqueue",
    "enqueue_sync",
    "get_result",
    "group",
    "set_default_app",
    "wait",
    "wait_sync",
]
