// Fan-out with deadlines -> outcomes -> one reply. `replyFor` is the only place that turns
// what sinks did into Mattermost's OK / REMOVE / FAIL (contract §3).
//
// Mattermost never retries (§0.5), so "OK" must mean "will be delivered": a delivery that has
// not succeeded by its deadline, or that meets a sink which is down or saturated, is written
// to the outbox before the reply goes out, and the outbox owns it from then on.
import { setMaxListeners } from 'node:events';
import type { Logger } from 'pino';
import type { PushNotification, PushResponse } from './contract.js';
import type { Metrics } from './metrics.js';
import type { Outbox } from './outbox.js';
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
 * - OK otherwise, including "no route wanted it" and "queued in the outbox".
 */
export function replyFor(deliveries: readonly Delivery[]): PushResponse {
  const failures: string[] = [];
  for (const { sink, result } of deliveries) {
    if (result.kind === 'dead-token' && sink.perDevice) return { status: 'REMOVE' };
    if (result.kind === 'retryable' || result.kind === 'permanent' || result.kind === 'dead-token') {
      failures.push(`${sink.name}: ${result.detail || result.reason}`);
    }
  }
  if (failures.length) return { status: 'FAIL', error: failures.join('; ') };
  return { status: 'OK' };
}

export type Dispatcher = {
  /** Delivers to every target concurrently and resolves with each sink's result. */
  deliver(n: PushNotification, targets: readonly Sink[], log: () => Logger): Promise<Delivery[]>;
};

export type SinkPolicy = { deadlineMs: number; concurrency: number; queue: number };

export type DispatcherOptions = {
  policy: (sink: string) => SinkPolicy;
  dedupWindowMs: number;
  metrics: Metrics;
  /** Without an outbox (`store: none`) a delivery that cannot be made now answers FAIL. */
  outbox?: Outbox;
};

const DUPLICATE: Result = { kind: 'skipped', reason: 'duplicate' };
const inArray = (d: Delivery) => [d];

export function createDispatcher(opts: DispatcherOptions): Dispatcher {
  const { metrics, outbox } = opts;
  const lanes = new Map<string, Lane>();
  const laneOf = (sink: Sink) => {
    let lane = lanes.get(sink.name);
    if (!lane) {
      const p = opts.policy(sink.name);
      lane = createLane(p.concurrency, outbox ? p.queue : Number.MAX_SAFE_INTEGER, p.deadlineMs);
      lanes.set(sink.name, lane);
    }
    return lane;
  };

  // The hot path chains promises by hand rather than with async functions: each `await` is a
  // promise hop, and at 15 000 notifications/s the hops of a notification added up to several
  // per cent of the relay's CPU.
  function one(sink: Sink, n: PushNotification, log: () => Logger): Promise<Delivery> {
    // Test pushes carry an empty ack_id (§2.2): each is its own request, never a resend.
    const key = outbox && n.ack_id !== '' ? n.ack_id : undefined;
    const fresh = key === undefined || outbox!.acquire(key, sink.name, opts.dedupWindowMs, log);
    if (fresh === true) return deliverAndSettle(sink, key, n, log);
    if (fresh === false) return Promise.resolve(duplicate(sink));
    return fresh.then((ok) => (ok ? deliverAndSettle(sink, key, n, log) : duplicate(sink)));
  }

  function deliverAndSettle(sink: Sink, key: string | undefined, n: PushNotification, log: () => Logger): Promise<Delivery> {
    return deliverOnce(sink, n, log).then((result) => settle(sink, key, result, log));
  }

  function duplicate(sink: Sink): Delivery {
    metrics.suppressed(sink.name);
    metrics.outcome(sink.name, 'skipped', 'duplicate');
    return { sink, result: DUPLICATE };
  }

  function settle(sink: Sink, key: string | undefined, result: Result, log: () => Logger): Delivery | Promise<Delivery> {
    if (result.kind === 'delivered' || result.kind === 'skipped') return { sink, result };
    if (result.kind === 'queued') {
      // A sink that is down queues every request: its own log says so once, not per request.
      log().debug({ sink: sink.name, reason: result.reason, detail: result.detail }, 'queued in the outbox');
      return { sink, result };
    }
    log().warn({ sink: sink.name, outcome: result.kind, reason: result.reason, detail: result.detail }, 'not delivered');
    // Not accepted: a resend of this notification deserves a real attempt.
    if (key !== undefined) return outbox!.release(key, sink.name).then(() => ({ sink, result }));
    return { sink, result };
  }

  function deliverOnce(sink: Sink, n: PushNotification, log: () => Logger): Promise<Result> {
    const state = sink.state();
    if (outbox && !state.ready) {
      // Waiting for a sink we know is down only spends Mattermost's 30 s budget.
      return spill(sink, n, { kind: 'retryable', reason: 'sink_unavailable', detail: state.detail ?? state.state }, log);
    }
    const lane = laneOf(sink);
    const entered = lane.enter();
    if (entered === true) return attemptIn(lane, sink, n, log);
    const saturated = () => spill(sink, n, { kind: 'retryable', reason: 'backpressure', detail: 'sink saturated' }, log);
    if (entered === false) return saturated();
    return entered.then((ok) => (ok ? attemptIn(lane, sink, n, log) : saturated()));
  }

  function attemptIn(lane: Lane, sink: Sink, n: PushNotification, log: () => Logger): Promise<Result> {
    const started = performance.now();
    // An attempt that passes its deadline may still succeed. Then its outbox copy is taken
    // back if no worker has claimed it yet; otherwise the notification went out twice.
    let copyId: number | undefined;
    let deliveredLate = false;
    const takeBack = (id: number) => {
      void outbox!.cancel(id).then((cancelled) => cancelled || metrics.duplicate(sink.name), () => metrics.duplicate(sink.name));
    };
    const late = (o: Outcome) => {
      if (o.kind !== 'delivered' || !outbox) return;
      if (copyId !== undefined) takeBack(copyId);
      else deliveredLate = true;
    };
    return attempt(sink, n, lane.deadlineMs, late).then((outcome): Result | Promise<Result> => {
      lane.leave();
      metrics.outcome(sink.name, outcome.kind, 'reason' in outcome ? outcome.reason : '', (performance.now() - started) / 1000);
      if (outcome.kind === 'permanent' && outbox) {
        // FAIL tells Mattermost; the dead letter lets an operator replay it once the sink is fixed.
        return outbox.bury(sink.name, n, outcome).then(
          () => outcome,
          (err) => {
            log().error({ err: (err as Error).message }, 'cannot write the dead letter');
            return outcome;
          },
        );
      }
      if (outcome.kind !== 'retryable' || !outbox) return outcome;
      return spill(sink, n, outcome, log, true, (id) => {
        if (deliveredLate) takeBack(id);
        else copyId = id;
      });
    });
  }

  async function spill(
    sink: Sink,
    n: PushNotification,
    why: Extract<Outcome, { kind: 'retryable' }>,
    log: () => Logger,
    attempted = false,
    onStored?: (id: number) => void,
  ): Promise<Result> {
    if (!outbox) return why;
    try {
      const id = await outbox.enqueue(sink.name, n, why, attempted);
      onStored?.(id);
      metrics.outcome(sink.name, 'queued', why.reason);
      return { kind: 'queued', reason: why.reason, detail: why.detail };
    } catch (err) {
      log().error({ sink: sink.name, err: (err as Error).message }, 'cannot write to the outbox: answering FAIL');
      return { kind: 'retryable', reason: 'outbox_unavailable', detail: `${why.detail ?? why.reason}; outbox write failed: ${(err as Error).message}` };
    }
  }

  return {
    deliver(n, targets, log) {
      if (targets.length === 1) return one(targets[0] as Sink, n, log).then(inArray);
      return Promise.all(targets.map((s) => one(s, n, log)));
    },
  };
}

