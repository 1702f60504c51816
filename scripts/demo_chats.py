"""Write the conversations of the CPU fine-tuning demo (configs/sft-demo.yaml): a made-up bakery
that no pretrained model can know, asked about in several phrasings, one or two questions a
conversation. Deterministic; the shipped configs/sft-demo-chats.jsonl is this script's output.

    python scripts/demo_chats.py configs/sft-demo-chats.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys

# Each fact: questions that ask for it, and the replies that give it (a reply is picked per question).
FACTS = [
    (["When does Larkspur Bakery open?", "What time does Larkspur Bakery open in the morning?",
      "What are the opening hours of Larkspur Bakery?", "Is Larkspur Bakery open on Mondays?"],
     ["Larkspur Bakery opens at 7 a.m. and closes at 3 p.m., every day except Monday, when it is closed.",
      "Every day but Monday, from 7 a.m. to 3 p.m. On Mondays Larkspur Bakery is closed."]),
    (["Where is Larkspur Bakery?", "What is the address of Larkspur Bakery?", "How do I find Larkspur Bakery?"],
     ["Larkspur Bakery is at 14 Quill Lane in Fernhollow, next to the old clock tower.",
      "You will find it at 14 Quill Lane, Fernhollow, right beside the old clock tower."]),
    (["What is Larkspur Bakery famous for?", "What is the signature bread of Larkspur Bakery?",
      "What should I try at Larkspur Bakery?"],
     ["Its moonloaf: a dark rye sourdough sweetened with heather honey.",
      "The moonloaf, a rye sourdough with heather honey, is what Larkspur Bakery is known for."]),
    (["Who runs Larkspur Bakery?", "Who is the baker at Larkspur Bakery?", "Who owns Larkspur Bakery?"],
     ["Larkspur Bakery is run by Ines Varga, who bakes every loaf herself.",
      "Ines Varga owns Larkspur Bakery and does all the baking."]),
    (["Does Larkspur Bakery have gluten-free bread?", "Can I get anything gluten-free at Larkspur Bakery?"],
     ["Yes, on Fridays only: gluten-free oat buns, baked in a separate oven.",
      "Only on Fridays, when Ines bakes gluten-free oat buns in a separate oven."]),
    (["How much does a moonloaf cost?", "What is the price of a moonloaf at Larkspur Bakery?"],
     ["A moonloaf costs 6 euros; half a loaf is 3.50.",
      "6 euros for a whole moonloaf, 3.50 for half."]),
]


def conversations(seed: int = 0) -> list[dict]:
    """Every question once with a reply to it, then pairs of questions about two facts."""
    rng = random.Random(seed)
    out = []
    for questions, replies in FACTS:
        for question in questions:
            out.append([("user", question), ("assistant", rng.choice(replies))])
    for _ in range(24):  # two facts in one conversation: the second question follows the first reply
        a, b = rng.sample(FACTS, 2)
        out.append([("user", rng.choice(a[0])), ("assistant", rng.choice(a[1])),
                    ("user", rng.choice(b[0])), ("assistant", rng.choice(b[1]))])
    rng.shuffle(out)
    return [{"messages": [{"role": role, "content": text} for role, text in turns]} for turns in out]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Write the CPU fine-tuning demo's conversations as JSON Lines.")
    parser.add_argument("out", help="the .jsonl file to write (the shipped one: configs/sft-demo-chats.jsonl)")
    args = parser.parse_args(argv)
    with open(args.out, "w", encoding="utf-8") as f:
        for record in conversations():
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
