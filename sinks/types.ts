// The one interface every sink implements, the outcomes it reports, and what a sink module
// exports so that adding a sink type is one file here plus a line in ./index.ts.
//
// Outcomes are data (STYLE.md §2): a sink resolves `send()` to one of these and throws only
// for bugs. `reason` is a short stable code (it becomes a metric label); `detail` is the
// human text that ends up in logs and in Mattermost's FAIL error.
import type { Logger } from 'pino';
import type { Counter, CounterConfiguration, Gauge, GaugeConfiguration, Histogram, HistogramConfiguration } from 'prom-client';
import type { z } from 'zod';
import type { PushNotification } from '../src/contract.js';
import type { DeviceRegistry } from '../src/devices.js';
import type { KeyValue } from '../src/store/types.js';

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
   * proxy, Web Push). Only such a sink's dead-token outcome may become REMOVE: a broadcast
   * sink such as MQTT knows nothing about the phone (STYLE.md §3).
   */
  readonly perDevice: boolean;
  /** Every (kind, reason) the sink can report, so each metric series exists at 0 from the start. */
  readonly reasons: ReadonlyArray<readonly [OutcomeKind, string]>;
  /** Connects; resolves when the sink is usable or has logged why it is not yet. */
  start(): Promise<void>;
  state(): SinkState;
  /** Delivers one notification. `signal` aborts when the deadline passes: stop waiting then. */
  send(n: PushNotification, signal: AbortSignal): Promise<Outcome>;
  /** Optional: the VAPID public key browsers subscribe with (a Web Push sink; the pairing page shows it). */
  readonly vapidPublicKey?: string;
  /** Optional: Mattermost's ack for a push this sink delivered (the upstream sink forwards it). */
  ack?(body: string, signal: AbortSignal): Promise<void>;
  close(): Promise<void>;
}

/**
 * How a sink declares series of its own, beside its code (STYLE.md §7). Get-or-create by name:
 * a sink built again (a reload) or two sinks sharing a series (the official proxy's names,
 * declared by both FCM and APNs) get the one already registered.
 */
export type SinkMetrics = {
  counter<L extends string>(c: Omit<CounterConfiguration<L>, 'registers'>): Counter<L>;
  gauge<L extends string>(c: Omit<GaugeConfiguration<L>, 'registers'>): Gauge<L>;
  histogram<L extends string>(c: Omit<HistogramConfiguration<L>, 'registers'>): Histogram<L>;
};

/** What the relay gives each sink it builds. */
export type SinkContext = {
  /** A child logger with `sink: <name>` already bound. */
  logger: Logger;
  /** Declares the sink's own series on the relay's registry (get-or-create: a reload re-declares). */
  metrics: SinkMetrics;
  /** A key-value namespace of this sink's own in the relay's store (SQLite, PostgreSQL or memory). */
  store: KeyValue;
  /** The relay's device registry: devices it issued tokens for, and their targets. */
  devices: DeviceRegistry;
  /** `mattermost.url` from the config, for links to posts (permalinks). */
  mattermostUrl?: string;
};

export type SinkFactory<C> = (name: string, config: C, ctx: SinkContext) => Sink;

/**
 * What `sinks/<type>.ts` exports as its default: its config `type`, its schema (built with
 * `sinkSchema` from src/schema.ts) and its factory.
 */
export type SinkModule<S extends z.ZodType = z.ZodType> = {
  type: string;
  schema: S;
  create: SinkFactory<z.output<S>>;
};

/** Types a sink module: `export default defineSink({ type, schema, create })`. */
export const defineSink = <S extends z.ZodType>(m: SinkModule<S>): SinkModule<S> => m;
