"""The processor interface: one handler per queue, typed messages, and the two
kinds of failure the drainer tells apart.

A processor parses the raw body into its message model (a pydantic model):
a body of the wrong shape is a `PermanentError`, dead-lettered at once with
the validation message. Anything else a handler raises is retried with
backoff, unless it is a `PermanentError` (bad input, a row that does not
exist), or the attempts run out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from reactor.engine.errors import Deferred, PermanentError, RetryableError, RetryLater

if TYPE_CHECKING:
    from reactor.engine.db import Database
    from reactor.engine.events import EventBus
    from reactor.engine.health import Health
    from reactor.engine.queues import Message
    from reactor.engine.settings import EngineSettings

__all__ = ["Context", "Deferred", "Job", "MessageModel", "PermanentError", "Processor",
           "RetryLater",
           "RetryableError"]


class MessageModel(BaseModel):
    """Base of typed messages: unknown keys are tolerated (forward compatibility)."""

    model_config = {"extra": "ignore", "frozen": True}


M = TypeVar("M", bound=MessageModel)

# Per model class: the one instance every JSON object validates to, for a model that
# accepts anything (no fields, extra keys ignored, no validator, no post-init), or None.
_ANYTHING: dict[type[BaseModel], BaseModel | None] = {}


def _accepts_anything(model: type[BaseModel]) -> BaseModel | None:
    """For a model whose every JSON object validates to the same empty instance, that
    instance (made once, by pydantic); else None: its bodies are validated one by one."""
    try:
        return _ANYTHING[model]
    except KeyError:
        pass
    decorators = model.__pydantic_decorators__
    plain = (not model.model_fields and model.model_config.get("extra") == "ignore"
             and model.model_config.get("frozen") is True
             and not decorators.model_validators and not decorators.root_validators
             and model.__pydantic_post_init__ is None)
    shared = _ANYTHING[model] = model.model_validate({}) if plain else None
    return shared


@dataclass(frozen=True, slots=True)
class Job(Generic[M]):
    """What a handler gets: the typed message and the delivery it came from."""

    message: M
    delivery: Message

    @property
    def msg_id(self) -> int:
        return self.delivery.msg_id


@dataclass(frozen=True, slots=True)
class Context:
    """What a processor is given at construction, all of it: nothing is set later.

    `settings` is the app's settings object (the app's subclass of EngineSettings);
    a processor reads only its own part of it.
    """

    queue: str
    db: Database
    bus: EventBus
    health: Health
    settings: EngineSettings
    concurrency: int | None = None  # jobs of this queue in flight in one process
    timeout_s: float | None = None  # a job running longer is cancelled (and retried)


class Processor(Generic[M]):
    """Handles the messages of one queue.

    Subclasses set `model` and implement `handle`; the queue is the one the app
    declared for it (`Queue(name, ProcessorClass)`), given in the `Context`.
    `concurrency` bounds the jobs of this queue in flight in one process;
    `timeout_s` cancels a stuck job (it is then retried): class defaults, which
    the app's declaration may override. A message whose deliveries keep
    ending with no outcome (its worker crashes) is dead-lettered by the drainer
    after MAX_LOST_DELIVERIES, in every queue.
    """

    # The queue it drains: the name the app declared (a default for tests and benches).
    queue: str
    model: type[M]
    # Defaults; the app's Queue declaration may set either for its queue.
    concurrency: int = 50
    timeout_s: float = 60.0

    def __init__(self, ctx: Context) -> None:
        """Check the processor's settings here (raise ConfigError): this runs before start."""
        self.queue = ctx.queue
        self.settings = ctx.settings
        self.db = ctx.db
        self.bus = ctx.bus
        self.health = ctx.health
        if ctx.concurrency is not None:
            self.concurrency = ctx.concurrency
        if ctx.timeout_s is not None:
            self.timeout_s = ctx.timeout_s

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Resources held while the reactor runs (a connection pool, an event loop)."""
        yield

    def routes(self) -> list[Any]:
        """HTTP routes (starlette.routing.Route) this processor serves on METRICS_PORT."""
        return []

    def dead_letter_stamp(self, delivery: Message) -> dict[str, Any]:
        """Keys to merge into a dead letter's original, so that a replay is the same
        job (e.g. the email ledger key of a mail queued without one). Default: none."""
        return {}

    def parse(self, delivery: Message) -> Job[M]:
        """Validate the raw body; a wrong shape is permanent."""
        body: Any = delivery.body
        if not isinstance(body, dict):
            raise PermanentError(f"message is not a JSON object (got {type(body).__name__})")
        shared = _accepts_anything(self.model)
        if shared is not None:  # a model that accepts any object: nothing to validate
            return Job(shared, delivery)  # type: ignore[arg-type]
        try:
            return Job(self.model.model_validate(body), delivery)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}"
                for e in exc.errors()
            )
            raise PermanentError(f"bad message: {problems}") from None

    async def handle(self, job: Job[M]) -> None:
        raise NotImplementedError
