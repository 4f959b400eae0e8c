"""Write data/tiny_alpaca.jsonl, the built-in job's dataset: short instruction/output pairs.

Deterministic (fixed seed): rerunning it reproduces the committed file byte for byte.
Run from anywhere: python examples/tiny/make_data.py
"""

import json
import random
from pathlib import Path

WORDS = ["apple", "river", "cloud", "stone", "garden", "pencil", "window", "rocket", "forest", "candle",
         "bridge", "tiger", "planet", "button", "silver", "ladder"]
RECORDS = 128


def record(rng: random.Random, i: int) -> dict[str, str]:
    word = rng.choice(WORDS)
    kind = i % 5
    if kind == 0:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} is {a + b}."}
    if kind == 1:
        return {"instruction": "Write the word backwards.", "input": word,
                "output": f"{word} backwards is {word[::-1]}."}
    if kind == 2:
        return {"instruction": f"Write '{word}' in capital letters.", "input": "", "output": word.upper()}
    if kind == 3:
        return {"instruction": f"How many letters are in the word '{word}'?", "input": "",
                "output": f"The word '{word}' has {len(word)} letters."}
    numbers = rng.sample(range(1, 100), 4)
    return {"instruction": "Sort these numbers from smallest to largest.", "input": ", ".join(map(str, numbers)),
            "output": ", ".join(map(str, sorted(numbers)))}


def main() -> None:
    rng = random.Random(20261122)
    out = Path(__file__).resolve().parent / "data" / "tiny_alpaca.jsonl"
    out.write_text("".join(json.dumps(record(rng, i)) + "\n" for i in range(RECORDS)), encoding="utf-8")


if __name__ == "__main__":
    main()
