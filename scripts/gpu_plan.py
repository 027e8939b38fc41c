"""The first call on a lent GPU machine: the headline figures first, in under 8 minutes.

A session is lent one H100 or H200 for 15 minutes in all (its start, the transfers and the build
included), at most 10 minutes a command, and the machine stays warm about 30 s after a call.
So the run is a list of stages in order of value (issue #32), each with its own time limit:

  device     the GPU, its driver, nvcc, CUDA_HOME, gcc, torch and triton
  build      the extension; a failed build does not end the run: the later stages run with
             MAE_KERNELS_NO_CUDA=1 (gather/scatter in plain PyTorch on CUDA), and RESULTS.md says so
  step       RESERVED: the ViT-B/16 pre-training step in bf16, ours / the reference / HF ViTMAE
             eager, then ours and the reference compiled
  loader     RESERVED: the end-to-end loader cases (benchmarks/test_pipeline.py)
  smoke      one case per op on CUDA against its CPU kernel, forward and backward, and one
             torch.compile(fullgraph=True) model step
  tests      every other gpu-marked test: a timeout per test, no --maxfail, round robin over
             the test functions, so one broken op cannot starve the others
  ops        per-op call time and kernel time at ViT-B/16 sizes in bf16, against the floor
  sanitizer  compute-sanitizer memcheck over every kernel (scripts/gpu_sanitize.py)
  extras     while time is left: HF compiled, the compiled op references, the loader stages,
             VideoMAE's ops, the compiles that take minutes

A reserved stage starts by its time (`start by`): the stages before it are cut to leave it that,
and the step and the loader both start in the first half of the budget. The smoke stage comes
after them: before the step, the reservation would leave it only what the build does not use,
and no stage waits on it (none is fatal). The stages after the smoke fill the time that is left,
in order; the dry run says which the estimates expect to be cut, and the plan's log names the
command of a second call that runs them. Every stage writes its output to $OUT as it ends (each
benchmark case its line of cases.jsonl as it ends), and its wall time to $OUT/stages.json:
committed as benchmarks/gpu_stage_times.json, those numbers replace the estimates below.

    bash scripts/gpu_run.sh                        # the plan (calls this script)
    bash scripts/gpu_run.sh --only step,loader     # the warm rerun: within 30 s of a call's end
    bash scripts/gpu_run.sh -k EXPR                # the benchmarks matching EXPR as the extras
    python3 scripts/gpu_plan.py --dry-run          # the plan and its arithmetic, runs nothing
    python3 scripts/gpu_plan.py --count            # collects every stage, compares with CASES

As a pytest plugin (`-p gpu_plan`, the tests stage) it orders the tests round robin.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 470  # under 8 minutes, with room for the last stage to be stopped
STOP_GRACE_S = 15  # SIGINT first: pytest-benchmark still writes its JSON when interrupted
MIN_STAGE_S = 10  # a stage is not started with less time than this left
TEST_TIMEOUT_S = 90  # per test (pytest-timeout): a hang costs one test, not the stage
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
MEASURED = ROOT / "benchmarks" / "gpu_stage_times.json"
# The files that come back from $OUT (at most 8 on the lent machine).
OUTPUTS = ["plan.log", "stages.log", "stages.json", "cases.jsonl", "benchmarks.json",
           "RESULTS.md", "tests.xml"]
WARM_RERUN = "bash scripts/gpu_run.sh --only step,loader"
# a second call on the warm machine: what the first call's 8 minutes leave out (the build stays)
THE_REST = "bash scripts/gpu_run.sh --only tests,ops,sanitizer"

# Seconds on the H100/H200 (16 cores). ESTIMATES, never measured there: the first run's
# stages.json replaces them (benchmarks/gpu_stage_times.json).
DEVICE_S = 5
# Measured on the CPU machine (2 cores shared with other work): `setup.py build_ext --inplace`
# took 68-80 s wall, 31-35 s of CPU, nearly all of it ops.cpp; nvcc 13.0 compiled
# cuda/tokens_kernels.cu for sm_90 in 4 s. There ninja compiles the three sources in parallel.
BUILD_S = 45
PYTEST_START_S = 12  # imports, CUDA init, collection
INDUCTOR_START_S = 15  # Inductor's first compile in a process: its imports, its worker pool
# - a ViT-B/16 step case, eager: model build, 5 + 20 timed steps at B=256 bf16 (~0.1 s each);
# - compiled: Inductor compiles forward and backward of the whole model (cold caches)
STEP_S, STEP_COMPILED_S = 10, 60
# the lead's estimate for the end-to-end loader cases: ~25 s each, ~30 s to write the JPEGs
PIPELINE_S, PIPELINE_FIXED_S = 25, 30
# - a smoke case: one op forward and backward, with the first compiles of its kernels (triton
#   3.6 also builds a C launcher with gcc for each new signature);
# - the compiled smoke step: Inductor on the tiny model, forward and backward
SMOKE_S, SMOKE_COMPILED_S = 1.5, 20
TEST_S = 0.8  # a gpu-marked test: a few MAE-size calls, compiles spread over them
# - an op case: 10 + 100 timed calls, 10 profiled, 5 rounds, its kernels' first compiles;
# - compiled: the same plus a fresh Inductor compile (dynamo is reset per case);
# - `long_compile`: dynamo unrolls block masking's loop over 196 tokens (aot_eager traced it in
#   136 s forward, 189 s with backward on the CPU machine)
OP_S, OP_COMPILED_S, OP_LONG_COMPILE_S = 1.3, 7.0, 120
# a loader extra: resized_crop's reference at B=256 is 256 resizes of ~20 launches each per
# call; the worker stages run 64 JPEGs through Pillow per round on one core
LOADER_S = 6.0
SANITIZER_S = 60  # every op at small sizes under memcheck, and the compiles of their kernels
REPORT_S = 3  # benchmarks.json and RESULTS.md remade after each benchmark stage

STEP = "benchmarks/test_training_step.py"
VIT_B = "mae_vit_base_patch16"


def _steps(*cases: str) -> list[str]:
    """ViT-B/16 step cases by id, in the order given (pytest keeps it)."""
    return [f"{STEP}::test_pretrain_step{'_hf_vitmae' if 'hf' in c else ''}[{VIT_B}-{c}]"
            for c in cases]


# The selections, each a pytest argument list.
STEPS_EAGER = _steps("kernels", "reference", "eager-hf")
STEPS_COMPILED = _steps("kernels+compile", "reference+compile")
PIPELINE = ["benchmarks/test_pipeline.py", "-m", "pipeline and vit_b"]
SMOKE = ["tests/test_gpu.py", "-m", "gpu and smoke"]
SMOKE_COMPILED = "compiled_model_step"  # the test of the compiled step, by name
TESTS = ["tests", "-m", "gpu and not smoke"]
OPS = ["benchmarks/test_ops.py", "-m", "vit_b and bf16 and not video and not compiled"]
EXTRAS_STEPS = _steps("eager-hf+patch_vit_mae", "compile-hf", "compile-hf+patch_vit_mae")
# Pixio's and CrossMAE's steps beside MAE's, and their ops (the decoder side), eager
EXTRAS_DECODER_STEPS = [f"{STEP}::test_decoder_side_step", "-m", "not compiled"]
EXTRAS_DECODER_OPS = ["benchmarks/test_decoder_ops.py", "-m",
                      "decoder_side and vit_b and bf16 and not compiled"]
EXTRAS_DECODER = [EXTRAS_DECODER_STEPS[0], EXTRAS_DECODER_OPS[0], "-m",  # both, in one run
                  "decoder_side and not compiled and (step or (vit_b and bf16))"]
EXTRAS_OPS_COMPILED = ["benchmarks/test_ops.py", "-m",
                       "vit_b and bf16 and not video and compiled and not long_compile"]
# resized_crop against its per-sample reference, the loaders' worker stages and the main
# process's decode + crop at B=256; their compiled reference unrolls a per-sample loop of
# different crop shapes: left out
EXTRAS_LOADER = ["benchmarks/test_resized_crop.py", "benchmarks/test_loader.py", "-m",
                 "loader and not compiled"]
EXTRAS_VIDEO = [f"benchmarks/test_ops.py::{test}"
                for test in ("test_tube_masking", "test_mae_loss", "test_patchify")] + [
                "-m", "vit_b and bf16 and video"]
EXTRAS_LONG = ["benchmarks/test_ops.py::test_masking", "-m",
               "vit_b and bf16 and compiled and long_compile"]
# What each selection collects (`python3 scripts/gpu_plan.py --count` recounts them).
CASES = {
    "steps": 3, "steps compiled": 2, "pipeline": 4, "smoke": 17, "smoke compiled": 1,
    "tests": 148, "ops": 38,
    "extras steps": 1, "extras steps compiled": 2, "extras decoder steps": 6,
    "extras decoder ops": 16, "extras ops compiled": 17,
    "extras loader": 12, "extras video": 16, "extras video compiled": 8,
    "extras long compile": 2,
}


@dataclasses.dataclass
class Part:
    """Cases of one cost: a pytest selection, how many it collects, seconds per case."""
    select: list[str]
    cases: int
    per_case: float


@dataclasses.dataclass
class Stage:
    name: str
    command: list[str]
    fixed: float  # seconds besides the cases
    limit: float  # seconds before it is stopped
    parts: list[Part] = dataclasses.field(default_factory=list)
    start_by: float | None = None  # reserved: the stages before it are cut to start it by then
    fills: bool = False  # after the reserved stages: runs in whatever time is left
    bench: bool = False  # writes a pytest-benchmark JSON (and lines of cases.jsonl)
    env: dict = dataclasses.field(default_factory=dict)
    # on failure: the environment of every later stage, and what RESULTS.md says
    fallback_env: dict = dataclasses.field(default_factory=dict)
    fallback_note: str = ""
    measured: float | None = None  # seconds a committed run measured (MEASURED)

    @property
    def estimate(self) -> float:
        if self.measured is not None:
            return self.measured
        return self.fixed + sum(p.cases * p.per_case for p in self.parts)


def _selection(select: list[str], marks: str) -> list[str]:
    """A selection narrowed by more marks."""
    if "-m" not in select:
        return [*select, "-m", marks]
    paths, own = select[:select.index("-m")], select[select.index("-m") + 1]
    return [*paths, "-m", f"({own}) and {marks}"]


def _benchmarks(select: list[str], stage: str) -> list[str]:
    """A benchmark stage's pytest command: its JSON to the scratch folder, merged into $OUT."""
    return [*PYTEST, *select, f"--benchmark-json={{scratch}}/{stage}.json"]


