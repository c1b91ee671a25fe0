"""Plant known faults in a copy of the tree and check that the tests catch every one.

    python tools/mutation_check.py                  # every fault, against the committed HEAD
    python tools/mutation_check.py --only mask-mean-local zero3-range+1
    python tools/mutation_check.py --worktree       # the working tree, uncommitted edits included
    python tools/mutation_check.py --list

The tree under test is never edited. The commit (``git archive``) or the working tree is copied
into a work folder; each fault is planted into that copy (tools/mutation_faults.py, which fails
with "mutation target not found" when a snippet it edits is gone) and the tests that should
catch it run there, the copy first on ``PYTHONPATH`` and as the working directory, so the
spawned ranks of the distributed tests import the faulty code too. The native CPU kernels are
built from the copy into the work folder's own extension cache (``TORCH_EXTENSIONS_DIR``), never
into the shared one.

First the unmutated copy must pass every test run the faults use (else a "caught" would mean
nothing); then per fault: caught (a test failed; the first failure is shown, each run's output
is kept in the work folder's ``logs``), or missed. A fault the named tests miss is then tried
against tests/unit/test_mutation_holes.py, the tests written for the holes this check found.
A fault in ``csrc/`` gets its own kernel build. Every pytest run has a timeout (``--timeout``);
a run that ends in a usage or collection error, or passes without running anything, counts as
an error of the check, never as a catch. Exit status 0 only when the baseline passed and every
fault was caught.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
from mutation_faults import FAULTS, HOLES, MutationTargetNotFound, TestRun, plant  # noqa: E402

REPO = TOOLS.parent


@dataclass
class Outcome:
    status: str  # "passed" | "failed" | "timeout" | "error"
    seconds: float
    first_failure: str = ""
    output: str = ""


def machine() -> str:
    """CPU model and vector extensions, from lscpu (Linux) or platform."""
    model, flags = platform.processor() or "unknown CPU", ""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        for line in info.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            if key.strip() == "Flags":
                flags = value
    except (OSError, subprocess.SubprocessError):
        pass
    have = [name for name in ("avx2", "avx512f") if f" {name} " in f" {flags} "]
    return f"{model}, {os.cpu_count()} logical CPUs, {' + '.join(have) or 'no AVX2/AVX-512'}"


def copy_tree(destination: Path, ref: str | None) -> str:
    """The tree to mutate at ``destination``: commit ``ref`` (``git archive``), or the working
    tree (tracked and untracked files that git does not ignore) when ``ref`` is None.
    Returns a label of what was copied."""
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    if ref is not None:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True, check=True).stdout.strip()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", ref], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
        return f"commit {commit}"
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-c", "-o", "--exclude-standard"], capture_output=True, check=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return f"working tree on {head}"


def environment(tree: Path, extensions: Path, run: TestRun | None, mode: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("MUTATION_DS_CASES", "MUTATION_FSDP_MESH"):
        env.pop(key, None)
    env.update(
        PYTHONPATH=os.pathsep.join([str(tree), str(TOOLS)]),
        PYTHONDONTWRITEBYTECODE="1",
        TORCH_EXTENSIONS_DIR=str(extensions),
        DS_ACCELERATOR="cpu",
        DIST_CAUTIOUS_KERNELS=mode,
        COLUMNS="400",  # pytest's short summary keeps each failure's message on its line
    )
    if run is not None:
        env.update(dict(run.env))
    return env


def run_command(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str, float]:
    """Run ``command`` in its own process group; on timeout kill that group. Returns
    (exit code or None on timeout, combined output, seconds)."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output, time.monotonic() - started
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output, time.monotonic() - started


