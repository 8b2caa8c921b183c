"""The module layering of DESIGN.md, enforced: a module imports only modules below it.

Parsed with ast (nothing is imported), the way trio guards its _core split.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "procqueue"

# module -> the procqueue modules it may import (top-down order of DESIGN.md)
ALLOWED: dict[str, set[str]] = {
    "__init__": {"taskqueue", "service", "store", "stored_call", "pool", "errors", "results",
                 "limits", "journal", "trace", "report", "stats", "scheduler", "fork_server",
                 "dashboard", "lazy"},
    "pool": {"records", "service", "taskqueue", "supervisor", "inbox", "stats", "config",
             "results", "errors", "protocol", "admission", "journal", "trace", "affinity",
             "limits", "backends", "calls", "call_options", "job_maker", "submission", "feeder",
             "input_feed", "pool_journal", "program_fork"},
    # the feeder thread of a lazy call (imap*): takes inputs as its window has room
    "feeder": {"input_feed", "submission", "pool_journal", "inbox", "results", "tasks",
               "program_fork"},
    # a lazy call's feeding loop, the same for every backend
    "input_feed": {"results"},
    # a call's inputs as Tasks and Blocks, posted to the supervisor in groups
    "submission": {"pool_journal", "supervisor", "inbox", "config", "results", "tasks",
                   "protocol", "errors"},
    # a pool's journal as its calls use it: opened at the first call, replay, committing sink
    "pool_journal": {"journal", "chunking"},
    # a call's Job from its parsed options, and what a pool keeps across calls (caches)
    "job_maker": {"call_options", "admission", "chunking", "config", "limits", "protocol",
                  "tasks"},
    # per-call options (chunksize, errors=, limit=, halt=...), parsed and validated once
    "call_options": {"records", "calls", "config", "scheduler", "limits"},
    # a worker service of a durable TaskQueue: runs stored tasks in a pool (duck-typed)
    "service": {"taskqueue", "store", "stored_call", "process_meter", "errors"},
    # CPU and memory of worker processes, for those who watch them (psutil only)
    "process_meter": set(),
    # durable queues: calls -> stored tasks, stored outcomes -> results
    "taskqueue": {"store", "stored_call", "limits", "errors"},
    # what a worker runs for a stored task; light, no procqueue imports
    "stored_call": {"records"},
    # the loop only: detects events and sequences the parts below
    "supervisor": {"inbox", "dispatch", "outcomes", "cancelling", "worker_slots", "blocks", "stats",
                   "program_fork",
                   "retry",
                   "task_book", "timeouts", "scheduler", "tasks", "protocol", "errors",
                   "config",
                   "chunking"},  # a batch's length: how long callers let a turn run
    # what caller threads post to the supervisor, and its wake-up pipe
    "inbox": {"tasks"},
    # ending tasks on request (cancel, halt, terminate): the book, and the workers holding them
    "cancelling": {"outcomes", "blocks", "task_book", "worker_slots", "tasks", "errors"},
    # what a worker's results, death or overrun mean for its tasks
    "outcomes": {"blocks", "task_book", "timeouts", "worker_slots", "retry", "stats",
                 "tasks", "protocol", "errors"},
    # which queued work goes to which worker, and the message that carries it
    "dispatch": {"task_book", "worker_slots", "scheduler", "tasks", "protocol", "config"},
    # when a running task times out: pure, reads a slot and its tasks
    "timeouts": {"worker_slots", "tasks"},
    # blocks' one home: reading and routing a block's report, exploding it into tasks
    "blocks": {"task_book", "worker_slots", "tasks", "protocol"},
    # the task book keeps tasks' books and decides what follows an outcome: no processes
    "task_book": {"retry", "scheduler", "tasks", "protocol", "errors"},
    # which failures run again, and the backoff: shared by every backend
    "retry": {"records", "errors"},
    "worker_slots": {"records", "worker", "protocol", "affinity", "errors", "tasks",
                     "program_fork", "fork_server", "procfs"},
    # Linux's /proc: a process's parent and start time
    "procfs": set(),
    "worker": {"item_run", "give_back", "protocol", "affinity", "errors", "fork_server",
               "process_group"},
    # a worker's own process group, killed when the program is gone (local and Dask workers)
    "process_group": {"procfs"},
    # in a worker: what waits behind a task that runs long goes back to the supervisor
    "give_back": {"protocol"},
    # one item's run as every backend's workers report it: result or error, never a raise
    "item_run": {"protocol", "errors"},
    "scheduler": {"records", "config", "admission", "tasks", "limits", "errors", "chunking"},
    "admission": {"limits", "errors"},
    "chunking": set(),
    "calls": {"protocol", "results"},
    "results": {"records", "tasks", "errors"},
    "config": {"records", "affinity", "limits", "errors", "fork_server", "program_fork"},
    "fork_server": set(),
    # a pool's own fork server, forked from the program when it has one thread
    "program_fork": {"fork_server"},
    "tasks": {"errors", "protocol"},
    "stats": {"records", "tasks"},
    # the batch journal is one of the stores: it opens and encodes through procqueue.store
    "journal": {"errors", "protocol", "tasks", "results", "store", "code_identity"},
    # what code a function runs, hashed for the journal's same-function check
    "code_identity": {"protocol"},
    "trace": {"stats"},
    "report": {"stats"},
    "protocol": {"records", "errors"},
    "affinity": {"errors"},
    "errors": set(),
    # PEP 562 lazy exports of a package
    "lazy": set(),
    # small value types (repr, ==, frozen) without importing dataclasses
    "records": set(),
}


def procqueue_imports(path: Path) -> set[str]:
    """The procqueue modules a file imports (first component below the package)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.startswith("procqueue."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("procqueue."):
                    found.add(alias.name.split(".")[1])
    return found


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_module_imports_only_modules_below_it(module: str) -> None:
    path = PACKAGE / f"{module}.py"
    if not path.exists():
        pytest.fail(f"{path} is listed in the layering but missing")
    illegal = procqueue_imports(path) - ALLOWED[module]
    assert not illegal, f"procqueue/{module}.py imports {sorted(illegal)}, above it in the layering"


def test_every_module_is_in_the_layering() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules <= set(ALLOWED), f"unlisted modules: {sorted(modules - set(ALLOWED))}"


def test_limits_package_imports_only_errors_and_the_base_modules() -> None:
    for path in (PACKAGE / "limits").glob("*.py"):
        tree = ast.parse(path.read_text())
        # level 2 ("from ..x import") reaches out of limits/ into procqueue/
        outside = {n.module.split(".")[0] for n in ast.walk(tree)
                   if isinstance(n, ast.ImportFrom) and n.level == 2 and n.module}
        assert outside <= {"errors", "lazy", "records", "procfs"}, \
            f"limits/{path.name} imports {sorted(outside)}"


def test_cli_uses_only_the_public_api() -> None:
    import procqueue

    public = set(procqueue.__all__)
    for path in (ROOT / "cli").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("procqueue") and node.level == 0:
                assert node.module == "procqueue", f"{path.name} imports {node.module}"
                names = {a.name for a in node.names}
                assert names <= public, f"{path.name} imports non-public {names - public}"
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id == "procqueue":
                assert node.attr in public or node.attr.startswith("__"), \
                    f"{path.name} uses procqueue.{node.attr}, not exported"


# A backend may use the shared task model and mechanisms: the call surface, the result
# objects, the wire format, a lazy call's feeding loop (input_feed), one item's run in a
# worker (item_run), the retry policy, the errors, the configuration values, the usable-CPU
# count, the limits' value objects and bookkeeping (Rate, KeyedLimit, FairQueue) and a worker's
# own process group (process_group: a LocalCluster's workers lead one, as local workers); never the
# local supervisor's machinery (supervisor, worker_slots, task_book, worker, scheduler,
# admission).
# stats: a backend reports each task attempt as the local supervisor does, a stats.TaskEvent
# (what Pool(on_event=...) and the trace receive).
BACKEND_SHARED = {"affinity", "calls", "chunking", "config", "errors", "input_feed", "item_run",
                  "lazy", "limits", "process_group", "protocol", "results", "retry", "stats",
                  "tasks"}
# The one way up: a DaskPool is a procqueue.Pool (isinstance holds), so dask/pool.py takes its
# base class and the values and types of the Pool API from the pool module - these names only.
# _JournaledCall: a call's journal is the front end's (Pool's code, shared by both pools), and
# DaskPool's calls hand it their inputs; the backend itself never touches the journal.
# Queue: a DaskPool's queues= are the local pool's procqueue.Queue values.
BACKEND_POOL_NAMES = {"dask/pool.py": {"BACKENDS", "CallOptions", "Pool", "PoolState",
                                       "PoolStats", "Queue", "WorkerStats", "_JournaledCall"},
                      "dask/options.py": {"Queue"}}

# The Dask backend's package: module -> the modules of the package it may import, bottom up
# (what runs in a Dask worker imports nothing of the driver's side).
DASK_ALLOWED: dict[str, set[str]] = {
    "__init__": {"cluster", "pool", "worker_side"},
    "pool": {"cluster", "cluster_limits", "driver", "items", "options", "worker_side"},
    "cluster_limits": {"cluster", "options", "worker_side"},
    "driver": {"chunks", "cluster", "events", "items", "outcomes", "worker_side"},
    "chunks": {"items", "worker_side"},
    "outcomes": {"items", "worker_side"},
    "events": {"items"},
    "options": {"items"},
    "cluster": {"worker_side"},
    "items": {"worker_side"},
    "worker_side": set(),
}


def absolute_imports(path: Path) -> set[str]:
    """The procqueue modules a file imports, as dotted names (relative imports resolved)."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            if node.module is None:  # from . import x: x is a module
                found.update(".".join(module + [alias.name]) for alias in node.names)
            else:
                found.add(".".join(module))
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "procqueue"}


def test_backends_use_only_the_shared_mechanisms() -> None:
    """A backend reuses the shared task model (BACKEND_SHARED); it never reaches up into the
    local supervisor's machinery, and into the pool module only for the Pool API."""
    for path in (PACKAGE / "backends").rglob("*.py"):
        outside = {name.split(".")[1] for name in absolute_imports(path)
                   if not name.startswith("procqueue.backends")}
        name = path.relative_to(PACKAGE / "backends").as_posix()
        allowed = BACKEND_SHARED | ({"pool"} if name in BACKEND_POOL_NAMES else set())
        assert outside <= allowed, f"{name} imports {sorted(outside - allowed)}"


def test_the_dask_pool_takes_only_the_pool_api_from_the_pool_module() -> None:
    for name, allowed in BACKEND_POOL_NAMES.items():
        path = PACKAGE / "backends" / name
        taken = {alias.name for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.ImportFrom) and (node.module, node.level) in (
                     ("pool", 3), ("procqueue.pool", 0)) for alias in node.names}
        assert taken and taken <= allowed, f"{name} takes {sorted(taken - allowed)} from pool"


