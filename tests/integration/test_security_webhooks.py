"""Webhooks cannot be turned against the API or other tenants (issue 16, items 1, 5, 6, 7 and 22):
a URL nothing can send to fails alone, non-public destinations are refused at submit and at delivery
(every resolved address, the connection pinned to them), a receiver can neither drip nor flood the
dispatcher, two dispatchers never send one delivery at once, and a database outage logs once."""

import logging
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import h11
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import text

import handler.webhook_urls
from db import DatabaseUnavailable, NewJob
from db.store import RetryPolicy
from handler.settings import Settings
from handler.webhooks import WebhookDispatcher
from pipeline.contract import GenerationRequest
from pipeline.urls import URLRefused, parse_http_url
from tests.integration.http_harness import free_port, start_api

LOOPBACK = "127.0.0.0/8,::1/128"
NOW_RETRY = RetryPolicy(base_seconds=0.0, max_seconds=0.0)
LATER_RETRY = RetryPolicy(base_seconds=600.0, max_seconds=600.0)


class Hooks:
    """A receiver on 127.0.0.1 with one behaviour per path:
    /ok answers 200; /drip-head drips its status line and headers a byte at a time (for `drip` s);
    /drip-body answers 200 and drips its body; /huge answers 200 with a body of `huge` bytes sent as
    fast as the client takes them (`sent` counts what it managed to send)."""

    def __init__(self, *, drip: float = 30.0, huge: int = 256 * 2**20):
        self.received: list[tuple[str, dict, float]] = []  # (path, headers, monotonic time)
        self.sent = 0
        self.in_flight: Counter = Counter()
        self.max_copies_in_flight = 0
        self.lock = threading.Lock()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                delivery = self.headers["X-AceStep-Delivery"]
                with hooks.lock:
                    hooks.received.append((self.path, dict(self.headers), time.monotonic()))
                    hooks.in_flight[delivery] += 1
                    hooks.max_copies_in_flight = max(hooks.max_copies_in_flight, hooks.in_flight[delivery])
                try:
                    getattr(self, "answer_" + self.path.split("?")[0].strip("/").replace("-", "_"))()
                except OSError:
                    pass  # the dispatcher hung up
                finally:
                    with hooks.lock:
                        hooks.in_flight[delivery] -= 1
                self.close_connection = True

            def answer_ok(self):
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def drip(self, data: bytes):
                end = time.monotonic() + drip
                for byte in data:
                    if time.monotonic() > end:
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)

            def answer_drip_head(self):
                self.drip(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000 + b"\r\nContent-Length: 0\r\n\r\n")

            def answer_drip_body(self):
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n")
                self.drip(b"b" * 10_000)

            def answer_huge(self):
                self.wfile.write(f"HTTP/1.1 200 OK\r\nContent-Length: {huge}\r\n\r\n".encode())
                chunk = b"\0" * 2**16
                while hooks.sent < huge:
                    self.wfile.write(chunk)
                    hooks.sent += len(chunk)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # two dispatchers' 16 connections at once

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        return [path.split("?")[0] for path, _, _ in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks():
    h = Hooks()
    yield h
    h.close()


def dispatcher(store, **options) -> WebhookDispatcher:
    options = {"allow_networks": LOOPBACK, "retry": NOW_RETRY, "timeout_seconds": 2.0} | options
    return WebhookDispatcher(store, lambda job: {"job_id": str(job["id"])}, b"s" * 32, **options)


def webhook_job(store, url: str, owner: str = "tenant"):
    """A canceled job whose webhook is due; the URL is stored as given (as an older version, which did
    not check it, would have stored it)."""
    job_id = store.submit(NewJob(request={"webhook_url": url}), owner=owner).id
    store.cancel(job_id)
    return job_id


def outbox(engine) -> dict[str, tuple]:
    """url -> (attempts, delivered, gave up, last_error)"""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT url, attempts, delivered_at IS NOT NULL, gave_up_at IS NOT NULL, last_error FROM webhook_outbox"
        )).all()
    return {row[0]: tuple(row[1:]) for row in rows}


