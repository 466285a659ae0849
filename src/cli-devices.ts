// `push-relay vapid generate` and `push-relay devices list|add|remove`: the device registry
// from the command line, for admins and for testing without Mattermost's login.
//
// The commands open the relay's own store (not as its owner: a running relay keeps its lock),
// so a relay running on the same SQLite file (WAL) or PostgreSQL database sees a device the
// moment it is added: the registry is read from the store on every push.
import { readFileSync } from 'node:fs';
import { z } from 'zod';
import type { Config } from './config.js';
import { createDeviceRegistry, isRelayToken, mattermostDeviceId, type Device } from './devices.js';
import { openStore } from './store/index.js';

export type CliTools = {
  option(args: string[], ...names: string[]): string | undefined;
  fail(message: string, code?: number): never;
  out(line: string): void;
};

/** Prints a new VAPID key pair (RFC 8292 §3.2: P-256, base64url) and the config lines for it. */
export async function vapidGenerate(args: string[], { option, out }: CliTools): Promise<void> {
  const subject = option(args, '--subject') ?? 'mailto:admin@example.com';
  // Loaded here only: `serve` need not carry web-push unless a webpush sink starts.
  const { default: webPush } = await import('web-push');
  const { publicKey, privateKey } = webPush.generateVAPIDKeys();
  out('A VAPID key pair for a webpush sink. Keep the private key secret; browsers subscribe with the');
  out('public key, so changing it later means every browser pairs again.');
  out('');
  out(`VAPID_PUBLIC_KEY=${publicKey}`);
  out(`VAPID_PRIVATE_KEY=${privateKey}`);
  out('');
  out('# config lines (put VAPID_PRIVATE_KEY in the relay\'s environment, or the key itself in place of ${VAPID_PRIVATE_KEY}):');
  out('sinks:');
  out('  browser:');
  out('    type: webpush');
  out(`    vapid: { publicKey: "${publicKey}", privateKey: "\${VAPID_PRIVATE_KEY}", subject: "${subject}" }`);
}

const base64urlBytes = (min: number, max: number, what: string) =>
  z
    .string({ error: `${what} must be a string` })
    .refine((v) => /^[A-Za-z0-9_-]+={0,2}$/.test(v), { message: `${what} must be base64url` })
    .refine((v) => {
      const n = Buffer.from(v, 'base64url').length;
      return n >= min && n <= max;
    }, { message: `${what} must be ${min === max ? min : `${min} to ${max}`} bytes` });

/** A PushSubscription as `subscription.toJSON()` gives it (W3C Push API §7). */
const subscriptionSchema = (allowHttp: boolean) =>
  z.object({
    endpoint: z.string({ error: 'endpoint must be a string' }).refine(
      (v) => {
        try {
          const p = new URL(v).protocol;
          return p === 'https:' || (allowHttp && p === 'http:');
        } catch {
          return false;
        }
      },
      { message: allowHttp ? 'endpoint must be an http(s) URL' : 'endpoint must be an https URL (http only with a webpush sink that has allowPrivateEndpoints: true)' },
    ),
    expirationTime: z.number().nullable().optional(),
    keys: z.object(
      {
        // RFC 8291 §3.1: an uncompressed P-256 point (65 bytes) and a 16-byte auth secret.
        p256dh: base64urlBytes(65, 65, 'keys.p256dh').refine((v) => Buffer.from(v, 'base64url')[0] === 4, { message: 'keys.p256dh must be an uncompressed P-256 point' }),
        auth: base64urlBytes(16, 16, 'keys.auth'),
      },
      { error: 'keys { p256dh, auth } missing' },
    ),
  });

