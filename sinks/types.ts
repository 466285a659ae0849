// The one interface every sink implements, and the outcomes it reports.
//
// Outcomes are data (STYLE.md §2): a sink resolves `send()` to one of these and throws only
// for bugs. `reason` is a short stable code (it becomes a metric label); `detail` is the
// human text that ends up in logs and in Mattermost's FAIL error.
import type { Logger } from 'pino';
import type { PushNotification } from '../src/contract.js';

export type Outcome =
  | { kind: 'delivered' }
  | { kind: 'skipped'; reason: string }
  /** The provider proved the device token dead. Only honoured from a per-device sink. */
  | { kind: 'dead-token'; reason: string; detail?: string }
  /** Worth trying again later (broker away, 5xx, 429 with Retry-After). */
  | { kind: 'retryable'; reason: string; detail?: string; retryAfterMs?: number }
  /** Trying again will not help (bad credentials, payload rejected). */
  | { kind: 'permanent'; reason: string; detail?: string };

export type OutcomeKind = Outcome['kind'];

export type SinkState = { ready: boolean; state: string; detail?: string };

export interface Sink {
  readonly name: string;
  readonly type: string;
  /**
   * True when the sink delivers to the notification's own device token (FCM, APNs, upstream
   * proxy). Only such a sink's dead-token outcome may become REMOVE: a broadcast sink such as
   * MQTT knows nothing about the phone (STYLE.md §3).
   */
  readonly perDevice: boolean;
  /** Every (kind, reason) the sink can report, so each metric series exists at 0 from the start. */
  readonly reasons: ReadonlyArray<readonly [OutcomeKind, string]>;
  /** Connects; resolves when the sink is usable or has logged why it is not yet. */
  start(): Promise<void>;
  state(): SinkState;
  /** Delivers one notification. `signal` aborts when the deadline passes: stop waiting then. */
  send(n: PushNotification, signal: AbortSignal): Promise<Outcome>;
  close(): Promise<void>;
}

export type SinkContext = { logger: Logger };
export type SinkFactory<C> = (name: string, config: C, ctx: SinkContext) => Sink;