# --- item 1: a URL nothing can send to ------------------------------------------------------------

UNSENDABLE = [
    "http://0177.0.0.1:8250/x",  # httpx: InvalidURL, which aborted the whole round
    "http://user:secret@127.0.0.1:8250/x",
    "http://127.0.0.1:99999/x",
    "http://[::1/x",
    "http://exa mple.com/x",
    "http://169.254.169.254/latest/meta-data/",  # sendable, but never allowed
]


def test_a_url_nothing_can_send_to_fails_alone_and_reaches_the_give_up(store, engine, hooks):
    for url in UNSENDABLE:  # claimed first: the outbox is taken oldest first
        webhook_job(store, url, owner="mallory")
    good = f"{hooks.base}/ok"
    webhook_job(store, good, owner="alice")
    webhooks = dispatcher(store, max_attempts=3)

    rounds = []
    for _ in range(6):
        rounds.append(webhooks.run_once())  # never raises for one delivery's sake
        if not rounds[-1]:
            break
    assert hooks.paths() == ["/ok"]  # on the first round, beside the bad ones
    rows = outbox(engine)
    assert rows[good][:3] == (1, True, False)
    for url in UNSENDABLE:
        attempts, delivered, gave_up, error = rows[url]
        assert (attempts, delivered, gave_up) == (3, False, True), url
        assert "webhook_url" in error or "refused" in error, (url, error)
    assert rounds[:4] == [len(UNSENDABLE) + 1, len(UNSENDABLE), len(UNSENDABLE), 0]


# --- item 6: SSRF, at submit ----------------------------------------------------------------------

NEVER_VALID = [  # refused at submit whatever the deployment allows: nothing can (or should) send there
    "http://0177.0.0.1:8250/x",
    "http://2130706433/",
    "http://127.1/",
    "http://0x7f.0.0.1/",
    "http://0x7f000001/",
    "http://1.2.3.4.5/",
    "http://user:pass@hooks.example.com/x",
    "https://token@hooks.example.com/x",
    "http://hooks.example.com:99999/",
    "http://hooks.example.com:0/",
    "http://[::1/x",
    "http://[fe80::1%25eth0]/",
    "http://hooks.example.com/a b",
    "http://hooks%2eexample.com/",
    "http:\\\\hooks.example.com\\x",
    "ftp://hooks.example.com/",
]

NOT_PUBLIC = [  # refused at submit by default (the API passes its policy as validation context)
    "http://127.0.0.1:8250/x",
    "http://127.8.9.10/",
    "http://localhost:8250/",
    "http://LOCALHOST./",
    "http://api.localhost/",
    "http://[::1]:8250/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:a00:1::]/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata/computeMetadata/v1/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://[fd00::1]/",
    "http://[fe80::1]/",
    "http://224.0.0.1/",
    "http://printer.local/",
]

PUBLIC = ["https://hooks.example.com/acestep?x=1", "http://8.8.8.8:8080/hook", "https://[2606:4700:4700::1111]/h"]


def submit_check(url: str, allow: str | None = ""):
    context = None if allow is None else {"webhook_allow_networks": allow}
    return GenerationRequest.model_validate({"webhook_url": url}, context=context)


@pytest.mark.parametrize("url", NEVER_VALID)
def test_urls_nothing_can_send_to_are_refused_at_submit_even_without_a_policy(url):
    for allow in (None, "", "0.0.0.0/0,::/0"):
        with pytest.raises(ValidationError) as refused:
            submit_check(url, allow)
        assert refused.value.errors()[0]["loc"] == ("webhook_url",)