def _tests(select: list[str], junit: bool = False) -> list[str]:
    """A test stage's pytest command: a timeout per test (pytest-timeout, on the GPU image and
    in the test extra; signal: the test fails and the next one runs), the tests round robin
    (this file as a plugin), no --maxfail."""
    return [*PYTEST, *select, f"--timeout={TEST_TIMEOUT_S}", "--timeout-method=signal", "-p",
            "gpu_plan", "-rfE"] + (["--junitxml={out}/tests.xml"] if junit else [])


def plan(extras_k: str | None = None) -> list[Stage]:
    python = sys.executable
    bench = {"MAE_BENCH_CASES": "{out}/cases.jsonl"}
    tests_env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "scripts"),
                                                             os.environ.get("PYTHONPATH")]))}
    device = ("nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "
              "nvcc --version | tail -2; echo CUDA_HOME=${CUDA_HOME:-unset}; "
              f"gcc --version | head -1; {python} -c \"import torch, triton; print('torch', "
              "torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)\"")
    build = (f"{python} setup.py build_ext --inplace && {python} -c \"from mae_kernels import "
             "tokens as t; print('extension', t.LIBRARY, 'kernels for', "
             "sorted(t.KERNEL_DEVICES)); assert 'cuda' in t.KERNEL_DEVICES, 'no CUDA kernels'\"")
    if extras_k:  # the extras' count is not known in advance: they get the time that is left
        extras = [Stage("extras", _benchmarks(["benchmarks", "-k", extras_k], "extras"),
                        PYTEST_START_S + INDUCTOR_START_S + REPORT_S, float("inf"),
                        fills=True, bench=True, env=bench)]
    else:
        extras = [
            Stage("extras steps", _benchmarks(EXTRAS_STEPS, "extras_steps"),
                  PYTEST_START_S + INDUCTOR_START_S + REPORT_S, 300,
                  [Part(EXTRAS_STEPS[:1], CASES["extras steps"], STEP_S),
                   Part(EXTRAS_STEPS[1:], CASES["extras steps compiled"], STEP_COMPILED_S)],
                  fills=True, bench=True, env=bench),
            Stage("extras decoder side", _benchmarks(EXTRAS_DECODER, "extras_decoder_side"),
                  PYTEST_START_S + REPORT_S, 300,
                  [Part(EXTRAS_DECODER_STEPS, CASES["extras decoder steps"], STEP_S),
                   Part(EXTRAS_DECODER_OPS, CASES["extras decoder ops"], OP_S)],
                  fills=True, bench=True, env=bench),
            Stage("extras ops compiled", _benchmarks(EXTRAS_OPS_COMPILED, "extras_ops_compiled"),
                  PYTEST_START_S + INDUCTOR_START_S + REPORT_S, 300,
                  [Part(EXTRAS_OPS_COMPILED, CASES["extras ops compiled"], OP_COMPILED_S)],
                  fills=True, bench=True, env=bench),
            Stage("extras loader", _benchmarks(EXTRAS_LOADER, "extras_loader"),
                  PYTEST_START_S + REPORT_S, 200,
                  [Part(EXTRAS_LOADER, CASES["extras loader"], LOADER_S)],
                  fills=True, bench=True, env=bench),
            Stage("extras video", _benchmarks(EXTRAS_VIDEO, "extras_video"),
                  PYTEST_START_S + INDUCTOR_START_S + REPORT_S, 300,
                  [Part(_selection(EXTRAS_VIDEO, "not compiled"), CASES["extras video"], OP_S),
                   Part(_selection(EXTRAS_VIDEO, "compiled"), CASES["extras video compiled"],
                        OP_COMPILED_S)],
                  fills=True, bench=True, env=bench),
            Stage("extras long compile", _benchmarks(EXTRAS_LONG, "extras_long"),
                  PYTEST_START_S + INDUCTOR_START_S + REPORT_S, float("inf"),
                  [Part(EXTRAS_LONG, CASES["extras long compile"], OP_LONG_COMPILE_S)],
                  fills=True, bench=True, env=bench),
        ]
    stages = [
        Stage("device", ["sh", "-c", device], DEVICE_S, 30),
        Stage("build", ["sh", "-c", build], BUILD_S, 180,
              fallback_env={"MAE_KERNELS_NO_CUDA": "1"},
              fallback_note="The build of the CUDA extension failed (stages.log): the stages "
              "after it ran with MAE_KERNELS_NO_CUDA=1, so gather_tokens/scatter_tokens ran "
              "plain PyTorch on CUDA."),
        # eager first, then compiled: a stop at its limit cuts the compiles
        Stage("step", _benchmarks(STEPS_EAGER + STEPS_COMPILED, "step"),
              PYTEST_START_S + INDUCTOR_START_S + REPORT_S, 300,
              [Part(STEPS_EAGER, CASES["steps"], STEP_S),
               Part(STEPS_COMPILED, CASES["steps compiled"], STEP_COMPILED_S)],
              start_by=90, bench=True, env=bench),
        Stage("loader", _benchmarks(PIPELINE, "loader"),
              PYTEST_START_S + PIPELINE_FIXED_S + REPORT_S, 240,
              [Part(PIPELINE, CASES["pipeline"], PIPELINE_S)], start_by=BUDGET_S // 2,
              bench=True, env=bench),
        Stage("smoke", _tests(SMOKE), PYTEST_START_S + INDUCTOR_START_S, 120,
              [Part([*SMOKE, "-k", f"not {SMOKE_COMPILED}"], CASES["smoke"], SMOKE_S),
               Part([*SMOKE, "-k", SMOKE_COMPILED], CASES["smoke compiled"], SMOKE_COMPILED_S)],
              env=tests_env),
        Stage("tests", _tests(TESTS, junit=True), PYTEST_START_S, 240,
              [Part(TESTS, CASES["tests"], TEST_S)], fills=True, env=tests_env),
        Stage("ops", _benchmarks(OPS, "ops"), PYTEST_START_S + REPORT_S, 240,
              [Part(OPS, CASES["ops"], OP_S)], fills=True, bench=True, env=bench),
        Stage("sanitizer", [python, "scripts/gpu_sanitize.py", "--memcheck"], SANITIZER_S, 150,
              fills=True, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
        *extras,
    ]
    _apply_measured(stages)
    return stages


def _apply_measured(stages: list[Stage], path: Path = MEASURED) -> None:
    """A committed run's stage times replace the estimates: a finished stage's time, or for a
    stage stopped before its end, the larger of its estimate and the time it had."""
    if not path.exists():
        return
    measured = json.loads(path.read_text())["stages"]
    for stage in stages:
        record = measured.get(stage.name)
        if record is None or record["status"] == "skipped":
            continue
        seconds = record["seconds"]
        stage.measured = seconds if record["status"] == 0 else max(stage.estimate, seconds)


def timeline(stages: list[Stage]) -> list[float]:
    """Each stage's planned start, in seconds from the plan's start, by the estimates."""
    return [0.0, *itertools.accumulate(s.estimate for s in stages)][:len(stages)]


def arithmetic(stages: list[Stage], budget: float = BUDGET_S) -> tuple[list[str], float]:
    """The budget table, and the estimated seconds of the stages that must fit (all but those
    that fill the time left)."""
    lines = [f"{'stage':<20} {'cases x s/case + fixed':<40} {'estimate':>9} {'start':>6} "
             f"{'start by':>8} {'limit':>6}"]
    for stage, start in zip(stages, timeline(stages)):
        terms = " + ".join(f"{p.cases} x {p.per_case:g}" for p in stage.parts) or "-"
        terms = "measured" if stage.measured is not None else f"{terms} + {stage.fixed:g}"
        limit = "rest" if stage.limit == float("inf") else f"{stage.limit:.0f}"
        start_by = "-" if stage.start_by is None else f"{stage.start_by:.0f}"
        lines.append(f"{stage.name:<20} {terms:<40} {stage.estimate:>7.0f} s {start:>6.0f} "
                     f"{start_by:>8} {limit:>6}")
    core = sum(stage.estimate for stage in stages if not stage.fills)
    left = budget - STOP_GRACE_S - core
    fills = [stage for stage in stages if stage.fills]
    lines.append(f"planned stages: {core:.0f} s + {STOP_GRACE_S} s to stop the last one, of the "
                 f"{budget:.0f} s budget; the stages after them get the {left:.0f} s left")
    for stage in fills:
        share = max(0.0, min(left, stage.estimate))
        left -= share
        lines.append(f"  {stage.name}: {stage.estimate:.0f} s, expected to get {share:.0f} s"
                     + ("" if share >= stage.estimate else ": cut"))
    return lines, core


def _available(stages: list[Stage], i: int, elapsed: float, budget: float) -> float:
    """The seconds stage i may have: the budget left, and the start of the next reserved stage
    less the estimates of the stages between."""
    available = budget - STOP_GRACE_S - elapsed
    for j in range(i + 1, len(stages)):
        if stages[j].start_by is not None:
            between = sum(s.estimate for s in stages[i + 1:j])
            return min(available, stages[j].start_by - elapsed - between)
    return available


class Log:
    """Prints to stdout and appends to $OUT/plan.log as it goes."""

    def __init__(self, out: Path):
        self.path = out / "plan.log"

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _fill(text: str, out: Path, scratch: Path) -> str:
    return text.replace("{out}", str(out)).replace("{scratch}", str(scratch))


def run_stage(stage: Stage, out: Path, limit: float, log: Log, env: dict | None = None,
              scratch: Path | None = None) -> int | str:
    """Runs one stage with its output in stages.log, stops it at `limit` seconds (SIGINT, then
    SIGKILL to its whole process group); returns its exit status or "timeout"."""
    scratch = scratch or out
    command = [_fill(c, out, scratch) for c in stage.command]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}),
               **{k: _fill(v, out, scratch) for k, v in stage.env.items()})
    with (out / "stages.log").open("a") as f:
        f.write(f"\n=== {stage.name}: {' '.join(command)}\n")
        f.flush()
        try:
            # SIGINT as default in the stage: a shell without job control starts background
            # commands with it ignored, and pytest must get it to write its JSON
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_default_sigint)
        except FileNotFoundError:
            log(f"{stage.name}: {command[0]} not found")
            return "missing"
        try:
            return proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            log(f"{stage.name}: stopped at its limit of {limit:.0f} s")
            for sig, grace in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
            return "timeout"


