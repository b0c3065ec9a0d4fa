"""Parses a /metrics exposition with the Prometheus project's own Python
client, independently of the Rust library that wrote it.

    python3 metrics_parse.py prometheus|openmetrics FILE

The OpenMetrics parser is strict (it refuses a missing `# EOF`, a unit the
name does not end with, a malformed sample). Prints JSON: one object per
family with its name, type, help, unit and samples ([name, labels, value,
exemplar labels or null]).
"""

import json
import sys

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as prometheus_families


def main():
    kind, path = sys.argv[1], sys.argv[2]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    parse = {"prometheus": prometheus_families, "openmetrics": openmetrics_families}[kind]
    families = [
        {
            "name": family.name,
            "type": family.type,
            "help": family.documentation,
            "unit": family.unit,
            "samples": [
                [s.name, s.labels, s.value, s.exemplar.labels if s.exemplar else None]
                for s in family.samples
            ],
        }
        for family in parse(text)
    ]
    json.dump(families, sys.stdout)


if __name__ == "__main__":
    main()