@pytest.mark.parametrize("url", NOT_PUBLIC)
def test_non_public_destinations_are_refused_at_submit(url):
    with pytest.raises(ValidationError) as refused:
        submit_check(url)
    assert refused.value.errors()[0]["loc"] == ("webhook_url",)
    assert "public" in refused.value.errors()[0]["msg"]
    submit_check(url, allow=None)  # a stored row (no policy: the worker) is only checked for syntax


def test_public_destinations_and_allowed_networks_are_accepted_at_submit():
    for url in PUBLIC:
        assert submit_check(url).webhook_url == url
    for url in ("http://127.0.0.1:8250/x", "http://[::1]:8250/", "http://localhost:8250/", "http://[::ffff:127.0.0.1]/"):
        submit_check(url, allow=LOOPBACK)
    for url in ("http://10.0.0.1/", "http://169.254.169.254/", "http://[fd00::1]/"):
        with pytest.raises(ValidationError):
            submit_check(url, allow=LOOPBACK)
    submit_check("http://10.1.2.3/", allow="10.0.0.0/8")


def test_the_api_refuses_unsendable_webhook_urls_with_422(tmp_path, db_url, engine):
    settings = Settings(database_url=db_url, data_dir=tmp_path, port=free_port())
    api = start_api(settings, db_url)
    try:
        for url in ("http://0177.0.0.1:8250/x", "http://user:pass@hooks.example.com/x"):
            response = httpx.post(f"{api.url}/v1/music/generate", json={"caption": "x", "webhook_url": url})
            assert response.status_code == 422, (url, response.text)
            assert "webhook_url" in response.text
    finally:
        api.stop()
    with engine.connect() as conn:  # nothing stored, credentials included
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar() == 0


HOSTS = st.one_of(
    st.from_regex(r"[a-z0-9-]{1,8}(\.[a-z0-9-]{1,8}){0,3}\.?", fullmatch=True),
    st.ip_addresses().map(lambda a: f"[{a}]" if a.version == 6 else str(a)),
    st.text(max_size=12),
)
PORTS = st.one_of(st.just(""), st.integers(-5, 70_000).map(lambda p: f":{p}"), st.text(max_size=4).map(lambda s: ":" + s))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["http", "https", "HTTP", "ftp"]), HOSTS, PORTS, st.text(max_size=16))
def test_what_the_submit_check_accepts_the_dispatcher_can_send(scheme, host, port, path):
    url = f"{scheme}://{host}{port}/{path}"
    try:
        target = parse_http_url(url)  # refusals are URLRefused (a ValueError: 422), never anything else
    except URLRefused:
        return
    request = h11.Request(method="POST", target=target.target.encode("ascii"),
                          headers=[("Host", target.host_header), ("Content-Length", "0")])
    h11.Connection(h11.CLIENT).send(request)


def test_the_api_refuses_non_public_webhook_urls_unless_its_settings_allow_them(tmp_path, db_url):
    for allow, expected in (("", 422), (LOOPBACK, 200)):
        settings = Settings(database_url=db_url, data_dir=tmp_path, port=free_port(), webhook_allow_networks=allow)
        api = start_api(settings, db_url)
        try:
            response = httpx.post(f"{api.url}/v1/music/generate", json={"webhook_url": "http://127.0.0.1:8250/x"})
        finally:
            api.stop()
        assert response.status_code == expected, (allow, response.text)


def test_an_allow_list_that_is_not_networks_stops_the_start(store):
    with pytest.raises(ValueError, match="ACESTEP_WEBHOOK_ALLOW_NETWORKS: 'intranet' is not an IP network"):
        dispatcher(store, allow_networks="10.0.0.0/8, intranet")


# --- item 6: SSRF, at delivery --------------------------------------------------------------------


@pytest.fixture
def resolver(monkeypatch):
    """Names resolved by the table given; every lookup recorded."""
    table: dict[str, list[str]] = {}
    lookups: list[str] = []

    def resolve(host: str, port: int):
        lookups.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [handler.webhook_urls.ipaddress.ip_address(a) for a in table[host]]

    monkeypatch.setattr(handler.webhook_urls, "resolve_host", resolve)
    return table, lookups