def _stage_lines(path: Path, name: str, lines: int) -> list[str]:
    """The last lines of one stage's output in stages.log."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    start = text.rfind(f"\n=== {name}: ")
    return text[start:].splitlines()[2:][-lines:] if start >= 0 else []


def report(out: Path, log: Log, scratch: Path, notes: list[str] = ()) -> None:
    """benchmarks.json (the cases of every stage's JSON in `scratch` and of cases.jsonl,
    merged) and RESULTS.md, with the plan's notes."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import report as report_module

    # pytest-benchmark creates its JSON file when it starts: a killed stage leaves it empty
    inputs = [path for path in [*sorted(scratch.glob("*.json")), out / "cases.jsonl"]
              if path.exists() and path.stat().st_size]
    if not inputs:
        log("no benchmark results to report")
        return
    try:
        merged = out / "benchmarks.json"
        merged.write_text(json.dumps(report_module.load(inputs)))
        report_module.main([str(merged), "--output", str(out / "RESULTS.md"), "--no-plots",
                            *itertools.chain.from_iterable(("--note", n) for n in notes)])
    except Exception as e:  # noqa: BLE001 - a broken report must not stop the later stages
        log(f"report failed: {type(e).__name__}: {e}")


def _device_name() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no nvidia-smi"
    done = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip()


