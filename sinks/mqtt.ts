// MQTT sink: one publish per notification, to a templated topic, as the notification's text,
// its JSON, or a template. A broadcast sink: it never knows whether a phone's token is dead,
// so it never reports dead-token.
import { readFileSync } from 'node:fs';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import { hasText, type PushNotification } from '../src/contract.js';
import { z } from 'zod';
import { duration, flag, int, numeric, sinkSchema, template, url } from '../src/schema.js';
import { compileTemplate, mqttTopicLevel } from '../src/template.js';
import { autoBroker, type AutoBroker } from './mqtt-broker.js';
import { defineSink, type Outcome, type SinkFactory, type SinkState } from './types.js';

const schema = sinkSchema('mqtt', {
  /** Omitted or `auto`: use a broker on 127.0.0.1:autoPort, or start an embedded one there. */
  url: z.union([z.literal('auto'), url(['mqtt', 'mqtts', 'tcp', 'tls', 'ssl', 'ws', 'wss'])]).default('auto'),
  autoPort: int(1, 65535).default(1883),
  topic: template(mqttTopicLevel)
    .refine((t) => !/[+#\p{Cc}]/u.test(t.replace(/\{[a-z_]+\}/g, '')), {
      message: 'a topic to publish to may not contain +, # or control characters outside placeholders',
    })
    .default('mm/_notif'),
  format: z.enum(['message', 'json', 'template']).default('message'),
  template: template().optional(),
  qos: z.preprocess(numeric, z.union([z.literal(0), z.literal(1), z.literal(2)], { error: 'must be 0, 1 or 2' })).default(1),
  retain: flag.default(false),
  /** 5 lets the broker say why it refuses a publish (e.g. an ACL); 4 is MQTT 3.1.1, which aedes speaks. */
  protocolVersion: z.preprocess(numeric, z.union([z.literal(4), z.literal(5)], { error: 'must be 4 (MQTT 3.1.1) or 5' })).default(4),
  username: z.string().optional(),
  password: z.string().optional(),
  clientId: z.string().min(1).optional(),
  tls: z
    .strictObject({
      ca: z.string().optional(),
      cert: z.string().optional(),
      key: z.string().optional(),
      rejectUnauthorized: flag.default(true),
    })
    .optional(),
  reconnectMin: duration.default(500),
  reconnectMax: duration.default(10_000),
}).superRefine((sink, ctx) => {
  if (sink.format === 'template' && !sink.template) {
    ctx.addIssue({ code: 'custom', path: ['template'], message: 'required when format is template' });
  }
});
export type MqttSinkConfig = z.output<typeof schema>;

/** The zero-config relay (interface.md): the seed's behaviour, `message` text to `mm/_notif`. */
export function defaultMqttSink(env: Record<string, string | undefined>): Record<string, unknown> {
  return {
    type: 'mqtt',
    ...(env.PUSH_RELAY_MQTT_URL ? { url: env.PUSH_RELAY_MQTT_URL } : {}),
    ...(env.PUSH_RELAY_MQTT_TOPIC ? { topic: env.PUSH_RELAY_MQTT_TOPIC } : {}),
    ...(env.PUSH_RELAY_MQTT_AUTO_PORT ? { autoPort: env.PUSH_RELAY_MQTT_AUTO_PORT } : {}),
    format: 'message',
  };
}

/**
 * MQTT 5 PUBACK reason codes that mean "this publish will never be accepted as it is"
 * (OASIS MQTT 5.0 §3.4.2.1). 0x97 quota exceeded and 0x80 unspecified stay retryable.
 * MQTT 3.1.1 has no such codes: a broker that denies a publish drops it silently.
 */
const PERMANENT_PUBACK: Record<number, string> = {
  0x83: 'implementation_specific_error',
  0x87: 'not_authorized',
  0x90: 'topic_name_invalid',
  0x99: 'payload_format_invalid',
};

const NOT_CONNECTED: Outcome = { kind: 'retryable', reason: 'broker_unavailable', detail: 'MQTT broker not connected' };
const NO_TEXT: Outcome = { kind: 'skipped', reason: 'no_text' };
const DELIVERED: Outcome = { kind: 'delivered' };
const CONNECTED: SinkState = { ready: true, state: 'connected' };
const TOPIC_TOO_LONG: Outcome = { kind: 'permanent', reason: 'topic_too_long', detail: 'rendered MQTT topic exceeds 65535 bytes' };
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms).unref());

