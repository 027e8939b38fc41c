"""The default run on a lent GPU machine, planned to end in under 8 minutes.

A session is lent one H200 for 15 minutes in all (its start, the transfers and the build
included), at most 10 minutes a command, and pytest-benchmark writes its JSON only when a run
ends. So the run is a list of stages in priority order (issue #24): the build, correctness (the
gpu-marked tests, compute-sanitizer), per-op speed at ViT-B/16 sizes in bf16, the ViT-B/16
pre-training step, then whatever time is left. Each stage has its own time limit, cut to what is
left of the budget, so a hang cannot eat the lease; each writes its files to $OUT when it ends
(and every benchmark case its line of cases.jsonl as it ends). The budget arithmetic (cases x
cost per case + fixed cost) is printed first; tests/test_gpu_plan.py checks on a CPU machine
that the stages still collect CASES and that the sum stays within the budget.

    bash scripts/gpu_run.sh                # the plan (calls this script)
    bash scripts/gpu_run.sh -k EXPR        # the plan, with the benchmarks matching EXPR as extras
    python3 scripts/gpu_plan.py --dry-run  # prints the plan and its arithmetic, runs nothing
    python3 scripts/gpu_plan.py --count    # collects every stage, compares with CASES
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 470  # under 8 minutes, with room for the last stage to be stopped
STOP_GRACE_S = 15  # SIGINT first: pytest-benchmark still writes its JSON when interrupted
MIN_STAGE_S = 10  # a stage is not started with less time than this left
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
# The files that come back from $OUT (at most 8 on the lent machine).
OUTPUTS = ["plan.log", "build.log", "sanitizer.log", "ops.json", "step.json", "extras.json",
           "cases.jsonl", "RESULTS.md"]

# Cost per case on the H200 (16 cores), in seconds. ESTIMATES, not yet measured there: each
# stage's measured time is printed in plan.log, to replace them after the first GPU run.
# - a gpu-marked test: a few MAE-size calls (and their CPU-kernel twins on the host), plus, spread
#   over them, Triton's compile of each new specialisation (about 90 of them);
# - an op case, eager or ours: the profiler's launch count, 10 + 100 timed calls, 5 rounds
#   (block masking's reference, a loop of 196 steps of ~20 launches, takes ~5 s of them);
# - an op case, compiled: the same plus a fresh Inductor compile (dynamo is reset per case);
# - a `long_compile` op case, compiled: dynamo unrolls a loop over 196 tokens (block masking:
#   aot_eager traced it in 136 s forward, 189 s with backward on the CPU machine);
# - a ViT-B/16 step case, eager: model build, 5 + 20 timed steps at B=256 bf16 (~0.1 s each);
# - a ViT-B/16 step case, compiled: Inductor compiles forward and backward of the whole model.
TEST_S, OP_S, OP_COMPILED_S, STEP_S, STEP_COMPILED_S = 0.6, 1.3, 5.0, 15.0, 90.0
OP_LONG_COMPILE_S = 120
# a loader case: resized_crop's reference at B=256 is 256 resizes of ~20 launches each per call;
# the worker stages run 64 JPEGs through Pillow per round on one core
LOADER_S = 6.0
PYTEST_START_S = 15  # imports, CUDA init, collection
INDUCTOR_START_S = 10  # Inductor's first compile in a process: its imports, its worker pool
REPORT_S = 3  # RESULTS.md remade after each benchmark stage
SANITIZER_S = 45  # python, torch and Triton's compiles of a dozen kernels under memcheck
# Measured on the CPU machine (2 cores shared with other work, load ~4; no GPU, so CPU kernels
# only): `python3 setup.py build_ext --inplace` in a copy of the repo took 79.5 s and 68.3 s wall,
# 31-35 s of CPU, nearly all of it ops.cpp; nvcc 13.0 compiled cuda/tokens_kernels.cu for sm_90 in
# 4.0 s wall (1.4 s CPU). On the GPU machine ninja compiles ops.cpp, cuda/tokens_cuda.cpp (the
# same torch headers, about as heavy) and the .cu in parallel, for the one visible architecture.
BUILD_S = 45


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
    log: str = "plan.log"
    json: str | None = None  # its pytest-benchmark JSON, in $OUT
    required: bool = False  # the plan stops if it fails
    open_ended: bool = False  # runs until the budget is spent: being stopped is its end
    env: dict = dataclasses.field(default_factory=dict)

    @property
    def estimate(self) -> float:
        return self.fixed + sum(p.cases * p.per_case for p in self.parts)


OPS = ["benchmarks/test_ops.py", "-m",
       "vit_b and bf16 and not video and not (compiled and long_compile)"]
STEPS = ["benchmarks/test_training_step.py", "-m", "vit_b and not compiled"]
# The default extras, in this order: the input pipeline's cases (below), then #24's: the op
# cases whose compile takes minutes, the compiled steps (ours, the reference, HF ViTMAE),
# VideoMAE's ops.
EXTRAS_LONG = ["benchmarks/test_ops.py::test_masking", "-m",
               "vit_b and bf16 and compiled and long_compile"]
EXTRAS_STEPS = ["benchmarks/test_training_step.py", "-m", "vit_b and step and compiled"]
EXTRAS_VIDEO = [f"benchmarks/test_ops.py::{test}"
                for test in ("test_tube_masking", "test_mae_loss", "test_patchify")] + [
                "-m", "vit_b and bf16 and video"]
# The input pipeline (#21): resized_crop against its per-sample reference, the loaders' worker
# stages and the main-process decode + crop against torchvision's per-sample loop, at B=256.
# Their compiled reference unrolls a per-sample loop of different crop shapes: left out.
EXTRAS_LOADER = ["benchmarks/test_resized_crop.py", "benchmarks/test_loader.py", "-m",
                 "loader and not compiled"]
# (The extras' marks are disjoint, so one -m expression, their union, selects each on its paths.)
# What each selection collects (`python3 scripts/gpu_plan.py --count` recounts them).
CASES = {
    "tests -m gpu": 133,
    "ops": 38, "ops compiled": 17,
    "steps": 4,
    "extras long compile": 2,
    "extras steps compiled": 4,
    "extras loader": 12,
    "extras video": 16, "extras video compiled": 8,
}


def _paths(select: list[str]) -> list[str]:
    return select[:select.index("-m")]


def _marks(select: list[str]) -> str:
    return select[select.index("-m") + 1]


def _compiled(select: list[str], compiled: bool) -> list[str]:
    """The selection narrowed to its compiled cases, or to the others."""
    return [*_paths(select), "-m", f"({_marks(select)}) and {'' if compiled else 'not '}compiled"]


def plan(extras_k: str | None = None) -> list[Stage]:
    # pytest runs the paths in the order given, each selection's marks applied to its paths;
    # with -k the extras' count is not known in advance: they get the time that is left
    # the loader's cases first: cheap, and the only GPU figures #21 has
    extras = [EXTRAS_LOADER, EXTRAS_LONG, EXTRAS_STEPS, EXTRAS_VIDEO]
    extras_select = ["benchmarks", "-k", extras_k] if extras_k else [
        *(path for select in extras for path in _paths(select)), "-m",
        " or ".join(f"({_marks(select)})" for select in extras)]
    extras_parts = [] if extras_k else [
        Part(EXTRAS_LOADER, CASES["extras loader"], LOADER_S),
        Part(EXTRAS_LONG, CASES["extras long compile"], OP_LONG_COMPILE_S),
        Part(EXTRAS_STEPS, CASES["extras steps compiled"], STEP_COMPILED_S),
        Part(_compiled(EXTRAS_VIDEO, False), CASES["extras video"], OP_S),
        Part(_compiled(EXTRAS_VIDEO, True), CASES["extras video compiled"], OP_COMPILED_S)]
    bench = {"MAE_BENCH_CASES": "{out}/cases.jsonl"}
    return [
        Stage("device", ["sh", "-c", "nvidia-smi --query-gpu=name,driver_version,memory.total "
                         f"--format=csv; {sys.executable} -c \"import torch, triton; print("
                         "'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', "
                         "triton.__version__)\""], 5, 60),
        Stage("build", [sys.executable, "setup.py", "build_ext", "--inplace"], BUILD_S, 180,
              log="build.log", required=True),
        # the build must have the CUDA kernels: without them gather/scatter run plain PyTorch
        Stage("extension", [sys.executable, "-c", "from mae_kernels import tokens as t; "
                            "print('extension', t.LIBRARY, 'kernels for', "
                            "sorted(t.KERNEL_DEVICES)); assert 'cuda' in t.KERNEL_DEVICES"],
              5, 60, required=True),
        Stage("tests", [*PYTEST, "tests", "-m", "gpu", "--maxfail=20"], PYTEST_START_S, 150,
              [Part(["tests", "-m", "gpu"], CASES["tests -m gpu"], TEST_S)]),
        Stage("sanitizer", ["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1",
                            sys.executable, "scripts/gpu_sanitize.py"], SANITIZER_S, 90,
              log="sanitizer.log", env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
        Stage("ops", [*PYTEST, *OPS, "--benchmark-json={out}/ops.json"],
              PYTEST_START_S + INDUCTOR_START_S + REPORT_S, 240,
              [Part(_compiled(OPS, False), CASES["ops"], OP_S),
               Part(_compiled(OPS, True), CASES["ops compiled"], OP_COMPILED_S)],
              json="ops.json", env=bench),
        Stage("step", [*PYTEST, *STEPS, "--benchmark-json={out}/step.json"],
              PYTEST_START_S + REPORT_S, 120, [Part(STEPS, CASES["steps"], STEP_S)],
              json="step.json", env=bench),
        Stage("extras", [*PYTEST, *extras_select, "--benchmark-json={out}/extras.json"],
              PYTEST_START_S + INDUCTOR_START_S + REPORT_S, float("inf"), extras_parts,
              json="extras.json", env=bench,
              open_ended=True),
    ]


def arithmetic(stages: list[Stage], budget: float = BUDGET_S) -> tuple[list[str], float]:
    """The budget table, and the estimated seconds of every stage but the extras (which get
    what is left, less STOP_GRACE_S for being stopped)."""
    lines = [f"{'stage':<10} {'cases x s/case + fixed':<44} {'estimate':>9} {'limit':>7}"]
    core = 0.0
    for stage in stages:
        terms = " + ".join(f"{p.cases} x {p.per_case:g}" for p in stage.parts) or "-"
        limit = "rest" if stage.limit == float("inf") else f"{stage.limit:.0f} s"
        lines.append(f"{stage.name:<10} {terms + f' + {stage.fixed:g}':<44} "
                     f"{stage.estimate:>7.0f} s {limit:>7}")
        if not stage.open_ended:
            core += stage.estimate
    rest = sum(stage.estimate for stage in stages if stage.open_ended)
    lines.append(f"planned stages: {core:.0f} s + {STOP_GRACE_S} s to stop the last one, of the "
                 f"{budget:.0f} s budget; the extras get the {budget - STOP_GRACE_S - core:.0f} "
                 f"s left (all of them would take {rest:.0f} s)")
    return lines, core


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


def run_stage(stage: Stage, out: Path, limit: float, log: Log) -> int | str:
    """Runs one stage with its output in its log, stops it at `limit` seconds (SIGINT, then
    SIGKILL to its whole process group); returns its exit status or "timeout"."""
    command = [c.replace("{out}", str(out)) for c in stage.command]
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               **{k: v.replace("{out}", str(out)) for k, v in stage.env.items()})
    with (out / stage.log).open("a") as f:
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


def _tail(path: Path, lines: int) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


def report(out: Path, log: Log) -> None:
    """RESULTS.md from every benchmark JSON there, and the per-case lines of stopped stages."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import report as report_module

    # pytest-benchmark creates its JSON file when it starts: a killed stage leaves it empty
    inputs = [out / name for name in ("ops.json", "step.json", "extras.json", "cases.jsonl")
              if (out / name).exists() and (out / name).stat().st_size]
    if not inputs:
        log("no benchmark results to report")
        return
    try:
        report_module.main([*map(str, inputs), "--output", str(out / "RESULTS.md"),
                            "--no-plots"])
    except Exception as e:  # noqa: BLE001 - a broken report must not stop the later stages
        log(f"report failed: {type(e).__name__}: {e}")


