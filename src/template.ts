// `{placeholder}` templates for topics and message bodies, compiled once at start-up.
import type { PushNotification } from './contract.js';

/** Fields a template may name. `base_platform` is `platform` without `-vN` (§2.1). */
export const PLACEHOLDERS = [
  'ack_id',
  'platform',
  'base_platform',
  'server_id',
  'device_id',
  'post_id',
  'category',
  'sound',
  'message',
  'badge',
  'team_id',
  'channel_id',
  'root_id',
  'channel_name',
  'type',
  'sub_type',
  'sender_id',
  'sender_name',
  'override_username',
  'from_webhook',
  'version',
] as const;
type Placeholder = (typeof PLACEHOLDERS)[number];

export type Render = (n: PushNotification) => string;

/** Throws with the offending name when a template names an unknown placeholder. */
export function compileTemplate(template: string, escape: (s: string) => string = (s) => s): Render {
  const parts: Array<string | Placeholder> = [];
  const isField: boolean[] = [];
  const re = /\{([a-z_]+)\}/g;
  let last = 0;
  for (let m = re.exec(template); m; m = re.exec(template)) {
    const name = m[1] as string;
    if (!(PLACEHOLDERS as readonly string[]).includes(name)) {
      throw new Error(`unknown placeholder {${name}}; known: ${PLACEHOLDERS.map((p) => `{${p}}`).join(' ')}`);
    }
    parts.push(template.slice(last, m.index));
    isField.push(false);
    parts.push(name as Placeholder);
    isField.push(true);
    last = m.index + m[0].length;
  }
  parts.push(template.slice(last));
  isField.push(false);
  if (parts.length === 1) return () => template;
  return (n) => {
    let out = '';
    for (let i = 0; i < parts.length; i++) {
      const part = parts[i] as string;
      out += isField[i] ? escape(field(n, part as Placeholder)) : part;
    }
    return out;
  };
}

function field(n: PushNotification, name: Placeholder): string {
  if (name === 'base_platform') return n.platform.replace(/-v\d+$/, '');
  const v = n[name];
  return v === undefined || v === null ? '' : String(v);
}

/**
 * One MQTT topic level from untrusted text: `/` would add levels, `+` and `#` are wildcards
 * that a publish may not contain, NUL is forbidden (MQTT 3.1.1 §4.7.3), and an empty level
 * would make `mm//x`. Each becomes `_`. So do control characters (U+0001-U+001F,
 * U+007F-U+009F), noncharacters and lone surrogates: MQTT 3.1.1 §1.5.3 lets a broker drop the
 * connection for them, and mosquitto does ("malformed packet"), after which mqtt.js resends
 * the same publish on every reconnect and the sink never recovers.
 */
export function mqttTopicLevel(value: string): string {
  if (value === '') return '_';
  const level = value.replace(/[/+#\p{Cc}\p{Cs}\p{Noncharacter_Code_Point}]/gu, '_');
  return Buffer.byteLength(level) <= MAX_LEVEL_BYTES ? level : truncateUtf8(level, MAX_LEVEL_BYTES);
}

/**
 * A whole topic is at most 65535 bytes (MQTT 3.1.1 §1.5.3). mqtt.js throws mid-write on a
 * longer one and the client never publishes again, so one over-long field (device_id has no
 * limit but the body size) would silence the sink: each placeholder gets at most 4 KiB.
 */
const MAX_LEVEL_BYTES = 4096;

function truncateUtf8(s: string, max: number): string {
  let out = '';
  let bytes = 0;
  for (const ch of s) {
    bytes += Buffer.byteLength(ch);
    if (bytes > max) break;
    out += ch;
  }
  return out;
}
