"""The user-facing values of procqueue.limits: Rate and Limit (validation, parsing), and the
package's exports.  The live objects are tested in test_limits_shm.py (shared memory),
test_limits_rate_gate.py and test_limits_keyed.py."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest

from procqueue import limits
from procqueue.limits import Limit, Rate


def test_package_exports_the_public_api() -> None:
    for name in ("Semaphore", "RateGate", "KeyedLimit", "FairQueue", "Limit", "Rate",
                 "SemaphoreStatistics", "RateGateStatistics", "KeyedLimitStatistics",
                 "FairQueueStatistics", "LimitHandle", "LimitStatistics", "QueuedItem"):
        assert name in limits.__all__
        assert hasattr(limits, name)


def test_values_are_frozen_and_picklable() -> None:
    limit = Limit("geo-api", concurrency=2, rate=Rate(10, per=1))
    assert pickle.loads(pickle.dumps(limit)) == limit
    with pytest.raises(dataclasses.FrozenInstanceError):
        limit.concurrency = 3  # type: ignore[misc]
    assert Rate(10, per=1) == Rate(10, per=1.0)
    assert Rate(50, per=30).period_s == 30.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50/30s", Rate(50, 30.0)),
        ("10/s", Rate(10, 1.0)),
        ("10/1", Rate(10, 1.0)),
        ("5/500ms", Rate(5, 0.5)),
        ("100/2m", Rate(100, 120.0)),
        ("100/min", Rate(100, 60.0)),
        ("1000/h", Rate(1000, 3600.0)),
        (" 3 / 1.5s ", Rate(3, 1.5)),
    ],
)
def test_rate_parse(text: str, expected: Rate) -> None:
    assert Rate.parse(text) == expected


@pytest.mark.parametrize("text", ["", "50", "/s", "50/30x", "-1/s", "1.5/s", "0/s", "5/0s"])
def test_rate_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Rate.parse(text)


@pytest.mark.parametrize(
    ("limit", "per", "error", "message"),
    [
        (0, 1.0, ValueError, "Rate limit must be >= 1"),
        (False, 1.0, TypeError, "Rate limit must be an int"),
        ("5", 1.0, TypeError, "Rate limit must be an int"),
        (5, 0, ValueError, "Rate per must be a finite number of seconds > 0"),
        (5, math.inf, ValueError, "Rate per must be a finite number of seconds > 0"),
        (5, None, TypeError, "Rate per must be a number of seconds"),
    ],
)
def test_rate_validation(limit: object, per: object, error: type[Exception],
                         message: str) -> None:
    with pytest.raises(error, match=message):
        Rate(limit, per)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("gpu=1", Limit("gpu", concurrency=1)),
        ("geo-api=2,10/1s", Limit("geo-api", concurrency=2, rate=Rate(10, 1.0))),
        ("api=50/30s", Limit("api", rate=Rate(50, 30.0))),
        ("api=50/30s,4", Limit("api", concurrency=4, rate=Rate(50, 30.0))),
    ],
)
def test_limit_parse(text: str, expected: Limit) -> None:
    assert Limit.parse(text) == expected


@pytest.mark.parametrize("text", ["gpu", "gpu=", "gpu=1,2", "gpu=1/s,2/s", "gpu=x", "=1",
                                  "gpu=1,", "gpu=-1"])
def test_limit_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        Limit.parse(text)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": "x"}, ValueError, "needs concurrency= or rate="),
        ({"name": "x", "concurrency": 0}, ValueError, "concurrency must be >= 1"),
        ({"name": "x", "concurrency": True}, TypeError, "concurrency must be an int"),
        ({"name": "x", "rate": (10, 1)}, TypeError, "rate must be a Rate"),
        ({"name": "bad name", "concurrency": 1}, ValueError, "limit name must be"),
        ({"name": None, "concurrency": 1}, TypeError, "limit name must be a str"),
    ],
)
def test_limit_validation(kwargs: dict[str, object], error: type[Exception],
                          message: str) -> None:
    with pytest.raises(error, match=message):
        Limit(**kwargs)  # type: ignore[arg-type]
