"""Where a study lives: Optuna's relational storage, a SQLite file in the output folder by
default, or a PostgreSQL or MySQL server (``--storage URL``) that workers on several
machines share. The storage is Optuna's own (optuna.storages.RDBStorage); this module
checks the URL, opens it, and says what went wrong in one line.

SQLite, not Optuna's journal file: it is the format Optuna's dashboard and a database server
share, so a study can move from a file to a server (``optuna copy-study``) unchanged. SQLite
serialises writers with a file lock; a trial writes a few rows per epoch, so N local workers
rarely wait, and the connection's ``timeout`` makes one that does wait (up to a minute)
instead of failing with "database is locked".
"""

from __future__ import annotations

import warnings
from pathlib import Path

from afmp.utils.errors import UsageError

STUDY_DB = "study.db"
# backend -> how to install its driver (SQLAlchemy's default one for the URL's scheme)
BACKENDS = {
    "sqlite": "",
    "postgresql": "pip install psycopg2-binary",
    "mysql": "pip install mysqlclient, or pip install PyMySQL and write mysql+pymysql://",
}
EXPECTED = (
    "sqlite:///PATH, postgresql://USER:PASSWORD@HOST/DATABASE or mysql+pymysql://USER:PASSWORD@HOST/DATABASE"
)
SQLITE_TIMEOUT_S = 60
# A storage outside the output folder may be shared by commands and machines that may die: a
# trial whose worker has not beaten for GRACE_S is marked failed by the next worker that starts
# a trial (Optuna's heartbeat). The default file needs none: the folder's lock keeps others out.
HEARTBEAT_S, GRACE_S = 60, 180


def storage_url(out: Path, url: str | None) -> str:
    """The study's storage: ``url`` checked, or by default the SQLite file ``out/study.db``."""
    import sqlalchemy

    if url is None:
        return f"sqlite:///{(Path(out) / STUDY_DB).absolute()}"
    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise UsageError(f"--storage {url!r} is not a database URL; expected {EXPECTED}") from None
    backend = parsed.get_backend_name()
    if backend not in BACKENDS:
        raise UsageError(
            f"--storage: {backend} is not a storage Optuna keeps studies in; expected {EXPECTED}"
        )
    if backend == "sqlite" and parsed.database in (None, "", ":memory:"):
        raise UsageError("--storage: an in-memory SQLite database is lost when the search stops; give a file")
    if backend != "sqlite" and not parsed.host:
        raise UsageError(f"--storage {shown(url)}: no server named; expected {EXPECTED}")
    return url


def shown(url: str) -> str:
    """The URL as it may be printed: its password hidden."""
    import sqlalchemy

    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def open_storage(url: str, *, shared: bool = True):
    """Optuna's RDBStorage on ``url`` (tables created if new), with heartbeats if ``shared``;
    a UsageError if the driver is missing or the database cannot be reached."""
    import optuna
    import sqlalchemy

    backend = sqlalchemy.engine.make_url(url).get_backend_name()
    local = url.startswith("sqlite")
    options: dict = {
        "engine_kwargs": {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if local else {"pool_pre_ping": True}
    }
    if shared:
        options.update(heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    try:
        with warnings.catch_warnings():  # the heartbeat is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, **options)
    except ImportError as err:
        missing = getattr(err.__cause__, "name", None) or err.name or "its module"
        raise UsageError(
            f"--storage {shown(url)}: the {backend} driver ({missing}) is not installed here; {BACKENDS[backend]}"
        ) from err
    except sqlalchemy.exc.SQLAlchemyError as err:
        reason = " ".join(str(getattr(err, "orig", None) or err).split())
        raise UsageError(f"--storage {shown(url)}: cannot open the database ({reason[:300]})") from err
