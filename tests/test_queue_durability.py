"""Issue #21's durability promise, tested by force: two enqueuing processes and two worker
services share one store while the test SIGKILLs a random service at random points of the
run and starts it again at once.  Whatever the kills hit:

- an enqueue that returned is never lost;
- every task ends once, succeeded, with the right value, from the last run that started;
- a task whose result was recorded never runs again (its side-effect log proves it);
- each task the killed services held runs again once, and nothing else does;
- a killed service's pool workers die with it, and every kill is detected within seconds.

It runs on both stores (conftest's store_target: an SQLite file, a pgserver PostgreSQL
database).  The run and the checks are bench/queue_soak.py's, which runs the issue's full
size (5,000 tasks, 20 kills); here 2,000 tasks of 5 ms and 10 kills, ~20 s each on 2 cores.
"""
from __future__ import annotations

import random

import pytest

from bench_modules import load_bench_module

from procqueue.store.sql import LEASE_S

# a kill is detected this soon once a live service is there to claim (on this host its pid
# check takes ~1 s; the lease, 5 s, bounds it anywhere), with room for a loaded machine
DETECT_WITHIN_S = LEASE_S + 2.0


def _soak():
    return load_bench_module("queue_soak.py")


@pytest.fixture(scope="module")
def soak():
    return _soak()


@pytest.fixture
def facts(soak, store_target, tmp_path):
    plan = soak.Plan(tasks=2000, kills=10, task_s=0.005, jobs=2, batches=8, deadline_s=120.0,
                     seed=random.SystemRandom().randrange(1 << 30))
    workdir = tmp_path / "soak"
    workdir.mkdir()
    facts = soak.run(store_target, plan, workdir)
    print(soak.figures(facts))  # the figures, shown with -s or on a failure
    return facts


@pytest.mark.timeout(180)
def test_sigkilled_services_lose_nothing_and_rerun_nothing_finished(soak, facts):
    figures = soak.figures(facts)
    assert len(facts.kills) == facts.plan.kills
    assert soak.check_enqueues(facts) == [], figures
    assert soak.check_results(facts) == [], figures
    assert soak.check_no_run_after_finish(facts) == [], figures
    assert soak.check_reruns(facts) == [], figures
    assert soak.check_services(facts, DETECT_WITHIN_S) == [], figures
    # the bound, stated: re-runs are exactly the tasks the killed services held
    assert figures["reruns"] == figures["tasks_held_by_killed"]
