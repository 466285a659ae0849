// A test subscriber: what a user running `mosquitto_sub -v -t 'mm/#'` would see, as bytes.
import mqtt, { type MqttClient } from 'mqtt';
import { afterAll } from 'vitest';

export type Received = { topic: string; payload: Buffer };

export type Subscriber = {
  messages: Received[];
  /** Resolves with the messages once at least `n` have arrived; throws after `timeoutMs`. */
  waitFor(n: number, timeoutMs?: number): Promise<Received[]>;
  close(): Promise<void>;
};

const open = new Set<MqttClient>();

export type SubscribeOptions = {
  /**
   * A persistent session (clean: false, fixed client id) that reconnects on its own: with a
   * persistent broker it receives what was published while it or the broker was away.
   */
  session?: string;
};

export async function subscribe(url: string, filter: string | string[], opts: SubscribeOptions = {}): Promise<Subscriber> {
  const client = await mqtt.connectAsync(url, {
    clientId: opts.session ?? `push-relay-test-${process.pid}-${Math.random().toString(16).slice(2, 10)}`,
    reconnectPeriod: opts.session ? 100 : 0,
    connectTimeout: 5000,
    clean: !opts.session,
  });
  open.add(client);
  const messages: Received[] = [];
  const waiters = new Set<() => void>();
  client.on('message', (topic, payload) => {
    messages.push({ topic, payload: Buffer.from(payload) });
    for (const w of waiters) w();
  });
  await client.subscribeAsync(filter, { qos: 1 });

  return {
    messages,
    waitFor(n, timeoutMs = 5000) {
      if (messages.length >= n) return Promise.resolve(messages);
      return new Promise((resolve, reject) => {
        const check = () => {
          if (messages.length < n) return;
          clearTimeout(timer);
          waiters.delete(check);
          resolve(messages);
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          const seen = messages.map((m) => `${m.topic}: ${m.payload.toString('utf8').slice(0, 60)}`).join('\n  ');
          reject(new Error(`expected ${n} message(s) on ${String(filter)} within ${timeoutMs} ms, got ${messages.length}:\n  ${seen}`));
        }, timeoutMs);
        waiters.add(check);
      });
    },
    async close() {
      open.delete(client);
      await client.endAsync(true);
    },
  };
}

// Never throws: a failing hook would keep the hooks after it (brokers, temp dirs) from running.
afterAll(async () => {
  await Promise.all([...open].map((c) => c.endAsync(true).catch(() => {})));
  open.clear();
});
