"""SSRF checks: the address judge, the URL check, and the connector on a real loopback server.

No test here sends a packet beyond loopback: refused addresses are judged directly or handed
over by a fake resolver, and every real request goes to a local test server.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from server.addresses import (
    DestinationRefused,
    SafeResolver,
    check_destination_url,
    check_header_value,
    make_connector,
    refusal_reason,
)
from server.policy import classify

ALWAYS_REFUSED = [
    "169.254.169.254",  # the metadata address of most clouds
    "169.254.170.2",  # AWS ECS task metadata
    "169.254.1.1",
    "100.100.100.200",  # Alibaba metadata, outside link-local
    "168.63.129.16",  # Azure WireServer, a public-looking address
    "fd00:ec2::254",  # AWS metadata over IPv6
    "fe80::1",
    "fe80::1%eth0",
    "0.0.0.0",  # noqa: S104 - judged here, never bound
    "::",
    "224.0.0.1",
    "ff02::1",
    "255.255.255.255",
    "240.0.0.1",
    "192.0.2.1",
    "2001:db8::1",
    "4000::1",  # outside 2000::/3, unallocated
    "::ffff:169.254.169.254",
    "::ffff:0:a9fe:a9fe",  # SIIT-translated 169.254.169.254
    "64:ff9b::a9fe:a9fe",  # NAT64; Python calls it global
    "64:ff9b:1:a9fe:a9:fe00::",  # local-use NAT64, /48 placement
    "64:ff9b:1::a9fe:a9fe",  # local-use NAT64, /96 placement
    "2002:a9fe:a9fe::1",  # 6to4
    "::169.254.169.254",  # IPv4-compatible
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
]
PRIVATE = [
    "127.0.0.1",
    "127.255.255.254",
    "::1",
    "10.0.0.1",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.1.1",
    "100.64.0.1",  # CGNAT
    "198.18.0.1",
    "fc00::1",
    "fd12:3456::1",
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "64:ff9b::7f00:1",
    "64:ff9b:1::808:808",  # local-use NAT64 prefix itself
    "2002:7f00:1::",  # 6to4 of 127.0.0.1; Python calls it global
    "2002:a00:1::1",
]
PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.215.14",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # DNS64 answers for public IPv4 hosts
    "2002:808:808::1",
]


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize("address", ALWAYS_REFUSED)
@pytest.mark.parametrize("allow_private", [False, True])
def test_link_local_metadata_and_reserved_are_always_refused(
    address: str, allow_private: bool
) -> None:
    assert refusal_reason(ip(address), allow_private=allow_private) is not None


@pytest.mark.parametrize("address", PRIVATE)
def test_private_addresses_are_refused_unless_allowed(address: str) -> None:
    assert refusal_reason(ip(address), allow_private=False) is not None
    assert refusal_reason(ip(address), allow_private=True) is None


@pytest.mark.parametrize("address", PUBLIC)
@pytest.mark.parametrize("allow_private", [False, True])
def test_public_addresses_are_allowed(address: str, allow_private: bool) -> None:
    assert refusal_reason(ip(address), allow_private=allow_private) is None


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("169.254.169.254", "cloud metadata"),
        ("64:ff9b::a9fe:a9fe", "169.254.169.254 is a cloud metadata address (inside"),
        ("2002:7f00:1::", "127.0.0.1 is a loopback address (inside 2002:7f00:1::)"),
        ("fe80::1%eth0", "fe80::1 is a link-local address"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("0.0.0.0", "an unspecified address"),  # noqa: S104 - judged, never bound
    ],
)
def test_reasons_name_the_address_and_the_range(address: str, words: str) -> None:
    reason = refusal_reason(ip(address), allow_private=False)
    assert reason is not None and words in reason


@given(st.ip_addresses())
def test_allowing_private_never_refuses_more(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    relaxed = refusal_reason(address, allow_private=True)
    strict = refusal_reason(address, allow_private=False)
    assert relaxed is None or strict is not None


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hook",
        "http://example.com:8080/hooks?team=1#frag",
        "https://hooks.example.com./in",
        "https://bücher.example/in",
        "https://8.8.8.8/hook",
        "https://[2606:4700:4700::1111]:8443/hook",
        "https://under_score.example.com/",
    ],
)
def test_public_destination_urls_are_accepted(url: str) -> None:
    check_destination_url(url, allow_private=False)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://example.com/",
        "javascript:alert(1)",
        "example.com/hook",
        "/relative/hook",
        "http:///no-host",
        "http://user:pass@example.com/",
        "http://user@example.com/",
        "http://@example.com/",
        "http://example.com:0/",
        "http://example.com:99999/",
        "http://example.com:port/",
        "http://[::1",
        "http://exa mple.com/",
        " https://example.com/",
        "http://example.com/\r\nX-Injected: 1",
        "http://example.com\\@127.0.0.1/",
        "http://127%2E0%2E0%2E1/",
        "https://example.com/" + "a" * 2100,
        "",
    ],
)
def test_malformed_or_unsafe_urls_are_refused(url: str) -> None:
    with pytest.raises(DestinationRefused):
        check_destination_url(url, allow_private=True)


LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "127.0.0.1.",
    "2130706433",
    "0x7f.1",
    "0x7F000001",
    "127.1",
    "017700000001",
    "0177.0.0.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "１２７.０.０.１",  # fullwidth digits, which IDNA folds to ASCII
    "localhost",
    "LOCALHOST.",
    "api.localhost",
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_loopback_in_any_spelling_is_refused_at_configuration(host: str) -> None:
    with pytest.raises(DestinationRefused):
        check_destination_url(f"http://{host}:8080/hook", allow_private=False)
    check_destination_url(f"http://{host}:8080/hook", allow_private=True)


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1", "017700000001"])
def test_the_spellings_getaddrinfo_accepts_are_the_ones_caught(host: str) -> None:
    infos = socket.getaddrinfo(host, 80, family=socket.AF_INET, flags=socket.AI_NUMERICHOST)
    assert {info[4][0] for info in infos} == {"127.0.0.1"}
    with pytest.raises(DestinationRefused):
        check_destination_url(f"http://{host}/", allow_private=False)


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "2852039166",  # 169.254.169.254 as one number
        "0xa9.0xfe.0xa9.0xfe",
        "100.100.100.200",
        "[fd00:ec2::254]",
        "[64:ff9b::a9fe:a9fe]",
        "[fe80::1%25eth0]",
        "0.0.0.0",  # noqa: S104 - judged here, never bound
        "0",
    ],
)
def test_metadata_and_link_local_literals_are_refused_even_when_private_is_allowed(
    host: str,
) -> None:
    with pytest.raises(DestinationRefused):
        check_destination_url(f"http://{host}/latest/meta-data/", allow_private=True)


@pytest.mark.parametrize("url", ["http://[]@", "http://[::1]@", "https://x:y@[]@"])
def test_a_url_yarl_cannot_read_is_refused_not_raised(url: str) -> None:
    # yarl 1.25 raises IndexError on these (brackets before an empty host), not ValueError.
    with pytest.raises(DestinationRefused, match="not a valid URL"):
        check_destination_url(url, allow_private=True)


URLISH = st.text(alphabet=st.sampled_from("htps:/@[]%.-_?#\\ \r\n\x00fx0179aAeë:"), max_size=40)


@given(st.one_of(st.text(), URLISH, st.builds("http://{}".format, URLISH)))
def test_url_check_raises_nothing_but_destination_refused(url: str) -> None:
    try:
        check_destination_url(url, allow_private=False)
    except DestinationRefused as exc:
        assert exc.reason


class FakeResolver(AbstractResolver):
    """Answers with the addresses it is given: lets a test see what DNS might say."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.is_closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=h, port=port, family=0, proto=0, flags=0)
            for h in self.answers.pop(0)
        ]

    async def close(self) -> None:
        self.is_closed = True


