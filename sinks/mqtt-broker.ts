// "auto" broker: use the MQTT broker on 127.0.0.1:<port> if one answers, otherwise start an
// embedded aedes broker there, so `mosquitto_sub -v -t 'mm/#'` works on a bare machine.
import { createServer, type Server } from 'node:net';
import type { Aedes } from 'aedes';
import mqtt from 'mqtt';
import type { Logger } from 'pino';

export type AutoBroker = { url: string; embedded: boolean; close(): Promise<void> };

const HOST = '127.0.0.1';

/** One embedded broker per port per process, shared by every sink that asks for it. */
const embedded = new Map<number, Promise<{ broker: Aedes; server: Server; users: number }>>();

export async function autoBroker(port: number, logger: Logger): Promise<AutoBroker> {
  const url = `mqtt://${HOST}:${port}`;
  if (!embedded.has(port) && (await answersMqtt(url))) {
    logger.info({ url }, 'found an MQTT broker, publishing there');
    return { url, embedded: false, close: async () => {} };
  }
  let entry = embedded.get(port);
  if (!entry) {
    entry = startEmbedded(port);
    embedded.set(port, entry);
    entry.catch(() => embedded.delete(port));
  }
  const e = await entry;
  e.users++;
  logger.info({ url }, 'no MQTT broker answered, started an embedded one (aedes, in memory)');
  let closed = false;
  return {
    url,
    embedded: true,
    async close() {
      if (closed) return;
      closed = true;
      if (--e.users > 0) return;
      embedded.delete(port);
      await new Promise<void>((resolve) => e.broker.close(() => resolve()));
      await new Promise<void>((resolve) => e.server.close(() => resolve()));
    },
  };
}

/** True when something at `url` completes an MQTT CONNECT within a second. */
async function answersMqtt(url: string): Promise<boolean> {
  const client = mqtt.connect(url, { connectTimeout: 1000, reconnectPeriod: 0, clientId: `push-relay-probe-${process.pid}` });
  try {
    return await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), 1500);
      client.once('connect', () => (clearTimeout(timer), resolve(true)));
      client.once('error', () => (clearTimeout(timer), resolve(false)));
      client.once('close', () => (clearTimeout(timer), resolve(false)));
    });
  } finally {
    client.end(true);
  }
}

async function startEmbedded(port: number) {
  // Loaded only when needed: most installations publish to a broker of their own.
  const { Aedes: Broker } = await import('aedes');
  const broker = await Broker.createBroker();
  const server = createServer(broker.handle);
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err) => {
      broker.close();
      reject(new Error(`cannot start the embedded MQTT broker on ${HOST}:${port}: ${err.message}`));
    });
    server.listen(port, HOST, () => resolve());
  });
  return { broker, server, users: 0 };
}
