"""Virtual objects (interposer/handles.py): typed per-session handles and per-vdev device address spaces."""

from __future__ import annotations

import pytest

from interposer.handles import (
    DEVICE_VA_BASE,
    SEQ_BITS,
    SESSION_BITS,
    VA_ALIGN,
    AddressSpace,
    HandleTable,
    Kind,
    is_device_address,
)
from npu.errors import AclError, InvalidHandle, InvalidParam
from npu.memory import Buffer, DeviceMemory

# -- HandleTable -----------------------------------------------------------------------------------------


def fields(handle: int) -> tuple[int, int, int]:
    return handle >> 56, (handle >> SEQ_BITS) & ((1 << SESSION_BITS) - 1), handle & ((1 << SEQ_BITS) - 1)


@pytest.mark.parametrize("kind", list(Kind))
def test_handle_carries_type_tag_and_session(kind):
    table = HandleTable(0x1234)
    obj = object()
    handle = table.add(kind, obj)
    tag, session, seq = fields(handle)
    assert tag == kind
    assert session == 0x1234
    assert seq != 0
    assert table.get(handle, kind) is obj


def test_handles_are_distinct_and_never_reused_after_removal():
    table = HandleTable(1)
    seen = set()
    for _ in range(50):
        handle = table.add(Kind.STREAM, object())
        assert handle not in seen
        seen.add(handle)
        table.remove(handle, Kind.STREAM)
    assert table.values(Kind.STREAM) == []


def test_remove_returns_the_object_and_forgets_it():
    table = HandleTable(1)
    obj = object()
    handle = table.add(Kind.EVENT, obj)
    assert table.remove(handle, Kind.EVENT) is obj
    with pytest.raises(InvalidHandle):
        table.get(handle, Kind.EVENT)
    with pytest.raises(InvalidHandle):
        table.remove(handle, Kind.EVENT)


def test_values_lists_live_objects_of_one_kind():
    table = HandleTable(1)
    a, b, c = object(), object(), object()
    ha = table.add(Kind.STREAM, a)
    table.add(Kind.STREAM, b)
    table.add(Kind.EVENT, c)
    table.remove(ha, Kind.STREAM)
    assert table.values(Kind.STREAM) == [b]
    assert table.values(Kind.EVENT) == [c]
    assert table.values(Kind.CONTEXT) == []


def test_wrong_kind_is_invalid_handle_naming_both_kinds():
    table = HandleTable(1)
    event = table.add(Kind.EVENT, object())
    with pytest.raises(InvalidHandle) as info:
        table.get(event, Kind.STREAM)
    message = info.value.message
    assert f"0x{event:x}" in message
    assert "not a stream" in message
    assert "event handle" in message
    assert info.value.code == AclError.RT_INVALID_HANDLE
    # the object is still there under its own kind
    table.get(event, Kind.EVENT)


def test_wrong_kind_does_not_remove():
    table = HandleTable(1)
    stream = table.add(Kind.STREAM, "s")
    with pytest.raises(InvalidHandle, match="not a context"):
        table.remove(stream, Kind.CONTEXT)
    assert table.get(stream, Kind.STREAM) == "s"


def test_destroyed_handle_says_so():
    table = HandleTable(1)
    handle = table.add(Kind.STREAM, object())
    table.add(Kind.STREAM, object())  # a newer object must not alias the destroyed one
    table.remove(handle, Kind.STREAM)
    with pytest.raises(InvalidHandle, match="already destroyed") as info:
        table.get(handle, Kind.STREAM)
    assert f"0x{handle:x}" in info.value.message
    assert "never created" not in info.value.message


@pytest.mark.parametrize("seq", [0, 2, 1 << 20])
def test_never_created_handle_says_so(seq):
    table = HandleTable(1)
    table.add(Kind.EVENT, object())
    forged = (Kind.EVENT << 56) | (1 << SEQ_BITS) | seq
    with pytest.raises(InvalidHandle, match="never created") as info:
        table.get(forged, Kind.EVENT)
    assert "destroyed" not in info.value.message


def test_raw_integer_is_not_a_handle():
    table = HandleTable(1)
    with pytest.raises(InvalidHandle, match="0x1234 is not a stream"):
        table.get(0x1234, Kind.STREAM)


def test_other_sessions_handle_says_so():
    mine, theirs = HandleTable(1), HandleTable(2)
    mine.add(Kind.STREAM, object())
    handle = theirs.add(Kind.STREAM, object())
    with pytest.raises(InvalidHandle, match="belongs to another process's session") as info:
        mine.get(handle, Kind.STREAM)
    assert "destroyed" not in info.value.message
    assert "never created" not in info.value.message


