"""procqueue's value types (procqueue/records.py): what users of the ones the API hands out
rely on, as when they were dataclasses: fields by name, repr, equality by value, immutability,
hashing, pickling, positional pattern matching, and a changed copy."""
from __future__ import annotations

import copy
import pickle

import pytest

import procqueue
from procqueue.protocol import ErrorInfo, Ready
from procqueue.records import FrozenInstanceError, as_dict, replaced


def outcome(**changes):
    fields = dict(index=3, input="a.txt", ok=True, value=5, error=None, attempts=1,
                  seconds=0.25, pid=1234)
    return procqueue.TaskOutcome(**{**fields, **changes})


def test_a_frozen_record_compares_hashes_and_prints_by_its_fields():
    a, b = outcome(), outcome()
    assert a == b and hash(a) == hash(b) and a != outcome(value=6)
    assert len({a, b, outcome(index=4)}) == 2
    assert repr(a) == ("TaskOutcome(index=3, input='a.txt', ok=True, value=5, error=None, "
                       "attempts=1, seconds=0.25, pid=1234)")
    assert as_dict(a)["input"] == "a.txt" and list(as_dict(a)) == list(type(a)._fields)


def test_a_frozen_record_cannot_be_changed_but_copied_with_changes():
    a = outcome()
    with pytest.raises(FrozenInstanceError):
        a.value = 6  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del a.value
    assert replaced(a, value=6) == outcome(value=6) and a.value == 5
    with pytest.raises(TypeError):
        replaced(a, colour="red")


def test_records_pickle_and_copy_with_their_fields_slotted_or_not():
    info = ErrorInfo(b"x", "ValueError", "bad", "Traceback ...")  # frozen, slots
    for record in (outcome(), info, Ready(42), procqueue.HaltPolicy(True, "fail", 3)):
        for twin in (pickle.loads(pickle.dumps(record, 5)), copy.copy(record),
                     copy.deepcopy(record)):
            assert type(twin) is type(record)
            assert as_dict(twin) == as_dict(record)


def test_records_match_positionally_as_dataclasses_did():
    match outcome():
        case procqueue.TaskOutcome(index, item, ok):
            assert (index, item, ok) == (3, "a.txt", True)
        case _:
            pytest.fail("no match")
    match Ready(42):
        case Ready(pid):
            assert pid == 42


def test_a_mutable_record_is_unhashable_and_one_without_eq_compares_by_identity():
    with pytest.raises(TypeError):
        hash(Ready(1))
    assert Ready(1) == Ready(1)
    info = ErrorInfo(b"x", "ValueError", "bad", "tb")
    assert info != ErrorInfo(b"x", "ValueError", "bad", "tb") and info == info


@pytest.mark.timeout(60)
def test_pool_stats_compare_and_print_by_their_fields():
    with procqueue.Pool(1) as pool:
        assert pool.map(abs, [-1]) == [1]
        stats = pool.stats()
    assert stats == replaced(stats) and hash(stats) == hash(replaced(stats))
    assert repr(stats).startswith("PoolStats(state=") and "workers=(WorkerStats(" in repr(stats)
    assert stats.tasks_succeeded == 1 and as_dict(stats)["processes"] == 1
