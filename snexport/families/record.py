"""Record the architecture facts of every known name into ``known.json``, from the meta-device path.

    python -m snexport.families.record            # rewrite snexport/families/known.json
    python -m snexport.families.record --check    # exit 1 (naming them) if any record differs from a fresh build

Known names: every alias of every family (DeiT, DeiT-III, ViT, Swin, ResNet), the timm names they stand for, and the
bundled demo families. ``describe_anchor`` answers these from the file without importing torch or timm (``snexport
plan`` in well under a second instead of the seconds that import costs); any other name still goes through a
meta-device build. Run it after changing a family adapter, AnchorSpec or the FLOPs convention, or upgrading timm:
tests/test_plan_fast.py fails until the records equal the meta-device facts again.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata

from snexport.families import demo
from snexport.families.registry import (FAMILIES, KNOWN_FILE, describe_anchor, record_fields, spec_from_record,
                                        spec_to_record)


def known_names() -> list[str]:
    """Aliases, their timm names and the demo names, in a stable order."""
    names: list[str] = []
    for family in FAMILIES.values():
        for alias, timm_name in family.aliases().items():
            names += [alias, timm_name]
    names += list(demo.DEMO_KWARGS)
    return list(dict.fromkeys(names))


def fresh_records(names: list[str]) -> dict[str, dict]:
    return {name: spec_to_record(describe_anchor(name, recorded=False)) for name in names}


def write_records(records: dict[str, dict]) -> None:
    data = {
        "about": "Architecture facts (snexport.records.AnchorSpec) per known name, made by "
                 "`python -m snexport.families.record` from meta-device builds; read by "
                 "snexport.families.registry.describe_anchor so that plans need no torch/timm import.",
        "timm": metadata.version("timm"),
        "torch": metadata.version("torch"),
        "fields": record_fields(),
        "specs": records,
    }
    # One line per name: a diff after regenerating shows which names changed.
    head = json.dumps({k: v for k, v in data.items() if k != "specs"}, indent=1)[:-2]
    specs = ",\n".join(f"  {json.dumps(n)}: {json.dumps(r)}" for n, r in records.items())
    KNOWN_FILE.write_text(f"{head},\n \"specs\": {{\n{specs}\n }}\n}}\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare the records with fresh builds, write nothing")
    args = parser.parse_args(argv)
    records = fresh_records(known_names())
    if args.check:
        try:
            stored = json.loads(KNOWN_FILE.read_text(encoding="utf-8"))["specs"]
        except (OSError, ValueError, KeyError):
            stored = {}
        stale = [n for n, r in records.items() if n not in stored or spec_from_record(stored[n]) != spec_from_record(r)]
        if stale:
            print(f"records differ from the meta-device facts for: {', '.join(stale)}; "
                  "run `python -m snexport.families.record`", file=sys.stderr)
            return 1
        print(f"{len(records)} records match the meta-device facts")
        return 0
    write_records(records)
    print(f"wrote {len(records)} records to {KNOWN_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
