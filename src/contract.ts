// Mattermost's push wire types (contract §2, §3; the sample payloads are in test/fixtures/payloads).
//
// Parsing follows Go's encoding/json as the official push proxy uses it: unknown fields pass
// through (the server keeps adding them), a `null` leaves a field at its zero value, and a
// field of the wrong type is an error. The three fields the proxy cannot route without
// (platform, server_id, device_id) must be non-empty strings.
import { z } from 'zod';

// `null` on any top-level field is dropped before validation (`withoutNulls`), so `null`
// and absent mean the same, as in Go: an optional field is unset, an always-sent one gets its
// zero value. Keeping transforms out of the schema keeps the hot path cheap.
const opt = <T extends z.ZodType>(schema: T) => schema.optional();
/** A field Mattermost always sends; a missing one decodes to Go's zero value. */
const str = z.string().default('');
const bool = z.boolean().default(false);
const required = z.string().min(1, { error: 'must not be empty' });

function kindOf(v: unknown): string {
  if (typeof v === 'number' && !Number.isFinite(v)) return 'a number out of range'; // 1e400 parses as Infinity
  return v === null ? 'null' : Array.isArray(v) ? 'an array' : typeof v;
}

export const PushNotificationSchema = z.looseObject({
  ack_id: str,
  platform: required,
  server_id: required,
  device_id: required,
  post_id: str,
  category: opt(z.string()),
  sound: opt(z.string()),
  message: opt(z.string()),
  badge: opt(z.number().int()),
  cont_ava: opt(z.number().int()),
  team_id: opt(z.string()),
  channel_id: opt(z.string()),
  root_id: opt(z.string()),
  channel_name: opt(z.string()),
  type: opt(z.string()),
  sub_type: opt(z.string()),
  sender_id: opt(z.string()),
  sender_name: opt(z.string()),
  override_username: opt(z.string()),
  override_icon_url: opt(z.string()),
  from_webhook: opt(z.string()),
  version: opt(z.string()),
  is_crt_enabled: bool,
  is_id_loaded: bool,
  signature: str,
  transport: opt(z.string()),
});
export type PushNotification = z.infer<typeof PushNotificationSchema>;

/**
 * The schema above as a table, for the hot path: a payload that passes these checks is what
 * zod would accept, with the same defaults filled in, without zod's per-field machinery (10%
 * of the relay's CPU at 11 000 notifications/s). Anything else goes to zod, whose errors name
 * the problem. test/contract.test.ts holds the two to the same answers.
 */
const FAST_FIELDS: ReadonlyArray<readonly [string, 'required' | 'string' | 'boolean' | 'string?' | 'int?']> = [
  ['ack_id', 'string'],
  ['platform', 'required'],
  ['server_id', 'required'],
  ['device_id', 'required'],
  ['post_id', 'string'],
  ['category', 'string?'],
  ['sound', 'string?'],
  ['message', 'string?'],
  ['badge', 'int?'],
  ['cont_ava', 'int?'],
  ['team_id', 'string?'],
  ['channel_id', 'string?'],
  ['root_id', 'string?'],
  ['channel_name', 'string?'],
  ['type', 'string?'],
  ['sub_type', 'string?'],
  ['sender_id', 'string?'],
  ['sender_name', 'string?'],
  ['override_username', 'string?'],
  ['override_icon_url', 'string?'],
  ['from_webhook', 'string?'],
  ['version', 'string?'],
  ['is_crt_enabled', 'boolean'],
  ['is_id_loaded', 'boolean'],
  ['signature', 'string'],
  ['transport', 'string?'],
];

/** The notification if `obj` (nulls already dropped) plainly conforms, else undefined. */
export function fastNotification(obj: Record<string, unknown>): PushNotification | undefined {
  for (let i = 0; i < FAST_KEYS.length; i++) {
    const key = FAST_KEYS[i] as string;
    const v = obj[key];
    switch (FAST_KINDS[i]) {
      case 'required':
        if (typeof v !== 'string' || v === '') return undefined;
        break;
      case 'string':
        if (v === undefined) obj[key] = '';
        else if (typeof v !== 'string') return undefined;
        break;
      case 'boolean':
        if (v === undefined) obj[key] = false;
        else if (typeof v !== 'boolean') return undefined;
        break;
      case 'string?':
        if (v !== undefined && typeof v !== 'string') return undefined;
        break;
      case 'int?':
        if (v !== undefined && !Number.isSafeInteger(v)) return undefined;
        break;
    }
  }
  return obj as PushNotification;
}
const FAST_KEYS = FAST_FIELDS.map(([k]) => k);
const FAST_KINDS = FAST_FIELDS.map(([, kind]) => kind);
export const FAST_FIELD_NAMES: readonly string[] = FAST_KEYS;

