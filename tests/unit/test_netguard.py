"""The address classifier of the fetch tool (SPEC §5.9): IP literals in every encoding, and which
addresses are not public."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llorch.netguard import HostError, blocked_reason, parse_host_ip

V4 = st.integers(min_value=0, max_value=2**32 - 1).map(ipaddress.IPv4Address)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("127.0.0.1.", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("[::ffff:7f00:1]", "::ffff:7f00:1"),
        ("fe80::1%eth0", "fe80::1"),
        ("169.254.169.254", "169.254.169.254"),
    ],
)
def test_ip_literals_in_every_form(host: str, address: str) -> None:
    assert parse_host_ip(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize(
    "host", ["example.com", "localhost", "a.0x7f", "1.2.3.4.5", "08.0.0.1", "xn--bcher-kva.example"]
)
def test_names_are_not_literals(host: str) -> None:
    assert parse_host_ip(host) is None


@pytest.mark.parametrize(
    "host", ["", "256.1.1.1", "1.2.3.256", "0x1ffffffff", "1.16777216", "[::zz]", "ex%41mple.com", "a b"]
)
def test_impossible_hosts_are_errors(host: str) -> None:
    with pytest.raises(HostError):
        parse_host_ip(host)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.1.1", "link-local"),
        ("169.254.169.254", "metadata"),
        ("100.64.0.1", "cgnat"),
        ("100.127.255.254", "cgnat"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("240.0.0.1", "private"),
        ("198.18.0.1", "private"),
        ("192.0.0.1", "private"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fe80::1", "link-local"),
        ("fec0::1", "link-local"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("ff02::1", "multicast"),
        ("fd00:ec2::254", "metadata"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "metadata"),
        ("::127.0.0.1", "loopback"),
        ("64:ff9b::127.0.0.1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "metadata"),
        ("64:ff9b:1::1", "private"),
        ("2002:7f00:1::", "loopback"),
        ("2002:a00:1::", "private"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "private"),  # Teredo
        ("2001:db8::1", "private"),  # documentation
    ],
)
def test_non_public_addresses(address: str, reason: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "2606:4700:4700::1111",
        "2001:4860:4860::8888",
        "2002:808:808::",
        "64:ff9b::808:808",
    ],
)
def test_public_addresses(address: str) -> None:
    assert blocked_reason(ipaddress.ip_address(address)) is None


@given(V4)
def test_every_encoding_of_an_ipv4_address_reads_the_same(address: ipaddress.IPv4Address) -> None:
    value = int(address)
    a, b, c, d = address.packed
    for form in (
        str(value),
        hex(value),
        f"0{value:o}",
        f"{a}.{(b << 16) | (c << 8) | d}",
        f"{a}.{b}.{(c << 8) | d}",
        f"{a:#x}.0{b:o}.{c}.{d}",
    ):
        assert parse_host_ip(form) == address, form


@given(V4)
def test_ipv6_forms_of_an_ipv4_address_are_judged_by_it(address: ipaddress.IPv4Address) -> None:
    """Mapped, NAT64 and 6to4 forms are refused whenever the IPv4 address itself is."""
    inner = blocked_reason(address)
    value = int(address)
    forms = [
        ipaddress.IPv6Address((0xFFFF << 32) | value),  # ::ffff:a.b.c.d
        ipaddress.IPv6Address((0x64FF9B << 96) | value),  # 64:ff9b::a.b.c.d
        ipaddress.IPv6Address((0x2002 << 112) | (value << 80)),  # 2002:aabb:ccdd::
    ]
    for form in forms:
        if inner is not None:
            assert blocked_reason(form) is not None, form
    assert blocked_reason(forms[0]) == inner


@given(
    st.sampled_from(
        [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "100.64.0.0/10",
            "224.0.0.0/4",
            "0.0.0.0/8",
        ]
    ),
    st.integers(min_value=0),
)
def test_every_address_of_a_blocked_range_is_refused(network: str, offset: int) -> None:
    net = ipaddress.ip_network(network)
    address = net[offset % net.num_addresses]
    assert blocked_reason(address) is not None
    assert blocked_reason(ipaddress.IPv6Address((0xFFFF << 32) | int(address))) is not None
