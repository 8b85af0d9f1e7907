"""The Celery app's settings that decide how soon a dead worker's task comes back."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sentinel.config import Settings, WorkerSettings
from sentinel.workers.app import make_app


def test_the_visibility_timeout_follows_the_time_limit_not_an_hour() -> None:
    workers = WorkerSettings(soft_time_limit_s=240, time_limit_s=250)
    app = make_app(Settings(workers=workers), "redis://127.0.0.1:1/0")
    timeout = app.conf.broker_transport_options["visibility_timeout"]
    assert workers.time_limit_s < timeout <= workers.time_limit_s + 150  # minutes, not 3600 s
    assert WorkerSettings(visibility_timeout_s=900).visibility_s == 900  # still settable
    with pytest.raises(ValidationError, match="soft_time_limit_s < time_limit_s < visibility"):
        WorkerSettings(time_limit_s=400, visibility_timeout_s=300)
