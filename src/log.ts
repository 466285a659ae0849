// pino: JSON lines for machines by default, readable lines when a person watches a terminal.
//
// Privacy (STYLE.md §6), in two layers:
// - redaction by key: whatever object a log call carries, a `password`, `token`, `secret`,
//   `privateKey` or `authorization` field (also inside `headers`, `config`, `err`) becomes
//   `***`, and a `device_id` is shortened as shortToken does;
// - scrubbing by value: every secret the config holds (`configSecrets`) is replaced by `***`
//   in the finished line, wherever it appears (an error message that quotes a URL, a field
//   nobody thought of). test/redaction.test.ts greps a trace-level log for each of them.
import pino, { type Logger } from 'pino';
import type { Config } from './config.js';
import { shortToken } from './contract.js';

const KEYS = ['password', 'passphrase', 'token', 'secret', 'privateKey', 'authorization', 'Authorization', 'cookie', 'device_id'];
const PATHS = [
  ...KEYS,
  ...KEYS.map((k) => `*.${k}`),
  ...KEYS.map((k) => `*.*.${k}`),
  'headers.authorization',
  'req.headers.authorization',
  'req.headers.cookie',
];

/** The values to scrub: a mutable list, so a reload can change it on the live logger. */
export type SecretList = { values: string[] };

export function createLogger(config: Config['log'], destination?: pino.DestinationStream, secrets: SecretList = { values: [] }): Logger {
  const pretty = config.format === 'pretty' || (config.format === 'auto' && process.stdout.isTTY === true);
  const options: pino.LoggerOptions = {
    level: config.level,
    base: { service: 'push-relay' },
    // Credentials never reach a log line, whatever object carries them.
    redact: {
      paths: PATHS,
      censor: (value, path) => (path[path.length - 1] === 'device_id' && typeof value === 'string' ? shortToken(value) : '***'),
    },
    hooks: { streamWrite: (line) => scrub(line, secrets.values) },
  };
  if (destination) return pino(options, destination);
  if (pretty) {
    return pino({ ...options, transport: { target: 'pino-pretty', options: { colorize: true, ignore: 'pid,hostname,service', translateTime: 'SYS:HH:MM:ss.l' } } });
  }
  return pino(options);
}

function scrub(line: string, secrets: readonly string[]): string {
  let out = line;
  for (const s of secrets) {
    if (out.includes(s)) out = out.split(s).join('***');
    // As it appears inside a JSON string (quotes, backslashes, control characters escaped).
    const escaped = JSON.stringify(s).slice(1, -1);
    if (escaped !== s && out.includes(escaped)) out = out.split(escaped).join('***');
  }
  return out;
}

/** Values under these keys anywhere in the config are secrets. */
const SECRET_KEY = /pass(word|phrase)?$|secret|token|privatekey|^key$|apikey|credentials/i;

/**
 * Every secret in `config`: the values of secret-named keys, the passwords in URLs
 * (`mqtt://user:pass@host`, `smtp://...`), the values of Authorization-like headers, and the
 * basic-auth credentials as Mattermost sends them (base64). Shorter than 4 characters is not
 * scrubbed (it would mangle every line; such a secret is no secret).
 */
export function configSecrets(config: unknown): string[] {
  const found = new Set<string>();
  const walk = (v: unknown, key: string) => {
    if (typeof v === 'string') {
      if (SECRET_KEY.test(key) && !/\.(pem|key|p8|crt|json)$/.test(v)) found.add(v);
      for (const m of v.matchAll(/[a-z][a-z0-9+.-]*:\/\/[^:/@\s]*:([^@/\s]+)@/gi)) {
        found.add(m[1] as string);
        try {
          found.add(decodeURIComponent(m[1] as string));
        } catch {
          /* not percent-encoded */
        }
      }
      if (/^authorization$/i.test(key)) found.add(v.replace(/^(Basic|Bearer|token)\s+/i, ''));
      return;
    }
    if (Array.isArray(v)) v.forEach((x) => walk(x, key));
    else if (v && typeof v === 'object') for (const [k, x] of Object.entries(v)) walk(x, k);
  };
  walk(config, '');
  const auth = (config as Partial<Config> | undefined)?.server?.auth;
  if (auth) {
    found.add(Buffer.from(`${auth.username}:${auth.password}`).toString('base64'));
    found.add(`${auth.username}:${auth.password}`);
  }
  return [...found].filter((s) => s.length >= 4).sort((a, b) => b.length - a.length);
}