def test_delivery_checks_every_address_a_name_resolves_to(store, engine, hooks, resolver):
    table, lookups = resolver
    table["rebound.example.com"] = ["127.0.0.1"]
    table["mixed.example.com"] = ["93.184.216.34", "10.0.0.5"]  # one private address is enough to refuse
    table["metadata.example.com"] = ["::ffff:169.254.169.254"]
    urls = [f"http://{name}:{hooks.port}/ok" for name in table] + [f"{hooks.base}/ok", f"http://[::1]:{hooks.port}/ok",
                                                                    f"http://localhost:{hooks.port}/ok"]
    for url in urls:
        webhook_job(store, url)
    dispatcher(store, allow_networks="", max_attempts=1).run_once()

    assert hooks.received == []
    rows = outbox(engine)
    for url in urls:
        attempts, delivered, gave_up, error = rows[url]
        assert (attempts, delivered, gave_up) == (1, False, True) and error.startswith("destination refused"), (url, error)
    assert "rebound.example.com resolves to 127.0.0.1 is loopback" in rows[urls[0]][3]
    assert "10.0.0.5 is private" in rows[urls[1]][3]
    assert "localhost is a local or internal name" in rows[urls[-1]][3]
    assert "localhost" not in lookups  # refused by name, before any lookup


def test_delivery_connects_to_the_checked_address_without_a_second_lookup(store, engine, hooks, resolver):
    table, lookups = resolver
    table["pinned.example.com"] = ["127.0.0.1"]  # the real DNS does not know this name: only the checked address works
    url = f"http://pinned.example.com:{hooks.port}/ok"
    webhook_job(store, url)
    dispatcher(store).run_once()  # loopback allowed here, as a private deployment would allow its network

    assert lookups == ["pinned.example.com"]
    assert hooks.paths() == ["/ok"] and hooks.received[0][1]["Host"] == f"pinned.example.com:{hooks.port}"
    assert outbox(engine)[url][:2] == (1, True)


# --- items 5 and 7: receivers that drip or flood --------------------------------------------------


def test_a_slow_drip_receiver_is_cut_at_the_deadline_and_delays_no_one(store, engine, hooks):
    slow_head, slow_body, fast = f"{hooks.base}/drip-head", f"{hooks.base}/drip-body", f"{hooks.base}/ok"
    for url in (slow_head, slow_body, fast):  # the slow ones are claimed first
        webhook_job(store, url)
    webhooks = dispatcher(store, timeout_seconds=1.5, max_attempts=1)

    started = time.monotonic()
    round_ = threading.Thread(target=webhooks.run_once)
    round_.start()
    while fast not in [u for u, row in outbox(engine).items() if row[1]] and time.monotonic() - started < 5:
        time.sleep(0.02)
    fast_done = time.monotonic() - started
    round_.join(10)
    took = time.monotonic() - started

    assert not round_.is_alive()
    assert fast_done < 1.2, f"the fast receiver's webhook was recorded after {fast_done:.2f} s"
    assert 1.4 < took < 4.0, f"the round took {took:.2f} s for a 1.5 s deadline"
    rows = outbox(engine)
    assert rows[fast][:2] == (1, True)
    assert rows[slow_head][:3] == (1, False, True) and "did not answer within 1.5 s" in rows[slow_head][3]
    assert rows[slow_body][:2] == (1, True)  # it answered 200; its dripped body was cut at the deadline


def test_a_huge_answer_is_not_read_whole(store, engine, hooks):
    url = f"{hooks.base}/huge"
    webhook_job(store, url)
    started = time.monotonic()
    dispatcher(store, timeout_seconds=20).run_once()
    took = time.monotonic() - started

    assert outbox(engine)[url][:2] == (1, True)
    # 64 KiB read, then the connection closed: what the receiver got out is its socket buffers' worth
    assert hooks.sent < 32 * 2**20, f"the receiver sent {hooks.sent / 2**20:.0f} MiB of its 256 MiB answer"
    assert took < 5


