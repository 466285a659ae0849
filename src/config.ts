// The relay's configuration: a YAML or JSON file, `${VAR}` interpolation, env overrides and
// strict validation. A mistake stops start-up with the key path and the reason, before
// anything listens: a relay that silently ignores `qso: 1` is worse than one that refuses.
import { readFileSync } from 'node:fs';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { compileTemplate, mqttTopicLevel } from './template.js';

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n  ${problems.join('\n  ')}`);
  }
}

// ---- value types that accept what people write in YAML and what ${VAR} produces ----

const UNITS_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
/** `500ms`, `5s`, `1h`, or a number of milliseconds. */
const duration = z.union([z.number().int().nonnegative(), z.string()]).transform((v, ctx) => {
  if (typeof v === 'number') return v;
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$/.exec(v);
  if (!m) {
    ctx.addIssue({ code: 'custom', message: `"${v}" is not a duration (e.g. 500ms, 5s, 1h)` });
    return z.NEVER;
  }
  return Math.round(Number(m[1]) * (UNITS_MS[m[2] ?? 'ms'] as number));
});

const UNITS_BYTES: Record<string, number> = { b: 1, kb: 1024, kib: 1024, mb: 1024 ** 2, mib: 1024 ** 2 };
/** `512kb`, `1mb`, or a number of bytes. */
const size = z.union([z.number().int().positive(), z.string()]).transform((v, ctx) => {
  if (typeof v === 'number') return v;
  const m = /^\s*(\d+)\s*([a-z]*)\s*$/i.exec(v);
  const unit = UNITS_BYTES[(m?.[2] || 'b').toLowerCase()];
  if (!m || !unit) {
    ctx.addIssue({ code: 'custom', message: `"${v}" is not a size (e.g. 1mb, 512kb, 1048576)` });
    return z.NEVER;
  }
  return Number(m[1]) * unit;
});

const numeric = (v: unknown) => (typeof v === 'string' && /^\s*-?\d+\s*$/.test(v) ? Number(v) : v);
const boolish = (v: unknown) => (v === 'true' ? true : v === 'false' ? false : v);
const int = (min: number, max: number) => z.preprocess(numeric, z.number().int().min(min).max(max));
const flag = z.preprocess(boolish, z.boolean());

const url = (protocols: string[]) =>
  z.string().refine(
    (v) => {
      try {
        return protocols.includes(new URL(v).protocol.replace(/:$/, ''));
      } catch {
        return false;
      }
    },
    { message: `must be a URL with scheme ${protocols.join(', ')}` },
  );

const template = (escape?: (s: string) => string) =>
  z.string().superRefine((v, ctx) => {
    try {
      compileTemplate(v, escape);
    } catch (err) {
      ctx.addIssue({ code: 'custom', message: (err as Error).message });
    }
  });

const oneOrMany = z.union([z.string(), z.array(z.string()).min(1)]).transform((v) => (Array.isArray(v) ? v : [v]));

// ---- sinks ----

/** Per-sink overrides of the `delivery` defaults. */
const sinkDelivery = {
  deadline: duration.optional(),
  ttl: duration.optional(),
  concurrency: int(1, 100_000).optional(),
  queue: int(0, 1_000_000).optional(),
  maxAttempts: int(1, 1_000_000).optional(),
};

const MqttSinkSchema = z.strictObject({
  type: z.literal('mqtt'),
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
  ...sinkDelivery,
});

const LogSinkSchema = z.strictObject({
  type: z.literal('log'),
  level: z.enum(['debug', 'info', 'warn']).default('info'),
  ...sinkDelivery,
});

const SinkSchema = z.discriminatedUnion('type', [MqttSinkSchema, LogSinkSchema], {
  error: (iss) =>
    iss.code === 'invalid_union' ? `unknown sink type; known types: ${SINK_TYPES.join(', ')}` : undefined,
});
export const SINK_TYPES = ['mqtt', 'log'] as const;

export type MqttSinkConfig = z.infer<typeof MqttSinkSchema>;
export type LogSinkConfig = z.infer<typeof LogSinkSchema>;
export type SinkConfig = z.infer<typeof SinkSchema>;

// ---- routes ----

const MatchSchema = z.strictObject({
  type: oneOrMany.optional(),
  sub_type: oneOrMany.optional(),
  /** `android_rn` matches `android_rn-v2` too. */
  platform: oneOrMany.optional(),
  server_id: oneOrMany.optional(),
  team_id: oneOrMany.optional(),
  channel_id: oneOrMany.optional(),
  channel_name: oneOrMany.optional(),
  sender_name: oneOrMany.optional(),
  from_webhook: z.preprocess(boolish, z.boolean()).optional(),
});
export type Match = z.infer<typeof MatchSchema>;

const RouteSchema = z.strictObject({
  match: MatchSchema.default({}),
  sinks: z.array(z.string()).min(1),
});

// ---- the whole file ----

export const ConfigSchema = z
  .strictObject({
    server: z
      .strictObject({
        host: z.string().min(1).default('0.0.0.0'),
        port: int(0, 65535).default(8066),
        basePath: z
          .string()
          .regex(/^(\/[^/?#\s]+)*$/, { message: 'must be empty or like "/s3cret" (no trailing /, no query)' })
          .default(''),
        bodyLimit: size.default(1024 * 1024),
        shutdownTimeout: duration.default(10_000),
        /** Basic auth for the API; Mattermost sends it when its URL is https://user:pass@relay/. */
        auth: z.strictObject({ username: z.string().min(1), password: z.string().min(1) }).optional(),
      })
      .prefault({}),
    log: z
      .strictObject({
        level: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent']).default('info'),
        format: z.enum(['auto', 'json', 'pretty']).default('auto'),
      })
      .prefault({}),
    delivery: z
      .strictObject({
        /** How long one sink may take before the delivery goes to the outbox (or, without one, FAIL). */
        deadline: duration.default(5_000),
        /** How long an undelivered notification is worth delivering: a stale push is worse than none. */
        ttl: duration.default(3_600_000),
        /** Attempts before a delivery becomes a dead letter (the ttl usually comes first). */
        maxAttempts: int(1, 1_000_000).default(1000),
        /** Backoff between outbox retries: exponential from retryMin to retryMax, with jitter. */
        retryMin: duration.default(1_000),
        retryMax: duration.default(60_000),
        /** Deliveries in flight per sink; beyond it requests wait in a queue of this size, then spill to the outbox. */
        concurrency: int(1, 100_000).default(1024),
        queue: int(0, 1_000_000).default(4096),
        /** The same (ack_id, sink) is delivered once within this window. */
        dedupWindow: duration.default(600_000),
      })
      .prefault({}),
    /** `sqlite` (in dataDir), `postgres://user@host/db` (shared by several instances) or `none`. */
    store: z
      .string()
      .refine((v) => v === 'sqlite' || v === 'none' || /^postgres(ql)?:\/\/\S+$/.test(v), {
        message: 'must be sqlite, none, or a postgres:// URL',
      })
      .default('sqlite'),
    dataDir: z.string().min(1).default('./data'),
    sinks: z.record(z.string().regex(/^[A-Za-z0-9_.-]+$/, { message: 'sink names use letters, digits, _ . -' }), SinkSchema),
    routes: z.array(RouteSchema).optional(),
  })
  .superRefine((cfg, ctx) => {
    if (Object.keys(cfg.sinks).length === 0) {
      ctx.addIssue({ code: 'custom', path: ['sinks'], message: 'at least one sink is needed' });
    }
    for (const [name, sink] of Object.entries(cfg.sinks)) {
      if (sink.type === 'mqtt' && sink.format === 'template' && !sink.template) {
        ctx.addIssue({ code: 'custom', path: ['sinks', name, 'template'], message: 'required when format is template' });
      }
    }
    cfg.routes?.forEach((route, i) =>
      route.sinks.forEach((s, j) => {
        if (!(s in cfg.sinks)) {
          ctx.addIssue({
            code: 'custom',
            path: ['routes', i, 'sinks', j],
            message: `no sink named "${s}"; defined: ${Object.keys(cfg.sinks).join(', ') || 'none'}`,
          });
        }
      }),
    );
  });
