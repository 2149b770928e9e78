import os
import sys

# One torch thread per test process (and per script a test starts, which inherits the environment):
# pytest runs one worker per core (pytest.ini), and more threads than cores make every job crawl.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite runs on the CPU on any machine, a GPU one included: CUDA is hidden before torch first
# looks for it (the scripts a test starts inherit the environment). CEGPPO_GPU_TESTS=1 keeps CUDA
# visible and runs the tests marked gpu instead; the CPU tests, which would then see the GPU, skip.
GPU_TESTS = os.environ.get("CEGPPO_GPU_TESTS") == "1"
if not GPU_TESTS:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402
from engine import lab, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


# The files that take longest, longest first (seconds measured with `--durations=0`, two workers).
# pytest-xdist hands each worker whole files in collection order (--dist loadfile): starting with
# the long poles keeps one worker from idling at the end while the other runs them.
LONG_FILES = ("test_carry_lab.py", "test_lab.py", "test_scripts.py", "test_bench.py", "test_devices.py", "test_hub.py",
              "test_sampling.py", "test_readme.py", "test_fp16.py", "test_notebook.py", "test_gpu_check.py")


def pytest_collection_modifyitems(config, items):
    """Long files first (LONG_FILES); gpu-marked tests run only with CEGPPO_GPU_TESTS=1 and CUDA,
    the others only without it."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))     # stable: file order kept
    cuda = GPU_TESTS and __import__("torch").cuda.is_available()
    for item in items:
        if item.get_closest_marker("gpu") is None:
            if GPU_TESTS:
                item.add_marker(pytest.mark.skip(reason="a CPU test: run the suite without CEGPPO_GPU_TESTS"))
        elif not GPU_TESTS:
            item.add_marker(pytest.mark.skip(reason="a GPU test: CEGPPO_GPU_TESTS=1 on a machine with CUDA"))
        elif not cuda:
            item.add_marker(pytest.mark.skip(reason="a GPU test: no CUDA GPU here"))


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory):
    """Tiny models are written to a per-session cache; nothing may reach the Hub."""
    os.environ["CEGPPO_CACHE"] = str(tmp_path_factory.mktemp("cegppo_cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    yield


@pytest.fixture(scope="session")
def tiny_path():
    return lab.tiny_model_path("tiny")


@pytest.fixture()
def tiny_policy(tiny_path):
    """The real training path: 4-bit NF4 (bitsandbytes on CPU) + LoRA (peft) on the tiny model."""
    return models.load_model(tiny_path, four_bit=True, lora_rank=8, trainable=True)
