"""Replays what the binaries sent a ClickHouse 18.16 server on ClickHouse
26.9 (chdb, in process) and compares the answers.

    python3 clickhouse_replay.py URL DATABASE

URL is a private 18.16 server that logged every query (`log_queries`) and
served one run on DATABASE. From its `system.query_log`:

- every statement sent that is not a query or a row insert (CREATE, DROP,
  ALTER, INSERT ... SELECT, OPTIMIZE) runs on 26.9 exactly as sent, in the
  run's database once it exists, in the order the statements finished on
  18.16 (the schema loaded below, listed by name, is run until nothing
  more applies);
- every SELECT sent is answered by both servers over the same rows: 18.16's
  schema (`SHOW CREATE`) and its rows (moved as `Native`) are loaded into a
  second database on 26.9, and each answer is compared as sorted TSV lines.

Prints JSON: {"version", "sent", "queries", "rows" (moved), "lines" (of
equal answers), "refused": [[statement, error]], "differ": [[query, answer
on 18.16, answer on 26.9]]}.
"""

import json
import os
import re
import sys
import tempfile
import urllib.parse
import urllib.request

import chdb.session


def old(url, sql, database=None):
    """`sql`'s answer from the 18.16 server, as bytes."""
    params = {"database": database} if database else {}
    request = urllib.request.Request(
        url + "/?" + urllib.parse.urlencode(params), data=sql.encode()
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.read()


def run_all(session, statements, database):
    """Runs `statements` until none more succeeds, each in `database` once
    it exists (as the binaries send them: their client names it, and the
    analytics job's OPTIMIZE names its table alone); returns those refused."""
    pending, errors = list(statements), {}
    while pending:
        left = []
        for statement in pending:
            try:
                session.query(f"USE `{database}`")
            except Exception:  # not created yet
                pass
            try:
                session.query(statement)
            except Exception as error:  # chdb raises one exception type for all
                left.append(statement)
                errors[statement] = str(error).strip()
        if len(left) == len(pending):
            break
        pending = left
    return [[s, errors[s]] for s in pending]


def unformatted(query):
    return re.sub(r"\s+FORMAT\s+\w+\s*$", "", query.strip())


def main():
    url, database = sys.argv[1], sys.argv[2]
    old(url, "SYSTEM FLUSH LOGS")
    logged = old(
        url,
        # In the order they finished: as stored, read by one thread. 18.16
        # logs times to the second, and an ORDER BY shuffles the statements
        # of one second (a view before its table, a CREATE DATABASE after
        # the worker's CREATE DATABASE IF NOT EXISTS); the log's parts keep
        # them in the order they were written, ties included.
        "SELECT query FROM system.query_log WHERE type = 2 "
        "SETTINGS max_threads = 1 FORMAT JSONEachRow",
    ).decode()
    statements = [json.loads(line)["query"] for line in logged.splitlines()]
    # What the test itself asked of the server's own tables is not the run's;
    # the analytics job's look at the inserts still running is.
    statements = [s for s in statements
                  if ("system." not in s or "FROM system.processes" in s) and not s.startswith("SYSTEM")]
    # Every query but the one asking for the server's version, which
    # differs by design (the analytics job chooses its inserts by it).
    queries = list(dict.fromkeys(
        s for s in statements
        if s.lstrip().upper().startswith("SELECT") and unformatted(s) != "SELECT version()"
    ))
    sent = [
        s
        for s in statements
        if not s.lstrip().upper().startswith(("SELECT", "SHOW", "DESCRIBE", "EXISTS"))
        and not re.search(r"\bFORMAT\s+\w+\s*$", s.strip())
    ]

    session = chdb.session.Session(tempfile.mkdtemp())
    version = session.query("SELECT version()", "TabSeparated").data().strip()
    refused = run_all(session, sent, database)

    # The end state: 18.16's schema and rows, in a database of their own.
    answers_db = database + "_answers"

    def there(statement):
        return statement.replace(f"`{database}`.", f"`{answers_db}`.").replace(
            f"{database}.", f"{answers_db}."
        )

    session.query(f"CREATE DATABASE `{answers_db}`")
    objects = old(
        url,
        f"SELECT name, engine FROM system.tables WHERE database = '{database}' FORMAT JSONEachRow",
    ).decode()
    objects = [json.loads(line) for line in objects.splitlines()]
    schema = [
        old(url, f"SHOW CREATE TABLE `{database}`.`{o['name']}` FORMAT TabSeparatedRaw").decode().strip()
        for o in objects
    ]
    refused += run_all(session, [there(s) for s in schema], answers_db)
    rows = 0
    files = tempfile.mkdtemp()
    for o in objects:
        if o["engine"].endswith("View"):
            continue
        path = os.path.join(files, o["name"] + ".native")
        with open(path, "wb") as f:
            f.write(old(url, f"SELECT * FROM `{database}`.`{o['name']}` FORMAT Native"))
        try:
            session.query(
                f"INSERT INTO `{answers_db}`.`{o['name']}` SELECT * FROM file('{path}', 'Native')"
            )
            rows += int(session.query(f"SELECT count() FROM `{answers_db}`.`{o['name']}`", "TabSeparated").data())
        except Exception as error:
            refused.append([f"loading {o['name']}", str(error).strip()])

    differ, lines = [], 0
    session.query(f"USE `{answers_db}`")
    for query in queries:
        sql = unformatted(query)
        try:
            then = sorted(old(url, sql + " FORMAT TabSeparated", database).decode().splitlines())
        except Exception as error:
            then = {"error": str(error)}
        try:
            now = sorted(session.query(there(sql), "TabSeparated").data().splitlines())
        except Exception as error:
            now = {"error": str(error).strip()}
        if then != now:
            differ.append([query, then, now])
        elif isinstance(now, list):
            lines += len(now)
    json.dump(
        {
            "version": version,
            "sent": len(sent),
            "queries": len(queries),
            "rows": rows,
            "lines": lines,
            "refused": refused,
            "differ": differ,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
