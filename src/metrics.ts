// Prometheus metrics, declared up front so every series exists at 0 (STYLE.md §7): a
// dashboard or alert on `rate(...)` must not wait for the first failure to see the series.
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import { PUSH_TYPES, type PushStatus } from './contract.js';
import type { Store } from './store/index.js';
import type { OutcomeKind, Sink, SinkMetrics } from '../sinks/types.js';

const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export type Metrics = ReturnType<typeof createMetrics>;

/** The relay's registry, with the process's default series. */
export function createRegistry(): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'push_relay_' });
  return registry;
}

/** SinkMetrics on the relay's registry: get-or-create by name (sinks/types.ts says why). */
export function sinkMetrics(registry: Registry): SinkMetrics {
  const make =
    // eslint-disable-next-line @typescript-eslint/no-explicit-any -- one helper for three constructors
    <M>(Kind: new (c: any) => M) =>
    (c: { name: string }): M =>
      (registry.getSingleMetric(c.name) as M | undefined) ?? new Kind({ ...c, registers: [registry] });
  return {
    counter: make(Counter) as SinkMetrics['counter'],
    gauge: make(Gauge) as SinkMetrics['gauge'],
    histogram: make(Histogram) as SinkMetrics['histogram'],
  };
}

export function createMetrics(sinks: readonly Sink[], store?: Store, registry: Registry = createRegistry()) {
  const received = new Counter({
    name: 'push_relay_notifications_received_total',
    help: 'Valid notifications received from Mattermost, by push type (unknown types count as other).',
    labelNames: ['type'],
    registers: [registry],
    collect: () => receivedBy.flush(),
  });
  for (const t of [...PUSH_TYPES, 'other']) received.labels(t).inc(0);

  const invalid = new Counter({
    name: 'push_relay_invalid_requests_total',
    help: 'Requests answered FAIL or 413 because the body was not a valid payload, by endpoint and problem.',
    labelNames: ['endpoint', 'problem'],
    registers: [registry],
  });
  for (const e of ['send_push', 'ack']) for (const p of ['invalid_payload', 'too_large']) invalid.labels(e, p).inc(0);

  const replies = new Counter({
    name: 'push_relay_replies_total',
    help: 'Replies given to Mattermost for send_push, by status.',
    labelNames: ['status'],
    registers: [registry],
    collect: () => repliesBy.flush(),
  });
  for (const s of ['OK', 'FAIL', 'REMOVE'] satisfies PushStatus[]) replies.labels(s).inc(0);

  const acks = new Counter({
    name: 'push_relay_acks_total',
    help: 'Delivery receipts forwarded by Mattermost from phones.',
    registers: [registry],
  });

  const outcomes = new Counter({
    name: 'push_relay_sink_outcomes_total',
    help: 'What each delivery attempt came to, by sink, outcome and reason.',
    labelNames: ['sink', 'outcome', 'reason'],
    registers: [registry],
    collect: () => outcomesBy.flush(),
  });
  const latency = sinkHistogram(
    'push_relay_sink_latency_seconds',
    'Time one delivery attempt took, by sink.',
    sinks.map((s) => s.name),
  );
  registry.registerMetric(latency as unknown as Parameters<Registry['registerMetric']>[0]);
  new Gauge({
    name: 'push_relay_sink_ready',
    help: '1 when the sink is connected and ready, else 0.',
    labelNames: ['sink'],
    registers: [registry],
    collect() {
      for (const s of sinks) this.labels(s.name).set(s.state().ready ? 1 : 0);
    },
  });

  const perSinkCounters: Array<Counter<'sink'>> = [];
  const perSinkCounter = (name: string, help: string) => {
    const c = new Counter({ name, help, labelNames: ['sink'], registers: [registry] });
    perSinkCounters.push(c);
    return c;
  };
  const enqueued = perSinkCounter('push_relay_outbox_enqueued_total', 'Deliveries written to the outbox because the sink was down, slow or saturated.');
  const drained = perSinkCounter('push_relay_outbox_delivered_total', 'Deliveries the outbox completed after the reply had gone out.');
  const retries = perSinkCounter('push_relay_outbox_retries_total', 'Outbox delivery attempts that failed and were scheduled again.');
  const dead = perSinkCounter('push_relay_dead_letters_total', 'Deliveries given up on (permanent failure, time to live or attempt budget).');
  const suppressed = perSinkCounter('push_relay_duplicates_suppressed_total', 'Resent notifications not delivered again: same (ack_id, sink) within the dedup window.');
  const duplicates = perSinkCounter('push_relay_duplicates_delivered_total', 'Deliveries made twice: an attempt that passed its deadline succeeded after its outbox copy was sent too.');
  if (store) {
    let cached: { at: number; stats: Promise<Awaited<ReturnType<Store['stats']>>> } | undefined;
    const stats = () => {
      if (!cached || Date.now() - cached.at > 1000) cached = { at: Date.now(), stats: store.stats() };
      return cached.stats;
    };
    new Gauge({
      name: 'push_relay_outbox_depth',
      help: 'Deliveries waiting in the outbox, by sink.',
      labelNames: ['sink'],
      registers: [registry],
      async collect() {
        const st = await stats();
        for (const s of sinks) this.labels(s.name).set(st.bySink[s.name] ?? 0);
      },
    });
    new Gauge({
      name: 'push_relay_outbox_oldest_age_seconds',
      help: 'Age of the oldest delivery waiting in the outbox (0 when empty).',
      registers: [registry],
      async collect() {
        const st = await stats();
        this.set(st.oldestCreatedAt === null ? 0 : (Date.now() - st.oldestCreatedAt) / 1000);
      },
    });
    new Gauge({
      name: 'push_relay_dead_letters',
      help: 'Dead letters stored (see push-relay dead-letters list).',
      registers: [registry],
      async collect() {
        this.set((await stats()).deadLetters);
      },
    });
  }

  const lost = perSinkCounter(
    'push_relay_lost_deliveries_total',
    'Deliveries answered FAIL that could be neither queued nor kept as a dead letter (the store failed): gone for good.',
  );

  /** Every series of these sinks at 0 (at start, and for a sink a reload adds). */
  function addSinks(added: readonly Sink[]) {
    for (const s of added) {
      latency.add(s.name);
      for (const c of perSinkCounters) c.labels(s.name).inc(0);
      const pairs: Array<readonly [string, string]> = [...s.reasons, ...DISPATCH_REASONS];
      // Whatever can fail retryably can also end up queued for the same reason.
      const queued = pairs.filter(([kind]) => kind === 'retryable').map(([, reason]) => ['queued', reason] as const);
      for (const [kind, reason] of [...pairs, ...queued]) outcomes.labels(s.name, kind, reason).inc(0);
    }
  }
  addSinks(sinks);

  // The hot path adds to plain numbers; prom-client gets them when scraped (its inc() hashes
  // labels and checks values on every call: 5% of the relay's CPU at 12 000 notifications/s).
  const receivedBy = tally(received, 1);
  const repliesBy = tally(replies, 1);
  const outcomesBy = tally(outcomes, 3);

  return {
    registry,
    received(type: string | undefined) {
      receivedBy.inc(type && (PUSH_TYPES as readonly string[]).includes(type) ? type : 'other');
    },
    invalid(endpoint: 'send_push' | 'ack', problem: 'invalid_payload' | 'too_large') {
      invalid.labels(endpoint, problem).inc();
    },
    reply(status: PushStatus) {
      repliesBy.inc(status);
    },
    ack() {
      acks.inc();
    },
    enqueued: (sink: string, n = 1) => enqueued.labels(sink).inc(n),
    drained: (sink: string) => drained.labels(sink).inc(),
    retried: (sink: string) => retries.labels(sink).inc(),
    deadLetter: (sink: string) => dead.labels(sink).inc(),
    suppressed: (sink: string) => suppressed.labels(sink).inc(),
    duplicate: (sink: string) => duplicates.labels(sink).inc(),
    lost: (sink: string) => lost.labels(sink).inc(),
    addSinks,
    outcome(sink: string, kind: OutcomeKind | 'queued', reason: string, seconds?: number) {
      outcomesBy.inc(sink, kind, reason);
      if (seconds !== undefined) latency.observe(sink, seconds);
    },
  };
}