export type Config = z.infer<typeof ConfigSchema>;

// ---- loading ----

type Env = Record<string, string | undefined>;

/** The zero-config relay: the seed's behaviour, `message` text to `mm/_notif`. */
function defaultConfig(env: Env): Record<string, unknown> {
  return {
    sinks: {
      mqtt: {
        type: 'mqtt',
        ...(env.PUSH_RELAY_MQTT_URL ? { url: env.PUSH_RELAY_MQTT_URL } : {}),
        ...(env.PUSH_RELAY_MQTT_TOPIC ? { topic: env.PUSH_RELAY_MQTT_TOPIC } : {}),
        ...(env.PUSH_RELAY_MQTT_AUTO_PORT ? { autoPort: env.PUSH_RELAY_MQTT_AUTO_PORT } : {}),
        format: 'message',
      },
    },
  };
}

/** Env that overrides a key in any config, file or default (ntfy-style: every knob is an env var). */
const ENV_OVERRIDES: Array<[string, string[]]> = [
  ['PUSH_RELAY_HOST', ['server', 'host']],
  ['PUSH_RELAY_PORT', ['server', 'port']],
  ['PUSH_RELAY_BASE_PATH', ['server', 'basePath']],
  ['PUSH_RELAY_LOG_LEVEL', ['log', 'level']],
  ['PUSH_RELAY_LOG_FORMAT', ['log', 'format']],
  ['PUSH_RELAY_BODY_LIMIT', ['server', 'bodyLimit']],
  ['PUSH_RELAY_STORE', ['store']],
  ['PUSH_RELAY_DATA_DIR', ['dataDir']],
];

