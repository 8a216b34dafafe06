// Order service in Node: the outbox's SQL contract from node-postgres (pg).
//
// Each order is one transaction that inserts the order row and enqueues its message with
// `<schema>.enqueue_json(...)`, so the message exists if and only if the order does.
//
//   bash scripts/writers-setup.sh
//   DATABASE_URL=postgres://... node examples/node/order_service.mjs \
//       --schema outbox --topic demo.orders --orders 200
//
// Environment: DATABASE_URL (required; kept out of the command line, where `ps` would show it).
// Arguments: --schema (the outbox schema, default `outbox`), --topic (default `demo.orders`),
// --orders N (default 10). The orders go to `<schema>.node_orders`, created if missing; the keys
// are the customers, `customer-0` to `customer-9`, so each key gets several messages, in order.
//
// Besides the N orders it shows the two other outcomes: an order whose transaction is rolled back
// on purpose (key `customer-rolled-back`: neither the order nor its message exists afterwards) and
// an order with an empty topic, which the outbox refuses with SQLSTATE OB001 (key
// `customer-refused`: the whole transaction is rolled back).
//
// Output, one line per outcome, to be read by machines:
//   committed <message-id> <key>
//   rolled_back <key>
//   refused <sqlstate> <key>
// Exit status 0 when all of that went as described, 1 otherwise.

import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import pg from "pg";

const MESSAGE_TYPE = "com.example.order.created";
const ROLLED_BACK_KEY = "customer-rolled-back";
const REFUSED_KEY = "customer-refused";

function argumentsGiven() {
  const { values } = parseArgs({
    options: {
      schema: { type: "string", default: "outbox" },
      topic: { type: "string", default: "demo.orders" },
      orders: { type: "string", default: "10" },
    },
  });
  const orders = Number(values.orders);
  if (!Number.isInteger(orders) || orders < 0) {
    throw new Error("--orders takes a whole number");
  }
  return { schema: values.schema, topic: values.topic, orders };
}

// Runs `work` in one transaction: COMMIT when it returns, ROLLBACK when it throws (and rethrows).
async function inTransaction(client, work) {
  await client.query("BEGIN");
  try {
    const result = await work();
    await client.query("COMMIT");
    return result;
  } catch (e) {
    await client.query("ROLLBACK");
    throw e;
  }
}

class RollBack extends Error {}

async function main() {
  const args = argumentsGiven();
  const url = process.env.DATABASE_URL;
  if (!url) {
    console.error("order_service: error: set DATABASE_URL");
    return 1;
  }
  const client = new pg.Client({ connectionString: url, application_name: "node-order-service" });
  await client.connect();
  try {
    const schema = client.escapeIdentifier(args.schema);
    const insert = `INSERT INTO ${schema}.node_orders (id, customer, amount_cents) VALUES ($1, $2, $3)`;
    const enqueue = `SELECT ${schema}.enqueue_json($1::text, $2::text, $3::jsonb, $4::jsonb, $5::text, $6::text) AS id`;

    // Inserts the order and enqueues `order created`; returns the message id. Call it inside a
    // transaction.
    const place = async (topic, customer, amountCents) => {
      const orderId = randomUUID();
      await client.query(insert, [orderId, customer, amountCents]);
      const payload = { order_id: orderId, customer, amount_cents: amountCents };
      const headers = { "x-source": "node-order-service" };
      const res = await client.query(enqueue, [
        topic,
        customer,
        JSON.stringify(payload),
        JSON.stringify(headers),
        MESSAGE_TYPE,
        null,
      ]);
      return res.rows[0].id;
    };

    await client.query(
      `CREATE TABLE IF NOT EXISTS ${schema}.node_orders (
         id uuid PRIMARY KEY, customer text NOT NULL, amount_cents bigint NOT NULL)`,
    );

    for (let i = 0; i < args.orders; i++) {
      const customer = `customer-${i % 10}`;
      const messageId = await inTransaction(client, () => place(args.topic, customer, 100 + ((i * 37) % 9_900)));
      // Printed once COMMIT has returned: only then does the message exist.
      console.log(`committed ${messageId} ${customer}`);
    }

    // An order abandoned after the enqueue: the rollback takes the message with it.
    try {
      await inTransaction(client, async () => {
        await place(args.topic, ROLLED_BACK_KEY, 4_200);
        throw new RollBack();
      });
    } catch (e) {
      if (!(e instanceof RollBack)) throw e;
    }
    console.log(`rolled_back ${ROLLED_BACK_KEY}`);

    // Bad input: the outbox refuses it with a SQLSTATE of class OB, and the transaction (the order
    // row too) is rolled back.
    try {
      await inTransaction(client, () => place("", REFUSED_KEY, 4_300));
      console.error("order_service: error: an order with an empty topic was accepted");
      return 1;
    } catch (e) {
      if (typeof e.code !== "string" || !e.code.startsWith("OB")) throw e;
      console.log(`refused ${e.code} ${REFUSED_KEY}`);
      console.error(`order_service: the outbox refused an order: ${e.message}`);
    }
    return 0;
  } finally {
    await client.end();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (e) => {
    console.error(`order_service: error: ${e.message}`);
    process.exitCode = 1;
  },
);