def test_every_dask_backend_module_is_in_its_layering() -> None:
    modules = {p.stem for p in (PACKAGE / "backends" / "dask").glob("*.py")}
    assert modules == set(DASK_ALLOWED), f"unlisted: {sorted(modules ^ set(DASK_ALLOWED))}"


@pytest.mark.parametrize("module", sorted(DASK_ALLOWED))
def test_dask_backend_modules_import_only_modules_below_them(module: str) -> None:
    prefix = "procqueue.backends.dask."
    used = {name[len(prefix):].split(".")[0]
            for name in absolute_imports(PACKAGE / "backends" / "dask" / f"{module}.py")
            if name.startswith(prefix)}
    illegal = used - DASK_ALLOWED[module]
    assert not illegal, f"backends/dask/{module}.py imports {sorted(illegal)}, above it"


# The dashboard sits on top: it reads what the public layers offer (a TaskQueue, a pool's
# statistics and event stream, the report's colours, the process meter) and nothing below
# imports it.
DASHBOARD_USES = {"taskqueue", "store", "stats", "report", "process_meter", "errors"}


def test_the_dashboard_reads_only_the_layers_it_shows() -> None:
    for path in (PACKAGE / "dashboard").glob("*.py"):
        outside = {name.split(".")[1] for name in absolute_imports(path)
                   if not name.startswith("procqueue.dashboard")}
        assert outside <= DASHBOARD_USES, f"dashboard/{path.name} imports " \
                                          f"{sorted(outside - DASHBOARD_USES)}"


def test_nothing_but_the_public_api_imports_the_dashboard() -> None:
    users = {path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py")
             if "dashboard" not in path.relative_to(PACKAGE).parts[:-1]
             and any(name.startswith("procqueue.dashboard") for name in absolute_imports(path))}
    assert users <= {"__init__.py"}, f"{sorted(users)} import the dashboard"


def test_every_package_of_procqueue_is_installed() -> None:
    """setup.cfg lists packages by name: a new subpackage left out installs with
    `pip install -e .` (the folder is on the path) but is missing from `pip install .`."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"not in setup.cfg's packages: {sorted(found - listed)}"