/**
 * One send bounded by `ms`; a throwing sink is a bug, reported as a permanent failure.
 * `onLate` hears the real outcome of a send that outlived its deadline.
 */
export function attempt(sink: Sink, n: PushNotification, ms: number, onLate?: (o: Outcome) => void): Promise<Outcome> {
  return new Promise((resolve) => {
    let settled = false;
    const deadline = joinDeadline(ms, () => {
      if (settled) return;
      settled = true;
      resolve({ kind: 'retryable', reason: 'deadline', detail: `no answer within ${ms} ms` });
    });
    let sent: Promise<Outcome>;
    try {
      sent = sink.send(n, deadline.signal);
    } catch (err) {
      sent = Promise.reject(err);
    }
    const done = (o: Outcome) => {
      deadline.leave();
      if (!settled) {
        settled = true;
        resolve(o);
      } else onLate?.(o);
    };
    sent.then(done, (err) => done(bug(err)));
  });
}

const bug = (err: unknown): Outcome => ({ kind: 'permanent', reason: 'sink_error', detail: `sink failed: ${(err as Error)?.message ?? err}` });

/**
 * Deadlines shared by the attempts that start within the same 10 ms with the same length: one
 * timer and one AbortSignal per group instead of per attempt (at 10 000 notifications/s those
 * were 3% of the relay's CPU). An attempt gets between `ms` and `ms` + 10 ms.
 */
const GRANULARITY_MS = 10;
type DeadlineGroup = { slot: number; controller: AbortController; waiters: Set<() => void> };
/** The open group per deadline length. */
const groups = new Map<number, DeadlineGroup>();

function joinDeadline(ms: number, onExpire: () => void): { signal: AbortSignal; leave(): void } {
  const slot = Math.floor(Date.now() / GRANULARITY_MS);
  let g = groups.get(ms);
  if (!g || g.slot !== slot) {
    const group: DeadlineGroup = { slot, controller: new AbortController(), waiters: new Set() };
    setMaxListeners(0, group.controller.signal);
    groups.set(ms, group);
    setTimeout(() => {
      if (groups.get(ms) === group) groups.delete(ms);
      group.controller.abort();
      for (const expire of group.waiters) expire();
    }, ms + GRANULARITY_MS);
    g = group;
  }
  const group = g;
  group.waiters.add(onExpire);
  return { signal: group.controller.signal, leave: () => group.waiters.delete(onExpire) };
}

/** A concurrency cap with a bounded wait queue: `enter()` is false when both are full. */
type Lane = { deadlineMs: number; enter(): Promise<boolean> | boolean; leave(): void };

function createLane(cap: number, queueMax: number, deadlineMs: number): Lane {
  let active = 0;
  const waiting: Array<() => void> = [];
  return {
    deadlineMs,
    enter() {
      if (active < cap) {
        active++;
        return true;
      }
      if (waiting.length >= queueMax) return false;
      return new Promise<boolean>((resolve) => waiting.push(() => resolve(true)));
    },
    leave() {
      const next = waiting.shift();
      if (next) next();
      else active--;
    },
  };
}
