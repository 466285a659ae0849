// A send that passes its deadline is queued in the outbox, and the reply goes out; if the
// late send then succeeds, its outbox copy must be taken back, or the push goes out twice.
// Policy code over a real SQLite store, with a sink whose timing the test controls.
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import type { PushNotification } from '../src/contract.js';
import { createDeadTokens } from '../src/dead-tokens.js';
import { createDedup } from '../src/dedup.js';
import { createDispatcher, replyFor } from '../src/dispatch.js';
import { createMetrics } from '../src/metrics.js';
import { createOutbox } from '../src/outbox.js';
import { openSqliteStore } from '../src/store/sqlite.js';
import type { Outcome, Sink } from '../sinks/types.js';
import { messagePush } from './helpers/payloads.js';
import { tempDir } from './helpers/tmp.js';
import { sleep, until } from './helpers/wait.js';

function slowSink(delays: number[]): Sink & { sends: number } {
  const sink = {
    name: 'slow',
    type: 'test',
    perDevice: false,
    reasons: [],
    sends: 0,
    async start() {},
    state: () => ({ ready: true, state: 'ready' }),
    send(): Promise<Outcome> {
      const delay = delays[sink.sends++] ?? 0;
      return sleep(delay).then(() => ({ kind: 'delivered' }) as const);
    },
    async close() {},
  };
  return sink;
}

async function setup(sink: Sink, deadlineMs: number) {
  const store = openSqliteStore({ dataDir: tempDir(), owner: true });
  const metrics = createMetrics([sink], store);
  const logger = pino({ level: 'silent' });
  const policy = () => ({ deadlineMs, ttlMs: 60_000, maxAttempts: 10, retryMinMs: 400, retryMaxMs: 400, concurrency: 10, queue: 10 });
  const deadTokens = createDeadTokens(store.kv('dead-tokens'));
  const outbox = createOutbox({ store, sinks: new Map([[sink.name, sink]]), policy, metrics, logger, deadTokens, pollMs: 20 });
  outbox.start();
  const dispatcher = createDispatcher({ policy, dedup: createDedup(60_000), deadTokens, metrics, outbox });
  const deliver = (n: PushNotification) => dispatcher.deliver(n, [sink], () => logger);
  const close = async () => {
    await outbox.stop();
    await store.close();
  };
  return { store, metrics, deliver, close };
}

const push = (ack: string) => messagePush({ ack_id: ack }) as unknown as PushNotification;

describe('a send that outlives its deadline', () => {
  it('is queued and answered OK, and its outbox copy is taken back when it succeeds late', async () => {
    const sink = slowSink([150]);
    const { store, metrics, deliver, close } = await setup(sink, 50);
    const deliveries = await deliver(push('late-1'));
    expect(deliveries[0]?.result).toMatchObject({ kind: 'queued', reason: 'deadline' });
    expect(replyFor(deliveries)).toEqual({ status: 'OK' });
    expect((await store.stats()).depth).toBe(1);
    await until('the late success to take the copy back', async () => (await store.stats()).depth === 0, { timeoutMs: 2000 });
    await sleep(600); // past the copy's first retry time: nothing may send it again
    expect(sink.sends).toBe(1);
    expect(await metrics.registry.getSingleMetricAsString('push_relay_duplicates_delivered_total')).toMatch(/sink="slow"} 0$/m);
    await close();
  });

  it('is counted as a duplicate when the outbox already sent its copy', async () => {
    // The first send answers after 1.5 s; the outbox retries its copy after ~0.2-0.4 s.
    const sink = slowSink([1500, 0]);
    const { store, metrics, deliver, close } = await setup(sink, 50);
    await deliver(push('late-2'));
    await until('the late send and the outbox copy both to finish', async () => sink.sends === 2 && (await store.stats()).depth === 0, {
      timeoutMs: 3000,
    });
    await until('the duplicate to be counted', async () =>
      /sink="slow"} 1$/m.test(await metrics.registry.getSingleMetricAsString('push_relay_duplicates_delivered_total')),
    );
    await close();
  });

  it('is taken back from the outbox when a retry passes its deadline and then succeeds', async () => {
    // The first send is refused at once (queued); the outbox's retry answers after 120 ms,
    // past the 50 ms deadline but before the row's next try (>= 200 ms after it is
    // rescheduled): the late success takes the rescheduled row back.
    let sends = 0;
    const sink: Sink = {
      ...slowSink([]),
      send(): Promise<Outcome> {
        sends++;
        if (sends === 1) return Promise.resolve({ kind: 'retryable', reason: 'publish_failed' });
        return sleep(sends === 2 ? 120 : 0).then(() => ({ kind: 'delivered' }) as const);
      },
    };
    const { store, metrics, deliver, close } = await setup(sink, 50);
    expect((await deliver(push('late-3')))[0]?.result).toMatchObject({ kind: 'queued' });
    await until('the late retry to take its row back', async () => sends >= 2 && (await store.stats()).depth === 0, { timeoutMs: 3000 });
    await sleep(900); // past the next retry time: nothing may send it again
    expect(sends).toBe(2);
    expect(await metrics.registry.getSingleMetricAsString('push_relay_duplicates_delivered_total')).toMatch(/sink="slow"} 0$/m);
    await close();
  });
});
