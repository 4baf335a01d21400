"""The desired-state and credential caches never keep what a read found before a change they
were told of.

A poll that misses the cache reads the database and caches what it read. When the operator's
change commits and invalidates the device while that read is in flight, the read's (older)
state must not be cached after the invalidation: it would be served, with its ETag, until the
entry expires (five minutes by default), and the device would not see the change until then.
The same holds for a credential revoked while a request with it is being looked up. The window
is the few microseconds between a commit and its invalidation, too narrow to hit
from outside the process on purpose; the interleaving is driven here on the real cache.
"""

from __future__ import annotations

import pytest

from agent.contracts.state import DesiredState
from control_plane import desired as desired_module
from control_plane.desired import CredentialCache, DesiredStateCache


def _state(device_id: str, generation: int = 1) -> DesiredState:
    return DesiredState(device_id=device_id, generation=generation)


def test_a_state_read_before_an_invalidation_is_answered_but_not_kept() -> None:
    cache = DesiredStateCache(ttl_s=300)
    ticket = cache.ticket()  # the poll starts its read
    cache.invalidate(["dev-a"])  # the operator's change commits meanwhile
    entry = cache.put(_state("dev-a"), ticket)
    assert entry.state.device_id == "dev-a"  # this answer still gets it
    assert cache.get("dev-a") is None  # the next poll reads again

    ticket = cache.ticket()  # a read that starts after the change is kept
    cache.put(_state("dev-a", 2), ticket)
    kept = cache.get("dev-a")
    assert kept is not None
    assert kept.state.generation == 2


def test_only_the_invalidated_device_loses_its_read() -> None:
    cache = DesiredStateCache(ttl_s=300)
    ticket = cache.ticket()
    cache.invalidate(["dev-b"])
    cache.put(_state("dev-a"), ticket)
    assert cache.get("dev-a") is not None
    cache.invalidate(None)  # every device (a selector or an assignment for many)
    assert cache.get("dev-a") is None
    cache.put(_state("dev-a"), ticket)
    assert cache.get("dev-a") is None
    cache.put(_state("dev-a"), cache.ticket())
    assert cache.get("dev-a") is not None


def test_the_marks_stay_bounded_and_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(desired_module, "MAX_DROPPED_MARKS", 8)
    cache = DesiredStateCache(ttl_s=300)
    ticket = cache.ticket()
    for i in range(20):
        cache.invalidate([f"dev-{i}"])
    assert len(cache._dropped) <= 8
    for i in range(20):  # every read that began before its device's invalidation: none kept
        cache.put(_state(f"dev-{i}"), ticket)
        assert cache.get(f"dev-{i}") is None
    cache.put(_state("dev-0"), cache.ticket())
    assert cache.get("dev-0") is not None


def test_a_credential_revoked_during_its_lookup_is_not_cached() -> None:
    cache = CredentialCache(ttl_s=300)
    ticket = cache.ticket()  # the lookup read the credential as valid...
    cache.forget_device("dev-a")  # ...and the operator revoked it meanwhile
    cache.put("hash-a", "dev-a", ticket)
    assert cache.get("hash-a") is None

    ticket = cache.ticket()
    cache.forget("hash-b")  # a credential replaced by a fetch of the new one
    cache.put("hash-b", "dev-b", ticket)
    assert cache.get("hash-b") is None
    cache.put("hash-c", "dev-c", ticket)  # another device's lookup is kept
    assert cache.get("hash-c") == "dev-c"

    cache.put("hash-a", "dev-a", cache.ticket())  # a lookup after the change is kept
    assert cache.get("hash-a") == "dev-a"


def test_forgetting_a_device_drops_each_of_its_credentials_and_no_other() -> None:
    cache = CredentialCache(ttl_s=300)
    cache.put("old", "dev-a")  # a device mid-rotation has two credentials cached
    cache.put("new", "dev-a")
    cache.put("other", "dev-b")
    cache.forget("old")
    assert cache.get("new") == "dev-a"
    cache.put("old", "dev-a")
    cache.forget_devices(["dev-a", "dev-gone"])
    assert (cache.get("old"), cache.get("new"), cache.get("other")) == (None, None, "dev-b")
    cache.clear()
    assert cache.get("other") is None
