"""Runs SQL statements in order in one fresh ClickHouse 26.9 session (chdb,
in process) and prints each answer.

    python3 chdb_session.py < statements.json

stdin: a JSON list of statements. stdout: a JSON list with each answer as
TabSeparated text. Exits 1 naming the first statement refused and why.
"""

import json
import sys
import tempfile

import chdb.session


def main():
    statements = json.load(sys.stdin)
    session = chdb.session.Session(tempfile.mkdtemp())
    answers = []
    for statement in statements:
        try:
            answers.append(session.query(statement, "TabSeparated").data())
        except Exception as error:  # chdb raises one exception type for all
            print(f"refused: {statement}\n{str(error).strip()}", file=sys.stderr)
            sys.exit(1)
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