# --- item 7: two dispatchers ----------------------------------------------------------------------


def test_two_dispatchers_send_each_delivery_once_and_never_one_twice_at_once(store, engine, hooks):
    slow = f"{hooks.base}/drip-head"
    webhook_job(store, slow)  # drips far longer than the old claim lease (3 x the per-read timeout)
    fast = [f"{hooks.base}/ok?n={n}" for n in range(24)]
    for url in fast:
        webhook_job(store, url, owner=f"tenant-{url[-2:]}")
    first, second = (dispatcher(store, timeout_seconds=1.0, poll_seconds=0.05, retry=LATER_RETRY) for _ in range(2))

    stop = threading.Event()
    threads = [threading.Thread(target=d.run_until, args=(stop,)) for d in (first, second)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 10
        while sum(row[1] or row[2] or row[3] is not None for row in outbox(engine).values()) < len(fast) + 1:
            assert time.monotonic() < deadline, "the deliveries did not all settle"
            time.sleep(0.05)
        time.sleep(1.5)  # any second copy would have been claimed by now (old lease: 3 s)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)

    assert not any(thread.is_alive() for thread in threads)
    assert hooks.max_copies_in_flight == 1
    copies = Counter(headers["X-AceStep-Delivery"] for _, headers, _ in hooks.received)
    assert len(copies) == len(fast) + 1 and set(copies.values()) == {1}
    rows = outbox(engine)
    assert all(rows[url][:2] == (1, True) for url in fast)
    assert rows[slow][:2] == (1, False) and "did not answer" in rows[slow][3]


# --- item 22: a database outage -------------------------------------------------------------------


class FlakyStore:
    """The store, whose claims fail while `down` is set."""

    def __init__(self, store):
        self.store, self.down, self.claims = store, threading.Event(), 0

    def claim_webhooks(self, **kwargs):
        self.claims += 1
        if self.down.is_set():
            raise DatabaseUnavailable("database unavailable: connection refused")
        return self.store.claim_webhooks(**kwargs)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_a_database_outage_logs_one_warning_and_one_recovery_not_a_traceback_a_round(store, engine, hooks, caplog):
    flaky = FlakyStore(store)
    flaky.down.set()
    webhooks = dispatcher(flaky, poll_seconds=0.01)
    stop = threading.Event()
    caplog.set_level(logging.DEBUG, logger="handler.webhooks")
    thread = threading.Thread(target=webhooks.run_until, args=(stop,))
    thread.start()
    try:
        time.sleep(1.0)
        down_claims = flaky.claims
        url = f"{hooks.base}/ok"
        webhook_job(store, url)
        flaky.down.clear()
        deadline = time.monotonic() + 40  # the pause doubles up to 30 s; here it reaches ~0.6 s
        while not outbox(engine)[url][1]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)

    assert down_claims >= 3  # it kept retrying, with a doubling pause rather than every poll
    records = [r for r in caplog.records if r.name == "handler.webhooks" and r.levelno >= logging.INFO]
    assert [(r.levelname, r.action) for r in records] == [("WARNING", "webhook_dispatch_paused"), ("INFO", "webhook_dispatch_resumed")]
    assert all(r.exc_info is None for r in records)


def test_the_v2_signature_covers_the_delivery_id():
    import hashlib
    import hmac

    from handler.webhooks import signature_header

    header = dict(part.split("=", 1) for part in signature_header("s3cret", b"{}", 1700000000, "d-1").split(","))
    expected = hmac.new(b"s3cret", b"1700000000.d-1.{}", hashlib.sha256).hexdigest()
    assert header["v2"] == expected and header["v1"] != expected
    assert "v2" not in signature_header("s3cret", b"{}", 1700000000)  # v1 alone, as before, without an id
