// A tiny MQTT 5 server on 127.0.0.1 that answers each PUBLISH with the reason code the test
// chose for its topic: the PUBACK answers a real broker gives only under conditions hard to
// set up (0x83 implementation specific, 0x90 topic name invalid, 0x97 quota exceeded, 0x99
// payload format invalid). Packets are read and written by mqtt-packet, the codec mqtt.js and
// aedes use, so what crosses the socket is MQTT 5 as the sink's client really speaks it.
//
// Protocol, OASIS MQTT 5.0: CONNECT -> CONNACK 0x00 (§3.2); a client asking for another
// version gets CONNACK 0x84 Unsupported Protocol Version and the connection closes
// (§3.1.2.2). PUBLISH QoS 1 -> PUBACK with the chosen reason code (§3.4.2.1); QoS 2 -> PUBREC
// with it, then PUBREL -> PUBCOMP (§4.3.3); PINGREQ -> PINGRESP; DISCONNECT closes.
import { createServer, type Socket } from 'node:net';
import mqttPacket, { type IConnectPacket, type Packet, type QoS } from 'mqtt-packet';
import { afterAll } from 'vitest';

export type FakePublish = { topic: string; payload: Buffer; qos: QoS; retain: boolean };

export type Mqtt5Fake = {
  url: string;
  port: number;
  /** Every CONNECT received, in order. */
  connects: IConnectPacket[];
  /** Every PUBLISH received, in order. */
  publishes: FakePublish[];
  /** The reason code PUBACK (or PUBREC) carries for a publish to `topic`; 0x00 Success otherwise. */
  answer(topic: string, reasonCode: number): void;
  /** Resolves once `n` publishes have arrived; throws after `timeoutMs`. */
  waitForPublishes(n: number, timeoutMs?: number): Promise<FakePublish[]>;
  /** Drops every client connection without a DISCONNECT, as a broker that dies. */
  dropClients(): void;
  close(): Promise<void>;
};

const V5 = { protocolVersion: 5 };
const open = new Set<Mqtt5Fake>();

/** Listens on `port` (default: one the kernel picks). */
export async function startMqtt5Fake({ port: wanted = 0 }: { port?: number } = {}): Promise<Mqtt5Fake> {
  const connects: IConnectPacket[] = [];
  const publishes: FakePublish[] = [];
  const answers = new Map<string, number>();
  const sockets = new Set<Socket>();
  const waiters = new Set<() => void>();

  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    socket.on('error', () => socket.destroy());
    const parser = mqttPacket.parser(V5);
    const send = (p: Packet) => socket.write(mqttPacket.generate(p, V5));
    parser.on('error', () => socket.destroy());
    parser.on('packet', (packet: Packet) => {
      switch (packet.cmd) {
        case 'connect':
          connects.push(packet);
          if (packet.protocolVersion !== 5) {
            socket.end(mqttPacket.generate({ cmd: 'connack', returnCode: 1, sessionPresent: false }, { protocolVersion: 4 }));
            return;
          }
          send({ cmd: 'connack', reasonCode: 0, sessionPresent: false });
          return;
        case 'publish': {
          const payload = typeof packet.payload === 'string' ? Buffer.from(packet.payload) : Buffer.from(packet.payload);
          publishes.push({ topic: packet.topic, payload, qos: packet.qos, retain: packet.retain });
          const reasonCode = answers.get(packet.topic) ?? 0;
          if (packet.qos === 1) send({ cmd: 'puback', messageId: packet.messageId, reasonCode });
          if (packet.qos === 2) send({ cmd: 'pubrec', messageId: packet.messageId, reasonCode });
          for (const w of waiters) w();
          return;
        }
        case 'pubrel':
          send({ cmd: 'pubcomp', messageId: packet.messageId, reasonCode: 0 });
          return;
        case 'pingreq':
          send({ cmd: 'pingresp' });
          return;
        case 'disconnect':
          socket.end();
          return;
        default:
          return;
      }
    });
    socket.on('data', (chunk: Buffer) => parser.parse(chunk));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(wanted, '127.0.0.1', () => resolve());
  });
  const address = server.address();
  if (!address || typeof address === 'string') throw new Error('MQTT 5 fake: no port');
  const port = address.port;

  const fake: Mqtt5Fake = {
    url: `mqtt://127.0.0.1:${port}`,
    port,
    connects,
    publishes,
    answer(topic, reasonCode) {
      answers.set(topic, reasonCode);
    },
    waitForPublishes(n, timeoutMs = 5000) {
      if (publishes.length >= n) return Promise.resolve(publishes);
      return new Promise((resolve, reject) => {
        const check = () => {
          if (publishes.length < n) return;
          clearTimeout(timer);
          waiters.delete(check);
          resolve(publishes);
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`MQTT 5 fake: expected ${n} publish(es) within ${timeoutMs} ms, got ${publishes.length}`));
        }, timeoutMs);
        waiters.add(check);
      });
    },
    dropClients() {
      for (const s of sockets) s.destroy();
    },
    async close() {
      open.delete(fake);
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
  open.add(fake);
  return fake;
}

afterAll(async () => {
  await Promise.all([...open].map((f) => f.close().catch(() => {})));
});
