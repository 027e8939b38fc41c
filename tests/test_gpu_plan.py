"""The GPU plan (scripts/gpu_plan.py) and its sanitizer stage (scripts/gpu_sanitize.py), on a
machine without a GPU.

A lent GPU session has 15 minutes in all, so the first call's plan must end in under 8 minutes
with the headline figures first: the ViT-B/16 step and the loader start in the first half of
the budget, whatever the stages before them do. These checks: each stage still collects the
cases its budget arithmetic counts; the arithmetic stays within the budget; a failed build lets
the later stages run without the CUDA extension; a reserved stage starts by its time; a hanging
stage is stopped and the next one runs; a hanging test is cut by its timeout while the next file
still runs; stage times come back machine-readable and replace the estimates; the sanitizer
stage fails on a kernel that no call reaches and tells kernel errors from benign API errors; the
report shows kernel time beside call time.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # for dataclasses
    spec.loader.exec_module(module)
    return module


gpu_plan = _load("gpu_plan")
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


def test_the_step_and_the_loader_start_in_the_first_half_and_the_plan_fits():
    stages = gpu_plan.plan()
    names = [s.name for s in stages]
    assert names[:4] == ["device", "build", "step", "loader"]
    starts = dict(zip(names, gpu_plan.timeline(stages)))
    half = gpu_plan.BUDGET_S / 2
    for name in ("step", "loader"):
        stage = stages[names.index(name)]
        assert starts[name] <= stage.start_by <= half, (name, starts[name], stage.start_by)
    _, core = gpu_plan.arithmetic(stages)
    assert core + gpu_plan.STOP_GRACE_S <= gpu_plan.BUDGET_S < 8 * 60
    # what comes after the reserved stages and the smoke fills the time left, in order
    assert [s.name for s in stages if not s.fills] == ["device", "build", "step", "loader",
                                                      "smoke"]
    assert names.index("tests") < names.index("ops") < names.index("sanitizer")
    done = subprocess.run([sys.executable, "scripts/gpu_plan.py", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"of the {gpu_plan.BUDGET_S} s budget" in done.stdout
    assert done.stdout.startswith(f"warm rerun: {gpu_plan.WARM_RERUN}")
    step = next(line for line in done.stdout.splitlines() if line.startswith("step "))
    assert f"{starts['step']:.0f}" in step.split() and "90" in step.split()


def test_the_warm_rerun_selects_the_step_and_the_loader_alone(capsys):
    assert gpu_plan.main(["--dry-run", *gpu_plan.WARM_RERUN.split()[2:]]) == 0
    stages = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()
              if line.startswith(("device:", "build:", "step:", "loader:", "smoke:"))]
    assert stages == ["step", "loader"]
    with pytest.raises(SystemExit):
        gpu_plan.main(["--dry-run", "--only", "steps"])
    assert "--only: no stage steps" in capsys.readouterr().err


def test_the_files_that_come_back_are_at_most_eight():
    for extras in (None, "hf_vitmae"):
        stages = gpu_plan.plan(extras)
        written = {"plan.log", "stages.log", "stages.json", "cases.jsonl", "RESULTS.md",
                   "benchmarks.json"}
        written |= {arg.split("{out}/")[1] for s in stages for arg in s.command
                    if "{out}/" in arg}
        assert written <= set(gpu_plan.OUTPUTS)
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
    assert status == {"long": "cut", "later": "skipped"}
    assert time.monotonic() - start < 15


def test_a_reserved_stage_starts_by_its_time(tmp_path, monkeypatch):
    """A stage before a reserved one is cut to leave the stages between their estimates, so
    that the reserved stage starts by its `start_by`, not when the slow stage ends."""
    monkeypatch.setattr(gpu_plan, "STOP_GRACE_S", 1)
    monkeypatch.setattr(gpu_plan, "MIN_STAGE_S", 1)
    start_at = _python("import time; print('step at', time.time())")
    stages = [Stage("build", _python("import time; time.sleep(60)"), fixed=1, limit=100),
              Stage("between", _python("print('between ran')"), fixed=2, limit=30),
              Stage("step", start_at, fixed=1, limit=30, start_by=6)]
    start = time.time()
    assert gpu_plan.run(stages, tmp_path, budget=60) == {"build": "cut", "between": 0,
                                                         "step": 0}
    log = (tmp_path / "plan.log").read_text()
    assert "build: stopped at its limit of 4 s" in log and "between ran" in log
    step_at = float(log.split("step at ")[1].split()[0])
    assert step_at - start < 6 + 1  # its start, with the time a Python takes to print


def test_a_failed_build_lets_the_later_stages_run_without_the_extension(tmp_path):
    """The build stage of the plan, failing: the later stages run with its fallback
    environment (MAE_KERNELS_NO_CUDA=1), the warm rerun says so, and so does RESULTS.md."""
    (build,) = [s for s in gpu_plan.plan() if s.name == "build"]
    build.command = _python("raise SystemExit('nvcc fatal: Unsupported gpu architecture')")
    case = tmp_path / "case.json"  # one benchmark case, as MAE_BENCH_CASES gets it
    case.write_text(json.dumps(_case("test_a[ours]", "ours", 1.0)) + "\n")
    later = Stage("step", _python(
        "import os, shutil; print('later ran with MAE_KERNELS_NO_CUDA=' + "
        f"os.environ['MAE_KERNELS_NO_CUDA']); shutil.copy({str(case)!r}, "
        "os.environ['MAE_BENCH_CASES'])"),
        fixed=1, limit=30, bench=True, env={"MAE_BENCH_CASES": "{out}/cases.jsonl"})
    assert gpu_plan.run([build, later], tmp_path, budget=60) == {"build": 1, "step": 0}
    log = (tmp_path / "plan.log").read_text()
    assert "later ran with MAE_KERNELS_NO_CUDA=1" in log
    assert f"warm rerun: MAE_KERNELS_NO_CUDA=1 {gpu_plan.WARM_RERUN}" in log
    assert f"the rest: MAE_KERNELS_NO_CUDA=1 {gpu_plan.THE_REST}" in log
    assert "nvcc fatal" in (tmp_path / "stages.log").read_text()
    results = (tmp_path / "RESULTS.md").read_text()
    assert build.fallback_note in results and "build 1 in" in results
    times = json.loads((tmp_path / "stages.json").read_text())
    assert times["env"] == {"MAE_KERNELS_NO_CUDA": "1"}


def test_stage_times_come_back_and_replace_the_estimates(tmp_path):
    stages = [Stage("quick", _python("import time; time.sleep(1)"), fixed=30, limit=30),
              Stage("stopped", _python("import time; time.sleep(60)"), fixed=1, limit=2)]
    gpu_plan.run(stages, tmp_path, budget=60)
    times = json.loads((tmp_path / "stages.json").read_text())
    assert times["budget_s"] == 60 and times["device"] and times["date"]
    quick, stopped = times["stages"]["quick"], times["stages"]["stopped"]
    assert quick["status"] == 0 and 1 <= quick["seconds"] < 10 and quick["estimate"] == 30
    assert stopped["status"] == "timeout" and stopped["seconds"] >= 2
    # committed as benchmarks/gpu_stage_times.json: the next plan's numbers
    fresh = [Stage("quick", [], fixed=30, limit=30), Stage("stopped", [], fixed=1, limit=2),
             Stage("new", [], fixed=7, limit=30)]
    gpu_plan._apply_measured(fresh, tmp_path / "stages.json")
    assert fresh[0].estimate == quick["seconds"]  # finished: its time
    assert fresh[1].estimate == stopped["seconds"]  # stopped: at least the time it had
    assert fresh[2].estimate == 7
    lines, _ = gpu_plan.arithmetic(fresh, 60)
    assert "measured" in lines[1] and "measured" not in lines[3]


def _pytest_file(path: Path, body: str) -> Path:
    path.write_text("import time\n\nimport pytest\n\n" + body)
    return path


def test_a_hanging_test_is_cut_by_its_timeout_while_the_next_file_still_runs(tmp_path,
                                                                            monkeypatch):
    """The tests stage's own command (a timeout per test, no --maxfail, round robin)."""
    monkeypatch.setattr(gpu_plan, "TEST_TIMEOUT_S", 2)
    first = _pytest_file(tmp_path / "test_first.py",
                         "def test_hangs():\n    time.sleep(60)\n\n\n"
                         "def test_after_the_hang():\n    pass\n")
    second = _pytest_file(tmp_path / "test_second.py", "def test_next_file():\n    pass\n")
    (tests,) = [s for s in gpu_plan.plan() if s.name == "tests"]
    command = gpu_plan._tests([str(first), str(second)], junit=True)
    assert "--timeout=2" in command and not any("maxfail" in arg for arg in command)
    stage = Stage("tests", command, fixed=1, limit=60, env=tests.env)
    start = time.monotonic()
    assert gpu_plan.run([stage], tmp_path, budget=90) == {"tests": 1}  # one test failed
    assert time.monotonic() - start < 30
    log = (tmp_path / "stages.log").read_text()
    assert "Timeout" in log and "1 failed, 2 passed" in log, log
    junit = (tmp_path / "tests.xml").read_text()
    assert 'name="test_next_file"' in junit and 'name="test_after_the_hang"' in junit


