"""Test configuration shared by the whole suite.

The Triton interpreter is selected when a kernel is *decorated*, so it has to be switched
on before any kernel module is imported: with no GPU, every ``@triton.jit`` kernel then
runs on CPU tensors through NumPy.

The suite runs on every core through pytest-xdist (pyproject's addopts). Each worker gets
its share of the cores as torch threads, and so do the processes tests start (through
``OMP_NUM_THREADS``), so that N workers never run N times the machine's threads.

``TRILORA_TEST_CPU=N`` prints the N tests that cost the most CPU time (this process's and
the processes it waited for, setup and teardown included; a module fixture counts for the
first test that uses it): it does not count the time a test waited for a core, so it is the
figure to judge a test's cost by while other jobs load the machine (they still inflate it
somewhat, through shared caches: up to ~2x seen on a 2-core machine at load 6).
"""

import os
import resource
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import pytest  # noqa: E402

_COVERED = pytest.StashKey[bool]()  # slow only as a case beyond the covering set


def _param_key(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200]


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    """A parametrized test's cases beyond a covering set are marked ``slow``: the lanes that
    deselect slow tests (newest releases, floors) still run every value of every parameter at
    least once, which is what a new or old release of a library could break; the locked lane
    runs every combination. The covering set is chosen greedily in collection order (the
    first case, then each case that brings a value not yet run), so it is the same on every
    run."""
    by_function: dict[tuple, list] = {}
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params:
            by_function.setdefault((item.path, item.originalname, item.cls), []).append(item)
    for cases in by_function.values():
        seen: set[tuple[str, str]] = set()
        for item in cases:
            values = {(name, _param_key(v)) for name, v in item.callspec.params.items()}
            if values - seen:
                seen |= values
            elif not item.get_closest_marker("slow"):
                item.add_marker(pytest.mark.slow)
                item.stash[_COVERED] = True


class _LongFilesFirst:
    @pytest.hookimpl(trylast=True)  # after -m has deselected
    def pytest_collection_modifyitems(self, config, items):
        _long_files_first(items)


def pytest_configure(config):
    config.pluginmanager.register(_LongFilesFirst(), "trilora-long-files-first")


def _long_files_first(items) -> None:
    """Files holding slow tests, or tests that start processes (``distributed``), first:
    xdist hands out whole files in this order, so the longest ones start at once instead of
    trailing at the end of the run."""
    long_files = {
        item.path
        for item in items
        if (item.get_closest_marker("slow") and not item.stash.get(_COVERED, False))
        or item.get_closest_marker("distributed")
    }
    items.sort(key=lambda item: item.path not in long_files)


def _cpu_seconds() -> tuple[float, float]:
    """(this process's, its waited-for children's) user + system CPU seconds so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


_CPU_KEY = "cpu_s"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    item._trilora_cpu_start = (*_cpu_seconds(), time.perf_counter())
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    start = getattr(item, "_trilora_cpu_start", None)
    if report.when == "teardown" and start is not None:
        own, kids = _cpu_seconds()
        # a user property travels with the report from an xdist worker to the controller
        report.user_properties.append(
            (_CPU_KEY, (own - start[0], kids - start[1], time.perf_counter() - start[2]))
        )


_cpu_costs: dict[str, tuple[float, float, float]] = {}


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        for key, value in report.user_properties:
            if key == _CPU_KEY:
                _cpu_costs[report.nodeid] = tuple(value)


def pytest_terminal_summary(terminalreporter):
    count = int(os.environ.get("TRILORA_TEST_CPU", "0") or 0)
    if count <= 0 or not _cpu_costs:
        return
    write = terminalreporter.write_line
    own = sum(v[0] for v in _cpu_costs.values())
    kids = sum(v[1] for v in _cpu_costs.values())
    terminalreporter.section(f"CPU time: the {count} most expensive tests")
    write(
        f"all {len(_cpu_costs)} tests: {own + kids:.1f} s CPU ({own:.1f} s in pytest, "
        f"{kids:.1f} s in processes they started)"
    )
    write("   cpu_s   own_s  child_s  wall_s  test")
    ranked = sorted(_cpu_costs.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))
    for nodeid, (o, k, w) in ranked[:count]:
        write(f"{o + k:8.2f} {o:7.2f} {k:8.2f} {w:7.2f}  {nodeid}")
    by_file: dict[str, float] = {}
    for nodeid, (o, k, _) in _cpu_costs.items():
        path = nodeid.split("::")[0]
        by_file[path] = by_file.get(path, 0.0) + o + k
    write("per file:")
    for path, cpu in sorted(by_file.items(), key=lambda kv: -kv[1])[:count]:
        write(f"{cpu:8.2f}  {path}")


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test run, printed on failure so the case can be replayed.

    Set ``TRILORA_TEST_SEED`` to replay a failing draw.
    """
    value = int(os.environ.get("TRILORA_TEST_SEED", torch.seed() % (2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"seed={value}")
    return value
