// An application as the design's own example writes one: amqplib, assertQueue(name) with default
// arguments, sendToQueue(name, Buffer.from(message)). No confirms, no persistent flag: the lab proof
// changes only its URL (user, password, vhost) and what it sends.
//
//   AMQP_URL=amqp://user:password@host:5672/%2Fmail node producer.js QUEUE PREFIX COUNT BODY
//
// BODY is a mail job with {id} for PREFIX-<n>. Prints one JSON line: {"sent": n} or {"error": ...}.
'use strict';
const amqp = require('amqplib');

async function main() {
  const [queue, prefix, count, body] = process.argv.slice(2);
  const connection = await amqp.connect(process.env.AMQP_URL);
  const channel = await connection.createChannel();
  await channel.assertQueue(queue);
  let sent = 0;
  for (let n = 1; n <= Number(count); n++) {
    channel.sendToQueue(queue, Buffer.from(body.split('{id}').join(`${prefix}-${n}`)));
    sent++;
  }
  await channel.close();
  await connection.close();
  console.log(JSON.stringify({ sent }));
}

main().catch((err) => {
  console.log(JSON.stringify({ error: String(err && err.message ? err.message : err) }));
  process.exitCode = 1;
});