def run(stages: list[Stage], out: Path, budget: float = BUDGET_S) -> dict:
    """Runs the stages in order within `budget` seconds (a stage stopped at the deadline has
    STOP_GRACE_S more to write its files); returns {stage: status}: an exit status, "timeout"
    (its own limit), "cut" (the budget or the next reservation), "missing" or "skipped"."""
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out)
    start = time.monotonic()
    log(f"warm rerun (the step and loader only, reusing this build): {WARM_RERUN}; or the "
        f"stages this call leaves out: {THE_REST}; within 30 s of this call's end")
    lines, _ = arithmetic(stages, budget)
    for line in lines:
        log(line)
    status, env, notes = {}, {}, []
    times = {"budget_s": budget, "device": _device_name(),
             "date": datetime.datetime.now().isoformat(timespec="seconds"), "stages": {}}
    scratch = Path(tempfile.mkdtemp(prefix="gpu_plan_"))
    for i, stage in enumerate(stages):
        elapsed = time.monotonic() - start
        available = _available(stages, i, elapsed, budget)
        limit = min(stage.limit, available)
        if available < MIN_STAGE_S:
            log(f"{stage.name}: skipped, {available:.0f} s left for it")
            result, seconds = "skipped", 0.0
        else:
            log(f"--- {stage.name} (limit {limit:.0f} s, estimate {stage.estimate:.0f} s)")
            t0 = time.monotonic()
            result = run_stage(stage, out, limit, log, env, scratch)
            seconds = time.monotonic() - t0
            if result == "timeout" and limit < stage.limit:
                result = "cut"
            log(f"--- {stage.name}: {result} in {seconds:.0f} s "
                f"({time.monotonic() - start:.0f} s of {budget:.0f})")
            for line in _stage_lines(out / "stages.log", stage.name, 5 if result == 0 else 30):
                log(f"    {line}")
        status[stage.name] = result
        times["stages"][stage.name] = {"status": result, "seconds": round(seconds, 1),
                                       "limit": round(limit, 1),
                                       "estimate": round(stage.estimate, 1)}
        if result != 0 and stage.fallback_env and result != "skipped":
            env.update(stage.fallback_env)
            notes.append(stage.fallback_note)
            log(f"{stage.name} failed: the later stages run with "
                + " ".join(f"{k}={v}" for k, v in stage.fallback_env.items()))
        times["env"] = env
        (out / "stages.json").write_text(json.dumps(times, indent=1) + "\n")
        if stage.bench and result != "skipped":
            report(out, log, scratch, [*notes, _stages_note(times)])
    shutil.rmtree(scratch, ignore_errors=True)
    log(json.dumps(status))
    fallback = "".join(f"{k}={v} " for k, v in env.items())
    log(f"warm rerun: {fallback}{WARM_RERUN}; the rest: {fallback}{THE_REST}")
    results = out / "RESULTS.md"
    if results.exists():  # the tables last: the reply carries the end of the output
        print("\n".join([line for line in results.read_text().splitlines()
                         if line.startswith("| ")][-80:]))
    return status