export async function devicesCommand(args: string[], config: Config, { option, fail, out }: CliTools): Promise<void> {
  const [action = 'list', ...rest] = positional(args);
  const webpushSinks = Object.values(config.sinks).filter((s) => s.type === 'webpush') as Array<{ allowPrivateEndpoints?: boolean }>;
  if (!['list', 'add', 'remove'].includes(action)) fail(`unknown devices action "${action}": list, add or remove`);

  let subscription: z.output<ReturnType<typeof subscriptionSchema>> | undefined;
  if (action === 'add') {
    // Check the input before opening anything.
    const file = option(args, '--webpush') ?? fail('devices add needs --webpush FILE: a PushSubscription as JSON (subscription.toJSON() in the browser)');
    let json: unknown;
    try {
      json = JSON.parse(readFileSync(file === '-' ? 0 : file, 'utf8'));
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      fail(e.code ? `cannot read ${file}: ${e.code}` : `${file} is not JSON: ${e.message}`);
    }
    const parsed = subscriptionSchema(webpushSinks.some((s) => s.allowPrivateEndpoints)).safeParse(json);
    if (!parsed.success) fail(`${file} is not a PushSubscription: ${parsed.error.issues.map((i) => i.message).join('; ')}`);
    subscription = parsed.data;
  }

  const store =
    (await openStore(config.store, config.dataDir, false)) ??
    fail('devices need a store: the config says store: none (use sqlite, the default, or a postgres:// URL)');
  try {
    const devices = createDeviceRegistry(store.kv('devices'));
    if (action === 'list') {
      const list = await devices.list();
      if (args.includes('--json')) out(JSON.stringify(list.map(publicView), null, 2));
      else if (!list.length) out('no devices');
      else for (const d of list) out(describe(d));
    } else if (action === 'add') {
      const label = option(args, '--label') ?? `added with push-relay devices add on ${new Date().toISOString().slice(0, 10)}`;
      const d = await devices.add({ label, targets: { webpush: [subscription as NonNullable<typeof subscription>] } });
      out(`added device ${d.token} (${label}), one Web Push subscription at ${new URL(d.targets.webpush?.[0]?.endpoint ?? '').host}`);
      if (!webpushSinks.length) out('note: the config has no sink of type webpush, so pushes to this device go nowhere yet');
      out('attach this device id to a Mattermost session (the device_id of a login); pushes to it then reach the browser:');
      out(mattermostDeviceId(d.token));
    } else {
      const arg = rest[0] ?? fail('devices remove needs a TOKEN (see devices list)');
      const token = arg.replace(/^[a-z_]+(-v\d+)?:/, '');
      if (!isRelayToken(token)) fail(`"${arg}" is not a device token of this relay (pr1 and 24 characters)`);
      const before = await devices.get(token);
      if (!(await devices.remove(token))) fail(`no device ${token}`, 1);
      out(`removed device ${token}`);
      if (before?.session) out('note: its Mattermost session stays logged in; unpairing on the page logs it out');
    }
  } finally {
    await store.close();
  }
}

/** The arguments that are neither options nor their values. */
function positional(args: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i] as string;
    if (/^(--config|-c|--webpush|--label)$/.test(a)) i++;
    else if (!a.startsWith('-')) out.push(a);
  }
  return out;
}

/** A device without its secrets: no session token, no encryption keys. */
function publicView(d: Device): Record<string, unknown> {
  return {
    token: d.token,
    deviceId: mattermostDeviceId(d.token),
    label: d.label,
    createdAt: new Date(d.createdAt).toISOString(),
    ...(d.lastPushAt ? { lastPushAt: new Date(d.lastPushAt).toISOString() } : {}),
    ...(d.lastFailureAt ? { lastFailureAt: new Date(d.lastFailureAt).toISOString() } : {}),
    targets: {
      webpush: (d.targets.webpush ?? []).map((s) => ({ endpoint: s.endpoint, expirationTime: s.expirationTime ?? null })),
      ...(d.targets.email ? { email: d.targets.email } : {}),
      ...(d.targets.ntfy ? { ntfy: d.targets.ntfy } : {}),
    },
    ...(d.account ? { account: d.account } : {}),
    ...(d.session ? { session: { createdAt: new Date(d.session.createdAt).toISOString() } } : {}),
  };
}

function describe(d: Device): string {
  const when = (t?: number) => (t ? new Date(t).toISOString().replace(/\.\d+Z$/, 'Z') : 'never');
  const hosts = (d.targets.webpush ?? []).map((s) => {
    try {
      return new URL(s.endpoint).host;
    } catch {
      return '?';
    }
  });
  const targets = [
    hosts.length ? `webpush: ${hosts.length} (${hosts.join(', ')})` : 'webpush: none',
    ...(d.targets.email ? [`email: ${d.targets.email}`] : []),
    ...(d.targets.ntfy ? [`ntfy: ${d.targets.ntfy}`] : []),
  ];
  return (
    `${d.token}  ${d.label}\n` +
    `    ${targets.join('; ')}\n` +
    `    ${d.account ? `account @${d.account.username}, ` : ''}created ${when(d.createdAt)}, last push ${when(d.lastPushAt)}, last failure ${when(d.lastFailureAt)}`
  );
}
