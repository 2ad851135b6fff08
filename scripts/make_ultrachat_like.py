"""Write a synthetic data set laid out and typed like HuggingFaceH4/ultrachat_200k, for measuring ``prepare``.

    python scripts/make_ultrachat_like.py /tmp/uc200k --rows 200000
    python scripts/make_ultrachat_like.py /tmp/uc50k --rows 50000 --shards 1

The directory looks like a ``huggingface-cli download`` of the real set: ``README.md`` with the ``configs``
block that names each split's files, and ``data/{split}-0000i-of-0000n-<hash>.parquet`` shards with the
columns ``prompt`` (str), ``prompt_id`` (sha256 hex of the prompt) and ``messages`` (a list of
``{content, role}`` structs, user first, alternating, ending on the assistant). ``--rows`` is the size of
``train_sft``; ``test_sft``, ``train_gen`` and ``test_gen`` get small fixed sizes. The text is random words
(seeded, so the same arguments give the same files); the number of turns and the message lengths are drawn
around ``--chars`` characters per conversation (the real set averages about 6 000).
"""

from __future__ import annotations

import argparse
import hashlib
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not which but "
         "they you one all their we can has more will would there about so what if when into other some time "
         "model data water energy history language music city garden system river light paper number story "
         "explain describe compare write list summarise why how because however therefore example example "
         "important different small large early recent simple complex quickly carefully people students "
         "research design process market health science travel kitchen recipe planet ocean mountain").split()
SCHEMA = pa.schema([
    ("prompt", pa.string()),
    ("prompt_id", pa.string()),
    ("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
])
SMALL_SPLITS = {"test_sft": 0.11, "train_gen": 1.0, "test_gen": 0.14}  # relative to train_sft, capped below


def _text(rng: random.Random, chars: int) -> str:
    words = rng.choices(WORDS, k=max(3, chars // 6))
    return " ".join(words).capitalize() + "."


def conversation(rng: random.Random, chars: int) -> dict:
    """One ultrachat-shaped row: 1-4 user/assistant exchanges, answers about four times the questions."""
    turns = rng.randint(1, 4)
    budget = max(40, int(rng.gauss(chars, chars / 3)))
    per_turn = budget // turns
    messages = []
    for _ in range(turns):
        messages.append({"content": _text(rng, per_turn // 5), "role": "user"})
        messages.append({"content": _text(rng, per_turn * 4 // 5), "role": "assistant"})
    prompt = messages[0]["content"]
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "messages": messages}


def write_split(out: Path, split: str, rows: int, shards: int, chars: int, seed: int) -> list[Path]:
    """Write ``rows`` rows of one split as ``shards`` Parquet files; returns their paths."""
    rng = random.Random(f"{seed}:{split}")
    paths = []
    per_shard = -(-rows // shards)
    for index in range(shards):
        count = min(per_shard, rows - index * per_shard)
        tag = hashlib.sha256(f"{seed}{split}{index}".encode()).hexdigest()[:16]
        path = out / "data" / f"{split}-{index:05d}-of-{shards:05d}-{tag}.parquet"
        with pq.ParquetWriter(path, SCHEMA) as writer:
            for start in range(0, count, 5000):  # bounded memory: one row group of at most 5000 rows at a time
                batch = [conversation(rng, chars) for _ in range(min(5000, count - start))]
                writer.write_table(pa.Table.from_pylist(batch, schema=SCHEMA))
        paths.append(path)
    return paths


def readme(splits: list[str]) -> str:
    configs = "".join(f"  - split: {split}\n    path: data/{split}-*\n" for split in splits)
    return (f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}---\n\n"
            "# Synthetic ultrachat_200k-shaped data (scripts/make_ultrachat_like.py)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="directory to create")
    parser.add_argument("--rows", type=int, default=200_000, help="rows in train_sft")
    parser.add_argument("--shards", type=int, default=3, help="Parquet shards for train_sft")
    parser.add_argument("--chars", type=int, default=2000, help="mean characters of text per conversation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    sizes = {"train_sft": args.rows} | {s: max(1, min(int(args.rows * f), 2000)) for s, f in SMALL_SPLITS.items()}
    for split, rows in sizes.items():
        shards = args.shards if split == "train_sft" else 1
        paths = write_split(args.out, split, rows, shards, args.chars, args.seed)
        size = sum(p.stat().st_size for p in paths)
        print(f"{split}: {rows} rows in {len(paths)} shard(s), {size / 1e6:.1f} MB", flush=True)
    (args.out / "README.md").write_text(readme(list(sizes)), encoding="utf-8")


if __name__ == "__main__":
    main()
