// The registry: a config `type` -> the factory that builds that sink.
import type { SinkConfig } from '../src/config.js';
import { createLogSink } from './log.js';
import { createMqttSink } from './mqtt.js';
import type { Sink, SinkContext, SinkFactory } from './types.js';

type FactoryFor = { [T in SinkConfig['type']]: SinkFactory<Extract<SinkConfig, { type: T }>> };

const factories: FactoryFor = {
  mqtt: createMqttSink,
  log: createLogSink,
};

export function createSink(name: string, config: SinkConfig, ctx: SinkContext): Sink {
  const factory = factories[config.type] as SinkFactory<SinkConfig>;
  return factory(name, config, ctx);
}

export type { Outcome, OutcomeKind, Sink, SinkContext, SinkState } from './types.js';
