"""Where a webhook may go, checked when it is sent (the submit-time check is `pipeline/urls.py`).

Against SSRF and DNS rebinding, one delivery:

1. parses the stored URL again (`pipeline.urls.parse_http_url`: syntax, no credentials, no
   `0177.0.0.1`-style addresses) and, with no allow-list, refuses names that are never public
   (`localhost`, `metadata.google.internal`, `*.internal`, single-label names);
2. resolves the host ONCE (`resolve_host`) and checks EVERY address it resolves to: one address that
   is not public (loopback, private, link-local, unique-local, CGNAT, multicast, reserved, an IPv6
   address embedding such an IPv4 one) and not in the allow-list (`webhook_allow_networks`) refuses the
   delivery, so a name that answers a public and a private address is refused whatever order it
   answers in;
3. connects to those checked addresses only (`PinnedBackend`, the network backend of the connection):
   the name is never looked up a second time, so it cannot be rebound between the check and the
   connection. TLS still verifies the certificate against the URL's host name (SNI and hostname
   checking use the name). No proxy from the environment is used and redirects are not followed.

`DeadlineStream` bounds every socket operation by the delivery's total deadline: a receiver that drips
its answer a byte at a time is cut at the deadline, not at a per-read timeout. The name lookup itself is
the system resolver's (its own timeouts); a lookup that ends after the deadline sends nothing.
"""

from __future__ import annotations

import ipaddress
import socket
import time
import typing
from dataclasses import dataclass

import httpcore

from pipeline.urls import HttpTarget, IPAddress, IPNetwork, address_refusal, name_refusal, parse_http_url, parse_networks


class DestinationRefused(Exception):
    """The webhook's destination is not one this deployment may send to; the message says why."""


def resolve_host(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to (the system resolver); tests replace this function."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


@dataclass(frozen=True)
class Destination:
    target: HttpTarget
    addresses: tuple[IPAddress, ...]  # every address the host resolved to, each checked


class WebhookPolicy:
    """Which destinations webhooks may reach: public addresses, and the `allow_networks` (CIDRs)."""

    def __init__(self, allow_networks: str | tuple[IPNetwork, ...] = ""):
        self.allowed = parse_networks(allow_networks) if isinstance(allow_networks, str) else tuple(allow_networks)

    def destination(self, url: str) -> Destination:
        """The checked destination of `url`, or DestinationRefused / pipeline.urls.URLRefused."""
        target = parse_http_url(url)
        if target.address is not None:
            addresses = [target.address]
        else:
            if not self.allowed and (reason := name_refusal(target.host)):
                raise DestinationRefused(reason)
            try:
                addresses = resolve_host(target.host, target.port)
            except OSError as exc:
                raise DestinationRefused(f"{target.host} does not resolve ({exc.strerror or exc})") from None
            if not addresses:
                raise DestinationRefused(f"{target.host} resolves to no address")
        for address in addresses:
            if reason := address_refusal(address, self.allowed):
                where = "" if target.address is not None else f"{target.host} resolves to "
                raise DestinationRefused(f"not a public destination: {where}{reason}")
        return Destination(target, tuple(addresses))


def _left(deadline: float, timeout: float | None, error: type[Exception]) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("the webhook's total deadline passed")
    return left if timeout is None else min(timeout, left)


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read, write and TLS handshake ends by `deadline` (time.monotonic())."""

    WRITE_CHUNK = 64 * 1024

    def __init__(self, inner: httpcore.NetworkStream, deadline: float):
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(self._deadline, timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for start in range(0, len(buffer), self.WRITE_CHUNK):
            self._inner.write(buffer[start : start + self.WRITE_CHUNK], _left(self._deadline, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None) -> httpcore.NetworkStream:
        inner = self._inner.start_tls(ssl_context, server_hostname, _left(self._deadline, timeout, httpcore.ConnectTimeout))
        return DeadlineStream(inner, self._deadline)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class PinnedBackend(httpcore.NetworkBackend):
    """Opens connections to the checked addresses of one destination only (in order, the first that
    answers), never by name, each operation bounded by the delivery's deadline."""

    def __init__(self, destination: Destination, deadline: float):
        self._destination = destination
        self._deadline = deadline
        self._tcp = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        target = self._destination.target
        if host.strip("[]").lower() != target.host or port != target.port:
            raise httpcore.ConnectError(f"{host}:{port} is not the checked destination")
        error: Exception = httpcore.ConnectError("no address to connect to")
        for address in self._destination.addresses:
            try:
                stream = self._tcp.connect_tcp(
                    str(address), port, _left(self._deadline, timeout, httpcore.ConnectTimeout), local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
                continue
            return DeadlineStream(stream, self._deadline)
        raise error

    def connect_unix_socket(self, *args: typing.Any, **kwargs: typing.Any) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks are sent over TCP only")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