def test_the_four_explanations_differ():
    table, other = HandleTable(3), HandleTable(4)
    live_event = table.add(Kind.EVENT, object())
    destroyed = table.add(Kind.STREAM, object())
    table.remove(destroyed, Kind.STREAM)
    never = (Kind.STREAM << 56) | (3 << SEQ_BITS) | 999
    foreign = other.add(Kind.STREAM, object())
    messages = []
    for handle in (live_event, destroyed, never, foreign):
        with pytest.raises(InvalidHandle) as info:
            table.get(handle, Kind.STREAM)
        messages.append(info.value.message.split(": ")[-1].replace(f"0x{handle:x}", "H"))
    assert len(set(messages)) == 4


# -- AddressSpace ----------------------------------------------------------------------------------------


class Owner:
    """A session, as far as the address space cares: identity only."""


@pytest.fixture
def memory() -> DeviceMemory:
    return DeviceMemory(1 << 30, backed=True)


@pytest.fixture
def space() -> AddressSpace:
    return AddressSpace(0, "davinci0")


def alloc(space: AddressSpace, memory: DeviceMemory, size: int, owner: object):
    return space.map(size, memory.alloc(size), owner)


def test_addresses_are_device_addresses_and_do_not_overlap(space, memory):
    me = Owner()
    a = alloc(space, memory, 100, me)
    b = alloc(space, memory, 5000, me)
    c = alloc(space, memory, VA_ALIGN, me)
    for x in (a, b, c):
        assert is_device_address(x.start)
        assert x.start >= DEVICE_VA_BASE
    assert a.start + a.size < b.start
    assert b.start + b.size < c.start
    assert not is_device_address(0x7FFF_FFFF_F000)


def test_pointer_arithmetic_resolves_to_the_region_offset(space, memory):
    me = Owner()
    first = alloc(space, memory, 4096, me)
    second = alloc(space, memory, 4096, me)
    region = space.region(second.start + 100, 200, me, "memcpy dst")
    assert region.buffer is second.buffer
    assert (region.offset, region.size) == (100, 200)
    region.write(b"\xab" * 200)
    assert second.buffer.data[100:300].tobytes() == b"\xab" * 200
    assert not first.buffer.data.any()

    whole = space.region(first.start, 4096, me, "memcpy src")
    assert (whole.buffer, whole.offset, whole.size) == (first.buffer, 0, 4096)
    last = space.region(first.start + 4095, 1, me, "memset")
    assert (last.offset, last.size) == (4095, 1)


def test_access_past_the_end_is_refused(space, memory):
    me = Owner()
    a = alloc(space, memory, 1000, me)
    with pytest.raises(InvalidParam) as info:
        space.region(a.start + 900, 101, me, "memcpy dst")
    message = info.value.message
    assert message.startswith(f"memcpy dst 0x{a.start + 900:x}")
    assert "101 bytes at offset 900 run past the end of its 1000-byte allocation" in message
    assert f"0x{a.start:x}" in message


def test_access_past_the_end_is_refused_even_if_the_rounded_buffer_is_bigger(space, memory):
    """malloc rounds the physical buffer up; the caller may only touch what it asked for."""
    me = Owner()
    a = alloc(space, memory, 1000, me)
    assert a.buffer.size > 1000
    with pytest.raises(InvalidParam, match="run past the end"):
        space.region(a.start, 1001, me, "memcpy src")


def test_pointer_just_past_the_end_is_not_in_the_allocation(space, memory):
    me = Owner()
    a = alloc(space, memory, 1000, me)
    with pytest.raises(InvalidParam, match="not inside any live allocation on davinci0"):
        space.region(a.start + 1000, 1, me, "memset")


def test_negative_count_is_refused(space, memory):
    me = Owner()
    a = alloc(space, memory, 1000, me)
    with pytest.raises(InvalidParam):
        space.region(a.start, -1, me, "memset")


def test_another_owners_pointer_is_refused(space, memory):
    me, other = Owner(), Owner()
    theirs = alloc(space, memory, 1000, other)
    with pytest.raises(InvalidParam, match="belongs to another session on this device") as info:
        space.region(theirs.start + 10, 10, me, "memcpy src")
    assert f"memcpy src 0x{theirs.start + 10:x}" in info.value.message
    assert info.value.code == AclError.INVALID_PARAM


def test_freed_pointer_is_refused(space, memory):
    me = Owner()
    a = alloc(space, memory, 1000, me)
    space.unmap(a.start, me)
    with pytest.raises(InvalidParam, match=r"not inside any live allocation on davinci0 \(freed, or never allocated\)"):
        space.region(a.start, 10, me, "memcpy dst")


