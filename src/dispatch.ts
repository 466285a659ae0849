// Fan-out with deadlines -> outcomes -> one reply. `replyFor` is the only place that turns
// what sinks did into Mattermost's OK / REMOVE / FAIL (contract §3).
//
// Mattermost never retries (§0.5), so "OK" must mean "will be delivered": a delivery that has
// not succeeded by its deadline, or that meets a sink which is down or saturated, is written
// to the outbox before the reply goes out, and the outbox owns it from then on.
import type { Logger } from 'pino';
import type { PushNotification, PushResponse } from './contract.js';
import type { Metrics } from './metrics.js';
import { attempt } from './attempt.js';
import type { DeadTokens } from './dead-tokens.js';
import type { Dedup } from './dedup.js';
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
  /** The same (ack_id, sink) is delivered once within the window, with or without an outbox. */
  dedup: Dedup;
  /** Tokens a per-device sink proved dead in a background retry: the next push answers REMOVE. */
  deadTokens: DeadTokens;
  metrics: Metrics;
  /** Without an outbox (`store: none`) a delivery that cannot be made now answers FAIL. */
  outbox?: Outbox;
};

const DUPLICATE: Result = { kind: 'skipped', reason: 'duplicate' };
const REMEMBERED_DEAD = {
  kind: 'dead-token',
  reason: 'remembered_dead_token',
  detail: 'the provider reported this token dead during a background retry',
} as const satisfies Result;
const inArray = (d: Delivery) => [d];

export function createDispatcher(opts: DispatcherOptions): Dispatcher {
  const { metrics, outbox, dedup, deadTokens } = opts;
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
    if (!sink.perDevice) return deduplicated(sink, n, log);
    return deadTokens.take(sink.name, n.device_id).then(
      (dead): Delivery | Promise<Delivery> => {
        if (!dead) return deduplicated(sink, n, log);
        metrics.outcome(sink.name, 'dead-token', REMEMBERED_DEAD.reason);
        return { sink, result: REMEMBERED_DEAD };
      },
      () => deduplicated(sink, n, log),
    );
  }

  function deduplicated(sink: Sink, n: PushNotification, log: () => Logger): Promise<Delivery> {
    // Test pushes carry an empty ack_id (§2.2): each is its own request, never a resend.
    if (n.ack_id === '') return deliverAndSettle(sink, undefined, n, log);
    const key = n.ack_id;
    return dedup.acquire(key, sink.name, log).then((fresh) => (fresh ? deliverAndSettle(sink, key, n, log) : duplicate(sink)));
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
    if (key !== undefined) return dedup.release(key, sink.name).then(() => ({ sink, result }));
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
        // If even that fails, the reply must say the notification is gone: FAIL with both
        // reasons, counted as lost (never an OK, never a silent drop).
        return outbox.bury(sink.name, n, outcome).then(
          () => outcome,
          (err): Result => {
            metrics.lost(sink.name);
            log().error({ sink: sink.name, err: (err as Error).message }, 'cannot write the dead letter: this notification is lost');
            return { ...outcome, detail: `${outcome.detail ?? outcome.reason}; not kept as a dead letter either (${(err as Error).message}): lost` };
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
      metrics.lost(sink.name);
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