const createMqttSink: SinkFactory<MqttSinkConfig> = (name, config, { logger: log }) => {
  const topicOf = compileTemplate(config.topic, mqttTopicLevel);
  const bodyOf = payloadRenderer(config);
  let client: MqttClient | undefined;
  let broker: AutoBroker | undefined;
  let url = config.url;
  let lastError: string | undefined;
  let delay = config.reconnectMin;
  // Senders waiting for the broker to come back; woken on 'connect'.
  const waiting = new Set<() => void>();

  function connect(): MqttClient {
    const opts: IClientOptions = {
      clientId: config.clientId ?? `push-relay-${name}-${process.pid}-${Math.random().toString(16).slice(2, 8)}`,
      username: config.username,
      password: config.password,
      reconnectPeriod: config.reconnectMin,
      connectTimeout: 5000,
      clean: true,
      protocolVersion: config.protocolVersion,
      // We decide what happens to a publish while the broker is away (the dispatcher's
      // deadline and, later, the outbox); mqtt.js must not queue it behind our back.
      queueQoSZero: false,
      // mqtt.js logs through `debug` on every packet; ours are the log lines that matter.
      log: () => {},
      // Re-arming the keepalive timer on every packet sent cost ~0.5% of the relay's CPU; a
      // PINGREQ every keepalive period, busy or not, costs nothing.
      reschedulePings: false,
      ...tlsOptions(config),
    };
    const c = mqtt.connect(url, opts);
    c.on('connect', () => {
      // Each publish is a small packet whose PUBACK the HTTP answer waits for: Nagle's
      // algorithm would hold it back until the previous one is acknowledged.
      (c.stream as { setNoDelay?: (on: boolean) => void }).setNoDelay?.(true);
      if (lastError !== undefined || delay !== config.reconnectMin) log.info({ url: redact(url) }, 'MQTT broker connected');
      lastError = undefined;
      delay = config.reconnectMin;
      c.options.reconnectPeriod = delay;
      for (const wake of waiting) wake();
    });
    c.on('error', (err) => {
      if (lastError !== err.message) log.warn({ url: redact(url), err: err.message }, 'MQTT connection error; retrying');
      lastError = err.message;
    });
    c.on('close', () => {
      // Exponential backoff with jitter between reconnects (mqtt.js itself uses a fixed period).
      delay = Math.min(config.reconnectMax, delay * 2);
      c.options.reconnectPeriod = Math.round(delay * (0.5 + Math.random() / 2));
    });
    c.on('offline', () => log.warn({ url: redact(url) }, 'MQTT broker unreachable; notifications wait for it'));
    return c;
  }

  function waitForConnect(signal: AbortSignal): Promise<boolean> {
    return new Promise((resolve) => {
      if (signal.aborted) return resolve(false);
      const done = (ok: boolean) => {
        waiting.delete(wake);
        signal.removeEventListener('abort', abort);
        resolve(ok);
      };
      const wake = () => done(true);
      const abort = () => done(false);
      waiting.add(wake);
      signal.addEventListener('abort', abort, { once: true });
    });
  }

  // Publishes made in one event-loop turn (one per HTTP request that arrived in it) leave in
  // one write: without this each took its own writev syscall, 16% of the relay's CPU.
  let corked: MqttClient['stream'] | undefined;
  function coalesceWrites(c: MqttClient) {
    const stream = c.stream;
    if (!stream || corked === stream) return;
    corked = stream;
    stream.cork();
    setImmediate(() => {
      corked = undefined;
      stream.uncork();
    });
  }

  function publishTo(c: MqttClient, n: PushNotification, body: string | Buffer): Promise<Outcome> {
    const topic = topicOf(n);
    // MQTT 3.1.1 §1.5.3: at most 65535 bytes; mqtt.js would throw mid-write and stall the client.
    if (topic.length > 21845 && Buffer.byteLength(topic) > 65535) return Promise.resolve(TOPIC_TOO_LONG);
    return publish(c, topic, body);
  }

  const publishOptions = { qos: config.qos, retain: config.retain } as const;
  function publish(c: MqttClient, topic: string, body: string | Buffer): Promise<Outcome> {
    coalesceWrites(c);
    return new Promise((resolve) => {
      c.publish(topic, body, publishOptions, (err) => {
        if (!err) return resolve(DELIVERED);
        const code = (err as Error & { code?: number }).code;
        const permanent = typeof code === 'number' ? PERMANENT_PUBACK[code] : undefined;
        if (permanent) resolve({ kind: 'permanent', reason: permanent, detail: `MQTT broker refused the publish to ${topic}: ${err.message}` });
        else resolve({ kind: 'retryable', reason: 'publish_failed', detail: `MQTT publish failed: ${err.message}` });
      });
    });
  }

  return {
    name,
    type: 'mqtt',
    perDevice: false,
    reasons: [
      ['delivered', ''],
      ['skipped', 'no_text'],
      ['retryable', 'broker_unavailable'],
      ['retryable', 'publish_failed'],
      ['permanent', 'topic_too_long'],
      ...Object.values(PERMANENT_PUBACK).map((r) => ['permanent', r] as const),
    ],

    async start() {
      if (config.url === 'auto') {
        broker = await autoBroker(config.autoPort, log);
        url = broker.url;
        const filter = `${config.topic.split('/')[0]}/#`;
        log.info(
          `watch notifications with: mosquitto_sub -h 127.0.0.1 -p ${config.autoPort} -v -t '${filter.includes('{') ? '#' : filter}'`,
        );
      }
      client = connect();
      const c = client;
      // Give the broker a moment so the first notifications do not race the connection;
      // a broker that is down is reported by /readyz, not by refusing to start.
      const first = new AbortController();
      const timer = setTimeout(() => first.abort(), 3000);
      const ok = await waitForConnect(first.signal);
      clearTimeout(timer);
      if (!ok && !c.connected) log.warn({ url: redact(url) }, 'MQTT broker not reachable yet; starting anyway');
    },

    state(): SinkState {
      if (client?.connected) return CONNECTED;
      return { ready: false, state: client ? 'disconnected' : 'not started', ...(lastError ? { detail: lastError } : {}) };
    },

    send(n: PushNotification, signal: AbortSignal): Promise<Outcome> {
      const body = bodyOf(n);
      if (body === undefined) return Promise.resolve(NO_TEXT);
      const c = client;
      if (!c) return Promise.resolve(NOT_CONNECTED);
      // The common case stays free of extra promise hops: connected, publish now.
      if (c.connected) return publishTo(c, n, body);
      return waitForConnect(signal).then((up) => (up ? publishTo(c, n, body) : NOT_CONNECTED));
    },

    async close() {
      for (const wake of waiting) wake();
      if (client) {
        // A graceful end waits for in-flight publishes; a hung broker never answers them.
        const c = client;
        const graceful = c.endAsync(false).catch(() => {});
        if ((await Promise.race([graceful.then(() => true), sleep(2000).then(() => false)])) === false) {
          await c.endAsync(true).catch(() => {});
        }
      }
      if (broker) await broker.close();
    },
  };
};

/** undefined = nothing to publish (a push without text on a text format). */
function payloadRenderer(config: MqttSinkConfig): (n: PushNotification) => string | Buffer | undefined {
  switch (config.format) {
    case 'message':
      return (n) => (hasText(n) ? Buffer.from(n.message, 'utf8') : undefined);
    case 'json':
      return (n) => JSON.stringify(n);
    case 'template': {
      const render = compileTemplate(config.template ?? '{message}');
      return (n) => (hasText(n) ? render(n) : undefined);
    }
  }
}

function tlsOptions(config: MqttSinkConfig): Partial<IClientOptions> {
  if (!config.tls) return {};
  const read = (f?: string) => (f ? readFileSync(f) : undefined);
  return {
    ca: read(config.tls.ca),
    cert: read(config.tls.cert),
    key: read(config.tls.key),
    rejectUnauthorized: config.tls.rejectUnauthorized,
  };
}

/** URLs may carry credentials; logs must not. */
function redact(u: string): string {
  try {
    const parsed = new URL(u);
    if (parsed.password) parsed.password = '***';
    return parsed.toString();
  } catch {
    return u;
  }
}

export default defineSink({ type: 'mqtt', schema, create: createMqttSink });
