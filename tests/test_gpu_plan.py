"""The GPU plan (scripts/gpu_plan.py) fits its lease, and the benchmarks' compiled cases compile.

A lent H200 session has 15 minutes in all, so the default GPU run must end in under 8 minutes.
These checks run without a GPU: each stage still collects the cases its budget arithmetic
counts, the arithmetic stays within the budget, a hanging stage is stopped at its limit and the
next one runs, and the files that come back stay within the 8 the machine returns.
"""
import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_plan", ROOT / "scripts" / "gpu_plan.py")
gpu_plan = sys.modules["gpu_plan"] = importlib.util.module_from_spec(_spec)  # for dataclasses
_spec.loader.exec_module(gpu_plan)
Stage = gpu_plan.Stage


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


@pytest.mark.slow
def test_every_stage_collects_the_cases_its_budget_counts():
    done = subprocess.run([sys.executable, "scripts/gpu_plan.py", "--count"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    table = "\n".join(line for line in done.stdout.splitlines() if "(CASES:" in line)
    assert done.returncode == 0, f"update CASES in scripts/gpu_plan.py:\n{table}\n{done.stderr}"
    assert len(table.splitlines()) == sum(len(s.parts) for s in gpu_plan.plan())


def test_the_default_run_fits_in_eight_minutes():
    stages = gpu_plan.plan()
    _, core = gpu_plan.arithmetic(stages)
    assert core + gpu_plan.STOP_GRACE_S <= gpu_plan.BUDGET_S < 8 * 60
    assert [s.name for s in stages if s.open_ended] == ["extras"]  # the last, in the time left
    assert stages[-1].open_ended
    done = subprocess.run([sys.executable, "scripts/gpu_plan.py", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"of the {gpu_plan.BUDGET_S} s budget" in done.stdout


def test_the_files_that_come_back_are_at_most_eight():
    for extras in (None, "hf_vitmae"):
        stages = gpu_plan.plan(extras)
        written = {s.log for s in stages} | {s.json for s in stages if s.json}
        assert written | {"cases.jsonl", "RESULTS.md"} <= set(gpu_plan.OUTPUTS)
    assert len(gpu_plan.OUTPUTS) <= 8


def test_a_hanging_stage_is_stopped_and_the_next_one_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_plan, "STOP_GRACE_S", 1)
    deaf = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)"
    stages = [Stage("hang", _python(deaf), fixed=1, limit=2),
              Stage("after", _python("print('after ran')"), fixed=1, limit=30)]
    start = time.monotonic()
    assert gpu_plan.run(stages, tmp_path, budget=40) == {"hang": "timeout", "after": 0}
    assert time.monotonic() - start < 20
    log = (tmp_path / "plan.log").read_text()
    assert "hang: stopped at its limit of 2 s" in log and "after ran" in log


def test_a_stopped_stage_gets_sigint_even_where_it_was_ignored(tmp_path, monkeypatch):
    """pytest-benchmark writes its JSON on KeyboardInterrupt; a shell without job control
    starts background commands with SIGINT ignored, which their children would inherit."""
    monkeypatch.setattr(gpu_plan, "STOP_GRACE_S", 10)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    flag = tmp_path / "interrupted"
    code = (f"import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
            f"    open({str(flag)!r}, 'w').close()")
    try:
        status = gpu_plan.run([Stage("bench", _python(code), fixed=1, limit=2)], tmp_path, 30)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert status == {"bench": "timeout"} and flag.exists()


def test_the_budget_cuts_the_last_stage_and_skips_what_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_plan, "STOP_GRACE_S", 1)
    monkeypatch.setattr(gpu_plan, "MIN_STAGE_S", 2)
    stages = [Stage("long", _python("import time; time.sleep(60)"), fixed=1, limit=100),
              Stage("later", _python("print('later ran')"), fixed=1, limit=30)]
    start = time.monotonic()
    status = gpu_plan.run(stages, tmp_path, budget=5)
    assert status == {"long": "timeout", "later": "skipped"}
    assert time.monotonic() - start < 15


def test_a_failed_required_stage_stops_the_plan(tmp_path):
    stages = [Stage("build", _python("raise SystemExit(3)"), fixed=1, limit=30, required=True),
              Stage("tests", _python("print('tests ran')"), fixed=1, limit=30)]
    assert gpu_plan.run(stages, tmp_path, budget=60) == {"build": 3}
    assert "tests ran" not in (tmp_path / "plan.log").read_text()


def _case(name: str, impl: str, ms: float) -> dict:
    return {"name": name, "fullname": f"benchmarks/test_ops.py::{name}", "group": "gather_tokens",
            "extra_info": {"op": "gather_tokens", "impl": impl, "shape": [8, 4, 2],
                           "dtype": "torch.float32", "direction": "fwd"},
            "stats": {"median": ms / 1e3}}


def test_the_report_merges_stage_json_and_the_lines_of_a_stopped_stage(tmp_path):
    eager, ours = _case("test_a[reference]", "reference", 2.0), _case("test_a[ours]", "ours", 1.0)
    (tmp_path / "ops.json").write_text(json.dumps({
        "machine_info": {"device": "NVIDIA H200", "cuda": "13.0", "torch": "2.11"},
        "datetime": "2026-12-01T00:00:00", "benchmarks": [eager]}))
    # the stopped stage's cases, one of them also in the JSON
    (tmp_path / "cases.jsonl").write_text(json.dumps(eager) + "\n" + json.dumps(ours) + "\n")
    output = tmp_path / "RESULTS.md"
    report.main([str(tmp_path / "ops.json"), str(tmp_path / "cases.jsonl"), "--output",
                 str(output), "--no-plots"])
    text = output.read_text()
    assert "NVIDIA H200" in text and "![" not in text
    rows = [line for line in text.splitlines() if line.startswith("| 8x4x2")]
    assert len(rows) == 2 and "| ours | 1.000 |" in rows[1] and "2.00x" in rows[1]


def test_each_compiled_case_compiles_past_dynamos_recompile_limit():
    """The benchmarks compile the same reference function once per case: without a reset, past
    `recompile_limit` variants dynamo would run the rest eagerly and Compiled would say so.
    NOTE: in a fresh interpreter, as each benchmark stage runs: in a test worker that had run
    hundreds of other tests first, torch 2.14.1's guard building took over 20 minutes here."""
    script = """
import torch
from benchmarks.common import Compiled
from mae_kernels import reference
index = torch.zeros(1, 1, dtype=torch.int64)
for n in range(torch._dynamo.config.recompile_limit + 2):
    op = Compiled(reference.gather_tokens, "aot_eager", dynamic=False)
    op(torch.randn(1, n + 2, 3), index)
    assert op.graphs == 1, (n, op.graphs)
print("compiled", n + 1, "cases, past recompile_limit", torch._dynamo.config.recompile_limit)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = result.stdout.split()
    assert counts[0] == "compiled" and int(counts[1]) == int(counts[-1]) + 2, result.stdout


def test_a_killed_stages_empty_json_leaves_the_report_to_its_case_lines(tmp_path):
    (tmp_path / "ops.json").write_text("")  # pytest-benchmark opened it, then was killed
    (tmp_path / "cases.jsonl").write_text(json.dumps(_case("test_a[ours]", "ours", 1.0)) + "\n")
    gpu_plan.report(tmp_path, gpu_plan.Log(tmp_path))
    text = (tmp_path / "RESULTS.md").read_text()
    assert "per-case lines only" in text and "| 8x4x2 float32 fwd | ours | 1.000 |" in text
