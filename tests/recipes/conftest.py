"""``mnist_root``: a synthetic MNIST set shared by the CLI tests (``cli_helpers.write_mnist``)."""
from pathlib import Path

import pytest
from cli_helpers import write_mnist


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A synthetic MNIST root (read it only: copy it to damage it)."""
    root = tmp_path_factory.mktemp("mnist")
    write_mnist(root)
    return root