/** What a phone's ack looks like after the server re-marshals it (§3.3). */
export const PushAckSchema = z.looseObject({
  id: required,
  received_at: opt(z.number()),
  platform: opt(z.string()),
  type: opt(z.string()),
  post_id: opt(z.string()),
  is_id_loaded: bool,
});
export type PushAck = z.infer<typeof PushAckSchema>;

/** The push types the server sends (§2.2); anything else is counted as `other`. */
export const PUSH_TYPES = ['message', 'clear', 'update_badge', 'session', 'test'] as const;

export type PushStatus = 'OK' | 'FAIL' | 'REMOVE';
/** `map[string]string` on the server side: every value must be a string (§3.1). */
export type PushResponse = { status: PushStatus; error?: string };

/**
 * `android_rn-v2` -> base `android_rn`, app version 2. The official proxy strips `-v<N>` and
 * defaults the version to 1 (§2.1, PP server.go).
 */
export function parsePlatform(platform: string): { base: string; appVersion: number } {
  const m = /^(.*)-v(\d+)$/.exec(platform);
  if (!m) return { base: platform, appVersion: 1 };
  return { base: m[1] as string, appVersion: Number(m[2]) };
}

/** Whether a push carries text a person would read; clear/update_badge/test do not. */
export function hasText(n: PushNotification): n is PushNotification & { message: string } {
  return typeof n.message === 'string' && n.message.length > 0;
}

export type ParseResult<T> = { ok: true; value: T } | { ok: false; error: string };

/**
 * Decode a request body as Mattermost sends it: JSON regardless of Content-Type (§1.1).
 * The error text ends up in Mattermost's log, so it names the field and the problem.
 */
export function parseBody<T>(
  schema: z.ZodType<T>,
  body: string,
  fast?: (obj: Record<string, unknown>) => T | undefined,
): ParseResult<T> {
  let json: unknown;
  try {
    json = JSON.parse(body);
  } catch (err) {
    if (body.trim() === '') return { ok: false, error: 'empty body: expected a JSON object' };
    return { ok: false, error: `invalid JSON: ${(err as Error).message}` };
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    return { ok: false, error: `expected a JSON object, got ${kindOf(json)}` };
  }
  // The fast check rejects a null where a value is expected, so nulls only matter to zod.
  const quick = fast?.(json as Record<string, unknown>);
  if (quick !== undefined) {
    keepRaw(quick as object, body);
    return { ok: true, value: quick };
  }
  const parsed = schema.safeParse(withoutNulls(json as Record<string, unknown>), { reportInput: true });
  if (!parsed.success) return { ok: false, error: describeIssues(parsed.error) };
  keepRaw(parsed.data as object, body);
  return { ok: true, value: parsed.data };
}

/**
 * The text each value `parseBody` returned was parsed from, on the value itself under a symbol,
 * not enumerable: JSON.stringify, Object.keys and a spread copy do not see it, and it goes
 * with the value. (A WeakMap did the same and cost the young-generation GC an ephemeron per
 * notification: ~2% of the relay's CPU.)
 */
const RAW_BODY = Symbol('push-relay.rawBody');
const keepRaw = (value: object, body: string) => Object.defineProperty(value, RAW_BODY, { value: body });

/**
 * The exact body Mattermost posted for `value`, when `value` came from `parseBody` in this
 * process (a sink that forwards to another push proxy sends these bytes, not our re-encoding).
 * Undefined for a notification rebuilt elsewhere, e.g. read back from the outbox.
 */
export function rawBody(value: object): string | undefined {
  return (value as { [RAW_BODY]?: string })[RAW_BODY];
}

function withoutNulls(obj: Record<string, unknown>): Record<string, unknown> {
  for (const key in obj) {
    // fromEntries defines properties, so a "__proto__" key stays a plain key.
    if (obj[key] === null) return Object.fromEntries(Object.entries(obj).filter(([, v]) => v !== null));
  }
  return obj;
}

function describeIssues(error: z.ZodError): string {
  return error.issues
    .slice(0, 5)
    .map((issue) => {
      const field = issue.path.join('.') || 'body';
      if (issue.code !== 'invalid_type') return `${field} ${issue.message}`;
      if (issue.input === undefined) return `${field} is required`;
      return `${field} must be ${issue.expected === 'int' ? 'an integer' : `a ${issue.expected}`}, got ${kindOf(issue.input)}`;
    })
    .join('; ');
}

/** `abcdef…wxyz`: enough to correlate log lines, not enough to reuse a token. */
export function shortToken(token: string): string {
  return token.length <= 12 ? '…' : `${token.slice(0, 6)}…${token.slice(-4)}`;
}
