"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: the CI machine is shared, and tiny models gain nothing from two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
