"""Generate the demo's customer-service dataset (deterministic; no torch).

Every answer follows one house style that a base model does not know and that a program
can check (:func:`style_checks`):

* it opens with ``Thanks for contacting Nimbus Support!``;
* it names the task: ``Here's how to <task>:``;
* it gives numbered steps (``1.``, ``2.``, ...) one per line;
* it closes with the sign-off ``— Nimbus Care Team``.

Questions combine products, tasks and phrasings. The held-out split uses product/task
combinations that never occur in training, so the tuned model must carry the style over
to questions it has not seen.

Run ``python -m trilora.train.demo_data`` to rewrite the bundled files, ``--check`` to
verify that they are exactly what this script produces (a test does the same).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from trilora.io import atomic_write_text

__all__ = ["DATA_DIR", "generate", "style_checks", "style_score"]

DATA_DIR = Path(__file__).with_name("demo_dataset")
SEED = 20261125
GREETING = "Thanks for contacting Nimbus Support!"
SIGN_OFF = "— Nimbus Care Team"

PRODUCTS = [
    "Nimbus Router X2",
    "Nimbus Cam Mini",
    "Nimbus Thermostat",
    "Nimbus Doorbell",
    "Nimbus Smart Plug",
    "Nimbus Speaker One",
    "Nimbus Mesh Point",
    "Nimbus Air Sensor",
]

# task -> (phrase after "how to", steps with {p} for the product)
TASKS = {
    "reset": (
        "reset your {p}",
        [
            "Unplug the {p} and wait ten seconds.",
            "Hold the reset button while you plug it back in.",
            "Release the button when the light blinks blue.",
            "Set it up again in the Nimbus app.",
        ],
    ),
    "firmware": (
        "update the firmware of your {p}",
        [
            "Open the Nimbus app and select the {p}.",
            "Tap Settings, then Firmware.",
            "Tap Update and keep the device powered on.",
        ],
    ),
    "wifi": (
        "connect your {p} to a new Wi-Fi network",
        [
            "Open the Nimbus app and select the {p}.",
            "Tap Settings, then Network.",
            "Choose the new network and enter its password.",
            "Wait for the light to turn solid white.",
        ],
    ),
    "rename": (
        "rename your {p}",
        [
            "Open the Nimbus app and select the {p}.",
            "Tap the pencil icon next to its name.",
            "Type the new name and tap Save.",
        ],
    ),
    "share": (
        "share your {p} with a family member",
        [
            "Open the Nimbus app and select the {p}.",
            "Tap Settings, then Sharing.",
            "Enter their email address and tap Invite.",
        ],
    ),
    "offline": (
        "bring your {p} back online",
        [
            "Check that your router is working.",
            "Restart the {p} by unplugging it for ten seconds.",
            "Move it closer to the router if the light stays red.",
        ],
    ),
    "warranty": (
        "claim the warranty for your {p}",
        [
            "Find the serial number on the back of the {p}.",
            "Go to nimbus.example/warranty and fill in the form.",
            "Attach a photo of your receipt and submit.",
        ],
    ),
    "return": (
        "return your {p}",
        [
            "Go to nimbus.example/returns within 30 days of delivery.",
            "Enter your order number and choose the {p}.",
            "Print the free label and drop the box at any post office.",
        ],
    ),
    "notifications": (
        "turn off notifications from your {p}",
        [
            "Open the Nimbus app and select the {p}.",
            "Tap Settings, then Notifications.",
            "Switch off the alerts you do not want.",
        ],
    ),
    "schedule": (
        "set a schedule for your {p}",
        [
            "Open the Nimbus app and select the {p}.",
            "Tap Schedules, then Add.",
            "Pick the days and times and tap Save.",
        ],
    ),
}

PHRASINGS = [
    "How do I {t} on my {p}?",
    "I can't figure out how to {t}. It's the {p}.",
    "What's the right way to {t} for the {p}?",
    "Can you help me {t}? I have a {p}.",
    "Quick question: how can I {t} with my {p}?",
    "My {p} needs this: I want to {t}. What should I do?",
]

# what the user says, per task
USER_TASK = {
    "reset": "reset it",
    "firmware": "update the firmware",
    "wifi": "connect it to my new Wi-Fi",
    "rename": "rename it",
    "share": "share it with my family",
    "offline": "get it back online",
    "warranty": "claim the warranty",
    "return": "return it",
    "notifications": "turn off its notifications",
    "schedule": "set a schedule",
}


def answer(task: str, product: str) -> str:
    phrase, steps = TASKS[task]
    lines = [GREETING, "", f"Here's how to {phrase.format(p=product)}:"]
    lines += [f"{i}. {s.format(p=product)}" for i, s in enumerate(steps, 1)]
    lines += ["", SIGN_OFF]
    return "\n".join(lines)


def question(task: str, product: str, phrasing: str) -> str:
    return phrasing.format(t=USER_TASK[task], p=product)


def generate(n_train: int = 320, n_heldout: int = 40) -> tuple[list[dict], list[dict]]:
    """``(train, heldout)`` records in the messages shape."""
    rng = random.Random(SEED)
    combos = [(t, p) for t in TASKS for p in PRODUCTS]
    rng.shuffle(combos)
    held_combos = combos[:14]
    train_combos = combos[14:]

    def records(pool: list[tuple[str, str]], n: int) -> list[dict]:
        items = [(t, p, ph) for t, p in pool for ph in PHRASINGS]
        rng.shuffle(items)
        return [
            {
                "messages": [
                    {"role": "user", "content": question(t, p, ph)},
                    {"role": "assistant", "content": answer(t, p)},
                ]
            }
            for t, p, ph in items[:n]
        ]

    return records(train_combos, n_train), records(held_combos, n_heldout)


def style_checks(text: str) -> dict[str, bool]:
    """The four marks of the house style in one answer."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    numbered = [line for line in lines if len(line) > 2 and line[0].isdigit() and line[1] == "."]
    return {
        "greeting": bool(lines) and lines[0] == GREETING,
        "task_line": any(
            line.startswith("Here's how to ") and line.endswith(":") for line in lines
        ),
        "numbered_steps": len(numbered) >= 2 and numbered[0].startswith("1."),
        "sign_off": bool(lines) and lines[-1] == SIGN_OFF,
    }


def style_score(text: str) -> float:
    """Fraction of the house-style marks present in ``text`` (0 to 1)."""
    checks = style_checks(text)
    return sum(checks.values()) / len(checks)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--check", action="store_true", help="verify the bundled files instead of writing them"
    )
    p.add_argument("--out", type=Path, default=DATA_DIR, help=f"folder (default: {DATA_DIR})")
    args = p.parse_args(argv)
    train, heldout = generate()
    files = {"train.jsonl": _jsonl(train), "heldout.jsonl": _jsonl(heldout)}
    if args.check:
        bad = [
            n
            for n, text in files.items()
            if not (args.out / n).is_file() or (args.out / n).read_text("utf-8") != text
        ]
        if bad:
            print(f"differs from the generator: {', '.join(bad)}", file=sys.stderr)
            return 1
        print("bundled demo data matches the generator")
        return 0

    for name, text in files.items():
        atomic_write_text(args.out / name, text)
    print(f"wrote {len(train)} train and {len(heldout)} held-out records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