def run(stages: list[Stage], out: Path, budget: float = BUDGET_S) -> dict:
    """Runs the stages in order within `budget` seconds (a stage stopped at the deadline has
    STOP_GRACE_S more to write its files); returns {stage: status}."""
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out)
    start = time.monotonic()
    lines, _ = arithmetic(stages, budget)
    for line in lines:
        log(line)
    status = {}
    for stage in stages:
        left = budget - STOP_GRACE_S - (time.monotonic() - start)
        if left < MIN_STAGE_S:
            log(f"{stage.name}: skipped, {left:.0f} s left")
            status[stage.name] = "skipped"
            continue
        limit = min(stage.limit, left)
        log(f"--- {stage.name} (limit {limit:.0f} s, estimate {stage.estimate:.0f} s)")
        t0 = time.monotonic()
        status[stage.name] = result = run_stage(stage, out, limit, log)
        log(f"--- {stage.name}: {result} in {time.monotonic() - t0:.0f} s "
            f"({time.monotonic() - start:.0f} s of {budget:.0f})")
        if stage.log != "plan.log":
            for line in _tail(out / stage.log, 5 if result == 0 else 30):
                log(f"    {line}")
        if stage.json:
            report(out, log)
        if result == "timeout" and stage.open_ended:
            status[stage.name] = 0
        if stage.required and result != 0:
            log(f"{stage.name} failed: the plan stops here")
            break
    log(json.dumps(status))
    results = out / "RESULTS.md"
    if results.exists():  # the tables last: the reply carries the end of the output
        print("\n".join([line for line in results.read_text().splitlines()
                         if line.startswith("| ")][-80:]))
    return status


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
            counts[" ".join(part.select)] = counter.cases
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="extras", help="pytest -k expression: the extras stage runs "
                        "the benchmarks matching it instead of the default extras")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--count", action="store_true",
                        help="collect every stage, compare with CASES")
    parser.add_argument("--skip", default="", metavar="STAGE,...",
                        help="stages to leave out (a warm machine that has built already)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    args = parser.parse_args(argv)
    stages = plan(args.extras)
    skip = {name for name in args.skip.split(",") if name}
    unknown = skip - {stage.name for stage in stages}
    if unknown:
        parser.error(f"--skip: no stage {', '.join(sorted(unknown))}")
    stages = [stage for stage in stages if stage.name not in skip]
    if args.count:
        expected = {" ".join(p.select): p.cases for s in stages for p in s.parts}
        counts = count(stages)
        for selection, cases in counts.items():
            print(f"{cases:5d} (CASES: {expected[selection]:5d})  {selection}")
        return 0 if counts == expected else 1
    if args.dry_run:
        lines, core = arithmetic(stages)
        for stage in stages:
            print(f"{stage.name}: {' '.join(stage.command)}")
        print("\n".join(lines))
        return 0 if core + STOP_GRACE_S <= BUDGET_S else 1
    status = run(stages, args.out.resolve())
    return 0 if all(s in (0, "skipped") for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
