import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MPLBACKEND", "Agg")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from a known seed, float32 policy and a clean session."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()

# Helper scripts that tests run in a fresh process (they configure devices at
# import time): never imported by pytest itself.
collect_ignore = ["distributed_checks.py", "multiworker_checks.py", "backend_checks.py",
                  "distribution_checks.py",
                  "clipping_checks.py"]
