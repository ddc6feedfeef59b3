import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's tiny models single-threaded (fastest for tiny ops on a 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