def test_the_tests_run_round_robin_over_their_test_functions(tmp_path):
    """One op whose every case fails slowly cannot starve the others: each test function's
    first case runs before any function's second."""
    path = _pytest_file(tmp_path / "test_order.py",
                        "@pytest.mark.parametrize('i', [1, 2, 3])\ndef test_many(i):\n    pass\n"
                        "\n\ndef test_one():\n    pass\n\n\n"
                        "@pytest.mark.parametrize('i', [1, 2])\ndef test_two(i):\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", str(path), "--collect-only", "-q",
                           "-p", "gpu_plan", "-p", "no:cacheprovider"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "scripts")})
    order = [line.split("::")[1] for line in done.stdout.splitlines() if "::" in line]
    assert order == ["test_many[1]", "test_one", "test_two[1]", "test_many[2]", "test_two[2]",
                     "test_many[3]"], done.stdout + done.stderr


gpu_sanitize = _load("gpu_sanitize")


def test_the_sanitizer_calls_every_kernel():
    """Every Triton kernel of the package is reached by one of the op cases it runs (here
    through the interpreter): a new kernel needs its case in tests/test_gpu.py's OP_CASES."""
    launches = gpu_sanitize.exercise("cpu")
    assert set(launches) == set(gpu_sanitize.KERNELS), set(gpu_sanitize.KERNELS) - set(launches)


