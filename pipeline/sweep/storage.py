"""Where a study lives: SQLite (one worker), a journal file (workers on one machine), or a
PostgreSQL / MySQL server (workers on several machines).

``--storage`` accepts ``sqlite:///path.db``, ``postgresql://user:pw@host/db``,
``mysql+pymysql://...``, ``journal:///path.log`` or a bare path (``*.db``/``*.sqlite`` ->
SQLite, ``*.log``/``*.journal`` -> journal file). Without it the study's output directory
holds ``study.db`` (one worker) or ``journal.log`` (``--workers N > 1``); an existing one
is reused so that a rerun continues the same study.

One-time marks (:func:`take_mark`: "this worker, and no other, queues these grid points
again") live beside the studies, never as studies: a table ``fss_sweep_marks`` in a
database storage, files in ``JOURNAL.marks/`` beside a journal file. Optuna, ``optuna
studies`` and optuna-dashboard see only the real studies.
"""

from __future__ import annotations

import hashlib
import os
import re
import weakref
from pathlib import Path

import optuna

from fss.errors import ConfigError

RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb")
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
DEFAULT_SQLITE = "study.db"
DEFAULT_JOURNAL = "journal.log"


def _scheme(url: str) -> str | None:
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", url)
    return m.group(1).split("+")[0].lower() if m else None


def hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def normalize_storage(url: str) -> str:
    """A user's ``--storage`` value -> ``sqlite:///...``, an RDB URL or ``journal:///...``."""
    url = str(url).strip()
    scheme = _scheme(url)
    if scheme is None:
        p = Path(url)
        if p.suffix.lower() in JOURNAL_SUFFIXES:
            return f"journal:///{p.resolve()}"
        if p.suffix.lower() in SQLITE_SUFFIXES:
            return f"sqlite:///{p.resolve()}"
        raise ConfigError(
            f"--storage {url}: a path must end in .db/.sqlite (SQLite) or .log/.journal (journal file), "
            f"or give a URL (sqlite:///, postgresql://, mysql://, journal:///)."
        )
    if scheme == "journal" or scheme in RDB_SCHEMES:
        return url
    raise ConfigError(
        f"--storage {hide_password(url)}: unknown scheme '{scheme}'; use sqlite:///, postgresql://, mysql:// "
        f"or a journal file path ending in .log."
    )


def is_journal(url: str) -> bool:
    return _scheme(url) == "journal"


def is_sqlite(url: str) -> bool:
    return _scheme(url) == "sqlite"


def local_path(url: str) -> Path | None:
    """The file of a SQLite or journal storage (None for a server)."""
    if is_journal(url):
        return Path(url[len("journal://"):])
    if is_sqlite(url):
        rest = url.split("://", 1)[1]
        return Path(rest[1:]) if rest.startswith("/") else None
    return None


def default_storage(output: Path, workers: int) -> str:
    """The study's default storage in its output directory (see the module docstring)."""
    db, journal = Path(output) / DEFAULT_SQLITE, Path(output) / DEFAULT_JOURNAL
    if workers > 1:
        if db.exists() and not journal.exists():
            raise ConfigError(
                f"this study lives in the SQLite file {db}, which is for one worker; rerun with --workers 1, "
                f"or start a new study with --storage {journal} for several workers."
            )
        return f"journal:///{journal.resolve()}"
    if journal.exists():
        return f"journal:///{journal.resolve()}"
    return f"sqlite:///{db.resolve()}"


MARKS_TABLE = "fss_sweep_marks"
_MARK_DIRS: "weakref.WeakKeyDictionary[object, Path]" = weakref.WeakKeyDictionary()  # journal storage -> marks dir


def marks_dir(journal: Path) -> Path:
    """The folder of a journal storage's one-time marks."""
    return journal.with_name(journal.name + ".marks")


def take_mark(storage, study_name: str, mark: str) -> bool:
    """Record the one-time mark ``mark`` of study ``study_name``: True for exactly one caller,
    however many processes or machines ask at once (a unique row insert in a database, an
    exclusive file creation beside a journal)."""
    digest = hashlib.sha256(f"{study_name}\0{mark}".encode()).hexdigest()[:32]
    if isinstance(storage, optuna.storages.RDBStorage):
        return _insert_mark(storage.engine, study_name, digest)
    directory = _MARK_DIRS.get(storage)
    if directory is None:
        raise TypeError(f"{type(storage).__name__} was not opened by open_storage; one-time marks need its location")
    directory.mkdir(exist_ok=True)
    try:
        os.close(os.open(directory / digest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        return False
    return True


def _marks_table():
    import sqlalchemy as sa  # heavy: PostgreSQL storages only

    return sa.Table(MARKS_TABLE, sa.MetaData(), sa.Column("study_name", sa.String(512), nullable=False),
                    sa.Column("mark", sa.String(32), primary_key=True))


def _insert_mark(engine, study_name: str, digest: str) -> bool:
    import sqlalchemy as sa  # heavy: PostgreSQL storages only

    table = _marks_table()
    try:
        table.create(engine, checkfirst=True)
    except sa.exc.SQLAlchemyError:  # another worker created it between the check and the CREATE
        if not sa.inspect(engine).has_table(MARKS_TABLE):
            raise
    try:
        with engine.begin() as conn:
            conn.execute(table.insert().values(study_name=study_name[:512], mark=digest))
    except sa.exc.IntegrityError:
        return False
    return True


def _create_sqlite_schema(path: Path, connect_args: dict) -> None:
    """Create a new SQLite storage whole or not at all.

    Optuna creates its tables one statement at a time, so a process killed meanwhile left a
    file that every later open refused ("table ... already exists"). The schema is built in a
    temporary file beside ``path`` and linked into place only if ``path`` still does not exist.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}", engine_kwargs={"connect_args": connect_args})
        storage.engine.dispose()
        try:
            os.link(tmp, path)  # atomic, and never replaces a storage another process created meanwhile
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


def open_storage(url: str, *, create_dirs: bool = False):
    """The Optuna storage behind ``url``; anything that prevents opening it is one line."""
    shown = hide_password(url)
    path = local_path(url)
    if path is not None:
        if create_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
        if not path.parent.is_dir():
            raise ConfigError(f"cannot open storage {shown}: the directory {path.parent} does not exist; create it or "
                              f"choose another --storage.")
        if path.exists() and not path.is_file():
            raise ConfigError(f"cannot open storage {shown}: {path} is not a file; choose another --storage.")
    try:
        if is_journal(url):
            from optuna.storages.journal import JournalFileBackend, JournalStorage  # optional: journal storages only

            storage = JournalStorage(JournalFileBackend(str(path)))
            _MARK_DIRS[storage] = marks_dir(path)
            return storage
        connect_args = {"timeout": 60} if is_sqlite(url) else {"connect_timeout": 10}
        if is_sqlite(url) and path is not None and not path.exists():
            _create_sqlite_schema(path, connect_args)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": connect_args})
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        raise ConfigError(f"cannot open storage {shown}: the database driver '{exc.name}' is not installed; "
                          f"install it (psycopg[binary] for postgresql://, pymysql for mysql+pymysql://) in this environment.") from None
    except Exception as exc:  # noqa: BLE001 - any failure to connect or read is a user error here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"cannot open storage {shown}: {type(exc).__name__}: {first}; check the URL, "
                          f"the server and the credentials.") from None
