"""Shared by every test file: one torch thread per test."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and a second thread on a busy machine waits for
    # its core at every op (10x slower here): one thread keeps the tests fast and their timing steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
