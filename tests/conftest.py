import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # tests/support: the shared helpers (tiny models, tokenizers, trainers)

import torch  # noqa: E402

torch.set_num_threads(1)  # tests run two workers on two cores


@pytest.fixture(scope="session")
def real_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``BUPO_CACHE`` of the real-model tests: one folder for every xdist worker of a run, so each GGUF model is
    converted once per run (``bupo.models.prepare_model`` holds a lock while it converts; a second worker waits and
    then reuses the entry) whichever worker its tests land on. ``BUPO_TEST_CACHE`` names a persistent folder
    instead, to reuse a conversion between runs."""
    if os.environ.get("BUPO_TEST_CACHE"):
        return Path(os.environ["BUPO_TEST_CACHE"])
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above the workers' own (pytest-of-USER/pytest-N/)
    path = root / "bupo_cache"
    path.mkdir(exist_ok=True)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long tests first (``slow``, then ``distributed``), the rest in file order: xdist hands out tests in this order,
    so the minutes-long ones start at once instead of leaving one worker busy after the other has run out."""
    def rank(item: pytest.Item) -> int:
        return 0 if item.get_closest_marker("slow") else 1 if item.get_closest_marker("distributed") else 2

    items.sort(key=rank)  # stable: the file order holds within each rank


_TEST_START: dict[str, tuple] = {}  # nodeid -> (this process's rusage, the machine's steal jiffies) at its start


def _steal_jiffies() -> int:
    """CPU time the hypervisor gave to others (/proc/stat's steal column, all CPUs); 0 where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return 0


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    if os.environ.get("BUPO_TEST_TIMINGS"):
        import resource

        _TEST_START[nodeid] = (resource.getrusage(resource.RUSAGE_SELF), _steal_jiffies())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """``BUPO_TEST_TIMINGS=FILE`` appends one line per test phase as it ends (seconds, outcome, id, then the worker,
    torch's thread count and the worker's peak RSS in MB; then, since the test started, the worker's CPU seconds,
    major page faults, voluntary and involuntary context switches and the machine's steal seconds): a profile of the
    suite that survives a run cut short (``--durations`` prints only at the end), with what tells a test that runs
    far slower than usual apart - computing (CPU seconds near its wall time), starved of the CPU (involuntary
    switches, steal), waiting (voluntary switches) or re-reading evicted pages (major faults)."""
    path = os.environ.get("BUPO_TEST_TIMINGS")
    if getattr(report, "node", None) is not None:  # xdist's controller echoing a worker's report: logged there
        return
    if path and (report.when == "call" or report.duration > 1.0 or report.outcome != "passed"):
        import resource

        now = resource.getrusage(resource.RUSAGE_SELF)
        peak = now.ru_maxrss // 1024
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        start, steal0 = _TEST_START.get(report.nodeid, (now, _steal_jiffies()))
        cpu = now.ru_utime + now.ru_stime - start.ru_utime - start.ru_stime
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        with open(path, "a") as f:
            f.write(f"{report.duration:.1f}\t{report.when}\t{report.outcome}\t{report.nodeid}\t{worker}\t"
                    f"{torch.get_num_threads()}\t{peak}\t{cpu:.1f}\t{now.ru_majflt - start.ru_majflt}\t"
                    f"{now.ru_nvcsw - start.ru_nvcsw}\t{now.ru_nivcsw - start.ru_nivcsw}\t"
                    f"{(_steal_jiffies() - steal0) / hz:.1f}\n")
