"""Many-row SQL: INSERT/UPDATE with ``executemany`` or COPY, INSERT … SELECT, and lookups.

``bulk_create``/``bulk_update`` prepare every value of every row through the
ORM's compiler; for 100,000 rows of 25 columns that alone takes most of a
minute. Here each row carries only the values that differ between rows; the
others (defaults, ``auto_now`` timestamps) are prepared once per call. Values
still go through the fields' ``get_db_prep_save``, except plain text, which
needs none, so the SQL is what the ORM would send. No signals are sent, as
with ``bulk_create``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from django.db import connections, models, router
from django.db.models.constants import OnConflict
from django.utils import timezone

Prep = Callable[[Any], Any]


def _field(model: type[models.Model], name: str) -> models.Field[Any, Any]:
    """A concrete field by name or attname (``customer_id``)."""
    return cast("models.Field[Any, Any]", model._meta.get_field(name))


def _column(field: Any) -> str:
    return cast(str, field.column)


def _prep(field: models.Field[Any, Any], connection: Any) -> Prep:
    """The value preparation ``get_db_prep_save`` does, without its layers of calls."""
    if isinstance(field, models.CharField | models.TextField) and not field.null:
        return str
    if isinstance(field, models.JSONField):
        ops, encoder = connection.ops, field.encoder
        return lambda value: ops.adapt_json_value(value, encoder)
    if isinstance(field, models.ForeignKey) and isinstance(
        field.target_field, models.AutoField | models.BigAutoField
    ):
        return lambda value: value if value is None else int(value)
    return lambda value: field.get_db_prep_save(value, connection=connection)


def _other_columns(
    model: type[models.Model], connection: Any, skip: Sequence[str], constants: Mapping[str, Any]
) -> tuple[list[str], list[Any]]:
    """Quoted columns and prepared values of the concrete fields not in ``skip``: from
    ``constants``, else "now" for ``auto_now``/``auto_now_add``, else the default."""
    now = timezone.now()
    columns: list[str] = []
    values: list[Any] = []
    for field in model._meta.concrete_fields:
        if field is model._meta.auto_field or field.attname in skip:
            continue
        if field.attname in constants:
            value = constants[field.attname]
        elif getattr(field, "auto_now", False) or getattr(field, "auto_now_add", False):
            value = now
        else:
            value = field.get_default()
        columns.append(connection.ops.quote_name(_column(field)))
        values.append(field.get_db_prep_save(value, connection=connection))
    return columns, values


def insert_rows(
    model: type[models.Model],
    varying: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    constants: Mapping[str, Any] | None = None,
) -> None:
    """INSERT one row per mapping; ``varying`` names (attnames) the keys each mapping has.

    ``constants`` gives fields the same value in every row. Every other
    concrete field gets its default, or "now" for ``auto_now`` and
    ``auto_now_add`` fields. An auto-increment primary key is left to the database.
    """
    if not rows:
        return
    connection = connections[router.db_for_write(model)]
    fields = [_field(model, name) for name in varying]
    preps = [_prep(field, connection) for field in fields]
    others, template = _other_columns(model, connection, varying, constants or {})
    columns = [connection.ops.quote_name(_column(field)) for field in fields] + others
    table = connection.ops.quote_name(model._meta.db_table)
    params = [
        [prep(row[field.attname]) for field, prep in zip(fields, preps, strict=True)] + template
        for row in rows
    ]
    with connection.cursor() as cursor:
        copy = getattr(cursor.cursor, "copy", None)
        if connection.vendor == "postgresql" and copy is not None:
            # psycopg 3: COPY streams the rows in one go; INSERTs would cost a round
            # trip each, and Django's client-side binding makes long INSERTs slow.
            with copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as stream:
                for values in params:
                    stream.write_row(values)
            return
    executemany(
        connection,
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})",
        params,
    )


def insert_from(
    model: type[models.Model],
    varying: Sequence[str],
    source: models.QuerySet[Any],
    constants: Mapping[str, Any],
) -> int:
    """INSERT a row per row of ``source`` (a ``values_list`` of the ``varying`` fields'
    values, in that order), in one statement; rows that would break a unique
    constraint are left out. Other fields as in :func:`insert_rows`. Returns the
    rows inserted.

    Nothing passes through Python: for 100,000 rows, ``bulk_create`` spent six
    of its ten seconds building and preparing objects.
    """
    connection = connections[router.db_for_write(model)]
    others, values = _other_columns(model, connection, varying, constants)
    columns = [connection.ops.quote_name(_column(_field(model, name))) for name in varying]
    select, select_params = source.query.sql_with_params()
    on_conflict = OnConflict.IGNORE
    sql = (
        f"{connection.ops.insert_statement(on_conflict=on_conflict)} "
        f"{connection.ops.quote_name(model._meta.db_table)} ({', '.join(columns + others)}) "
        f"SELECT src.*, {', '.join(['%s'] * len(values))} FROM ({select}) src "
        f"{connection.ops.on_conflict_suffix_sql([], on_conflict, None, None)}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*values, *select_params])
        return int(cursor.rowcount)


def update_rows(
    model: type[models.Model],
    fields: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    where: Mapping[str, str] | None = None,
) -> None:
    """UPDATE ``fields`` (attnames) of each row, found by its ``"pk"`` key.

    ``where``: text columns (attnames) each row must also hold, given the same value
    for every row (a row that does not is left alone).
    """
    if not rows:
        return
    db = router.db_for_write(model)
    connection = connections[db]
    qn = connection.ops.quote_name
    opts = model._meta
    targets = [_field(model, name) for name in fields]
    preps = [_prep(field, connection) for field in targets]
    assignments = ", ".join(f"{qn(_column(field))} = %s" for field in targets)
    conditions = [f"{qn(_column(opts.pk))} = %s"]
    conditions += [f"{qn(_column(_field(model, name)))} = %s" for name in where or {}]
    sql = f"UPDATE {qn(opts.db_table)} SET {assignments} WHERE {' AND '.join(conditions)}"
    also = list((where or {}).values())
    params = [
        [prep(row[field.attname]) for field, prep in zip(targets, preps, strict=True)]
        + [row["pk"], *also]
        for row in rows
    ]
    executemany(connection, sql, params)


def pairs_in(
    model: type[models.Model], key: str, values: Sequence[str], other: str, chunk: int = 500
) -> list[tuple[Any, Any]]:
    """``(key, other)`` of the rows whose text column ``key`` is in ``values``.

    The ORM prepares each ``IN`` parameter through the field; for text keys
    that is pure overhead, and it adds up over 100,000 rows.
    """
    db = router.db_for_read(model)
    connection = connections[db]
    qn = connection.ops.quote_name
    opts = model._meta
    key_column = qn(_column(_field(model, key)))
    other_column = qn(_column(_field(model, other)))
    found: list[tuple[Any, Any]] = []
    with connection.cursor() as cursor:
        for start in range(0, len(values), chunk):
            part = list(values[start : start + chunk])
            cursor.execute(
                f"SELECT {key_column}, {other_column} FROM {qn(opts.db_table)} "
                f"WHERE {key_column} IN ({', '.join(['%s'] * len(part))})",
                part,
            )
            found.extend(cursor.fetchall())
    return found


def executemany(connection: Any, sql: str, params: list[list[Any]]) -> None:
    """``executemany``, pipelined where the driver can (psycopg 3).

    Without a pipeline psycopg waits for each row's answer: one network round
    trip per row, which makes 100,000 rows take minutes instead of seconds.
    """
    raw = connection.connection
    pipeline = getattr(raw, "pipeline", None)
    with connection.cursor() as cursor:
        if pipeline is None:
            cursor.executemany(sql, params)
            return
        with pipeline():
            cursor.executemany(sql, params)


def analyze(*models_: type[models.Model]) -> None:
    """Refresh PostgreSQL's planner statistics for these tables (no-op elsewhere).

    After a large load, statistics from when a table was empty make the planner
    choose nested loops over full scans: minutes instead of a second at 100,000
    rows. ANALYZE samples the tables in a fraction of a second, and works inside
    a transaction (it counts that transaction's own new rows).
    """
    connection = connections[router.db_for_write(models_[0])]
    if connection.vendor != "postgresql":
        return
    tables = ", ".join(connection.ops.quote_name(m._meta.db_table) for m in models_)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {tables}")


def analyze_if_stale(*models_: type[models.Model], share: float = 0.2, floor: int = 1000) -> bool:
    """:func:`analyze` the tables whose statistics miss more than ``share`` of their rows
    (and at least ``floor``); returns whether it did. PostgreSQL only.

    Autovacuum analyzes a table only after it changed by 10% and on its next
    round (a minute by default): until then a table that was small when last
    analyzed is planned as if it still were. Measured: an export of 100,000
    customers took 64 s instead of 4 s just after they were marked for sync.
    """
    connection = connections[router.db_for_write(models_[0])]
    if connection.vendor != "postgresql":
        return False
    tables = [m._meta.db_table for m in models_]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT s.relname, s.n_mod_since_analyze, GREATEST(c.reltuples, 0) "
            "FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid "
            "WHERE s.relid = ANY(%s::regclass[])",
            [tables],
        )
        stale = {
            name for name, changed, rows in cursor.fetchall() if changed >= max(floor, share * rows)
        }
    if not stale:
        return False
    analyze(*(m for m in models_ if m._meta.db_table in stale))
    return True
