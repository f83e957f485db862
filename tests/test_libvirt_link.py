"""The daemon's libvirt connection against libvirt's own test driver (``test:///default``:
libvirt's real client library and API, a hypervisor held in memory, no daemon): domains
listed with their state, events received on the daemon's loop and waited for, a call that
fails named clearly. The lab test (test_libvirt_lab) does the same against real libvirtds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from devagent.errors import NotFound, PeerError
from devagent.libvirt_link import DomainEvent, LibvirtLink, event_names, state_name
from devagent.wait import WaitTimeout

TEST_URI = "test:///default"  # holds one running domain, "test"


@pytest.fixture
async def link() -> AsyncIterator[LibvirtLink]:
    made = LibvirtLink(TEST_URI, "a")
    await made.open()
    try:
        yield made
    finally:
        await made.close()


async def test_the_domains_are_listed_with_their_state(link: LibvirtLink) -> None:
    domains = {d.name: d for d in await link.domains()}
    assert domains["test"].state == "running"
    assert domains["test"].persistent


async def test_an_event_is_seen_and_waited_for(
    link: LibvirtLink, caplog: pytest.LogCaptureFixture
) -> None:
    dom = await link.call("lookupByName", "test")
    suspended = asyncio.ensure_future(
        link.wait_event(lambda e: e.domain == "test" and e.event == "suspended", 10, "suspend")
    )
    await asyncio.sleep(0)  # the waiter is in place before the event
    with caplog.at_level(logging.INFO):
        await asyncio.to_thread(dom.suspend)
        got = await suspended
    assert (got.event, got.detail) == ("suspended", "paused")
    assert str(link.last_events["test"]) == "suspended/paused"
    assert "host a: libvirt domain test suspended/paused" in caplog.text
    assert {d.name: d.state for d in await link.domains()}["test"] == "paused"
    await asyncio.to_thread(dom.resume)


async def test_no_event_ends_the_wait_with_a_timeout(link: LibvirtLink) -> None:
    with pytest.raises(WaitTimeout, match="host a: a stop that never comes"):
        await link.wait_event(lambda e: e.event == "stopped", 0.2, "a stop that never comes")


async def test_an_unknown_domain_is_not_found_naming_the_host(link: LibvirtLink) -> None:
    with pytest.raises(NotFound, match=r"host a: libvirt lookupByName\('nosuch'\): Domain not"):
        await link.call("lookupByName", "nosuch")


async def test_a_failing_call_is_a_peer_error_naming_the_host(link: LibvirtLink) -> None:
    with pytest.raises(PeerError, match=r"host a: libvirt defineXML\('<domain>'\): .*Premature"):
        await link.call("defineXML", "<domain>")


async def test_an_unreachable_libvirt_is_a_peer_error() -> None:
    link = LibvirtLink("qemu:///system?socket=/nonexistent/libvirt-sock", "b")
    with pytest.raises(PeerError, match="host b: libvirt at qemu:///system"):
        await link.open()
    assert not link.connected


def test_names_of_libvirt_numbers() -> None:
    assert event_names(2, 1) == ("started", "migrated")
    assert event_names(3, 1) == ("suspended", "migrated")
    assert event_names(4, 1) == ("resumed", "migrated")
    assert event_names(5, 3) == ("stopped", "migrated")
    assert event_names(42, 7) == ("42", "7")  # from a newer libvirt: kept as numbers
    assert state_name(1) == "running" and state_name(3) == "paused"
    assert str(DomainEvent("d", "block-job", "ready", 0.0, disk="vda")) == "block-job vda/ready"


async def test_a_lost_connection_fails_its_waiters_and_opens_again(link: LibvirtLink) -> None:
    waiting = asyncio.ensure_future(link.wait_event(lambda e: False, 30, "an event"))
    await asyncio.sleep(0)
    lost = link._conn
    link._lost((object(), 1))  # an older connection's close: nothing to do
    assert link.connected and not waiting.done()
    link._lost((lost, 1))  # libvirt's close callback, as the daemon's loop gets it
    assert not link.connected
    with pytest.raises(PeerError, match="host a: libvirt went away"):
        await waiting
    assert {d.name for d in await link.domains()} >= {"test"}  # opened again
    assert link.connected
