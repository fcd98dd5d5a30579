"""The SMTP pool (`SmtpMailer`), and `open_mailer`, which runs the mailer EMAIL_PROVIDER asks for.

A few persistent SMTP connections, shared by the email jobs: checked out for
one mail, given back as soon as the server has accepted it, probed with NOOP
after a pause, replaced when the server closed them, and closed with QUIT when
idle too long (`reap_idle`, which `open_mailer` runs beside the caller's block).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Final

import structlog
import trio

from reactor.clinic.services.asyncio_thread import AsyncioThread
from reactor.clinic.services.mailer.mime import OutgoingMail
from reactor.clinic.services.mailer.outbox import open_file_mailer
from reactor.clinic.services.mailer.protocol import Mailer, MailSession
from reactor.clinic.services.mailer.smtp import (
    ConnectionGone,
    DeliveryUnknown,
    SmtpAuthFailed,
    SmtpConnection,
    check_mail_settings,
    classify,
    helo_name,
)
from reactor.clinic.settings import MailSettings
from reactor.engine.errors import PermanentError, RetryableError

__all__ = ["PROBE_AFTER_S", "SmtpMailer", "open_mailer"]

log = structlog.get_logger("reactor.mailer")

# A pooled connection idle longer than this is checked with NOOP before it carries a
# mail, so a connection the server closed costs a reconnect, never a failed send.
PROBE_AFTER_S: Final = 1.0


class SmtpMailer:
    """A small pool of persistent SMTP connections.

    A connection goes back to the pool as soon as the server has accepted a
    mail (its slot too: the caller's ledger write does not hold it); one idle
    for SMTP_POOL_IDLE_S is closed with QUIT by `reap_idle` (servers otherwise
    time it out and log it), and one the server closed is replaced before it
    carries a mail.
    """

    def __init__(self, settings: MailSettings) -> None:
        check_mail_settings(settings)
        self.settings = settings
        self.security = settings.smtp_security_effective
        self.helo_name = helo_name(settings)
        self._idle: list[tuple[SmtpConnection, float]] = []  # (connection, idle since)
        self._went_idle = trio.Event()
        self._slots = trio.Semaphore(settings.smtp_pool_size)
        # Loading the CA store costs milliseconds: once, not per connection.
        self._tls = self._tls_context() if self.security != "none" else None
        # aiosmtplib's event loop, in a thread of its own (closed by aclose).
        self._loop = AsyncioThread("reactor-smtp")
        self._loop.start()

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()  # certificates are always verified
        if self.settings.smtp_ca_file:
            context.load_verify_locations(cafile=str(self.settings.smtp_ca_file))
        return context

    async def _connect(self) -> SmtpConnection:
        s = self.settings
        host = s.smtp_host or "localhost"
        try:
            return await SmtpConnection.open(
                self._loop, host=host, port=s.smtp_port, reply_timeout_s=s.smtp_timeout_s,
                security=self.security, tls=self._tls, helo=self.helo_name,
                user=s.smtp_user, password=s.smtp_pass.get_secret_value() if s.smtp_pass else "")
        except SmtpAuthFailed as exc:
            log.error("SMTP authentication failed: check SMTP_USER and SMTP_PASS",
                      host=host, code=exc.code)
            raise classify(exc) from None
        except Exception as exc:
            raise classify(exc) from None

    async def _checkout(self) -> SmtpConnection:
        """A pooled connection that still works, else a new one.

        One that was idle for a while, or whose server has said something since
        (closed it, or sent 421 first), is asked NOOP first: a connection the
        server dropped costs a reconnect, not a failed send.
        """
        while self._idle:
            client, since = self._idle.pop()  # the most recently used: the others may expire
            if trio.current_time() - since < PROBE_AFTER_S and client.idle_and_quiet():
                return client
            try:
                await client.noop()
                return client
            except Exception as exc:
                log.debug("pooled SMTP connection no longer answers; reconnecting",
                          error=f"{type(exc).__name__}: {exc}")
                await self._discard(client)
            except BaseException:  # cancelled mid-NOOP: the connection is in doubt
                await self._discard(client)
                raise
        return await self._connect()

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[MailSession]:
        """A pool slot and a working connection (waiting is cancellable); back to the
        pool as soon as the mail is accepted, or at the end of the block, unless the
        conversation failed or was cut."""
        await self._slots.acquire()
        try:
            client = await self._checkout()
        except BaseException:
            self._slots.release()
            raise
        session = _SmtpSession(self, client)
        try:
            yield session
        finally:
            await session.finish(usable=session.usable)

    def _give_back(self, client: SmtpConnection | None) -> None:
        """The slot is free again; the connection, if any, waits in the pool."""
        if client is not None:
            self._idle.append((client, trio.current_time()))
            self._went_idle.set()
        self._slots.release()

    async def send(self, mail: OutgoingMail) -> str:
        async with self.session() as session:
            return await session.send(mail)

    async def reap_idle(self) -> None:
        """Close connections idle for SMTP_POOL_IDLE_S with QUIT; runs until cancelled."""
        idle_s = self.settings.smtp_pool_idle_s
        while True:
            now = trio.current_time()
            expired = [client for client, since in self._idle if now - since >= idle_s]
            self._idle = [(client, since) for client, since in self._idle
                          if now - since < idle_s]
            await self._quit_all(expired)
            if self._idle:
                await trio.sleep_until(min(since for _, since in self._idle) + idle_s)
            else:
                self._went_idle = trio.Event()
                await self._went_idle.wait()

    async def _quit_all(self, clients: list[SmtpConnection]) -> None:
        """QUIT the connections side by side, all within one bound (a relay that does
        not answer QUIT must not cost one bound per connection), then close them."""
        try:
            with trio.move_on_after(min(5.0, self.settings.smtp_timeout_s)):
                async with trio.open_nursery() as nursery:
                    for client in clients:
                        nursery.start_soon(self._say_quit, client)
        finally:
            for client in clients:  # after QUIT too: a TLS close may not have finished
                await self._discard(client)

    @staticmethod
    async def _say_quit(client: SmtpConnection) -> None:
        try:
            await client.quit()
        except Exception as exc:
            log.debug("QUIT on an idle SMTP connection failed", error=str(exc))

    @staticmethod
    async def _discard(client: SmtpConnection | None) -> None:
        """Close the connection now, socket included, whatever state it is in."""
        if client is not None:
            await client.abort()

    async def aclose(self) -> None:
        """QUIT the idle connections, then end the asyncio thread (shielded: it runs on
        the way out of cancelled scopes too)."""
        with trio.CancelScope(shield=True):
            idle, self._idle = self._idle, []
            await self._quit_all([client for client, _ in idle])
            await self._loop.aclose()


class _SmtpSession:
    """One conversation on a pooled connection."""

    def __init__(self, pool: SmtpMailer, client: SmtpConnection) -> None:
        self.pool = pool
        self.client: SmtpConnection | None = client
        self.usable = True

    async def send(self, mail: OutgoingMail) -> str:
        client = self.client
        if client is None or not self.usable:
            raise RuntimeError("one mail per session")
        self.usable = False  # until the server has answered the whole mail
        try:
            try:
                await client.sendmail(mail.sender, mail.recipient, mail.raw,
                                      smtputf8=mail.smtputf8)
            except ConnectionGone as exc:
                if not client.carried:
                    raise
                # A connection that has carried mail, closed by the server since (a
                # per-connection limit: 250 and the hang-up in one breath, or 421 at
                # the next MAIL) before our check could see it: nothing of this mail
                # went out, so a new connection carries it, once.
                log.debug("pooled SMTP connection closed by the server; reconnecting",
                          error=str(exc))
                client = await self.pool._connect()
                stale, self.client = self.client, client
                await self.pool._discard(stale)
                await client.sendmail(mail.sender, mail.recipient, mail.raw,
                                      smtputf8=mail.smtputf8)
        except (PermanentError, RetryableError, DeliveryUnknown):  # already told apart
            await self.finish(usable=False)
            raise
        except Exception as exc:
            await self.finish(usable=False)
            raise classify(exc) from None
        client.carried += 1
        await self.finish(usable=True)
        return mail.message_id

    async def finish(self, *, usable: bool) -> None:
        """Give the slot back, with the connection if it is in step; once."""
        client, self.client = self.client, None
        if client is None:
            return
        if usable:
            self.pool._give_back(client)
            return
        try:
            await self.pool._discard(client)
        finally:
            self.pool._give_back(None)


@contextlib.asynccontextmanager
async def open_mailer(settings: MailSettings) -> AsyncIterator[Mailer]:
    """The mailer EMAIL_PROVIDER asks for, for the duration of the block."""
    if settings.email_provider == "file":
        async with open_file_mailer(settings.email_outbox_dir) as outbox:
            yield outbox
        return
    mailer = SmtpMailer(settings)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(mailer.reap_idle)
        try:
            yield mailer
        finally:
            nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await mailer.aclose()