async def test_resolver_drops_refused_addresses_and_keeps_the_rest() -> None:
    fake = FakeResolver(["169.254.169.254", "127.0.0.1", "10.0.0.1"])
    resolver = SafeResolver(allow_private=True, resolver=fake)
    kept = await resolver.resolve("mixed.example", 80)
    assert [r["host"] for r in kept] == ["127.0.0.1", "10.0.0.1"]


async def test_resolver_refuses_a_name_with_no_allowed_address() -> None:
    resolver = SafeResolver(allow_private=False, resolver=FakeResolver(["127.0.0.1", "::1"]))
    with pytest.raises(DestinationRefused, match=r"127\.0\.0\.1 is a loopback address"):
        await resolver.resolve("internal.example", 80)


async def test_resolver_judges_every_resolution_so_rebinding_is_caught() -> None:
    fake = FakeResolver(["8.8.8.8"], ["169.254.169.254"])
    resolver = SafeResolver(allow_private=True, resolver=fake)
    assert [r["host"] for r in await resolver.resolve("rebind.example", 80)] == ["8.8.8.8"]
    with pytest.raises(DestinationRefused, match="cloud metadata"):
        await resolver.resolve("rebind.example", 80)


async def test_resolver_closes_the_resolver_it_wraps() -> None:
    fake = FakeResolver()
    await SafeResolver(allow_private=False, resolver=fake).close()
    assert fake.is_closed