/**
 * A histogram by sink in the Prometheus text format, kept as plain bucket counts: prom-client's
 * observe() hashes its labels on every call, 1.3% of the relay's CPU at 16 000 notifications/s.
 */
function sinkHistogram(name: string, help: string, sinkNames: readonly string[]) {
  const bySink = new Map(sinkNames.map((s) => [s, { buckets: new Array<number>(LATENCY_BUCKETS.length).fill(0), sum: 0, count: 0 }]));
  return {
    name,
    help,
    type: 'histogram' as const,
    aggregator: 'sum' as const,
    add(sink: string) {
      if (!bySink.has(sink)) bySink.set(sink, { buckets: new Array<number>(LATENCY_BUCKETS.length).fill(0), sum: 0, count: 0 });
    },
    observe(sink: string, value: number) {
      const h = bySink.get(sink);
      if (!h) return;
      h.sum += value;
      h.count++;
      for (let i = 0; i < LATENCY_BUCKETS.length; i++) {
        if (value <= (LATENCY_BUCKETS[i] as number)) {
          h.buckets[i] = (h.buckets[i] as number) + 1;
          return;
        }
      }
    },
    async get() {
      const values: Array<{ metricName: string; labels: Record<string, string | number>; value: number }> = [];
      for (const [sink, h] of bySink) {
        let cumulative = 0;
        LATENCY_BUCKETS.forEach((le, i) => {
          cumulative += h.buckets[i] as number;
          values.push({ metricName: `${name}_bucket`, labels: { le, sink }, value: cumulative });
        });
        values.push({ metricName: `${name}_bucket`, labels: { le: '+Inf', sink }, value: h.count });
        values.push({ metricName: `${name}_sum`, labels: { sink }, value: h.sum });
        values.push({ metricName: `${name}_count`, labels: { sink }, value: h.count });
      }
      return { name, help, type: 'histogram', aggregator: 'sum', values };
    },
    reset() {
      for (const h of bySink.values()) {
        h.buckets.fill(0);
        h.sum = 0;
        h.count = 0;
      }
    },
  };
}

