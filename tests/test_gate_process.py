"""Great Expectations checks handed to the gate worker process give the report of the same checks run here."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from catalog.config import ValidateConfig
from data_checks.clean_suite import check_clean_data

REPO = Path(__file__).resolve().parents[1]

# a fresh interpreter: the test process has imported Great Expectations, and then no worker is started
WORKER_RUN = """
import json, sys
from pathlib import Path
from catalog.sections import ValidateConfig
from data_checks import gate_process
from data_checks.clean_suite import check_clean_data
gate_process.start()
report, checked = gate_process.run(check_clean_data, Path(sys.argv[1]), {}, ValidateConfig(), Path(sys.argv[2]))
print(json.dumps({"imported_here": "great_expectations" in sys.modules, "checked": checked,
                  "records": report.as_records(), "blocking": len(report.blocking_failures)}))
"""


def test_checks_run_in_the_worker_match_checks_run_here(tmp_path):
    rows = 40
    instructions = ["x"] * rows
    instructions[5] = "z" * 5000  # one row over max_instruction_chars: a blocking failure either way
    clean = tmp_path / "clean"
    clean.mkdir()
    data = clean / "data.parquet"
    pd.DataFrame({"id": [str(i) for i in range(rows)], "instruction": instructions, "input": [""] * rows,
                  "response": ["y"] * rows, "source": ["s"] * rows, "category": ["c"] * rows}).to_parquet(data)
    done = subprocess.run([sys.executable, "-c", WORKER_RUN, str(clean), str(tmp_path / "docs-worker")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    worker = json.loads(done.stdout.strip().splitlines()[-1])
    here, checked = check_clean_data(clean, {}, ValidateConfig(), tmp_path / "docs-here")
    assert worker["imported_here"] is False  # the checks ran in the worker: this process never imported GE
    assert worker["checked"] == checked == rows
    assert worker["blocking"] == len(here.blocking_failures) == 1
    assert worker["records"] == here.as_records()
    assert (tmp_path / "docs-worker" / "index.html").is_file()


KILLED_PARENT = """
import time
from data_checks import gate_process
gate_process.start()
gate_process.run(time.sleep, 0)
print([process.pid for process in gate_process._worker._processes.values()][0], flush=True)
time.sleep(120)
"""


def test_the_worker_ends_when_its_run_is_killed_with_signal_9():
    import os
    import signal
    import time

    run = subprocess.Popen([sys.executable, "-c", KILLED_PARENT], cwd=REPO, stdout=subprocess.PIPE, text=True)
    worker = int(run.stdout.readline())
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return  # gone: a killed nightly run leaves no Great Expectations process behind
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError(f"the gate worker {worker} outlived its killed run")
