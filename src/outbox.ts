// The outbox: deliveries the relay answered OK for but could not make at once, retried in the
// background until they succeed, fail permanently, exhaust their attempts or outlive their
// time to live; then they become dead letters with the reason.
import type { Logger } from 'pino';
import { fastNotification, parseBody, PushNotificationSchema, rawBody, type PushNotification } from './contract.js';
import { attempt } from './attempt.js';
import type { DeadTokens } from './dead-tokens.js';
import type { Metrics } from './metrics.js';
import type { PendingDelivery, Store } from './store/index.js';
import type { Outcome, Sink } from '../sinks/types.js';

export type OutboxPolicy = {
  deadlineMs: number;
  ttlMs: number;
  maxAttempts: number;
  retryMinMs: number;
  retryMaxMs: number;
};

export type OutboxOptions = {
  store: Store;
  sinks: ReadonlyMap<string, Sink>;
  policy: (sink: string) => OutboxPolicy;
  metrics: Metrics;
  logger: Logger;
  /** Where a dead token found in a retry is remembered, so the next push to it answers REMOVE. */
  deadTokens: DeadTokens;
  /** Deliveries claimed per round; they are sent concurrently. */
  batch?: number;
  /** How often an idle worker looks for due deliveries. */
  pollMs?: number;
};

export type Outbox = {
  /** `attempted`: the sink was tried once already (it then gets a backoff before the next try). */
  enqueue(sink: string, n: PushNotification, why: Extract<Outcome, { kind: 'retryable' }>, attempted: boolean): Promise<number>;
  /** Keeps a notification a sink refused for good, so an operator can replay it once the sink is fixed. */
  bury(sink: string, n: PushNotification, why: Extract<Outcome, { kind: 'permanent' | 'dead-token' }>): Promise<void>;
  cancel(id: number): Promise<boolean>;
  /** Starts the background worker (resuming whatever a previous run left behind). */
  start(): void;
  stop(): Promise<void>;
};

/** Exponential backoff with full jitter in [d/2, d], at least what the sink asked for (Retry-After). */
export function backoff(attempts: number, p: Pick<OutboxPolicy, 'retryMinMs' | 'retryMaxMs'>, retryAfterMs = 0): number {
  const d = Math.min(p.retryMaxMs, p.retryMinMs * 2 ** Math.min(30, Math.max(0, attempts - 1)));
  return Math.max(retryAfterMs, Math.round(d / 2 + (Math.random() * d) / 2));
}

/** What the outbox keeps of a notification: the bytes Mattermost posted when we have them. */
const stored = (n: PushNotification) => rawBody(n) ?? JSON.stringify(n);

