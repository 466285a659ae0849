// Whatever a sink or the store throws, a delivery is made, queued, or kept as a dead letter,
// or the reply says it is lost: never an OK for a push that is gone. Policy code over a real
// SQLite store whose writes the test makes fail (a full disk, a store gone away).
import pino from 'pino';
import { describe, expect, it } from 'vitest';
import type { PushNotification } from '../src/contract.js';
import { createDeadTokens } from '../src/dead-tokens.js';
import { createDedup } from '../src/dedup.js';
import { createDispatcher, replyFor } from '../src/dispatch.js';
import { createMetrics } from '../src/metrics.js';
import { createOutbox } from '../src/outbox.js';
import { openSqliteStore } from '../src/store/sqlite.js';
import type { Store } from '../src/store/index.js';
import type { Outcome, Sink } from '../sinks/types.js';
import { messagePush } from './helpers/payloads.js';
import { tempDir } from './helpers/tmp.js';

const sink = (send: () => Promise<Outcome>): Sink => ({
  name: 'broken',
  type: 'test',
  perDevice: false,
  reasons: [],
  async start() {},
  state: () => ({ ready: true, state: 'ready' }),
  send,
  async close() {},
});

function setup(s: Sink, fail: Partial<Record<'bury' | 'enqueue', Error>>) {
  const real = openSqliteStore({ dataDir: tempDir(), owner: true });
  const store: Store = Object.create(real) as Store;
  if (fail.bury) store.bury = () => Promise.reject(fail.bury);
  if (fail.enqueue) store.enqueue = () => Promise.reject(fail.enqueue);
  const metrics = createMetrics([s], real);
  const logger = pino({ level: 'silent' });
  const policy = () => ({ deadlineMs: 200, ttlMs: 60_000, maxAttempts: 10, retryMinMs: 400, retryMaxMs: 400, concurrency: 10, queue: 10 });
  const deadTokens = createDeadTokens(real.kv('dead-tokens'));
  const outbox = createOutbox({ store, sinks: new Map([[s.name, s]]), policy, metrics, logger, deadTokens });
  const dispatcher = createDispatcher({ policy, dedup: createDedup(60_000), deadTokens, metrics, outbox });
  const lost = async () => Number(/sink="broken"} (\d+)/.exec(await metrics.registry.getSingleMetricAsString('push_relay_lost_deliveries_total'))?.[1]);
  return { real, lost, deliver: (n: PushNotification) => dispatcher.deliver(n, [s], () => logger) };
}

const push = (ack: string) => messagePush({ ack_id: ack }) as unknown as PushNotification;

describe('a delivery the store cannot keep', () => {
  it('answers FAIL saying it is lost, and counts it, when a permanent failure cannot be kept as a dead letter', async () => {
    const { real, lost, deliver } = setup(sink(() => Promise.reject(new Error('Maximum call stack size exceeded'))), { bury: new Error('disk I/O error') });
    expect(await lost()).toBe(0);
    const reply = replyFor(await deliver(push('lost-1')));
    expect(reply.status).toBe('FAIL');
    expect(reply.error).toBe('broken: sink failed: Maximum call stack size exceeded; not kept as a dead letter either (disk I/O error): lost');
    expect(await lost()).toBe(1);
    await real.close();
  });

  it('keeps a dead letter and says only what the sink said when the store works', async () => {
    const { real, lost, deliver } = setup(sink(() => Promise.reject(new Error('boom'))), {});
    expect(replyFor(await deliver(push('kept-1')))).toEqual({ status: 'FAIL', error: 'broken: sink failed: boom' });
    expect((await real.stats()).deadLetters).toBe(1);
    expect(await lost()).toBe(0);
    await real.close();
  });

  it('answers FAIL and counts it lost when a retryable failure cannot be queued', async () => {
    const { real, lost, deliver } = setup(sink(async () => ({ kind: 'retryable', reason: 'broker_unavailable', detail: 'down' })), { enqueue: new Error('database is locked') });
    const reply = replyFor(await deliver(push('lost-2')));
    expect(reply).toEqual({ status: 'FAIL', error: 'broken: down; outbox write failed: database is locked' });
    expect(await lost()).toBe(1);
    await real.close();
  });
});