def first_failure(output: str) -> str:
    """The first FAILED / ERROR line of pytest's short summary, with its message."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            text = line.split(" ", 1)[1]
            if "kernel self-check failed" in output and "self-check" not in text:
                text += " [native kernel self-check failed at load]"
            if "raised:" in text:  # a rank's exception: name it instead of the harness's words
                raised = re.search(r"^E\s+(\w+(?:Error|Exception): .*)$", output, flags=re.M)
                if raised:
                    text = f"{text.split(' - ', 1)[0]} - a rank raised {raised.group(1)}"
            return text
    return ""


def summary_counts(output: str) -> dict[str, int]:
    """pytest's final counts (``{"passed": 6, "skipped": 2}``) from its last summary line."""
    lines = [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {what: int(n) for n, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", lines[-1])} if lines else {}


def pytest_run(tests: tuple[str, ...], tree: Path, env: dict[str, str], timeout: float, stop_first: bool) -> Outcome:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "mutation_plugin", "-rfE", "--tb=short", "-W", "ignore::DeprecationWarning"]
    if stop_first:
        command.append("-x")
    code, output, seconds = run_command([*command, *tests], tree, env, timeout)
    if code is None:
        return Outcome("timeout", seconds, f"no result within {timeout:.0f} s", output)
    if code == 0:
        counts = summary_counts(output)
        if not counts.get("passed"):
            return Outcome("error", seconds, f"nothing passed: {counts}", output)
        return Outcome("passed", seconds, ", ".join(f"{n} {what}" for what, n in counts.items()), output)
    if code == 1:
        return Outcome("failed", seconds, first_failure(output) or "(a test failed)", output)
    return Outcome("error", seconds, f"pytest exit status {code}: {output.strip().splitlines()[-1] if output.strip() else ''}", output)


def check_imports(tree: Path, env: dict[str, str]) -> None:
    """The copy, not the checkout, must be what ``import dist_cautious`` and ``tests`` find."""
    probe = "import dist_cautious, tests; print(dist_cautious.__file__); print(tests.__file__)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tree, env=env, capture_output=True, text=True, timeout=120)
    paths = done.stdout.split()
    if done.returncode != 0 or len(paths) != 2 or not all(Path(p).resolve().is_relative_to(tree.resolve()) for p in paths):
        raise SystemExit(f"the copy at {tree} is not what Python imports there: {done.stdout}{done.stderr}")


def kernel_cache(work: Path, tree: Path) -> Path:
    """The extension cache the copy builds its native kernels into: one per content of
    ``csrc/``, so a new commit with the same kernel sources loads the earlier build. The copy's
    ``csrc`` files get one fixed old modification time (a fresh ``git archive`` stamps them
    with the commit's time, which would make ninja rebuild); a different content gets a
    different, empty cache, so no stale build is ever loaded."""
    digest = hashlib.sha256()
    for path in sorted((tree / "csrc").rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(tree)).encode() + b"\0" + path.read_bytes() + b"\0")
            os.utime(path, (1_000_000_000, 1_000_000_000))
    cache = work / "torch_extensions" / digest.hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def seed_deepspeed_ops(cache: Path) -> None:
    """Copy DeepSpeed's own JIT-built ops (its CPU all-reduce) from the shared extension cache
    into the copy's, so that the copy's DeepSpeed runs load them instead of compiling them
    again: their sources live in DeepSpeed's package, the same for the copy. The package's own
    kernels are never copied (they are built from the copy's csrc)."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    shared = Path(os.environ["TORCH_EXTENSIONS_DIR"]) if os.environ.get("TORCH_EXTENSIONS_DIR") else Path.home() / ".cache" / "torch_extensions" / tag
    if not shared.is_dir():
        return
    for entry in shared.iterdir():
        if entry.is_dir() and not entry.name.startswith("dist_cautious") and not (cache / entry.name).exists() and not (entry / "lock").exists():
            shutil.copytree(entry, cache / entry.name, copy_function=shutil.copy2)


def build_native(tree: Path, cache: Path, timeout: float, must_pass: bool = True) -> float:
    """Build (or load from ``cache``) the copy's native CPU kernels and self-check them. For the
    unmutated copy both must succeed; a faulty build may fail its self-check (the test run then
    shows it), but it must compile."""
    env = environment(tree, cache, None, "native")
    build = "from dist_cautious.kernels import cpu_ops; cpu_ops.load()"
    code, output, seconds = run_command([sys.executable, "-c", build], tree, env, timeout)
    if code != 0:
        raise SystemExit(f"the copy's native CPU kernels did not build:\n{output[-3000:]}")
    if must_pass:
        check = "from dist_cautious.kernels import prebuild; prebuild('cpu')"
        code, output, more = run_command([sys.executable, "-c", check], tree, env, timeout)
        seconds += more
        if code != 0:
            raise SystemExit(f"the unmutated copy's native CPU kernels fail their self-check:\n{output[-3000:]}")
    return seconds


def restore(tree: Path, pristine: Path, paths: list[Path]) -> None:
    for path in paths:
        shutil.copy2(pristine / path.relative_to(tree), path)


def table(rows: list[dict[str, str]]) -> str:
    header = ["fault", "where", "kernels", "tests run", "result", "first failure", "s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(row[h].replace("|", "\\|") for h in header) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="FAULT", help="run only these faults (names from --list)")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--ref", default="HEAD", help="the commit to copy (default HEAD)")
    parser.add_argument("--worktree", action="store_true", help="copy the working tree instead of a commit")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp") / f"dist_cautious_mutation_{os.getuid()}", help="where the copies and the kernel build live")
    parser.add_argument("--table", type=Path, help="also write the final table (markdown) to this file")
    args = parser.parse_args()

    faults = [f for f in FAULTS if not args.only or f.name in args.only]
    if args.list:
        for fault in FAULTS:
            print(f"{fault.name:32s} {fault.location():28s} {fault.run.mode:9s} {fault.what}")
        return 0
    unknown = set(args.only or ()) - {f.name for f in FAULTS}
    if unknown:
        parser.error(f"unknown faults: {sorted(unknown)}")

    started = time.monotonic()
    work = args.workdir
    pristine, tree = work / "pristine", work / "tree"
    what = copy_tree(pristine, None if args.worktree else args.ref)
    cache = kernel_cache(work, pristine)
    if tree.exists():
        shutil.rmtree(tree)
    shutil.copytree(pristine, tree, copy_function=shutil.copy2)
    print(f"mutation check of {what} ({REPO}); copy at {tree}")
    print(f"machine: {machine()}")

    # every fault's snippets must be found in the unmutated copy before anything runs
    for fault in faults:
        probe = work / "probe"
        if probe.exists():
            shutil.rmtree(probe)
        probe.mkdir(parents=True)
        for path in fault.paths():
            (probe / path).parent.mkdir(parents=True, exist_ok=True)
            if (pristine / path).is_file():
                shutil.copy2(pristine / path, probe / path)
        plant(probe, fault)  # raises MutationTargetNotFound
        shutil.rmtree(probe)

    check_imports(tree, environment(tree, cache, None, "reference"))
    seed_deepspeed_ops(cache)
    if any(f.run.mode == "native" for f in faults):
        print(f"native CPU kernels of the copy ready after {build_native(tree, cache, args.timeout):.0f} s")

    holes = (tree / HOLES).is_file()
    runs: dict[tuple, TestRun] = {f.run.key(): f.run for f in faults}
    if holes:
        for mode in sorted({f.run.mode for f in faults}):
            hole_run = TestRun((HOLES,), mode, label="test_mutation_holes")
            runs[hole_run.key()] = hole_run
    print(f"baseline: the unmutated copy runs {len(runs)} test runs")
    baseline_ok = True
    for run in tqdm(list(runs.values()), desc="baseline", unit="run"):
        outcome = pytest_run(run.tests, tree, environment(tree, cache, run, run.mode), args.timeout, stop_first=False)
        tqdm.write(f"  baseline [{run.mode}] {run.label or run.tests}: {outcome.status} in {outcome.seconds:.0f} s ({outcome.first_failure})")
        if outcome.status != "passed":
            baseline_ok = False
            tqdm.write(outcome.output[-4000:])
    if not baseline_ok:
        print("the unmutated copy does not pass the tests the faults use: a catch would mean nothing; stopping")
        return 2

    rows: list[dict[str, str]] = []
    all_caught = True
    progress = tqdm(faults, desc="faults", unit="fault")
    for fault in progress:
        progress.set_postfix_str(fault.name)
        changed = plant(tree, fault)
        try:
            fault_cache = cache
            if any(path.startswith("csrc/") for path in fault.paths()):
                # the kernels themselves are faulty: a cache of their own, built before the run
                fault_cache = kernel_cache(work, tree)
                seed_deepspeed_ops(fault_cache)
                built = build_native(tree, fault_cache, args.timeout, must_pass=False)
                tqdm.write(f"  {fault.name}: faulty native kernels built in {built:.0f} s")
            env = environment(tree, fault_cache, fault.run, fault.run.mode)
            outcome = pytest_run(fault.run.tests, tree, env, args.timeout, stop_first=True)
            result, seconds = outcome.status, outcome.seconds
            failure = outcome.first_failure
            if outcome.status == "passed" and holes:
                hole = pytest_run((HOLES,), tree, environment(tree, fault_cache, None, fault.run.mode), args.timeout, stop_first=True)
                seconds += hole.seconds
                result = {"failed": "missed, then caught by the new tests", "passed": "missed"}.get(hole.status, hole.status)
                failure = hole.first_failure
            elif outcome.status == "passed":
                result, failure = "missed", f"none ({outcome.first_failure})"
            elif outcome.status == "failed":
                result = "caught"
            elif outcome.status == "timeout":
                result = "caught (timeout)"
            (work / "logs").mkdir(exist_ok=True)
            (work / "logs" / f"{fault.name}.log").write_text(outcome.output)
        finally:
            restore(tree, pristine, changed)
        all_caught &= result.startswith("caught") or result.endswith("caught by the new tests")
        rows.append(
            {
                "fault": fault.name,
                "where": fault.location(),
                "kernels": fault.run.mode,
                "tests run": fault.run.label or ", ".join(fault.run.tests),
                "result": result,
                "first failure": re.sub(r"\s+", " ", failure)[:220],
                "s": f"{seconds:.0f}",
            }
        )
        tqdm.write(f"  {fault.name}: {result} ({seconds:.0f} s) {rows[-1]['first failure']}")
    elapsed = time.monotonic() - started
    summary = f"{sum(r['result'].startswith('caught') for r in rows)} caught by the named tests, {len(rows)} faults, {elapsed / 60:.1f} min in all, {what}"
    print()
    print(table(rows))
    print()
    print(summary)
    if args.table:
        args.table.write_text(f"{table(rows)}\n\n{summary}; machine: {machine()}\n")
    return 0 if all_caught else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MutationTargetNotFound as error:
        print(error, file=sys.stderr)
        sys.exit(3)
