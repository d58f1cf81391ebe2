import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models are dominated by thread hand-off on a shared machine; one thread is ~30x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
