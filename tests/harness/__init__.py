"""Run real Celery workers against real brokers, for the integration tests and the benchmarks.

One module per concept (``from tests.harness import X`` finds every public name):

- :mod:`~tests.harness.conf`: the backend matrix, a test's settings, their hand-over
  to workers in ``PH_CONF`` (:func:`conf_from_env`), the test process's own app.
- :mod:`~tests.harness.services`: the local servers and whether each is up.
- :mod:`~tests.harness.postgres`: databases on the local PostgreSQL.
- :mod:`~tests.harness.redis_db`: Redis db indexes claimed by one session at a time.
- :mod:`~tests.harness.store`: emptying a store between tests.
- :mod:`~tests.harness.session`: one pytest session's database and Redis db.
- :mod:`~tests.harness.processes`: ``/proc``, process groups, reaping.
- :mod:`~tests.harness.workers`: :class:`Worker` and :class:`WorkerFactory`.
- :mod:`~tests.harness.waiting`: :func:`wait_until` and waiting for workflow runs.
- :mod:`~tests.harness.cli`: :func:`run_cli`, the ``pluginhost`` command as users run it.

Worker processes import this package (the test apps call :func:`conf_from_env`), so
no module of it imports anything heavy at module level.
"""

from tests.harness.cli import run_cli
from tests.harness.conf import (
    BACKEND_IDS,
    BACKENDS,
    PH_CONF_ENV,
    PLUGINHOST_FS_SCHEME,
    REPO_ROOT,
    Backend,
    build_conf,
    conf_from_env,
    configure_app,
    delete_broker_objects,
    isolation_conf,
    register_transport_for,
    reset_app,
)
from tests.harness.postgres import (
    PG_DB_PREFIX,
    create_pg_database,
    drop_pg_database,
    drop_stale_pg_databases,
    pg_conninfo,
    pg_url,
)
from tests.harness.processes import (
    ProcInfo,
    become_child_subreaper,
    child_pids,
    group_members,
    list_processes,
    pid_alive,
    read_proc,
    reap_adopted_zombies,
)
from tests.harness.redis_db import (
    REDIS_CLAIM_TTL_S,
    REDIS_DB_ENV,
    REDIS_OWNER_KEY,
    TEST_REDIS_DBS,
    claim_redis_db,
    forced_redis_db,
    redis_owner,
    redis_url,
    release_redis_db,
)
from tests.harness.services import (
    AMQP_PORT,
    AMQP_URL,
    LOCALHOST,
    PG_ADMIN_DB,
    PG_PORT,
    REDIS_PORT,
    SERVICES,
    Service,
    check_service,
    service_down_message,
)
from tests.harness.session import SessionResources
from tests.harness.store import SEED_ROWS, empty_store
from tests.harness.waiting import RUN_FINISHED, wait_finished, wait_until
from tests.harness.workers import Worker, WorkerError, WorkerFactory, kill_all_workers

__all__ = [
    "run_cli",
    "AMQP_PORT",
    "AMQP_URL",
    "BACKENDS",
    "BACKEND_IDS",
    "Backend",
    "LOCALHOST",
    "PG_ADMIN_DB",
    "PG_DB_PREFIX",
    "PG_PORT",
    "PH_CONF_ENV",
    "PLUGINHOST_FS_SCHEME",
    "REDIS_CLAIM_TTL_S",
    "REDIS_DB_ENV",
    "REDIS_OWNER_KEY",
    "REDIS_PORT",
    "REPO_ROOT",
    "RUN_FINISHED",
    "SEED_ROWS",
    "SERVICES",
    "Service",
    "SessionResources",
    "TEST_REDIS_DBS",
    "ProcInfo",
    "Worker",
    "WorkerError",
    "WorkerFactory",
    "become_child_subreaper",
    "build_conf",
    "check_service",
    "child_pids",
    "claim_redis_db",
    "conf_from_env",
    "configure_app",
    "create_pg_database",
    "delete_broker_objects",
    "drop_pg_database",
    "drop_stale_pg_databases",
    "empty_store",
    "forced_redis_db",
    "group_members",
    "isolation_conf",
    "kill_all_workers",
    "list_processes",
    "pg_conninfo",
    "pg_url",
    "pid_alive",
    "read_proc",
    "reap_adopted_zombies",
    "redis_owner",
    "redis_url",
    "register_transport_for",
    "release_redis_db",
    "reset_app",
    "service_down_message",
    "wait_finished",
    "wait_until",
]
