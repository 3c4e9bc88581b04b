"""What the platform prints about the tracking store never shows a credential."""

import pytest

from pipelines import tracking


@pytest.mark.parametrize("uri, masked, link", [
    ("http://alice:s3cret@mlflow.example:5000", "http://alice:***@mlflow.example:5000", "http://mlflow.example:5000"),
    ("https://tok3n@mlflow.example", "https://***@mlflow.example", "https://mlflow.example"),
    ("postgresql://bob:pw@db:5432/mlflow", "postgresql://bob:***@db:5432/mlflow", "postgresql://db:5432/mlflow"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_credentials_in_a_tracking_uri_are_masked_or_dropped(uri, masked, link):
    assert tracking.shown_uri(uri) == masked
    assert tracking.shown_uri(uri, credentials="") == link


@pytest.mark.parametrize("uri", ["http://alice:s3cret@mlflow.example:5000", "postgresql://bob:s3cret@db/mlflow"])
def test_the_ui_hint_never_prints_the_password(uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert "s3cret" not in tracking.ui_command()
