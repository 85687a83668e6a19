import pytest


@pytest.fixture(params=["file", "s3"])
def store_uri(request, tmp_path):
    """The same tests run against both backends: a local directory and the real S3 server."""
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    return request.getfixturevalue("s3_uri")
