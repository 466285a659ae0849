// What the official push proxy (mattermost-push-proxy, "PP") sends to FCM and APNs for one
// Mattermost push, as pure functions: the FCM and APNs sinks post exactly this, so a custom
// Mattermost app that worked behind PP works behind push-relay (contract §5.5).
//
// Read from PP v6.5.0+ (`server/server.go` for the truncation, `android_notification_server.go`
// and `apple_notification_server.go` for the payloads); the Go semantics that shape the output
// are kept on purpose: a field Mattermost left out has Go's zero value ("" or 0) by the time PP
// reads it, and apns2's `omitempty` tags decide which `aps` keys appear.
//
// One deliberate difference: PP passes `message` through kyokomi/emoji's `Sprint`, which turns
// `:smile:` into the emoji followed by a space. push-relay sends the text as Mattermost wrote it
// (the mobile app renders the codes it knows); the README says so.
import { parsePlatform, type PushNotification } from '../src/contract.js';

/** PP cuts a message longer than 2047 bytes to 2046 and a channel name to 64 (contract §5.2). */
export const MESSAGE_LIMIT = 2046;
export const CHANNEL_NAME_LIMIT = 64;

/**
 * The longest prefix of `s` that fits in `maxBytes` of UTF-8 without splitting a character
 * (PP slices bytes and can leave half a character, which FCM and APNs then reject or show as
 * U+FFFD). A surrogate pair is one 4-byte character and is kept or dropped whole.
 */
export function truncateUtf8(s: string, maxBytes: number): string {
  // Fast path: UTF-8 needs at most 3 bytes per UTF-16 unit.
  if (s.length * 3 <= maxBytes) return s;
  let bytes = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    let size: number;
    let units = 1;
    if (c < 0x80) size = 1;
    else if (c < 0x800) size = 2;
    else if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length && (s.charCodeAt(i + 1) & 0xfc00) === 0xdc00) {
      size = 4;
      units = 2;
    } else size = 3; // BMP, or a lone surrogate (encoded as U+FFFD: 3 bytes)
    if (bytes + size > maxBytes) return s.slice(0, i);
    bytes += size;
    i += units - 1;
  }
  return s;
}

/** PP's limits (server.go): over 2047 bytes -> 2046; channel name over 64 -> 64. */
export function truncateForProxy(n: PushNotification): { message: string; channelName: string } {
  const message = n.message ?? '';
  const channelName = n.channel_name ?? '';
  return {
    message: Buffer.byteLength(message) > MESSAGE_LIMIT + 1 ? truncateUtf8(message, MESSAGE_LIMIT) : message,
    channelName: Buffer.byteLength(channelName) > CHANNEL_NAME_LIMIT ? truncateUtf8(channelName, CHANNEL_NAME_LIMIT) : channelName,
  };
}

const signatureOf = (n: PushNotification) => (n.signature === '' ? 'NO_SIGNATURE' : n.signature);

/**
 * The FCM HTTP v1 message PP builds (android_notification_server.go `SendNotification`): a data
 * message only (no `notification` block: the app draws it), every value a string, high
 * priority so a dozing phone wakes for it. Keys PP always sets are present even when empty.
 */
export function fcmMessage(n: PushNotification): { token: string; data: Record<string, string>; android: { priority: 'high' } } {
  const { message, channelName } = truncateForProxy(n);
  const type = n.type ?? '';
  const data: Record<string, string> = {
    ack_id: n.ack_id,
    type,
    sub_type: n.sub_type ?? '',
    version: n.version ?? '',
    channel_id: n.channel_id ?? '',
    is_crt_enabled: String(n.is_crt_enabled),
    server_id: n.server_id,
    category: n.category ?? '',
  };
  // -1 means "leave the badge alone" (the test push, contract §2.2); absent is Go's 0.
  const badge = n.badge ?? 0;
  if (badge !== -1) data.badge = String(badge);
  if (n.root_id) data.root_id = n.root_id;
  data.signature = signatureOf(n);
  if (n.is_id_loaded) {
    // id_loaded: the phone fetches the real content with the ack (contract §3.3); PP names no
    // one, and `sender_id` is the recipient's own id (a server quirk, §2 row 17).
    data.post_id = n.post_id;
    data.message = message;
    data.id_loaded = 'true';
    data.sender_id = n.sender_id ?? '';
    data.sender_name = 'Someone';
    data.team_id = n.team_id ?? '';
  } else if (type === 'message' || type === 'session') {
    data.team_id = n.team_id ?? '';
    data.sender_id = n.sender_id ?? '';
    data.sender_name = n.sender_name ?? '';
    data.message = message;
    data.channel_name = channelName;
    data.post_id = n.post_id;
    data.override_username = n.override_username ?? '';
    data.override_icon_url = n.override_icon_url ?? '';
    data.from_webhook = n.from_webhook ?? '';
  }
  return { token: n.device_id, data, android: { priority: 'high' } };
}

