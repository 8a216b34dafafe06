"""Order service in Python: the outbox's SQL contract from psycopg 3.

Each order is one transaction that inserts the order row and enqueues its message with
`<schema>.enqueue_json(...)`, so the message exists if and only if the order does.

    bash scripts/writers-setup.sh
    DATABASE_URL=postgres://... target/writers/venv/bin/python examples/python/order_service.py \
        --schema outbox --topic demo.orders --orders 200

Environment: DATABASE_URL (required; kept out of the command line, where `ps` would show it).
Arguments: --schema (the outbox schema, default `outbox`), --topic (default `demo.orders`),
--orders N (default 10). The orders go to `<schema>.py_orders`, created if missing; the keys are
the customers, `customer-0` to `customer-9`, so each key gets several messages, in order.

Besides the N orders it shows the two other outcomes: an order whose transaction is rolled back
on purpose (key `customer-rolled-back`: neither the order nor its message exists afterwards) and
an order with an empty topic, which the outbox refuses with SQLSTATE OB001 (key `customer-refused`:
the whole transaction is rolled back).

Output, one line per outcome, to be read by machines:
    committed <message-id> <key>
    rolled_back <key>
    refused <sqlstate> <key>
Exit status 0 when all of that went as described, 1 otherwise.
"""

import argparse
import os
import sys
import uuid

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

MESSAGE_TYPE = "com.example.order.created"
ROLLED_BACK_KEY = "customer-rolled-back"
REFUSED_KEY = "customer-refused"


def arguments():
    p = argparse.ArgumentParser(description="Order service writing through the outbox's SQL contract.")
    p.add_argument("--schema", default="outbox", help="the outbox schema (default: outbox)")
    p.add_argument("--topic", default="demo.orders", help="the Kafka topic (default: demo.orders)")
    p.add_argument("--orders", type=int, default=10, help="orders to commit (default: 10)")
    return p.parse_args()


class Orders:
    """The business write and its message, on one connection; the caller owns the transaction."""

    def __init__(self, conn, schema):
        self.conn = conn
        self.schema = sql.Identifier(schema)
        self.insert = sql.SQL(
            "INSERT INTO {}.py_orders (id, customer, amount_cents) VALUES (%s, %s, %s)"
        ).format(self.schema)
        self.enqueue = sql.SQL(
            "SELECT {}.enqueue_json(%s::text, %s::text, %s::jsonb, %s::jsonb, %s::text, %s::text)"
        ).format(self.schema)

    def create_table(self):
        with self.conn.transaction():
            self.conn.execute(
                sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.py_orders ("
                    " id uuid PRIMARY KEY, customer text NOT NULL, amount_cents bigint NOT NULL)"
                ).format(self.schema)
            )

    def place(self, topic, customer, amount_cents):
        """Inserts the order and enqueues `order created`; returns the message id. Call it inside
        a transaction."""
        order_id = uuid.uuid4()
        self.conn.execute(self.insert, (order_id, customer, amount_cents))
        payload = {"order_id": str(order_id), "customer": customer, "amount_cents": amount_cents}
        headers = {"x-source": "python-order-service"}
        row = self.conn.execute(
            self.enqueue, (topic, customer, Jsonb(payload), Jsonb(headers), MESSAGE_TYPE, None)
        ).fetchone()
        return row[0]


def main():
    args = arguments()
    url = os.environ.get("DATABASE_URL")
    if not url:
        print("order_service: error: set DATABASE_URL", file=sys.stderr)
        return 1
    # autocommit: each `with conn.transaction()` below is exactly one BEGIN ... COMMIT/ROLLBACK.
    with psycopg.connect(url, autocommit=True, application_name="python-order-service") as conn:
        orders = Orders(conn, args.schema)
        orders.create_table()

        for i in range(args.orders):
            customer = f"customer-{i % 10}"
            with conn.transaction():
                message_id = orders.place(args.topic, customer, 100 + (i * 37) % 9_900)
            # Printed once COMMIT has returned: only then does the message exist.
            print(f"committed {message_id} {customer}", flush=True)

        # An order abandoned after the enqueue: the rollback takes the message with it.
        with conn.transaction():
            orders.place(args.topic, ROLLED_BACK_KEY, 4_200)
            raise psycopg.Rollback()
        print(f"rolled_back {ROLLED_BACK_KEY}", flush=True)

        # Bad input: the outbox refuses it with a SQLSTATE of class OB, and the transaction (the
        # order row too) is rolled back by leaving the block with the error.
        try:
            with conn.transaction():
                orders.place("", REFUSED_KEY, 4_300)
        except psycopg.Error as e:
            if e.sqlstate is None or not e.sqlstate.startswith("OB"):
                raise
            print(f"refused {e.sqlstate} {REFUSED_KEY}", flush=True)
            print(f"order_service: the outbox refused an order: {e.diag.message_primary}", file=sys.stderr)
        else:
            print("order_service: error: an order with an empty topic was accepted", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