export function loadConfig(file: string | undefined, env: Env = process.env): Config {
  let raw: unknown;
  if (file) {
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (err) {
      throw new ConfigError([`${file}: cannot read: ${(err as Error).message}`]);
    }
    try {
      raw = /\.json$/i.test(file) ? JSON.parse(text) : parseYaml(text);
    } catch (err) {
      throw new ConfigError([`${file}: not valid ${/\.json$/i.test(file) ? 'JSON' : 'YAML'}: ${(err as Error).message}`]);
    }
    if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
      throw new ConfigError([`${file}: expected a mapping at the top level`]);
    }
  } else {
    raw = defaultConfig(env);
  }
  return parseConfig(raw, env);
}

export function parseConfig(raw: unknown, env: Env = process.env): Config {
  const problems: string[] = [];
  const interpolated = interpolate(raw, [], env, problems) as Record<string, unknown>;
  if (problems.length) throw new ConfigError(problems);
  for (const [name, path] of ENV_OVERRIDES) {
    const v = env[name];
    if (v !== undefined && v !== '') setPath(interpolated, path, v);
  }
  const parsed = ConfigSchema.safeParse(interpolated, { reportInput: true });
  if (!parsed.success) throw new ConfigError(parsed.error.issues.map(describe));
  return parsed.data;
}

function describe(issue: z.core.$ZodIssue): string {
  const path = issue.path.join('.');
  if (issue.code === 'unrecognized_keys') {
    return issue.keys.map((k) => `${path ? `${path}.` : ''}${k}: unknown key`).join('\n  ');
  }
  if (issue.code === 'invalid_type' && issue.input === undefined) return `${path}: is required`;
  if (issue.code === 'invalid_key') return `${path}: ${issue.issues.map((i) => i.message).join('; ')}`;
  return `${path || '(top level)'}: ${issue.message}`;
}

/** `${VAR}` and `${VAR:-default}` in every string value; `$${` is a literal `${`. */
function interpolate(value: unknown, path: Array<string | number>, env: Env, problems: string[]): unknown {
  if (typeof value === 'string') {
    return value.replace(/\$?\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}/g, (whole, name: string, def?: string) => {
      if (whole.startsWith('$$')) return whole.slice(1);
      const v = env[name];
      if (v !== undefined && v !== '') return v;
      if (def !== undefined) return def;
      problems.push(`${path.join('.')}: environment variable ${name} is not set (write \${${name}:-default} for a default)`);
      return '';
    });
  }
  if (Array.isArray(value)) return value.map((v, i) => interpolate(v, [...path, i], env, problems));
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, interpolate(v, [...path, k], env, problems)]));
  }
  return value;
}

function setPath(obj: Record<string, unknown>, path: string[], value: unknown): void {
  let cur = obj;
  for (const key of path.slice(0, -1)) {
    const next = cur[key];
    if (next === null || typeof next !== 'object') cur[key] = {};
    cur = cur[key] as Record<string, unknown>;
  }
  cur[path[path.length - 1] as string] = value;
}