def test_a_kernel_no_call_reaches_fails_the_sanitizer_stage(monkeypatch, capsys):
    cases = {"patchify": gpu_sanitize.OP_CASES["patchify"]}
    monkeypatch.setattr(gpu_sanitize, "OP_CASES", cases)
    assert gpu_sanitize.calls("cpu") == 1
    missed = next(line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("kernels no call reached:"))
    assert "_hog_kernel" in missed and "_resized_crop_kernel" in missed
    assert "_patch_rows_kernel" not in missed


MEMCHECK_LOG = """========= COMPUTE-SANITIZER
========= Program hit cudaErrorPeerAccessUnsupported (error 217) due to "peer access is not \
supported between these two devices" on CUDA API call to cudaDeviceCanAccessPeer.
=========     Saved host backtrace up to driver entry point at error
=========     Host Frame: [0x33e3c5] in libcuda.so.1
=========
========= Program hit CUDA_ERROR_NOT_FOUND (error 500) due to "named symbol not found" on CUDA \
API call to cuGetProcAddress.
=========     Host Frame: [0x2e8a5b] in libcuda.so.1
=========
"""
KERNEL_ERROR = """========= Invalid __global__ read of size 2 bytes
=========     at _resized_crop_kernel+0x1b40 in augment.py:212
=========     by thread (37,0,0) in block (2,5,0)
=========     Address 0x7f2a3c000ffe is out of bounds
=========
========= Program hit cudaErrorLaunchFailure (error 719) due to "unspecified launch failure" \
on CUDA API call to cudaStreamSynchronize.
=========
"""


def test_the_sanitizer_tells_kernel_errors_from_benign_api_errors():
    kernel_errors, api_errors = gpu_sanitize.read_log(MEMCHECK_LOG + KERNEL_ERROR)
    assert len(api_errors) == 2 and all(e.startswith("Program hit") for e in api_errors)
    assert kernel_errors[0] == ("Invalid __global__ read of size 2 bytes at _resized_crop_kernel"
                                "+0x1b40 in augment.py:212: ours (_resized_crop_kernel)")
    assert "cudaErrorLaunchFailure" in kernel_errors[1]  # the host seeing the kernel's fault
    assert gpu_sanitize.read_log(MEMCHECK_LOG) == ([], api_errors)


