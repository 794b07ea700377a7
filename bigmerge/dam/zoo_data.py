"""DAM training data for the zoo's specialists: one jsonl per skill from the zoo's training streams.

    python -m bigmerge.dam.zoo_data ZOO [--examples 256] [--seed 7]

writes ZOO/dam-data/<skill>.jsonl (`{"text": prompt + answer}` per line) for every skill. The
items come from `zoo_tasks.train_stream`, which never yields a held-out evaluation item, with a
seed no zoo model was trained with.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bigmerge.eval import zoo_tasks


def write_zoo_data(
    zoo: str | Path, examples: int = 256, seed: int = 7, out: str | Path | None = None
) -> dict[str, Path]:
    """Write <skill>.jsonl into `out` (default ZOO/dam-data); returns {skill: path}."""
    out = Path(out) if out is not None else Path(zoo) / "dam-data"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for skill in zoo_tasks.SKILLS:
        stream = zoo_tasks.train_stream(skill, 10_000 + seed)
        p = out / f"{skill}.jsonl"
        lines = [json.dumps({"text": (it := next(stream)).prompt + it.answer}) for _ in range(examples)]
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[skill] = p
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("zoo")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args(argv)
    for skill, p in write_zoo_data(a.zoo, a.examples, a.seed).items():
        print(f"{skill}: {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