type Cell = { labels: string[]; n: number };

export type Tally = {
  /** One more in the series of these label values (as many as the counter has, up to four). */
  inc(a: string, b?: string, c?: string, d?: string): void;
  /** Hands the counts to the counter: call it from the counter's `collect`. */
  flush(): void;
};

/**
 * Increments kept as plain numbers per label combination, flushed into `counter` on scrape
 * (prom-client's inc() hashes the labels on every call). Nested maps, not a joined key: the
 * hot path allocates nothing.
 */
export function tally(counter: Counter<string>, arity: 1 | 2 | 3 | 4): Tally {
  const index = new Map<string, Map<string, Map<string, Map<string, Cell>>>>();
  const cells: Cell[] = [];
  return {
    inc(a, b = '', c = '', d = '') {
      let byB = index.get(a);
      if (!byB) index.set(a, (byB = new Map()));
      let byC = byB.get(b);
      if (!byC) byB.set(b, (byC = new Map()));
      let byD = byC.get(c);
      if (!byD) byC.set(c, (byD = new Map()));
      let cell = byD.get(d);
      if (!cell) {
        cell = { labels: [a, b, c, d].slice(0, arity), n: 0 };
        byD.set(d, cell);
        cells.push(cell);
      }
      cell.n++;
    },
    flush() {
      for (const cell of cells) {
        if (cell.n === 0) continue;
        counter.labels(...cell.labels).inc(cell.n);
        cell.n = 0;
      }
    },
  };
}

/** Outcomes the dispatcher itself produces for any sink. */
export const DISPATCH_REASONS: ReadonlyArray<readonly [OutcomeKind, string]> = [
  ['retryable', 'deadline'],
  ['retryable', 'sink_unavailable'],
  ['retryable', 'backpressure'],
  ['retryable', 'outbox_unavailable'],
  ['permanent', 'sink_error'],
  ['skipped', 'duplicate'],
  ['dead-token', 'remembered_dead_token'],
];