@given(st.lists(st.text(max_size=30), min_size=1, max_size=3))
def test_resolver_raises_nothing_but_destination_refused_for_any_answer(
    answers: list[str],
) -> None:
    resolver = SafeResolver(allow_private=False, resolver=FakeResolver(answers))
    try:
        kept = asyncio.run(resolver.resolve("any.example", 80))
    except DestinationRefused:
        return
    assert all(refusal_reason(ip(r["host"]), allow_private=False) is None for r in kept)


def test_destination_refused_carries_its_reason() -> None:
    exc = DestinationRefused("127.0.0.1 is a loopback address")
    assert exc.reason == "127.0.0.1 is a loopback address"
    assert str(exc) == "destination refused: 127.0.0.1 is a loopback address"


@pytest.mark.parametrize("value", ["plain", "v1,abc+/=", "", "tab\tinside", "ünïcode"])
def test_ordinary_header_values_pass(value: str) -> None:
    check_header_value("X-Team-Token", value)


@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\r\nX-Evil: 1", "nul\x00"])
def test_header_values_that_could_split_the_request_are_refused(value: str) -> None:
    with pytest.raises(DestinationRefused) as caught:
        check_header_value("X-Team-Token", value)
    assert value not in str(caught.value)  # the value may be a secret


@pytest.mark.parametrize("name", ["", "X Team", "X-Team:", "X-Team\r\n", "Ünï"])
def test_header_names_that_are_not_tokens_are_refused(name: str) -> None:
    with pytest.raises(DestinationRefused):
        check_header_value(name, "value")


# --- the connector, against a real server on loopback -------------------------------------

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
async def destination(aiohttp_server: ServerFactory) -> tuple[TestServer, list[str]]:
    hits: list[str] = []

    async def receive(request: web.Request) -> web.Response:
        hits.append(request.host)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", receive)
    return await aiohttp_server(app), hits


async def fetch_status(url: str, *, allow_private: bool) -> int:
    async with (
        aiohttp.ClientSession(connector=make_connector(allow_private=allow_private)) as session,
        asyncio.timeout(10),
        session.get(url, allow_redirects=False) as response,
    ):
        return response.status


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0x7f.1"])
async def test_connector_refuses_loopback_before_connecting(
    destination: tuple[TestServer, list[str]], host: str
) -> None:
    server, hits = destination
    with pytest.raises(DestinationRefused, match="loopback"):
        await fetch_status(f"http://{host}:{server.port}/", allow_private=False)
    assert hits == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0x7f.1"])
async def test_connector_reaches_loopback_when_private_is_allowed(
    destination: tuple[TestServer, list[str]], host: str
) -> None:
    server, hits = destination
    assert await fetch_status(f"http://{host}:{server.port}/", allow_private=True) == 200
    assert len(hits) == 1


async def test_a_refused_connection_is_classified_permanent(
    destination: tuple[TestServer, list[str]],
) -> None:
    server, _ = destination
    with pytest.raises(DestinationRefused) as caught:
        await fetch_status(f"http://localhost:{server.port}/", allow_private=False)
    assert classify(None, caught.value) == "permanent"


async def test_connector_applies_the_per_host_limit() -> None:
    connector = make_connector(allow_private=False, limit_per_host=3)
    try:
        assert connector.limit_per_host == 3
    finally:
        await connector.close()
