import os
import sys

# One torch thread per test process (and per script a test starts, which inherits the environment):
# pytest runs one worker per core (pytest.ini), and more threads than cores make every job crawl.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


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
    import lab
    return lab.tiny_model_path("tiny")


@pytest.fixture()
def tiny_policy(tiny_path):
    """The real training path: 4-bit NF4 (bitsandbytes on CPU) + LoRA (peft) on the tiny model."""
    import loading
    return loading.load_model(tiny_path, four_bit=True, lora_rank=8, trainable=True)
