// The relay's configuration: a YAML or JSON file, `${VAR}` interpolation, env overrides and
// strict validation. A mistake stops start-up with the key path and the reason, before
// anything listens: a relay that silently ignores `qso: 1` is worse than one that refuses.
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { parse as parseYaml } from 'yaml';
import { z } from 'zod';
import { boolish, duration, int, numeric, oneOrMany, size, url, type SinkConfigBase } from './schema.js';
import { SignaturesSchema } from './signatures.js';
import { defaultSinks, SINK_MODULES } from '../sinks/index.js';

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n  ${problems.join('\n  ')}`);
  }
}

// ---- sinks: each sink module brings its own schema (sinks/index.ts) ----

const SINK_TYPES = SINK_MODULES.map((m) => m.type);
const SinkSchema = z.discriminatedUnion(
  'type',
  SINK_MODULES.map((m) => m.schema) as unknown as [z.ZodObject, ...z.ZodObject[]],
  { error: (iss) => (iss.code === 'invalid_union' ? `unknown sink type; known types: ${SINK_TYPES.join(', ')}` : undefined) },
) as unknown as z.ZodType<SinkConfigBase & Record<string, unknown>>;
export type SinkConfig = z.output<typeof SinkSchema>;

// ---- server ----

/** `10.0.0.0/8`, `2001:db8::/32`, or one address (a /32 or /128). */
const cidr = z.string().superRefine((v, ctx) => {
  const [addr = '', prefix, extra] = v.trim().split('/');
  const family = isIP(addr);
  const bits = prefix === undefined ? (family === 6 ? 128 : 32) : /^\d{1,3}$/.test(prefix) ? Number(prefix) : NaN;
  if (family === 0 || extra !== undefined || !(bits >= 0 && bits <= (family === 6 ? 128 : 32))) {
    ctx.addIssue({ code: 'custom', message: `"${v}" is not an address or CIDR (e.g. 10.0.0.0/8, 127.0.0.1, 2001:db8::/32)` });
  }
});
const positive = z.preprocess(numeric, z.number().positive());

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
  /** true: device tokens this relay issued (src/devices.ts); false: every other token (the official apps'). */
  paired: z.preprocess(boolish, z.boolean()).optional(),
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
        /** Who may call the Mattermost API (CIDRs or addresses, IPv4 and IPv6); absent: anyone. */
        allow: z.array(cidr).min(1).optional(),
        /** Peers whose X-Forwarded-For is believed (a reverse proxy in front of the relay). */
        trustProxy: z.array(cidr).optional(),
        /** Token buckets per client address on the API; absent: no limit (Mattermost drops a push that gets 429). */
        rateLimit: z
          .strictObject({ perSecond: positive, burst: positive.optional() })
          .transform((r) => ({ perSecond: r.perSecond, burst: r.burst ?? Math.max(1, Math.ceil(r.perSecond * 2)) }))
          .optional(),
        /** Serve HTTPS: PEM certificate chain and key files, read again on SIGHUP. */
        tls: z.strictObject({ cert: z.string().min(1), key: z.string().min(1) }).optional(),
        /** The longest request head (request line + headers) node:http reads; longer: 431. */
        maxHeaderSize: size.default(16 * 1024),
        /** The most header lines a request may carry; more: 431. */
        maxHeaders: int(8, 1000).default(64),
        /** How long a client may take to send its request head (slow clients are cut off: 408). */
        headersTimeout: duration.default(10_000),
        /** How long a client may take to send its whole request, head and body. */
        requestTimeout: duration.default(30_000),
        /** An idle keep-alive connection is closed after this (Mattermost keeps its own 90 s, contract §1.1). */
        keepAliveTimeout: duration.default(95_000),
      })
      .prefault({}),
    /** The operator's side: a bearer token for /admin/... (and /metrics when metricsAuth). */
    admin: z
      .strictObject({
        token: z.string().min(16, { error: 'use at least 16 characters (e.g. openssl rand -hex 32)' }).optional(),
        metricsAuth: z.preprocess(boolish, z.boolean()).default(false),
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
    /** The Mattermost server: links to posts (permalinks), and the pairing page logs in to it. */
    mattermost: z
      .strictObject({
        url: url(['http', 'https']).transform((u) => u.replace(/\/+$/, '')).optional(),
        /**
         * How often the pairing page's sessions are touched (GET /api/v4/users/me) so that a
         * server with ExtendSessionLengthWithActivity keeps them alive; well inside the session
         * length (Mattermost's mobile default is 180 days; 1% of it, at most a day, must pass
         * between extensions).
         */
        keepAlive: duration.default(12 * 3_600_000),
      })
      .optional(),
    /** Pushes must carry the server's ES256 signature (src/signatures.ts, contract §2.4). */
    signatures: SignaturesSchema.optional(),
    sinks: z.record(z.string().regex(/^[A-Za-z0-9_.-]+$/, { message: 'sink names use letters, digits, _ . -' }), SinkSchema),
    routes: z.array(RouteSchema).optional(),
  })
  .superRefine((cfg, ctx) => {
    if (cfg.admin.metricsAuth && !cfg.admin.token) {
      ctx.addIssue({ code: 'custom', path: ['admin', 'metricsAuth'], message: 'needs admin.token (the bearer token /metrics then asks for)' });
    }
    const s = cfg.server;
    if (s.headersTimeout > s.requestTimeout) {
      ctx.addIssue({ code: 'custom', path: ['server', 'headersTimeout'], message: 'must not be longer than server.requestTimeout' });
    }
    if (Object.keys(cfg.sinks).length === 0) {
      ctx.addIssue({ code: 'custom', path: ['sinks'], message: 'at least one sink is needed' });
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

/** The zero-config relay (interface.md): the default sinks, every setting at its default. */
function defaultConfig(env: Env): Record<string, unknown> {
  return { sinks: defaultSinks(env) };
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

/**
 * `${VAR}` and `${VAR:-default}` in every string value; `$${` is a literal `${`. When VAR is
 * unset and VAR_FILE names a file, `${VAR}` is that file's content without its trailing
 * newline: the convention of Docker and Kubernetes secrets (`/run/secrets/<name>`).
 */
function interpolate(value: unknown, path: Array<string | number>, env: Env, problems: string[]): unknown {
  if (typeof value === 'string') {
    return value.replace(/\$?\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}/g, (whole, name: string, def?: string) => {
      if (whole.startsWith('$$')) return whole.slice(1);
      const v = env[name];
      if (v !== undefined && v !== '') return v;
      const file = env[`${name}_FILE`];
      if (file !== undefined && file !== '') {
        try {
          return readFileSync(file, 'utf8').replace(/\r?\n$/, '');
        } catch (err) {
          problems.push(`${path.join('.')}: ${name}_FILE=${file}: cannot read: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
          return '';
        }
      }
      if (def !== undefined) return def;
      problems.push(`${path.join('.')}: environment variable ${name} is not set (nor ${name}_FILE; write \${${name}:-default} for a default)`);
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
