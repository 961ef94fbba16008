"""Write the small example data sets of the JSON-extraction and support-answer recipes (seeded, reproducible).

    python scripts/make_recipe_data.py            # -> recipes/data/
    python scripts/make_recipe_data.py --out DIR

- recipes/data/orders_{train,heldout}.jsonl: order-confirmation emails to extract into JSON. Each row
  carries `answer_schema`, the recipe's schema with `const`s holding the right values, so a schema
  reward checks the extracted values as well as the shape.
- recipes/data/support_{train,heldout}.jsonl (held out by question): customer questions with the policy
  passages retrieved
  for them (`passages`, ids `doc-N`), in Bedrock's `messages` form; answers should cite them as [doc-N].

These are starting points that show the row format; bring your own rows for real training.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "recipes" / "data"

FIRST_NAMES = [
    "Ana", "Ben", "Chloé", "Dev", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Jia", "Kofi", "Lena"
]
LAST_NAMES = ["Okafor", "Schmidt", "Nakamura", "Silva", "Novak", "Haddad", "Larsen", "Moreau", "Patel", "Kim"]
PRODUCTS = ["USB-C dock", "noise-cancelling headphones", "standing desk", "espresso grinder",
            "trail backpack",
            "e-reader", "monitor arm", "mechanical keyboard", "air purifier", "camping stove"]
CURRENCIES = {"USD": "$", "EUR": "€", "GBP": "£"}
EMAIL_TEMPLATES = [
    "Subject: Your order {order_id} is confirmed\n\nHi "
    "{customer},\nthanks for shopping with us! We received your "
    "order {order_id} for {count} x {product}. Total charged: "
    "{symbol}{total}. Expected delivery: {date_text}.",
    "Order confirmation\nCustomer: {customer}\nReference: {order_id}\nItems: {product} (qty {count})\n"
    "Amount: {total} {currency}\nEstimated arrival: {date_text}",
    "Dear {customer}, your purchase ({count} {product}) has shipped under order number {order_id}. "
    "It should arrive on {date_text}. The card on file was billed {symbol}{total} ({currency}).",
]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
EXTRACTION_INSTRUCTION = (
    "Extract the order from the email below as one JSON object with exactly these keys: order_id (string), "
    "customer (string), total (number), currency (USD, EUR or GBP), delivery_date (YYYY-MM-DD). "
    "Reply with the JSON only.\n\n"
)

# The same schema is written inline in recipes/json_extraction.yaml.
ORDER_SCHEMA = {
    "type": "object",
    "required": ["order_id", "customer", "total", "currency", "delivery_date"],
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": {"type": "string", "minLength": 1},
        "total": {"type": "number", "minimum": 0},
        "currency": {"enum": sorted(CURRENCIES)},
        "delivery_date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
    },
}

POLICIES = {
    "doc-1": "Refunds: purchases can be refunded in full within 30 days of the invoice date. After 30 days, "
             "unused months of an annual plan are refunded pro rata. "
             "Refunds go back to the original payment method "
             "within 10 business days.",
    "doc-2": "Data retention: after an account is closed, customer "
             "data is kept for 90 days so the account can be "
             "restored, then deleted permanently. Backups are purged within a further 30 days.",
    "doc-3": "Service level: the platform targets 99.9% monthly "
             "uptime. If uptime falls below the target, customers "
             "on paid plans may request a service credit of 10% of that month's fee within 30 days.",
    "doc-4": "Billing: invoices are issued on the first day of "
             "each billing period. Failed payments are retried "
             "three times over seven days before the account is "
             "suspended. Suspended accounts keep their data.",
    "doc-5": "Security: accounts can require two-factor authentication "
             "for all members. Support staff never ask for "
             "passwords or one-time codes.",
    "doc-6": "Plan changes: upgrades take effect immediately and are "
             "charged pro rata; downgrades take effect at the "
             "start of the next billing period.",
}
QUESTIONS = [
    ("I bought an annual plan 45 days ago and no longer need it. Can I get money back?", ["doc-1", "doc-6"]),
    ("How long do you keep my data after I close my account?", ["doc-2", "doc-4"]),
    ("Your service was down for hours last week. Do I get anything for that?", ["doc-3", "doc-1"]),
    ("My card was declined. Will my account be shut down right away?", ["doc-4", "doc-2"]),
    ("Someone from support asked for my login code by phone. Is that normal?", ["doc-5", "doc-4"]),
    ("If I downgrade today, when does the cheaper price start?", ["doc-6", "doc-4"]),
    ("How quickly will a refund reach my credit card?", ["doc-1", "doc-3"]),
    ("Can I force everyone on my team to use two-factor authentication?", ["doc-5", "doc-6"]),
    ("If my account is suspended for non-payment, do I lose my files?", ["doc-4", "doc-2"]),
    ("Is there a guarantee that the platform never goes down?", ["doc-3", "doc-5"]),
]
SUPPORT_SYSTEM = (
    "You are a support agent for Acme Cloud. Answer in at "
    "most 120 words using only the policy passages below, "
    "and cite every passage you rely on by its id in square "
    "brackets, e.g. [doc-1]. If the passages do not answer "
    "the question, say so. Never promise outcomes the policy does not state.\n\n{passages}"
)


def order_rows(count: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(count):
        currency = rng.choice(sorted(CURRENCIES))
        month, day = rng.randrange(1, 13), rng.randrange(1, 29)
        values = {
            "order_id": f"ORD-{rng.randrange(10**6):06d}",
            "customer": f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}",
            "total": round(rng.uniform(12, 900), 2),
            "currency": currency,
            "delivery_date": f"2025-{month:02d}-{day:02d}",
        }
        email = rng.choice(EMAIL_TEMPLATES).format(
            **values, symbol=CURRENCIES[currency], product=rng.choice(PRODUCTS), count=rng.randrange(1, 4),
            date_text=f"{MONTHS[month - 1]} {day}, 2025",
        )
        answer_schema = {
            **ORDER_SCHEMA,
            "properties": {
                key: {**ORDER_SCHEMA["properties"][key], "const": value} for key, value in values.items()
            },
        }
        rows.append({
            "prompt": EXTRACTION_INSTRUCTION + email, "reference_answer": values,
            "answer_schema": answer_schema,
        })
    return rows


def support_rows(rng: random.Random) -> list[dict]:
    rows = []
    for question, relevant in QUESTIONS:
        for _ in range(4):
            distractors = rng.sample(sorted(set(POLICIES) - set(relevant)), 2)
            retrieved = rng.sample(relevant + distractors, len(relevant) + len(distractors))
            passages = [{"id": doc, "text": POLICIES[doc]} for doc in retrieved]
            listing = "\n".join(f"[{p['id']}] {p['text']}" for p in passages)
            rows.append({
                "messages": [
                    {"role": "system", "content": SUPPORT_SYSTEM.format(passages=listing)},
                    {"role": "user", "content": question},
                ],
                "passages": passages,
                "topic": relevant[0],
            })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(out_dir: Path = DATA) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    orders = order_rows(96, rng)
    write_jsonl(out_dir / "orders_train.jsonl", orders[:72])
    write_jsonl(out_dir / "orders_heldout.jsonl", orders[72:])
    support = support_rows(rng)
    # Held out by question, not by row: the held-out questions are never seen in training.
    write_jsonl(out_dir / "support_train.jsonl", support[:32])
    write_jsonl(out_dir / "support_heldout.jsonl", support[32:])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA, help=f"folder to write to (default {DATA})")
    main(parser.parse_args().out)
