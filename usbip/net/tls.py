"""TLS for USB/IP: contexts, and the op-phase channel that runs the handshake.

The plain USB/IP byte stream travels inside a TLS 1.3 stream, exactly as stunnel would carry it,
so a TLS client of ours talks to a stunnel-wrapped kernel usbipd and the other way round.
TLS runs sans I/O (``ssl.SSLObject`` over two ``ssl.MemoryBIO``): the op phase reads and writes
through :class:`TlsChannel`; the URB phase's :class:`~usbip.net.stream.Stream` keeps the same
``SSLObject`` and BIOs, so it still reads into the decoder's buffers and sends each batch of
replies as one write.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from ..cancelsafe import wait_for
from ..errors import CyusbipError
from .netio import PeerClosed

RECV_SIZE = 256 * 1024


class TlsError(CyusbipError, ConnectionError):
    """A TLS handshake failed or a TLS stream broke (wrong certificate, not TLS at all, ...)."""


def server_context(cert: str, key: str | None = None, client_ca: str | None = None) -> ssl.SSLContext:
    """TLS 1.3 server context; with ``client_ca`` every client must present a certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None, check_hostname: bool = True
) -> ssl.SSLContext:
    """TLS 1.3 client context verifying the server against ``ca`` (the system's CAs when None)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if ca:
        ctx.load_verify_locations(ca)
    else:
        ctx.load_default_certs()
    ctx.check_hostname = check_hostname
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


#: TLS alerts a peer sends about our certificate (OpenSSL reason names), in words
_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate (--tls-cert)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer rejected our certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA of our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer rejected our certificate",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer does not speak TLS 1.3",
}


def describe_error(exc: BaseException) -> str:
    """One readable line for a TLS failure (the reason OpenSSL gives, in words where we know it)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        words = _ALERTS.get(reason)
        return f"{words} ({reason})" if words else reason
    return str(exc) or type(exc).__name__


def peer_names(tls: ssl.SSLObject) -> tuple[str, ...]:
    """The verified peer certificate's names: subject commonName, then DNS/email/URI subjectAltNames."""
    cert = tls.getpeercert()
    if not cert:
        return ()
    names: list[str] = []
    # getpeercert(): {"subject": ((("commonName", "x"),), ...), "subjectAltName": (("DNS", "x"), ...)}
    subject: Any = cert.get("subject", ())
    alt_names: Any = cert.get("subjectAltName", ())
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                names.append(value)
    for kind, value in alt_names:
        if kind in ("DNS", "email", "URI") and value not in names:
            names.append(value)
    return tuple(names)


class TlsChannel:
    """A TLS session over a connected non-blocking socket, for the op phase.

    :meth:`recv_exactly` and :meth:`send_all` have the signatures of ``usbip.net.netio``'s, so
    the op phase runs unchanged over either. Afterwards ``tls``, ``incoming`` and
    ``outgoing`` go to the URB phase's Stream (bytes already read stay in ``incoming``).
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname
        )

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            try:
                await asyncio.get_running_loop().sock_sendall(self.sock, data)
            except (ConnectionResetError, BrokenPipeError) as exc:
                alert = self._alert_before_reset()
                if alert is not None:
                    raise alert from exc
                raise

    def _alert_before_reset(self) -> TlsError | None:
        """After a send failed on a reset: the alert the peer sent before it, if any.

        A server that refuses our certificate may send its alert and then reset the
        connection (stunnel does: it closes with SO_LINGER 0); our next send then fails with
        ECONNRESET although the alert, which says why, is still queued on the socket.
        """
        try:
            while True:
                data = self.sock.recv(RECV_SIZE)
                if not data:
                    break
                self.incoming.write(data)
        except OSError:
            pass
        try:
            if self.tls.version() is None:  # still in the handshake
                self.tls.do_handshake()
            else:
                self.tls.read(1)
        except (ssl.SSLWantReadError, ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return None
        except ssl.SSLError as exc:
            return TlsError(f"TLS failed: {describe_error(exc)}")
        return None

    async def _fill(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, RECV_SIZE)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def handshake(self, timeout: float | None) -> None:
        """Run the handshake (TlsError when it fails, TimeoutError when the peer is too slow)."""

        async def run() -> None:
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                    # closed before a byte of TLS: a port probe or health check, not a failed handshake
                    raise PeerClosed("connection closed during the TLS handshake") from None
                except ssl.SSLWantReadError:
                    await self._flush()
                    if self.incoming.eof:
                        raise PeerClosed("connection closed during the TLS handshake") from None
                    await self._fill()
            await self._flush()

        try:
            await wait_for(run(), timeout)
        except ssl.SSLError as exc:
            # tell the peer why (the alert is in outgoing), then fail
            try:
                await wait_for(self._flush(), 1.0)
            except (OSError, asyncio.TimeoutError):
                pass
            raise TlsError(f"TLS handshake failed: {describe_error(exc)}") from exc

    @property
    def peer_names(self) -> tuple[str, ...]:
        return peer_names(self.tls)

    async def recv_exactly(self, n: int, timeout: float | None = 30.0) -> bytes:
        buf = bytearray()

        async def run() -> None:
            while len(buf) < n:
                try:
                    chunk = self.tls.read(n - len(buf))
                except ssl.SSLWantReadError:
                    await self._flush()
                    if self.incoming.eof:
                        raise PeerClosed(f"connection closed after {len(buf)} of {n} bytes") from None
                    await self._fill()
                    continue
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    raise PeerClosed(f"connection closed after {len(buf)} of {n} bytes") from None
                except ssl.SSLError as exc:
                    # with TLS 1.3 a refused client certificate shows here, after the handshake
                    raise TlsError(f"TLS failed: {describe_error(exc)}") from exc
                if not chunk:
                    raise PeerClosed(f"connection closed after {len(buf)} of {n} bytes")
                buf.extend(chunk)

        await wait_for(run(), timeout)
        return bytes(buf)

    async def send_all(self, data: bytes, timeout: float | None = 30.0) -> None:
        self.tls.write(data)
        await wait_for(self._flush(), timeout)


__all__ = ["TlsChannel", "TlsError", "client_context", "describe_error", "peer_names", "server_context"]
