// The device registry: devices this relay issued a token for (a browser paired on the page, or
// one an admin added with `push-relay devices add`), and where their notifications go.
//
// Mattermost addresses a push only by device id (contract §0: the payload names no user), so a
// browser gets a device id of ours, attached to the user's Mattermost session as
// `android_rn-v2:<token>`; Mattermost then posts pushes with `device_id: <token>`. A token has a
// recognisable shape, so a route can tell ours from the official apps' (`paired: true|false`)
// without a lookup; the per-device sinks then find the device here, and a token that is not
// here (unpaired, removed) is dead: REMOVE.
import { randomBytes } from 'node:crypto';
import type { KeyValue } from './store/types.js';

/** A browser's PushSubscription as `subscription.toJSON()` gives it (W3C Push API). */
export type WebPushSubscription = {
  endpoint: string;
  expirationTime?: number | null;
  keys: { p256dh: string; auth: string };
};

export type Device = {
  token: string;
  label: string;
  createdAt: number;
  lastPushAt?: number;
  lastFailureAt?: number;
  /** Where this device's notifications go, per sink kind. */
  targets: {
    webpush?: WebPushSubscription[];
    /** The paired account's address, set only when the person switched "also email me" on. */
    email?: string;
    /** An ntfy topic URL of the person's own (set on the page). */
    ntfy?: string;
  };
  /** The Mattermost account the device was paired with (absent for an admin-added device). */
  account?: { userId: string; username: string; email?: string };
  /**
   * The Mattermost session the device id is attached to. Secret: never logged, never sent to
   * the browser; used to log out on unpair and to keep the session alive.
   */
  session?: { token: string; createdAt: number; lastRefreshAt?: number };
};

export type NewDevice = Pick<Device, 'label' | 'targets'> & Partial<Pick<Device, 'account' | 'session'>>;

export type DeviceRegistry = {
  get(token: string): Promise<Device | undefined>;
  /** Issues a new token for the device and stores it. */
  add(device: NewDevice): Promise<Device>;
  /**
   * Read-modify-write of one device; `change` returning undefined deletes it. Resolves with the
   * result. A change made meanwhile (by this process or another instance on the same
   * PostgreSQL) is never lost: `change` runs again on the newer device.
   */
  update(token: string, change: (d: Device) => Device | undefined): Promise<Device | undefined>;
  remove(token: string): Promise<boolean>;
  list(): Promise<Device[]>;
};

const TOKEN_PREFIX = 'pr1';
/** Attempts of one update against changes made meanwhile by other instances. */
const MAX_TRIES = 50;
// 18 random bytes: 144 bits, 24 characters of base64url.
const TOKEN_SHAPE = /^pr1[A-Za-z0-9_-]{24}$/;

/** A new relay-issued device token: random, 144 bits, URL-safe. */
export function newDeviceToken(): string {
  return TOKEN_PREFIX + randomBytes(18).toString('base64url');
}

/** Whether a device id has the shape of a token this relay issues (routes' `paired: true`). */
export function isRelayToken(deviceId: string): boolean {
  return deviceId.length === 27 && TOKEN_SHAPE.test(deviceId);
}

/** The device id to enter in Mattermost for a token (contract §2.1: platform prefix, then the token). */
export const mattermostDeviceId = (token: string) => `android_rn-v2:${token}`;

export function createDeviceRegistry(kv: KeyValue): DeviceRegistry {
  const read = (text: string | undefined) => (text === undefined ? undefined : (JSON.parse(text) as Device));
  // Updates of one device within this process run one after another, so that they need not
  // retry each other's; across instances, the store's compare-and-set (swap) keeps each one.
  const chains = new Map<string, Promise<unknown>>();
  const serial = <T>(token: string, fn: () => Promise<T>): Promise<T> => {
    const run = (chains.get(token) ?? Promise.resolve()).then(fn, fn);
    const tail = run.catch(() => {});
    chains.set(token, tail);
    void tail.then(() => chains.get(token) === tail && chains.delete(token));
    return run;
  };
  return {
    get: async (token) => (isRelayToken(token) ? read(await kv.get(token)) : undefined),
    async add(device) {
      const d: Device = { ...device, token: newDeviceToken(), createdAt: Date.now() };
      await kv.set(d.token, JSON.stringify(d));
      return d;
    },
    update: (token, change) =>
      serial(token, async () => {
        for (let tries = 0; tries < MAX_TRIES; tries++) {
          const text = await kv.get(token);
          const current = read(text);
          if (!current) return undefined;
          const next = change(current);
          if (await kv.swap(token, text, next === undefined ? undefined : JSON.stringify({ ...next, token }))) return next;
        }
        throw new Error(`device ${token.slice(0, 7)}…: ${MAX_TRIES} concurrent changes in a row, giving up on this one`);
      }),
    remove: (token) => serial(token, () => kv.delete(token)),
    list: async () => (await kv.list()).map(([, v]) => JSON.parse(v) as Device),
  };
}
