"""Webhook destinations: which URLs a job may name, and which addresses a webhook may be sent to.

Standard library only: the request contract checks a `webhook_url` at submit with it (no DNS), and the
API's dispatcher (`handler/webhook_urls.py`) checks it again at delivery, against every address the
name resolves to.

* `parse_http_url` is syntax only, the same for every deployment: http(s), a port in 1..65535, a
  plain DNS name or a canonical IP literal (never `0177.0.0.1`, `2130706433`, `127.1`, `0x7f.0.0.1`,
  which resolvers read as other addresses), no `user:password@` credentials, no whitespace or control
  characters. Whatever it accepts the dispatcher can send to; whatever it refuses cannot be stored.
* `address_refusal` says why an address may not be sent to: anything not globally reachable
  (loopback, private, link-local such as 169.254.169.254, unique-local, CGNAT, multicast, reserved,
  unspecified), an IPv6 address that embeds such an IPv4 one (`::ffff:127.0.0.1`, 6to4, Teredo,
  NAT64) included, unless a network of the deployment's allow-list holds it.
* `name_refusal` says why a name can never be public (`localhost`, `*.internal` such as
  `metadata.google.internal`, `*.local`, single-label names the local search domains complete); with
  an allow-list the name is left to the addresses it resolves to.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_DOTTED_QUAD = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
# A host whose last label is a number is an IPv4 address to URL parsers and resolvers (inet_aton reads
# octal, hex and fewer than four parts), whatever the rest looks like.
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
_NEVER_PUBLIC_SUFFIXES = (".localhost", ".local", ".localdomain", ".internal", ".home.arpa", ".arpa")
_NEVER_PUBLIC_NAMES = frozenset({"localhost", "localhost.localdomain", "metadata.google.internal", "metadata.goog"})
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SAFE_TARGET = "/?&=%:@!$'()*+,;-._~[]"


class URLRefused(ValueError):
    """The URL may not be used as a webhook destination; the message says why."""


@dataclass(frozen=True)
class HttpTarget:
    """A parsed, checked http(s) URL: what the dispatcher connects to and sends."""

    scheme: str  # "http" or "https"
    host: str  # lower-case ASCII (IDNA), no brackets, no trailing dot
    port: int
    target: str  # path and query, percent-encoded ASCII
    address: IPAddress | None  # the host when it is an IP literal

    @property
    def default_port(self) -> bool:
        return self.port == (443 if self.scheme == "https" else 80)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if isinstance(self.address, ipaddress.IPv6Address) else self.host
        return host if self.default_port else f"{host}:{self.port}"


def parse_http_url(url: str) -> HttpTarget:
    """The target of an http(s) URL, or URLRefused saying what is wrong with it (syntax only)."""
    if not isinstance(url, str) or not url:
        raise URLRefused("must be an http:// or https:// URL")
    if len(url) > 2048:
        raise URLRefused("must be at most 2048 characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url) or "\\" in url:
        raise URLRefused("must not contain whitespace, control characters or backslashes")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise URLRefused(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.netloc:
        raise URLRefused("must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise URLRefused("must not contain credentials (user:password@): the webhook signature authenticates us")
    raw_host, _, raw_port = _split_host_port(parts.netloc)
    if raw_port is not None:
        if not raw_port.isascii() or not raw_port.isdigit() or not 1 <= int(raw_port) <= 65535:
            raise URLRefused("must have a port from 1 to 65535")
        port = int(raw_port)
    else:
        port = 443 if scheme == "https" else 80
    host, address = _parse_host(raw_host)
    target = quote(parts.path or "/", safe=_SAFE_TARGET) + (f"?{quote(parts.query, safe=_SAFE_TARGET)}" if parts.query else "")
    return HttpTarget(scheme=scheme, host=host, port=port, target=target, address=address)


def _split_host_port(netloc: str) -> tuple[str, str, str | None]:
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise URLRefused("has an unterminated [IPv6 address]")
        host, rest = netloc[: end + 1], netloc[end + 1 :]
        if rest and not rest.startswith(":"):
            raise URLRefused("has text after its [IPv6 address]")
        return host, ":", rest[1:] if rest else None
    host, colon, port = netloc.rpartition(":") if ":" in netloc else (netloc, "", "")
    return (host, colon, port) if colon else (netloc, "", None)


def _parse_host(raw: str) -> tuple[str, IPAddress | None]:
    if raw.startswith("["):
        try:
            if "%" in raw:
                raise ValueError("a zone id")
            address = ipaddress.IPv6Address(raw[1:-1])  # refuses IPv4 in brackets
        except ValueError:
            raise URLRefused("has an invalid [IPv6 address]") from None
        return str(address), address
    host = raw.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise URLRefused("must name a host")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise URLRefused("has a host name that is not a valid international domain name") from None
    labels = host.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        if not _DOTTED_QUAD.fullmatch(host):
            raise URLRefused("has a numeric host that is not a plain dotted-decimal IPv4 address (a.b.c.d)")
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            raise URLRefused("has an invalid IPv4 address") from None
        return str(address), address
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise URLRefused("has an invalid host name")
    return host, None


@functools.lru_cache(maxsize=32)
def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """Comma-separated CIDRs (`127.0.0.0/8,::1/128`; a bare address is a /32 or /128); "" is none."""
    networks = []
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network (CIDR such as 10.0.0.0/8 or ::1/128)") from None
    return tuple(networks)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _allowed(address: IPAddress, allowed: tuple[IPNetwork, ...]) -> bool:
    return any(address.version == network.version and address in network for network in allowed)


def address_refusal(address: IPAddress, allowed: tuple[IPNetwork, ...] = ()) -> str | None:
    """Why a webhook may not be sent to `address`, or None when it may."""
    if _allowed(address, allowed):
        return None
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = address_refusal(embedded, allowed)
            if reason is not None:
                return f"{address} embeds {reason.replace(' is ', ', which is ', 1)}"
            if address.ipv4_mapped is not None:  # the IPv4 address itself, spelled in IPv6
                return None
    for kind, flag in (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("not globally reachable", not address.is_global),
    ):
        if flag:
            return f"{address} is {kind}"
    return None


def name_refusal(host: str) -> str | None:
    """Why a host name can never be a public destination, or None (then its addresses decide)."""
    host = host.lower().rstrip(".")
    if host in _NEVER_PUBLIC_NAMES or host.endswith(_NEVER_PUBLIC_SUFFIXES):
        return f"{host} is a local or internal name"
    if "." not in host:
        return f"{host} is a single-label name (the local search domains complete it)"
    return None


def check_webhook_url(url: str, allow_networks: str | tuple[IPNetwork, ...] | None = None) -> HttpTarget:
    """The submit-time check: syntax always; with a policy (`allow_networks`, "" = public addresses
    only) also an IP literal's address and, for public-only, names that are never public. Raises
    URLRefused. Names are resolved, and every address checked, only at delivery."""
    target = parse_http_url(url)
    if allow_networks is None:
        return target
    allowed = parse_networks(allow_networks) if isinstance(allow_networks, str) else tuple(allow_networks)
    if target.address is not None:
        reason = address_refusal(target.address, allowed)
    else:
        reason = None if allowed else name_refusal(target.host)
    if reason is not None:
        raise URLRefused(f"must be a public destination: {reason}")
    return target