def _stages_note(times: dict) -> str:
    return "The GPU plan's stages (scripts/gpu_plan.py) on " + times["device"] + ": " + ", ".join(
        f"{name} {r['status']} in {r['seconds']:.0f} s" for name, r in times["stages"].items())


def pytest_collection_modifyitems(items) -> None:
    """As a pytest plugin (`-p gpu_plan`): the tests round robin over their test functions,
    each function's first case before any function's second, so that one op whose every case
    fails slowly (up to TEST_TIMEOUT_S each) cannot starve the others."""
    by_function = {}
    for item in items:
        by_function.setdefault((item.path, item.originalname), []).append(item)
    items[:] = [item for round_ in itertools.zip_longest(*by_function.values())
                for item in round_ if item is not None]


def count(stages: list[Stage]) -> dict[str, int]:
    """Collects every part of every stage in this process (imports once) with the GPU's sizes;
    returns {selection: cases}."""
    import pytest

    os.environ["MAE_BENCH_SIZES"] = "gpu"
    os.chdir(ROOT)

    class Counter:
        def pytest_collection_finish(self, session):
            self.cases = len(session.items)

    counts = {}
    for stage in stages:
        for part in stage.parts:
            counter = Counter()
            pytest.main([*part.select, "--collect-only", "-q", "-p", "no:cacheprovider"],
                        plugins=[counter])
            counts[" ".join(part.select)] = getattr(counter, "cases", 0)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="extras", help="pytest -k expression: the extras stage runs "
                        "the benchmarks matching it instead of the default extras")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--count", action="store_true",
                        help="collect every stage, compare with CASES")
    parser.add_argument("--only", default="", metavar="STAGE,...",
                        help="run these stages alone (the warm rerun: step,loader)")
    parser.add_argument("--skip", default="", metavar="STAGE,...", help="stages to leave out")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    args = parser.parse_args(argv)
    stages = plan(args.extras)
    names = {stage.name for stage in stages}
    only = {name for name in args.only.split(",") if name}
    skip = {name for name in args.skip.split(",") if name}
    for flag, chosen in (("--only", only), ("--skip", skip)):
        if chosen - names:
            parser.error(f"{flag}: no stage {', '.join(sorted(chosen - names))} (the stages: "
                         f"{', '.join(stage.name for stage in stages)})")
    stages = [s for s in stages if (not only or s.name in only) and s.name not in skip]
    if args.count:
        expected = {" ".join(p.select): p.cases for s in stages for p in s.parts}
        counts = count(stages)
        for selection, cases in counts.items():
            print(f"{cases:5d} (CASES: {expected[selection]:5d})  {selection}")
        return 0 if counts == expected else 1
    if args.dry_run:
        lines, core = arithmetic(stages)
        print(f"warm rerun: {WARM_RERUN}; the rest: {THE_REST}")
        for stage in stages:
            print(f"{stage.name}: {' '.join(stage.command)}")
        print("\n".join(lines))
        return 0 if core + STOP_GRACE_S <= BUDGET_S else 1
    if os.environ.get("CUDA_HOME") is None and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"  # the toolkit's root, not a wrapper's folder
    status = run(stages, args.out.resolve())
    return 0 if all(s in (0, "cut", "skipped") for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
