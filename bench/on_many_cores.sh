#!/usr/bin/env bash
# One run of the benchmarks that need more cores than the 2 of our development machines: how
# procqueue scales from 1 to 16 workers on CPU work (bench/scaling.py), how many 1 ms workers
# one supervisor feeds when the sleeping workers have cores of their own (bench/many_workers.py)
# and cold start-up (bench/startup.py).  For a machine without a package registry: the wheels
# of procqueue and of the peers lie in .whl/ (bench/README.md, "On a 16-core machine", says how
# they were fetched).  Every phase has its own time limit, so a slow one costs only itself.
#
#     OUT=/tmp/cores bash bench/on_many_cores.sh
#     SCALING_WORKERS="1 2" MANY_WORKERS="8" bash bench/on_many_cores.sh   # a quick try
#     PHASES="many startup" MANY_ONLY="procqueue:imap+key mp:map" bash bench/on_many_cores.sh
# With an earlier procqueue's wheel in .whl/before/, startup.py shows it beside this one.
set -u
OUT=${OUT:-/tmp/on_many_cores}
mkdir -p "$OUT"
log=$OUT/run.log
export PYTHONUNBUFFERED=1

say() { echo "== $(date +%T) $*" | tee -a "$log"; }

say "machine"
{ uname -r; nproc; grep -m1 'model name' /proc/cpuinfo; python3 -V
  python3 -c 'import os; print("usable CPUs", len(os.sched_getaffinity(0)))'
} 2>&1 | tee -a "$log"

# A venv of our own holds procqueue (with its console script, for startup.py's `procqueue map`)
# and the peers, whatever the machine's python3 has installed
say "install"
PY=/tmp/pq-venv/bin/python
if ! { python3 -m venv --without-pip /tmp/pq-venv &&
       python3 -m pip --python "$PY" install -q --no-index --no-deps --no-cache-dir .whl/*.whl
     } >> "$log" 2>&1; then
    say "no venv: procqueue from the tree, the peers from /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site \
        .whl/*.whl >> "$log" 2>&1
    export PYTHONPATH=/tmp/site
    PY=python3
fi

# An earlier procqueue for startup.py's before/after columns, when its wheel is in .whl/before/
BEFORE=
if compgen -G ".whl/before/*.whl" > /dev/null; then
    if python3 -m venv --without-pip /tmp/pq-before && python3 -m pip --python \
            /tmp/pq-before/bin/python install -q --no-index --no-deps --no-cache-dir \
            .whl/before/*.whl $(ls .whl/*.whl | grep -v '/procqueue-') >> "$log" 2>&1; then
        BEFORE=/tmp/pq-before/bin/python
    fi
fi

say "smoke"
timeout 60 "$PY" -c '
import psutil
from procqueue import Pool
with Pool(4) as p:
    assert p.map(abs, range(-100, 0)) == list(range(100, 0, -1))
    kids = psutil.Process().children(recursive=True)
    print("procqueue ok:", [(k.pid, k.cpu_affinity()) for k in kids])
' 2>&1 | tee -a "$log"

# PHASES="scaling many startup" (the default) runs all three
phase() { [[ " ${PHASES:-scaling many startup} " == *" $1 "* ]]; }

if phase scaling; then
    say "scaling"
    timeout 250 "$PY" bench/scaling.py --workers ${SCALING_WORKERS:-1 2 4 8 16} --rounds 2 \
        --ideal-s 0.4 --out "$OUT/scaling.md" 2>&1 | tee -a "$log"
fi

if phase many; then
    say "many workers"
    timeout ${MANY_LIMIT_S:-170} "$PY" bench/many_workers.py --workers ${MANY_WORKERS:-16 64 128} \
        --rounds 1 --ideal-s 1.0 ${MANY_ONLY:+--only $MANY_ONLY} --out "$OUT/many_workers.md" \
        2>&1 | tee -a "$log"
fi

if phase startup; then
    say "start-up"
    # from elsewhere: in the checkout, `python -c "import procqueue.cli"` would find the
    # tree's procqueue/ (which has no cli/) before the installed one
    repo=$PWD
    (cd /tmp && timeout 100 "$PY" "$repo/bench/startup.py" --rounds ${STARTUP_ROUNDS:-5} \
        --python "$PY" ${BEFORE:+--before-python $BEFORE} --out "$OUT/startup.md") 2>&1 \
        | tee -a "$log"
fi
say "done"