export type ApnsRequest = {
  /** `<topic>` or, for VoIP, `<topic>.voip` (PP `buildVoIPNotification`). */
  topic: string;
  pushType: 'alert' | 'voip';
  /** The JSON body, keys in the order Go's encoding/json writes them (apns2 `aps` struct order, other keys sorted). */
  body: string;
  voip: boolean;
};

/** `aps` keys in the order of apns2's `aps` struct (payload/builder.go), so the bytes match too. */
const APS_ORDER = ['alert', 'badge', 'category', 'content-available', 'mutable-content', 'sound', 'thread-id'] as const;
type Aps = Partial<Record<(typeof APS_ORDER)[number], unknown>>;

/**
 * The APNs request PP builds (apple_notification_server.go `SendNotification` and
 * `buildVoIPNotification`), for the app's bundle id `topic`. The app version comes from the
 * platform's `-v<N>` suffix (contract §2.1).
 */
export function apnsRequest(n: PushNotification, topic: string): ApnsRequest {
  if (n.transport === 'voip') return { topic: `${topic}.voip`, pushType: 'voip', body: render({ 'content-available': 1 }, voipKeys(n)), voip: true };
  const { appVersion } = parsePlatform(n.platform);
  const { message, channelName } = truncateForProxy(n);
  const type = n.type ?? '';
  const badge = n.badge ?? 0;
  const aps: Aps = {};
  const custom: Record<string, unknown> = {};
  // A clear with badge 0 from app version 2+ gets badge 1: PP's quirk, kept because the app
  // build behind it may count on it (contract §5.5).
  if (badge === 0 && type === 'clear' && appVersion > 1) aps.badge = 1;
  else if (badge !== -1) aps.badge = badge;
  if (n.is_id_loaded) {
    if (n.category) aps.category = n.category;
    aps.sound = 'default';
    custom.version = n.version ?? '';
    custom.id_loaded = true;
    aps['mutable-content'] = 1;
    aps.alert = message ? { body: message } : {};
    aps['content-available'] = 1;
  } else if (type === 'message' || type === 'session') {
    if (n.category) aps.category = n.category;
    aps.sound = 'default';
    custom.version = n.version ?? '';
    aps['mutable-content'] = 1;
    if (type === 'message') aps['content-available'] = 1;
    if (channelName !== '' && n.version === 'v2') {
      // apns2's alert struct: body before title; an empty body is omitted.
      aps.alert = message ? { body: message, title: channelName } : { title: channelName };
      custom.channel_name = channelName;
    } else {
      aps.alert = message;
      if (channelName !== '') custom.channel_name = channelName;
    }
  } else if (type === 'clear' || type === 'test') {
    aps['content-available'] = 1;
  }
  // update_badge: the badge alone; the app handles the rest.
  custom.type = type;
  custom.sub_type = n.sub_type ?? '';
  custom.server_id = n.server_id;
  if (n.ack_id) custom.ack_id = n.ack_id;
  custom.is_crt_enabled = n.is_crt_enabled;
  if (n.channel_id) {
    custom.channel_id = n.channel_id;
    aps['thread-id'] = n.is_crt_enabled && n.root_id ? n.root_id : n.channel_id;
  }
  custom.signature = signatureOf(n);
  for (const key of ['team_id', 'sender_id', 'sender_name', 'post_id', 'root_id', 'override_username', 'override_icon_url', 'from_webhook'] as const) {
    if (n[key]) custom[key] = n[key];
  }
  return { topic, pushType: 'alert', body: render(aps, custom), voip: false };
}

/** PP's flat VoIP payload: what the app needs to ring; the rest comes over the websocket. */
function voipKeys(n: PushNotification): Record<string, unknown> {
  const { channelName } = truncateForProxy(n);
  const custom: Record<string, unknown> = {
    type: n.type ?? '',
    sub_type: n.sub_type ?? '',
    channel_id: n.channel_id ?? '',
    server_id: n.server_id,
    post_id: n.post_id,
    thread_id: n.root_id ?? '',
    sender_id: n.sender_id ?? '',
    id_loaded: n.is_id_loaded,
  };
  if (n.sender_name) custom.sender_name = n.sender_name;
  if (channelName) custom.channel_name = channelName;
  if (n.ack_id) custom.ack_id = n.ack_id;
  custom.signature = signatureOf(n);
  return custom;
}

function render(aps: Aps, custom: Record<string, unknown>): string {
  const orderedAps: Aps = {};
  for (const k of APS_ORDER) if (k in aps) orderedAps[k] = aps[k];
  const top: Record<string, unknown> = { ...custom, aps: orderedAps };
  const sorted: Record<string, unknown> = {};
  for (const k of Object.keys(top).sort()) sorted[k] = top[k];
  return JSON.stringify(sorted);
}
