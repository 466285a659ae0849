// Fan-out with deadlines -> outcomes -> one reply. `replyFor` is the only place that turns
// what sinks did into Mattermost's OK / REMOVE / FAIL (contract §3).
import type { Logger } from 'pino';
import type { PushNotification, PushResponse } from './contract.js';
import type { Metrics } from './metrics.js';
import type { Outcome, Sink } from '../sinks/types.js';

/** `queued`: not delivered yet, but durably stored and owned by the outbox from now on. */
export type Result = Outcome | { kind: 'queued'; reason: string; detail?: string };
export type Delivery = { sink: Sink; result: Result };

/**
 * - REMOVE only when a per-device sink proved the token dead: the server then stops pushing to
 *   that phone (§3.2.4), so a wrong REMOVE silences a user. A broadcast sink's dead-token is
 *   a bug in that sink and counts as a failure.
 * - FAIL when any sink neither delivered, skipped nor queued: the server logs our error text
 *   and never retries (§3.2.5, §0.5), so the text names each sink and what went wrong.
 * - OK otherwise, including "no route wanted it".
 */
export function replyFor(deliveries: readonly Delivery[]): PushResponse {
  const failures: string[] = [];
  for (const { sink, result } of deliveries) {
    if (result.kind === 'dead-token' && sink.perDevice) return { status: 'REMOVE' };
    if (result.kind === 'retryable' || result.kind === 'permanent' || result.kind === 'dead-token') {
      failures.push(`${sink.name}: ${('detail' in result && result.detail) || result.reason}`);
    }
  }
  if (failures.length) return { status: 'FAIL', error: failures.join('; ') };
  return { status: 'OK' };
}

export type Dispatcher = {
  /** Delivers to every target concurrently and resolves with each sink's result. */
  deliver(n: PushNotification, targets: readonly Sink[], log: () => Logger): Promise<Delivery[]>;
};

export type DispatcherOptions = {
  /** Default per-sink deadline; a sink's own `deadline` config wins. */
  deadlineMs: number;
  sinkDeadlines: ReadonlyMap<string, number>;
  metrics: Metrics;
};

export function createDispatcher(opts: DispatcherOptions): Dispatcher {
  const { metrics } = opts;

  async function one(sink: Sink, n: PushNotification, log: () => Logger): Promise<Delivery> {
    const started = performance.now();
    const result = await attempt(sink, n, opts.sinkDeadlines.get(sink.name) ?? opts.deadlineMs);
    const seconds = (performance.now() - started) / 1000;
    metrics.outcome(sink.name, result.kind, 'reason' in result ? result.reason : '', seconds);
    if (result.kind !== 'delivered' && result.kind !== 'skipped') {
      log().warn({ sink: sink.name, outcome: result.kind, reason: result.reason, detail: result.detail }, 'delivery did not succeed');
    }
    return { sink, result };
  }

  return {
    deliver(n, targets, log) {
      if (targets.length === 1) return one(targets[0] as Sink, n, log).then((d) => [d]);
      return Promise.all(targets.map((s) => one(s, n, log)));
    },
  };
}

/** One send bounded by `ms`; a throwing sink is a bug, reported as a permanent failure. */
export async function attempt(sink: Sink, n: PushNotification, ms: number): Promise<Outcome> {
  const ac = new AbortController();
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<Outcome>((resolve) => {
    timer = setTimeout(() => {
      ac.abort();
      resolve({ kind: 'retryable', reason: 'deadline', detail: `no answer within ${ms} ms` });
    }, ms);
  });
  try {
    return await Promise.race([
      sink.send(n, ac.signal).catch(
        (err: unknown): Outcome => ({ kind: 'permanent', reason: 'sink_error', detail: `sink failed: ${(err as Error)?.message ?? err}` }),
      ),
      deadline,
    ]);
  } finally {
    clearTimeout(timer);
  }
}
