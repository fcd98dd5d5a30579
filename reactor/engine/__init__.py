"""reactor's engine: a pgmq worker for PostgreSQL and Supabase that wakes on NOTIFY.

It knows no app: an app declares its queues with their processors (`App`,
`Queue`), its settings (a subclass of `EngineSettings`) and its migrations,
and `reactor run --app module:factory` runs it (docs/engine.md: how to build
one; docs/architecture.md: how the engine works). This
is the engine's public API; everything else under reactor.engine is its
implementation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reactor.engine.app import App, AppFactory, Queue, load_app
from reactor.engine.batching import GroupCommit
from reactor.engine.commands import CliError, Command, with_db
from reactor.engine.errors import Deferred, PermanentError, RetryableError, RetryLater
from reactor.engine.processor import Context, Job, MessageModel, Processor
from reactor.engine.settings import ConfigError, EngineSettings, load_settings

if TYPE_CHECKING:
    from reactor.engine.runtime import Reactor

__all__ = ["App", "AppFactory", "CliError", "Command", "ConfigError", "Context", "Deferred",
           "EngineSettings", "GroupCommit", "Job", "MessageModel", "PermanentError",
           "Processor", "Queue", "Reactor", "RetryLater", "RetryableError", "load_app",
           "load_settings", "with_db"]


def __getattr__(name: str) -> Any:
    """`Reactor` (the runtime, with its HTTP and feed servers) loads on first use only."""
    if name == "Reactor":
        from reactor.engine.runtime import Reactor

        return Reactor
    raise AttributeError(f"module 'reactor.engine' has no attribute {name!r}")