export function createOutbox(opts: OutboxOptions): Outbox {
  const { store, sinks, metrics, logger } = opts;
  const batch = opts.batch ?? 1000;
  const pollMs = opts.pollMs ?? 200;
  const log = logger.child({ component: 'outbox' });
  let running = false;
  let loop: Promise<void> | undefined;
  let wake: (() => void) | undefined;
  let lastExpire = 0;

  async function deliver(row: PendingDelivery): Promise<'done' | 'later' | 'dead'> {
    // Claims name only configured sinks that are ready (`round`); the rows of a sink removed
    // from the config stay until their time to live, then become dead letters.
    const sink = sinks.get(row.sink);
    const p = opts.policy(row.sink);
    const now = Date.now();
    if (!sink) {
      // Removed by a reload between the claim and now: left for a config that has it again, or its TTL.
      await store.reschedule(row.id, row.attempts, now + 60_000, row.lastError);
      return 'later';
    }
    // Parsed as Mattermost's body was, so a sink that forwards the bytes (upstream) gets them.
    const parsed = parseBody(PushNotificationSchema, row.payload, fastNotification);
    if (!parsed.ok) {
      await store.bury(row, `stored payload is not a valid notification: ${parsed.error}`, now);
      return 'dead';
    }
    const n = parsed.value;
    // A retry that passes its deadline may still succeed (an MQTT publish that was already on
    // the wire, say). Then the row, rescheduled meanwhile, is taken back if no worker has
    // claimed it again; otherwise the notification went out twice, and that is counted.
    let deliveredLate = false;
    let rescheduled = false;
    const takeBack = () =>
      void store.cancel(row.id, Date.now()).then(
        (cancelled) => (cancelled ? metrics.drained(row.sink) : metrics.duplicate(row.sink)),
        () => metrics.duplicate(row.sink),
      );
    const outcome = await attempt(sink, n, p.deadlineMs, (late) => {
      if (late.kind !== 'delivered') return;
      if (rescheduled) takeBack();
      else deliveredLate = true;
    });
    const attempts = row.attempts + 1;
    switch (outcome.kind) {
      case 'delivered':
      case 'skipped':
        return 'done';
      case 'dead-token':
        // Too late for this push's REMOVE (its reply went out when it was queued): the next
        // push to the token answers REMOVE instead.
        if (sink.perDevice) await opts.deadTokens.remember(sink.name, n.device_id);
        await store.bury({ ...row, attempts }, `dead token: ${outcome.detail ?? outcome.reason}`, now);
        return 'dead';
      case 'permanent':
        await store.bury({ ...row, attempts }, `permanent failure: ${outcome.detail ?? outcome.reason}`, now);
        return 'dead';
      case 'retryable': {
        const error = outcome.detail ?? outcome.reason;
        if (attempts >= p.maxAttempts) {
          await store.bury({ ...row, attempts, lastError: error }, `gave up after ${attempts} attempts: ${error}`, now);
          return 'dead';
        }
        await store.reschedule(row.id, attempts, now + backoff(attempts, p, outcome.retryAfterMs), error);
        rescheduled = true;
        if (deliveredLate) takeBack();
        return 'later';
      }
    }
  }

  /** One round; true when there may be more due right away. */
  async function round(): Promise<boolean> {
    const now = Date.now();
    if (now - lastExpire > 1000) {
      lastExpire = now;
      const expired = await store.expire(now);
      if (expired) log.warn({ expired }, 'deliveries passed their time to live and became dead letters');
    }
    // Only claim for sinks that can take them: a broker that is down leaves its rows alone.
    const ready = [...sinks.values()].filter((s) => s.state().ready).map((s) => s.name);
    const rows = await store.claim(ready, batch, leaseMs(), now);
    if (rows.length === 0) return false;
    const results = await Promise.all(
      rows.map((row) =>
        deliver(row).catch((err: unknown) => {
          log.error({ err: (err as Error).message, id: row.id }, 'outbox delivery failed unexpectedly; will retry');
          return 'error' as const;
        }),
      ),
    );
    const done: number[] = [];
    results.forEach((r, i) => {
      const row = rows[i] as PendingDelivery;
      if (r === 'done') {
        done.push(row.id);
        metrics.drained(row.sink);
      } else if (r === 'later') metrics.retried(row.sink);
      else if (r === 'dead') metrics.deadLetter(row.sink);
    });
    await store.complete(done);
    log.debug({ claimed: rows.length, delivered: done.length }, 'outbox round');
    return rows.length === batch;
  }

  // A claim outlives the slowest attempt in the round, so no other worker takes it meanwhile.
  // `sinks` is the relay's current map: a reload may change it between rounds.
  const leaseMs = () => Math.max(0, ...[...sinks.keys()].map((s) => opts.policy(s).deadlineMs)) + 2_000;

  async function run() {
    let failures = 0;
    while (running) {
      let more = false;
      try {
        more = await round();
        failures = 0;
      } catch (err) {
        failures++;
        if (failures === 1 || failures % 50 === 0) log.error({ err: (err as Error).message }, 'outbox round failed; retrying');
      }
      if (!more && running) {
        await new Promise<void>((resolve) => {
          const t = setTimeout(resolve, failures ? Math.min(5000, pollMs * 2 ** failures) : pollMs);
          wake = () => {
            clearTimeout(t);
            resolve();
          };
        });
        wake = undefined;
      }
    }
  }

  return {
    async enqueue(sink, n, why, attempted) {
      const now = Date.now();
      const p = opts.policy(sink);
      const [id] = await store.enqueue([
        {
          sink,
          ackId: n.ack_id,
          payload: stored(n),
          createdAt: now,
          expiresAt: now + p.ttlMs,
          nextAttemptAt: now + (attempted ? backoff(1, p, why.retryAfterMs) : Math.max(why.retryAfterMs ?? 0, 0)),
          attempts: attempted ? 1 : 0,
          lastError: why.detail ?? why.reason,
        },
      ]);
      metrics.enqueued(sink);
      return id as number;
    },
    async bury(sink, n, why) {
      const now = Date.now();
      const detail = why.detail ?? why.reason;
      await store.bury(
        { sink, ackId: n.ack_id, payload: stored(n), createdAt: now, expiresAt: now + opts.policy(sink).ttlMs, nextAttemptAt: now, attempts: 1, lastError: detail },
        `${why.kind === 'dead-token' ? 'dead token' : 'permanent failure'}: ${detail}`,
        now,
      );
      metrics.deadLetter(sink);
    },
    cancel: (id) => store.cancel(id, Date.now()),
    start() {
      if (running) return;
      running = true;
      loop = run();
    },
    async stop() {
      running = false;
      wake?.();
      await loop;
    },
  };
}