@pytest.mark.parametrize("log,status", [(MEMCHECK_LOG, 0), (MEMCHECK_LOG + KERNEL_ERROR, 1)])
def test_the_sanitizer_stage_fails_on_kernel_errors_alone(tmp_path, monkeypatch, capsys, log,
                                                          status):
    """A stand-in compute-sanitizer writes the log and runs nothing."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text("#!/bin/sh\nwhile [ \"$1\" != --log-file ]; do shift; done\n"
                    f"cat > \"$2\" <<'EOF'\n{log}========= ERROR SUMMARY: 1 error\nEOF\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gpu_sanitize.shutil, "which", lambda name: str(fake))
    assert gpu_sanitize.memcheck() == status
    out = capsys.readouterr().out
    assert "benign: 2 CUDA API calls returned an error" in out
    assert ("ours (_resized_crop_kernel)" in out) == bool(status)


def _case(name: str, impl: str, ms: float, **info) -> dict:
    return {"name": name, "fullname": f"benchmarks/test_ops.py::{name}", "group": "gather_tokens",
            "extra_info": {"op": "gather_tokens", "impl": impl, "shape": [8, 4, 2],
                           "dtype": "torch.float32", "direction": "fwd", **info},
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
                 str(output), "--no-plots", "--note", "the build failed"])
    text = output.read_text()
    assert "NVIDIA H200" in text and "![" not in text and "the build failed" in text
    rows = [line for line in text.splitlines() if line.startswith("| 8x4x2")]
    assert len(rows) == 2 and "| ours | 1.000 | - |" in rows[1] and "2.00x" in rows[1]


def test_the_report_shows_kernel_time_beside_call_time(tmp_path):
    """On a GPU an op case has both: the call time (what the caller waits for) and the kernel
    time (the GPU's); x floor and the comparisons use the kernel time."""
    gpu = dict(bytes=8_000_000, floor_ms=0.004, copy_gb_per_s=3000.0)
    eager = _case("test_a[reference]", "reference", 0.5, cuda_median_ms=0.2, kernel_ms=0.06,
                  floor_ratio=15.0, gb_per_s=133.0, launches=6.0, **gpu)
    ours = _case("test_a[ours]", "ours", 0.5, cuda_median_ms=0.09, kernel_ms=0.012,
                 floor_ratio=3.0, gb_per_s=667.0, launches=2.0, **gpu)
    (tmp_path / "ops.json").write_text(json.dumps({
        "machine_info": {"device": "NVIDIA H100 80GB HBM3", "cuda": "13.0"},
        "benchmarks": [eager, ours]}))
    output = tmp_path / "RESULTS.md"
    report.main([str(tmp_path / "ops.json"), "--output", str(output), "--no-plots"])
    text = output.read_text()
    assert "| case | impl | call ms | kernel ms | GB/s | x floor | launches |" in text
    row = next(line for line in text.splitlines() if "| ours |" in line)
    assert "| ours | 0.090 | 0.012 | 667 | 3.00 | 2 | 5.00x |" in row  # 0.06 / 0.012


def test_the_report_keeps_cpu_results_and_groups_it_has_no_table_for(tmp_path):
    """A CPU run's JSON (no kernel times, call times from pytest-benchmark), with a suite the
    report has no table of its own for (a field it does not know)."""
    eager, ours = _case("test_a[reference]", "reference", 2.0), _case("test_a[ours]", "ours", 1.0)
    other = {"name": "test_pipeline[vit_b-gpu]", "fullname": "benchmarks/test_pipeline.py::x",
             "group": "end to end", "extra_info": {"loader": "gpu", "images_per_step": 256},
             "stats": {"median": 0.25}}
    (tmp_path / "cpu.json").write_text(json.dumps({
        "machine_info": {"device": "CPU only: x86, 2 cores", "cuda": None},
        "benchmarks": [eager, ours, other]}))
    output = tmp_path / "RESULTS.md"
    report.main([str(tmp_path / "cpu.json"), "--output", str(output), "--plots",
                 str(tmp_path / "plots")])
    text = output.read_text()
    assert "This run had no GPU" in text
    assert "| 8x4x2 float32 fwd | ours | 1.000 | - | - | - | - | 2.00x | - |" in text
    assert "| test_pipeline[vit_b-gpu] | 250.000 | gpu 256 |" in text
    assert (tmp_path / "plots" / "end_to_end.png").exists()


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
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "ops.json").write_text("")  # pytest-benchmark opened it, then was killed
    (tmp_path / "cases.jsonl").write_text(json.dumps(_case("test_a[ours]", "ours", 1.0)) + "\n")
    gpu_plan.report(tmp_path, gpu_plan.Log(tmp_path), scratch)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "per-case lines only" in text and "| 8x4x2 float32 fwd | ours | 1.000 |" in text
    assert json.loads((tmp_path / "benchmarks.json").read_text())["benchmarks"][0]["name"] == \
        "test_a[ours]"
