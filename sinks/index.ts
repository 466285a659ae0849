// The registry: the sink modules, each `sinks/<type>.ts` exporting its type, config schema
// and factory. Adding a sink type is its file, a line here and its tests; nothing in src/.
import type { SinkConfigBase } from '../src/schema.js';
import apns from './apns.js';
import fcm from './fcm.js';
import email from './email.js';
import log from './log.js';
import mqtt, { defaultMqttSink } from './mqtt.js';
import type { Sink, SinkContext, SinkModule } from './types.js';
import upstream from './upstream.js';
import webhook from './webhook.js';
import webpush from './webpush.js';

// eslint-disable-next-line @typescript-eslint/no-explicit-any -- each module's factory takes its own config type
export const SINK_MODULES: ReadonlyArray<SinkModule<any>> = [mqtt, log, fcm, apns, upstream, webpush, email, webhook];

const byType = new Map(SINK_MODULES.map((m) => [m.type, m]));

export function createSink(name: string, config: SinkConfigBase, ctx: SinkContext): Sink {
  const module = byType.get(config.type);
  if (!module) throw new Error(`unknown sink type "${config.type}"`);
  return module.create(name, config, ctx);
}

/** The sinks of the zero-config relay (interface.md): one MQTT sink named `mqtt`. */
export function defaultSinks(env: Record<string, string | undefined>): Record<string, unknown> {
  return { mqtt: defaultMqttSink(env) };
}

export type { Outcome, OutcomeKind, Sink, SinkContext, SinkModule, SinkState } from './types.js';
