"""The Celery app: the `validate` and `rollout` queues, with Redis as the broker.

The settings, and why (FIELD_NOTES §6):

- `task_acks_late` + `worker_prefetch_multiplier=1`: a task is acknowledged only after it ran,
  and a worker holds one task at a time, so a worker that dies loses nothing and hoards
  nothing.
- `task_reject_on_worker_lost`: a task whose worker process died is redelivered. Untrusted
  replays run in sandbox children, so a poison proposal kills a child, not the worker; and
  every task counts its attempts in Redis and gives up (with a verdict) after `max_attempts`,
  so nothing is redelivered forever.
- `visibility_timeout` above the hard time limit, which is above the soft one (the settings
  enforce it), and derived from it (`workers.visibility_s`): Redis redelivers an
  unacknowledged task after `visibility_timeout`. A rollout still running holds its lease
  (`workers.lease`), so a copy handed to a second worker skips; the timeout bounds only a
  task whose worker died before taking its lease. A worker that dies while it runs a group is
  found by the orchestrator when the lease lapses, within `workers.lease_s`, not this timeout.
- No result backend: results are messages on Redis Streams, like everything else.
- `global_keyprefix`: the broker's keys live under the bus prefix, beside the streams.
- The worker keeps our structured logging (`worker_hijack_root_logger=False`).
"""

from __future__ import annotations

from celery import Celery

from sentinel.config import Settings

VALIDATE_QUEUE = "validate"
ROLLOUT_QUEUE = "rollout"


def make_app(settings: Settings, broker_url: str) -> Celery:
    workers = settings.workers
    app = Celery(
        "sentinel",
        broker=broker_url,
        include=["sentinel.workers.validation", "sentinel.workers.rollout"],
    )
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=True,
        task_soft_time_limit=workers.soft_time_limit_s,
        task_time_limit=workers.time_limit_s,
        broker_transport_options={
            "visibility_timeout": workers.visibility_s,
            "global_keyprefix": f"{settings.bus.prefix}:celery:",
        },
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_routes={
            "sentinel.validate": {"queue": VALIDATE_QUEUE},
            "sentinel.rollout": {"queue": ROLLOUT_QUEUE},
        },
        task_default_queue=VALIDATE_QUEUE,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=False,
        # for the tasks, in every worker process; the URL (a secret) is sentinel_redis_url
        sentinel_settings=settings.model_dump_json(exclude={"redis_url"}),
        sentinel_redis_url=broker_url,
    )
    return app


def settings_of(app: Celery) -> tuple[Settings, str]:
    """The settings and Redis URL the app was made with."""
    raw = app.conf["sentinel_settings"]
    return Settings.model_validate_json(raw), str(app.conf["sentinel_redis_url"])
