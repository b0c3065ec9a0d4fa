"""Checks shopstream's Avro against an independent implementation (fastavro).

Usage: python3 tests/avro_interop.py SCHEMAS_DIR SAMPLES_DIR

1. Every schemas/**/*.avsc parses in fastavro.
2. Every SAMPLES_DIR/<name>.avro (single-object encoded by shopstream) has the
   C3 01 magic and the CRC-64-AVRO fingerprint fastavro computes for one of the
   schemas, decodes with that schema alone, and equals SAMPLES_DIR/<name>.json
   (the same event in shopstream's JSON form).
Exits non-zero with a message on the first disagreement.
"""
import datetime
import io
import json
import pathlib
import sys
import uuid

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def plain(value):
    """fastavro's logical types back to the JSON form's plain values."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime.datetime):
        return (value - EPOCH) // datetime.timedelta(milliseconds=1)
    return value


def main(schemas_dir, samples_dir):
    by_fingerprint = {}
    files = sorted(pathlib.Path(schemas_dir).glob("*/*.avsc"))
    if not files:
        sys.exit(f"no schemas under {schemas_dir}")
    for path in files:
        schema = fastavro.parse_schema(json.loads(path.read_text()))
        canonical = to_parsing_canonical_form(schema)
        fp = fingerprint(canonical, "CRC-64-AVRO")
        # fastavro's hex is already the little-endian byte order that
        # single-object encoding writes.
        by_fingerprint[bytes.fromhex(fp)] = (path, schema)
    samples = sorted(pathlib.Path(samples_dir).glob("*.avro"))
    if not samples:
        sys.exit(f"no samples under {samples_dir}")
    for sample in samples:
        data = sample.read_bytes()
        if data[:2] != b"\xc3\x01":
            sys.exit(f"{sample.name}: no single-object magic, starts {data[:2].hex()}")
        if data[2:10] not in by_fingerprint:
            sys.exit(f"{sample.name}: fingerprint {data[2:10].hex()} matches no schema file")
        path, schema = by_fingerprint[data[2:10]]
        body = io.BytesIO(data[10:])
        record = plain(fastavro.schemaless_reader(body, schema))
        if body.read():
            sys.exit(f"{sample.name}: bytes left after the record")
        expected = json.loads(sample.with_suffix(".json").read_text())
        if record != expected:
            sys.exit(f"{sample.name} ({path}): fastavro read {record}, JSON form is {expected}")
    print(f"fastavro: {len(files)} schemas parsed, {len(samples)} samples decoded and equal")


if __name__ == "__main__":
    main(*sys.argv[1:])