def test_freed_address_is_never_handed_out_again(space, memory):
    me = Owner()
    a = alloc(space, memory, 1000, me)
    space.unmap(a.start, me)
    b = alloc(space, memory, 1000, me)
    assert b.start != a.start
    with pytest.raises(InvalidParam, match="double free"):
        space.unmap(a.start, me)


@pytest.mark.parametrize("host", [0, 0x1000, 0x7FFF_DEAD_B000, DEVICE_VA_BASE - 1])
def test_host_pointer_is_refused(space, memory, host):
    me = Owner()
    alloc(space, memory, 1000, me)
    with pytest.raises(InvalidParam, match="is not a device address") as info:
        space.region(host, 10, me, "memcpy dst")
    assert f"0x{host:x}" in info.value.message


def test_another_vdevs_address_is_refused(memory):
    me = Owner()
    zero, one = AddressSpace(0, "davinci0"), AddressSpace(1, "davinci1")
    alloc(zero, memory, 1000, me)
    there = alloc(one, memory, 1000, me)
    with pytest.raises(InvalidParam, match=r"is not an address of davinci0 \(a pointer from another device\?\)"):
        zero.region(there.start, 10, me, "memcpy src")
    with pytest.raises(InvalidParam, match="is not an address of davinci0"):
        zero.unmap(there.start, me)
    # and the other way round
    here = zero.allocations(me)[0]
    with pytest.raises(InvalidParam, match="is not an address of davinci1"):
        one.region(here.start, 10, me, "memcpy src")
    assert one.region(there.start, 10, me, "memcpy src").buffer is there.buffer


def test_unmap_returns_the_allocation(space, memory):
    me = Owner()
    a = alloc(space, memory, 1000, me)
    assert space.unmap(a.start, me) is a
    assert space.allocations(me) == []


def test_unmap_of_an_interior_pointer_fails_and_changes_nothing(space, memory):
    me = Owner()
    a = alloc(space, memory, 1000, me)
    with pytest.raises(InvalidParam) as info:
        space.unmap(a.start + 16, me)
    message = info.value.message
    assert f"free(0x{a.start + 16:x})" in message
    assert f"16 bytes into the allocation at 0x{a.start:x}" in message
    assert space.allocations(me) == [a]
    assert space.region(a.start, 1000, me, "memset").buffer is a.buffer
    assert space.unmap(a.start, me) is a


def test_double_free_fails_with_rt_memory_free(space, memory):
    me = Owner()
    a = alloc(space, memory, 1000, me)
    b = alloc(space, memory, 1000, me)
    space.unmap(a.start, me)
    with pytest.raises(InvalidParam, match="double free") as info:
        space.unmap(a.start, me)
    assert info.value.code == AclError.RT_MEMORY_FREE
    assert f"0x{a.start:x}" in info.value.message
    assert space.allocations(me) == [b]


def test_unmap_of_another_owners_pointer_fails_and_changes_nothing(space, memory):
    me, other = Owner(), Owner()
    theirs = alloc(space, memory, 1000, other)
    with pytest.raises(InvalidParam, match="belongs to another session") as info:
        space.unmap(theirs.start, me)
    assert f"free(0x{theirs.start:x})" in info.value.message
    with pytest.raises(InvalidParam, match="belongs to another session"):
        space.unmap(theirs.start + 8, me)
    assert space.allocations(other) == [theirs]
    assert space.allocations(me) == []
    assert space.region(theirs.start, 1000, other, "memset").buffer is theirs.buffer
    assert space.unmap(theirs.start, other) is theirs


def test_unmap_of_a_never_allocated_pointer(space, memory):
    me = Owner()
    a = alloc(space, memory, 1000, me)
    with pytest.raises(InvalidParam, match="not inside any live allocation"):
        space.unmap(a.start + 1000 + VA_ALIGN, me)
    assert space.allocations(me) == [a]


def test_allocations_are_per_owner(space, memory):
    me, other = Owner(), Owner()
    mine = [alloc(space, memory, 100, me) for _ in range(3)]
    theirs = alloc(space, memory, 100, other)
    assert space.allocations(me) == mine
    assert space.allocations(other) == [theirs]


def test_region_of_an_unbacked_allocation_reads_zeros(space):
    me = Owner()
    a = space.map(64, Buffer(96, None), me)
    region = space.region(a.start + 8, 16, me, "memcpy src")
    assert region.read() == bytes(16)
