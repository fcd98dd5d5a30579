"""What an app built on the engine declares: its queues with their processors, its
settings, its migrations and its own event kinds.

An app is made by a factory, `build(settings=None) -> App`, that names every
queue once; `reactor run --app module:factory` loads one. The engine never
names a queue of its own: it drains what the app declares.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reactor.engine.processor import Processor
from reactor.engine.queues import QUEUE_NAME
from reactor.engine.settings import ConfigError, EngineSettings, load_settings

if TYPE_CHECKING:
    from reactor.engine.commands import Command

__all__ = ["App", "AppFactory", "Queue", "load_app"]

_CLASS_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class Queue:
    """One queue the app drains: the processor class that handles its messages, and
    (if not the processor's defaults) how many jobs run at once and for how long.

    `processor` is the class or its `"module:Class"` path. A path is imported only when
    a reactor drains the queue: `reactor status`, `dlq` or `migrate` then load none of
    the processors' libraries (a PDF renderer, an SMTP client: seconds per command).
    """

    name: str
    processor: type[Processor[Any]] | str
    concurrency: int | None = None
    timeout_s: float | None = None

    @property
    def processor_class(self) -> type[Processor[Any]]:
        """The processor class (imported now if it was given by path).

        Raises:
            ConfigError: the path names no Processor class.
        """
        if not isinstance(self.processor, str):
            return self.processor
        module_name, _, attr = self.processor.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except Exception as exc:  # ImportError, AttributeError, an error in the module …
            raise ConfigError(f"queue {self.name}: cannot load its processor "
                              f"{self.processor!r} ({type(exc).__name__}: {exc})") from None
        if not (isinstance(cls, type) and issubclass(cls, Processor)):
            raise ConfigError(f"queue {self.name}: {self.processor!r} is not a Processor class")
        return cls


class App:
    """An app on the engine: what `reactor run` drains and `reactor migrate` applies.

    Args:
        name: the app's name, for messages.
        settings: its settings, their class (read from the environment) or a function
            that loads them; a class or a function is called on first use, so
            `reactor --help` and commands that need no database (`reactor dev`) work
            with no environment set.
        queues: every queue it drains, each declared once.
        migrations: its ordered SQL migrations (the app's line; the engine has its own).
        event_kinds: event kinds its processors publish besides the engine's.
        pg_cron: its migrations schedule pg_cron jobs (`reactor migrate` checks it).
        commands: its own `reactor` subcommands (reactor.engine.commands.Command).
    """

    def __init__(self, *, name: str,
                 settings: EngineSettings | type[EngineSettings] | Callable[[], EngineSettings],
                 queues: tuple[Queue, ...], migrations: Path,
                 event_kinds: tuple[str, ...] = (), pg_cron: bool = False,
                 commands: tuple[Command, ...] = ()) -> None:
        self.name = name
        self.queues = queues
        self.migrations = migrations
        self.event_kinds = event_kinds
        self.pg_cron = pg_cron
        self.commands = commands
        self._settings = settings
        self._check()

    @cached_property
    def settings(self) -> EngineSettings:
        """The app's settings, loaded now if they were given as a loader.

        Raises:
            ConfigError: a setting is missing or wrong (one line naming the fix).
        """
        if isinstance(self._settings, EngineSettings):
            return self._settings
        if isinstance(self._settings, type):
            return load_settings(self._settings)
        return self._settings()

    def _check(self) -> None:
        names = [q.name for q in self.queues]
        if len(set(names)) != len(names):
            raise ConfigError(f"app {self.name}: a queue is declared twice ({', '.join(names)})")
        for queue in self.queues:
            if isinstance(queue.processor, str) and not _CLASS_PATH.fullmatch(queue.processor):
                raise ConfigError(f"app {self.name}: queue {queue.name}: write its processor "
                                  f"as module:Class, not {queue.processor!r}")
        for name in names:
            if not QUEUE_NAME.fullmatch(name) or name.endswith("_dlq"):
                raise ConfigError(f"app {self.name}: {name!r} cannot be a queue's name (lower "
                                  "case letters, digits and _, at most 43, not ending in _dlq)")
        commands = [c.name for c in self.commands]
        if len(set(commands)) != len(commands):
            raise ConfigError(f"app {self.name}: a command is declared twice "
                              f"({', '.join(commands)})")

    @property
    def queue_names(self) -> tuple[str, ...]:
        return tuple(q.name for q in self.queues)

    @property
    def processors(self) -> Mapping[str, type[Processor[Any]]]:
        return {q.name: q.processor_class for q in self.queues}

    def check_queue(self, name: str) -> str:
        """`name` if the app drains it.

        Raises:
            ValueError: naming the queues there are.
        """
        if name not in self.queue_names:
            raise ValueError(f"unknown queue {name!r}: use one of {', '.join(self.queue_names)}")
        return name


AppFactory = Callable[..., App]


def load_app(path: str, settings: EngineSettings | None = None) -> App:
    """The app made by the factory at `module:function` (procrastinate's App.from_path).

    Raises:
        ConfigError: the path does not name a factory that returns an App.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"--app {path!r}: write it as module:factory "
                          "(e.g. myworker.app:build)")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # ImportError, AttributeError, a SyntaxError in the module …
        raise ConfigError(f"--app {path!r}: cannot load it ({type(exc).__name__}: {exc})") \
            from None
    if not callable(factory):
        raise ConfigError(f"--app {path!r}: {attr} is not a factory (a function returning "
                          "an App)")
    try:
        app = factory(settings) if settings is not None else factory()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"--app {path!r}: the factory failed: {type(exc).__name__}: "
                          f"{exc}") from None
    if not isinstance(app, App):
        raise ConfigError(f"--app {path!r}: the factory returned {type(app).__name__}, "
                          "not reactor.engine.App")
    return app
