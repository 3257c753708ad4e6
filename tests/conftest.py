import json

import pytest

from tests.helpers import tiny_dataset


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """200 train / 70 test learnable PNG images in 10 classes (an image-folder tree), made once."""
    return tiny_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def config(tmp_path, request):
    """The test module's CONFIG dict written to a file the trainer reads."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps(request.module.CONFIG))
    return path
