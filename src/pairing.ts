// The pairing page and its JSON API: a browser subscribes to Web Push, and the relay logs in to
// Mattermost for the person with the browser's device id, so that Mattermost pushes to it.
//
// Mattermost addresses a push only by device id (contract §0), and a session's device id is set
// at login (`device_id` in POST /api/v4/users/login, app/login.go DoLogin) or later with
// PUT /api/v4/users/sessions/device (api4/user.go handleDeviceProps -> attachDeviceId, which
// acts on whatever session authenticates the call, a personal access token's too). The device id
// is `android_rn-v2:<token>` (contract §2.1; devices.ts): the server splits at the first `:`, so
// pushes arrive with `device_id: <token>`.
//
// What the browser holds: its device token (localStorage), the capability to manage its own
// pairing. What only the relay holds: the Mattermost session token (the `Token` header of the
// login answer), for unpair (logout) and keep-alive. The password passes through once, to
// Mattermost, and is neither stored nor logged.
//
// The endpoint is an attack surface (issue 9 §6): a relay that logs in for anyone must not
// become a password-guessing oracle against Mattermost, whose own login rate limit is per
// client address (ours, for every user) and off by default in older servers. So: token buckets
// per client address and per login id before anything reaches Mattermost, same-origin JSON
// only, a strict Content-Security-Policy, and no login over plain HTTP except from loopback.
import { existsSync, readFileSync } from 'node:fs';
import type { TLSSocket } from 'node:tls';
import { fileURLToPath } from 'node:url';
import type { HttpBindings } from '@hono/node-server';
import { Hono, type Context, type MiddlewareHandler } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import type { Logger } from 'pino';
import { z } from 'zod';
import type { Config } from './config.js';
import { shortToken, type PushResponse } from './contract.js';
import { isRelayToken, mattermostDeviceId, type Device, type DeviceRegistry, type WebPushSubscription } from './devices.js';
import { checkEndpoint } from './egress.js';
import { createRateLimiter } from './rate-limit.js';
import { VERSION } from './version.js';

export type PairingDeps = {
  config: Config;
  devices: DeviceRegistry;
  logger: Logger;
  /** The Web Push sink's VAPID public key (base64url), which browsers subscribe with. */
  vapidPublicKey?: string;
  /** Sends a `test` push to the device through the relay's routes and sinks. */
  deliverTest(token: string): Promise<PushResponse>;
};

export type KeepAliveRound = { checked: number; refreshed: number; expired: number; failed: number; skipped: number };

export type Pairing = Hono<{ Bindings: HttpBindings }> & {
  /** One keep-alive round now (the timer runs them every `mattermost.keepAlive`). */
  keepAliveNow(): Promise<KeepAliveRound>;
  /** Stops the keep-alive timer. */
  stop(): void;
};

// ---- limits ----

/** Sign-in attempts per login id: 5 a minute. A person mistyping needs 2 or 3; a guesser needs thousands. */
const PER_LOGIN = { perSecond: 5 / 60, burst: 5 };
/** Sign-in attempts per client address: 20 a minute, so one address cannot spread guesses over many login ids. */
const PER_ADDRESS = { perSecond: 20 / 60, burst: 20 };
/** Every other pairing call per client address (status, test, settings, unpair): 60 a minute. */
const PER_ADDRESS_OTHER = { perSecond: 1, burst: 60 };
/** Test notifications per device: 5 a minute. */
const PER_DEVICE_TEST = { perSecond: 5 / 60, burst: 5 };
/** The pairing API's bodies are small: a subscription is under 1 kB. */
const BODY_LIMIT = 16 * 1024;
/** One call to Mattermost. */
const MATTERMOST_TIMEOUT_MS = 10_000;
/** A keep-alive round stops after this many devices or this long, and goes on at the next tick. */
const KEEPALIVE_MAX_DEVICES = 10_000;
const KEEPALIVE_MAX_MS = 10 * 60_000;

// ---- Mattermost's answers to a failed login ----

type Failure = { status: 400 | 401 | 403 | 404 | 409 | 413 | 415 | 429 | 502 | 503; error: string; message: string };

const WRONG_CREDENTIALS = 'The login or the password is wrong.';
const LOCKED: Failure = {
  status: 403,
  error: 'locked',
  message: 'Mattermost has locked this account after too many failed sign-ins. Ask your Mattermost administrator to unlock it.',
};
const GUESTS: Failure = { status: 403, error: 'guest', message: 'Guest accounts cannot sign in on this Mattermost server at the moment.' };

/**
 * Error ids of POST /api/v4/users/login, from Mattermost's api4/user.go `login` (server
 * 00ba58f5): it masks every error but an allow-list as `api.user.login.invalid_credentials_*`
 * (the suffix says which sign-in methods are on), so a wrong password and an unknown login id
 * look the same. MFA: app/authentication.go checkUserMfa -> mfa.ValidateToken answers
 * `mfa.validate_token.authenticate.app_error` (HTTP 400) for a missing or malformed code, and
 * `api.user.check_user_mfa.bad_code.app_error` (401) for a wrong one. The web app prompts for
 * the code on the first id (webapp login.tsx), as we do.
 */
const LOGIN_ERRORS: Readonly<Record<string, Failure>> = {
  'api.user.login.invalid_credentials_email_username': { status: 401, error: 'invalid_credentials', message: WRONG_CREDENTIALS },
  'api.user.login.invalid_credentials_email': { status: 401, error: 'invalid_credentials', message: 'The email address or the password is wrong.' },
  'api.user.login.invalid_credentials_username': { status: 401, error: 'invalid_credentials', message: 'The username or the password is wrong.' },
  // Masked the same way when any SSO is enabled: the account may have no password at all.
  'api.user.login.invalid_credentials_sso': {
    status: 401,
    error: 'invalid_credentials',
    message: `${WRONG_CREDENTIALS} If you sign in to Mattermost with single sign-on (GitLab, Google, Office 365, OpenID, SAML), pair with a personal access token instead.`,
  },
  'api.user.check_user_mfa.bad_code.app_error': {
    status: 401,
    error: 'mfa_invalid',
    message: 'That code is not right, or it has expired. Enter the current code from your authenticator app.',
  },
  'api.user.check_user_login_attempts.too_many.app_error': LOCKED,
  'api.user.check_user_login_attempts.too_many_ldap.app_error': LOCKED,
  'api.user.login.inactive.app_error': { status: 403, error: 'inactive', message: 'This Mattermost account is deactivated.' },
  'api.user.login.not_verified.app_error': { status: 403, error: 'not_verified', message: 'Verify your email address with Mattermost first.' },
  'api.user.login.bot_login_forbidden.app_error': { status: 403, error: 'bot', message: 'Bot accounts cannot pair a browser.' },
  'api.user.login.remote_users.login.error': {
    status: 403,
    error: 'remote_user',
    message: 'Accounts of a connected (shared channels) server cannot sign in here.',
  },
  'api.user.login.guest_accounts.disabled.error': GUESTS,
  'api.user.login.guest_accounts.license.error': GUESTS,
  'api.user.login.blank_pwd.app_error': { status: 400, error: 'invalid_request', message: 'Enter your password.' },
};
/** Asks the page for the MFA code (see LOGIN_ERRORS). */
const MFA_REQUIRED_ID = 'mfa.validate_token.authenticate.app_error';

// ---- request bodies ----

const Subscription = z.object({
  // Push services are always https (RFC 8030 §8); the sink checks the address when it posts.
  endpoint: z.url({ protocol: /^https$/, error: 'subscription.endpoint must be an https URL' }).max(2048),
  expirationTime: z.number().nullable().optional(),
  keys: z.object({ p256dh: z.string().min(1).max(256), auth: z.string().min(1).max(256) }),
});
const Label = z.string().trim().max(100).optional();
const DeviceToken = z.string().refine(isRelayToken, { error: 'device must be a device token this relay issued' });

const LoginBody = z.object({
  loginId: z.string({ error: 'Enter your Mattermost login (email or username).' }).trim().min(1, { error: 'Enter your Mattermost login (email or username).' }).max(256),
  password: z.string({ error: 'Enter your password.' }).min(1, { error: 'Enter your password.' }).max(1024),
  mfaToken: z.string().trim().max(32).optional(),
  subscription: Subscription,
  label: Label,
  /** The device this browser had before (an expired pairing): removed once the new one works. */
  previous: DeviceToken.optional(),
});
const TokenBody = z.object({
  accessToken: z.string({ error: 'Enter a personal access token.' }).trim().min(1, { error: 'Enter a personal access token.' }).max(256),
  subscription: Subscription,
  label: Label,
  previous: DeviceToken.optional(),
});
const DeviceBody = z.object({ device: DeviceToken });
const SettingsBody = z.object({
  device: DeviceToken,
  email: z.boolean().optional(),
  /** A topic URL on an ntfy server, `https://ntfy.sh/my-topic`; empty or null removes it. */
  ntfy: z.string().trim().max(2048).nullable().optional(),
});

// ---- the page's files (src/page, copied to dist/src/page by the build) ----

const PAGE_FILES: ReadonlyArray<readonly [string, string, string]> = [
  ['/', 'index.html', 'text/html; charset=utf-8'],
  ['/app.js', 'app.js', 'text/javascript; charset=utf-8'],
  ['/sw.js', 'sw.js', 'text/javascript; charset=utf-8'],
  ['/style.css', 'style.css', 'text/css; charset=utf-8'],
  ['/manifest.webmanifest', 'manifest.webmanifest', 'application/manifest+json'],
  ['/icon.svg', 'icon.svg', 'image/svg+xml'],
  // PNG renderings of icon.svg (test/page.browser.test.ts with UPDATE_SCREENSHOTS=1): iOS takes
  // only PNG for the Home Screen, and some install prompts want 192 and 512 pixels.
  ['/apple-touch-icon.png', 'apple-touch-icon.png', 'image/png'],
  ['/icon-192.png', 'icon-192.png', 'image/png'],
  ['/icon-512.png', 'icon-512.png', 'image/png'],
];

function pageDir(): string {
  // dist/src/page after a build; run from the sources (vitest, tsx) it is src/page itself, and
  // a dist/ built by tsc alone (tests' global setup) falls back to the checkout's src/page.
  for (const rel of ['./page/', '../../src/page/']) {
    const dir = fileURLToPath(new URL(rel, import.meta.url));
    if (existsSync(`${dir}index.html`)) return dir;
  }
  throw new Error('the pairing page files are missing (src/page); rebuild with npm run build');
}

/**
 * Default-deny for the page: its own scripts, styles, images and API only; no inline script or
 * style, no plugins, no <base>, no form posts anywhere, never in a frame (clickjacking).
 */
const CSP = [
  "default-src 'self'",
  "script-src 'self'",
  "style-src 'self'",
  "img-src 'self' data:",
  "connect-src 'self'",
  "manifest-src 'self'",
  "worker-src 'self'",
  "object-src 'none'",
  "base-uri 'none'",
  "form-action 'none'",
  "frame-ancestors 'none'",
].join('; ');
const SECURITY_HEADERS: Record<string, string> = {
  'Content-Security-Policy': CSP,
  'X-Content-Type-Options': 'nosniff',
  'Referrer-Policy': 'no-referrer',
  'X-Frame-Options': 'DENY',
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Permissions-Policy': 'camera=(), microphone=(), geolocation=()',
};

// ---- the routes ----

export function pairingRoutes(deps: PairingDeps): Pairing {
  const { config, devices } = deps;
  const log = deps.logger.child({ component: 'pairing' });
  const mmUrl = config.mattermost?.url;
  const mattermost = mmUrl ? mattermostClient(mmUrl) : undefined;
  const keepAliveMs = config.mattermost?.keepAlive ?? 12 * 3_600_000;
  const perLogin = createRateLimiter(PER_LOGIN);
  const perAddress = createRateLimiter(PER_ADDRESS);
  const perAddressOther = createRateLimiter(PER_ADDRESS_OTHER);
  const perDeviceTest = createRateLimiter(PER_DEVICE_TEST);

  const dir = pageDir();
  const files = new Map(PAGE_FILES.map(([path, file, type]) => [path, { body: readFileSync(dir + file), type }]));

  const app = new Hono<{ Bindings: HttpBindings }>();
  type C = Context<{ Bindings: HttpBindings }>;

  // On our own paths only: `use('*')` would reach every route of the app this one is mounted in.
  const secured: MiddlewareHandler = async (c, next) => {
    await next();
    for (const [k, v] of Object.entries(SECURITY_HEADERS)) c.header(k, v);
  };
  app.use('/pair/*', secured);

  for (const [path, file] of files) {
    app.get(path, secured, (c) =>
      c.body(file.body, 200, {
        'Content-Type': file.type,
        // Small files; a browser always asks again, so a relay upgrade reaches the service worker.
        'Cache-Control': 'no-cache',
      }),
    );
  }

  const fail = (c: C, f: Failure, headers?: Record<string, string>) =>
    c.json({ ok: false, error: f.error, message: f.message }, f.status, { 'Cache-Control': 'no-store', ...headers });
  const ok = (c: C, body: Record<string, unknown>) => c.json({ ok: true, ...body }, 200, { 'Cache-Control': 'no-store' });

  app.get('/pair/config', (c) => {
    const peer = peerOf(c);
    return c.json(
      {
        mattermost: mmUrl ? { configured: true, host: new URL(mmUrl).host, url: mmUrl } : { configured: false },
        vapidPublicKey: deps.vapidPublicKey ?? null,
        secure: peer.secure,
      },
      200,
      { 'Cache-Control': 'no-store' },
    );
  });

  /**
   * The guards every state-changing call passes, in order; undefined when the call may go on.
   * CSRF: a cross-site page can POST a form (urlencoded, multipart, text/plain) without asking,
   * but JSON needs a CORS preflight, which we never answer; an Origin, when the browser sends
   * one, must be this host. The scheme is not compared: behind a TLS proxy the relay sees
   * http while the browser says https (the proxy must keep the Host header).
   */
  function guard(c: C): Failure | undefined {
    const type = (c.req.header('content-type') ?? '').split(';')[0]?.trim().toLowerCase();
    if (type !== 'application/json') {
      return { status: 415, error: 'json_only', message: 'The pairing API accepts only Content-Type: application/json from this page.' };
    }
    const origin = c.req.header('origin');
    if (origin !== undefined) {
      let host: string | undefined;
      try {
        const u = new URL(origin);
        if (u.protocol === 'http:' || u.protocol === 'https:') host = u.host;
      } catch {
        /* "null" (sandboxed frames, file:) and garbage: refused below */
      }
      if (!host || host !== c.req.header('host')) {
        return { status: 403, error: 'cross_origin', message: 'Requests from other sites are refused: use the pairing page on this relay.' };
      }
    }
    if (c.req.header('sec-fetch-site') === 'cross-site') {
      return { status: 403, error: 'cross_origin', message: 'Requests from other sites are refused: use the pairing page on this relay.' };
    }
    const peer = peerOf(c);
    if (!peer.secure) {
      return {
        status: 403,
        error: 'insecure',
        message:
          'This relay is reached over plain HTTP, so your password would cross the network unencrypted. Put the relay behind a TLS proxy (https://) and open this page there.',
      };
    }
    return undefined;
  }

  const TOO_LARGE: Failure = { status: 413, error: 'too_large', message: 'Request body too large.' };
  // Counts what is read, chunked bodies too, and stops reading past the limit.
  const limited = bodyLimit({ maxSize: BODY_LIMIT, onError: (c) => fail(c as C, TOO_LARGE) });

  async function readJson<T>(c: C, schema: z.ZodType<T>): Promise<{ ok: true; value: T } | { ok: false; failure: Failure }> {
    const text = await c.req.text();
    let raw: unknown;
    try {
      raw = JSON.parse(text);
    } catch {
      return { ok: false, failure: { status: 400, error: 'invalid_request', message: 'The request body is not JSON.' } };
    }
    const parsed = schema.safeParse(raw);
    if (!parsed.success) {
      const first = parsed.error.issues[0];
      // Our own messages are sentences for the person; zod's generic ones get the field's name.
      const generic = first && first.path.length > 0 && /^(Invalid|Too (big|small)|Unrecognized)/.test(first.message);
      const message = !first ? 'invalid request' : generic ? `${first.path.join('.')}: ${first.message}` : first.message;
      return { ok: false, failure: { status: 400, error: 'invalid_request', message } };
    }
    return { ok: true, value: parsed.data };
  }

  const tooMany = (c: C, seconds: number, what: string) =>
    fail(
      c,
      { status: 429, error: 'rate_limited', message: `Too many ${what}. Wait ${seconds} second${seconds === 1 ? '' : 's'} and try again.` },
      { 'Retry-After': String(seconds) },
    );

  /** Guards, then the per-address limit for the non-sign-in calls, then the body (16 kB at most), then the handler. */
  function post<T>(path: string, schema: z.ZodType<T>, handler: (c: C, body: T, peer: Peer) => Promise<Response>, signIn = false) {
    app.post(
      path,
      async (c, next) => {
        const refused = guard(c);
        if (refused) return fail(c, refused);
        const peer = peerOf(c);
        if (!signIn && !perAddressOther.take(peer.address)) return tooMany(c, perAddressOther.retryAfter(peer.address), 'requests');
        await next();
      },
      limited,
      async (c) => {
        const body = await readJson(c, schema);
        if (!body.ok) return fail(c, body.failure);
        return handler(c, body.value, peerOf(c));
      },
    );
    app.all(path, (c) => c.json({ ok: false, error: 'method', message: 'Use POST with a JSON body.' }, 405, { Allow: 'POST' }));
  }

  const NOT_CONFIGURED: Failure = {
    status: 503,
    error: 'not_configured',
    message: "This relay does not know its Mattermost server yet: the administrator must set mattermost.url in the relay's configuration.",
  };
  const NOT_PAIRED: Failure = { status: 404, error: 'not_paired', message: 'This browser is not paired (any more). Sign in to pair it again.' };

  /** Takes a sign-in attempt from the address's and the login id's buckets; a failure when either is empty. */
  function admitSignIn(c: C, peer: Peer, loginKey: string): Response | undefined {
    if (!perAddress.take(peer.address)) {
      log.warn({ address: peer.address }, 'pairing: sign-in attempts from one address over the limit; refused before Mattermost');
      return tooMany(c, perAddress.retryAfter(peer.address), 'sign-in attempts from your network');
    }
    if (!perLogin.take(loginKey)) {
      log.warn({ address: peer.address, login: loginKey }, 'pairing: sign-in attempts for one login over the limit; refused before Mattermost');
      return tooMany(c, perLogin.retryAfter(loginKey), 'sign-in attempts for this login');
    }
    return undefined;
  }

  /** The device, created before the login so that its id exists; removed again if the login fails. */
  const newDevice = (subscription: WebPushSubscription, label: string | undefined, ua: string | undefined) =>
    devices.add({ label: label || labelFromUserAgent(ua), targets: { webpush: [subscription as WebPushSubscription] } });

  async function finishPairing(c: C, device: Device, account: Account, sessionToken: string, previous: string | undefined, how: string) {
    const now = Date.now();
    const paired = await devices.update(device.token, (d) => ({
      ...d,
      account: { userId: account.id, username: account.username, ...(account.email ? { email: account.email } : {}) },
      session: { token: sessionToken, createdAt: now, lastRefreshAt: now },
    }));
    if (!paired) {
      // Removed meanwhile (an admin's `devices remove`): do not leave a session behind.
      if (mattermost) await mattermost.logout(sessionToken);
      return fail(c, { status: 409, error: 'conflict', message: 'The new device vanished while pairing; try again.' });
    }
    if (previous && previous !== device.token) await unpair(previous, 'replaced by a new pairing');
    log.info({ device: shortToken(device.token), user: account.id, how }, 'pairing: paired a browser');
    return ok(c, { device: device.token, status: statusOf(paired) });
  }

  post(
    '/pair/login',
    LoginBody,
    async (c, body, peer) => {
      if (!mattermost) return fail(c, NOT_CONFIGURED);
      const limited = admitSignIn(c, peer, body.loginId.toLowerCase());
      if (limited) return limited;
      const device = await newDevice(body.subscription, body.label, c.req.header('user-agent'));
      const result = await mattermost.login(body.loginId, body.password, body.mfaToken || undefined, mattermostDeviceId(device.token));
      if (!result.ok) {
        await devices.remove(device.token);
        const f = result.failure;
        // A missing code is a question, not a failure; a malformed one is a wrong one.
        const answer = f.error === 'mfa_required' && body.mfaToken ? { ...LOGIN_ERRORS['api.user.check_user_mfa.bad_code.app_error']! } : f;
        log.info({ login: body.loginId, address: peer.address, error: answer.error }, 'pairing: sign-in not completed');
        return fail(c, answer);
      }
      return finishPairing(c, device, result.account, result.sessionToken, body.previous, 'password');
    },
    true,
  );

  post(
    '/pair/token',
    TokenBody,
    async (c, body, peer) => {
      if (!mattermost) return fail(c, NOT_CONFIGURED);
      // A token is its own login id: guesses at tokens are limited like guesses at passwords.
      const limited = admitSignIn(c, peer, `token:${peer.address}`);
      if (limited) return limited;
      const me = await mattermost.me(body.accessToken);
      if (!me.ok) {
        const f = me.status === 401 ? PAT_REFUSED : me.failure;
        log.info({ address: peer.address, error: f.error }, 'pairing: personal access token not accepted');
        return fail(c, f);
      }
      const device = await newDevice(body.subscription, body.label, c.req.header('user-agent'));
      const attached = await mattermost.attachDevice(body.accessToken, mattermostDeviceId(device.token));
      if (!attached.ok) {
        await devices.remove(device.token);
        log.info({ address: peer.address, error: attached.failure.error }, 'pairing: attaching the device id to the token failed');
        return fail(c, attached.failure);
      }
      return finishPairing(c, device, me.account, body.accessToken, body.previous, 'personal access token');
    },
    true,
  );

  post('/pair/status', DeviceBody, async (c, body) => {
    const device = await devices.get(body.device);
    if (!device) return fail(c, NOT_PAIRED);
    return ok(c, { status: statusOf(device) });
  });

  post('/pair/test', DeviceBody, async (c, body) => {
    const device = await devices.get(body.device);
    if (!device) return fail(c, NOT_PAIRED);
    if (!perDeviceTest.take(body.device)) return tooMany(c, perDeviceTest.retryAfter(body.device), 'test notifications');
    const answer = await deps.deliverTest(body.device);
    log.info({ device: shortToken(body.device), status: answer.status }, 'pairing: test notification');
    if (answer.status === 'OK') return ok(c, { message: 'Test notification sent. It should appear in a few seconds.' });
    const detail = answer.error ? `: ${answer.error}` : '';
    return fail(c, {
      status: 502,
      error: 'test_failed',
      message:
        answer.status === 'REMOVE'
          ? `The push service no longer accepts this browser's subscription${detail}. Unpair and pair again.`
          : `The test notification could not be delivered${detail}.`,
    });
  });

  post('/pair/settings', SettingsBody, async (c, body) => {
    const device = await devices.get(body.device);
    if (!device) return fail(c, NOT_PAIRED);
    if (body.email === true && !device.account?.email) {
      return fail(c, { status: 409, error: 'no_email', message: 'Mattermost did not tell us an email address for this account.' });
    }
    let ntfy: string | null | undefined = body.ntfy === '' ? null : body.ntfy;
    if (typeof ntfy === 'string') {
      // The topic URL is the person's own and the relay will post to it: the same guard as a
      // sink's endpoint (https, public addresses only), with no exception. Not even for a
      // loopback caller: behind a TLS proxy on this machine every caller is loopback. An ntfy
      // server on a private network is the administrator's to configure, as a webhook sink.
      const checked = await checkNtfyTopic(ntfy, false);
      if (!checked.ok) return fail(c, { status: 400, error: 'invalid_ntfy', message: `That ntfy topic URL cannot be used: ${checked.reason}.` });
      ntfy = checked.url;
    }
    const updated = await devices.update(body.device, (d) => {
      const targets = { ...d.targets };
      if (body.email === true) targets.email = d.account?.email;
      if (body.email === false) delete targets.email;
      if (ntfy === null) delete targets.ntfy;
      else if (ntfy !== undefined) targets.ntfy = ntfy;
      return { ...d, targets };
    });
    if (!updated) return fail(c, NOT_PAIRED);
    log.info({ device: shortToken(body.device), email: Boolean(updated.targets.email), ntfy: Boolean(updated.targets.ntfy) }, 'pairing: settings changed');
    return ok(c, { status: statusOf(updated) });
  });

  post('/pair/unpair', DeviceBody, async (c, body) => {
    const device = await devices.get(body.device);
    if (!device) return fail(c, NOT_PAIRED);
    const loggedOut = await unpair(body.device, 'unpaired on the page');
    return ok(c, {
      loggedOut,
      message: loggedOut
        ? 'Unpaired: this browser gets no more notifications, and its Mattermost session is signed out.'
        : 'Unpaired: this browser gets no more notifications. Mattermost could not be told to sign the session out; it forgets this browser at its next notification.',
    });
  });

  /**
   * Logs the device's Mattermost session out (when it has one) and deletes the device. Deleting
   * is right even when the logout fails: Mattermost's next push to the device id then meets no
   * device, which answers REMOVE, and Mattermost drops the id from the session.
   */
  async function unpair(token: string, why: string): Promise<boolean> {
    const device = await devices.get(token);
    if (!device) return false;
    let loggedOut = false;
    if (device.session && mattermost) loggedOut = await mattermost.logout(device.session.token);
    await devices.remove(token);
    log.info({ device: shortToken(token), loggedOut, why }, 'pairing: device removed');
    return loggedOut;
  }

  // ---- keep-alive ----

  let round: Promise<KeepAliveRound> | undefined;
  /**
   * Mattermost extends a session's expiry on authenticated API calls when
   * ExtendSessionLengthWithActivity is on (app/session.go ExtendSessionExpiryIfNeeded: once at
   * least 1% of the session length, at most a day, has passed). A cheap authenticated call
   * (GET /api/v4/users/me) every `mattermost.keepAlive` keeps a paired browser's session from
   * running out while the person never opens Mattermost on it. A 401 means the session is gone
   * (expired, revoked, password changed): the device forgets its session token, the page then
   * says the pairing expired, and the device keeps its targets until Mattermost's own
   * session-expired push or REMOVE ends it.
   */
  async function keepAliveRound(): Promise<KeepAliveRound> {
    const counts: KeepAliveRound = { checked: 0, refreshed: 0, expired: 0, failed: 0, skipped: 0 };
    if (!mattermost) return counts;
    const started = Date.now();
    const fresh = started - keepAliveMs / 2; // refreshed by another instance on the same store: skip
    for (const d of await devices.list()) {
      if (!d.session) continue;
      if ((d.session.lastRefreshAt ?? d.session.createdAt) > fresh) {
        counts.skipped++;
        continue;
      }
      if (counts.checked >= KEEPALIVE_MAX_DEVICES || Date.now() - started > KEEPALIVE_MAX_MS) {
        log.warn({ ...counts }, 'pairing keep-alive: round budget spent; the rest wait for the next round');
        break;
      }
      counts.checked++;
      const me = await mattermost.me(d.session.token);
      if (me.ok) {
        counts.refreshed++;
        await devices.update(d.token, (x) => (x.session ? { ...x, session: { ...x.session, lastRefreshAt: Date.now() } } : x));
      } else if (me.status === 401) {
        counts.expired++;
        await devices.update(d.token, (x) => {
          const { session: _gone, ...rest } = x;
          return rest;
        });
        log.info({ device: shortToken(d.token), user: d.account?.userId }, 'pairing keep-alive: Mattermost says the session has ended; the page will ask to pair again');
      } else {
        counts.failed++;
        log.warn({ device: shortToken(d.token), error: me.failure.message }, 'pairing keep-alive: Mattermost did not answer; trying again next round');
      }
    }
    if (counts.checked) log.info({ ...counts }, 'pairing keep-alive round');
    return counts;
  }
  const keepAliveNow = () => (round ??= keepAliveRound().finally(() => (round = undefined)));
  const timer =
    mattermost && keepAliveMs > 0
      ? setInterval(() => void keepAliveNow().catch((err) => log.error({ err }, 'bug: pairing keep-alive round failed')), keepAliveMs)
      : undefined;
  timer?.unref();

  return Object.assign(app, { keepAliveNow, stop: () => clearInterval(timer) });
}

const PAT_REFUSED: Failure = {
  status: 401,
  error: 'invalid_token',
  message:
    'Mattermost did not accept that token. Create one under Profile > Security > Personal Access Tokens (the administrator must allow personal access tokens), and paste the access token, not its id.',
};

/** What the page is told about a device: never the session token. */
function statusOf(d: Device) {
  return {
    label: d.label,
    createdAt: d.createdAt,
    account: d.account ? { username: d.account.username, email: d.account.email ?? null } : null,
    /** Paired with an account, but Mattermost ended the session (keep-alive saw a 401). */
    sessionExpired: Boolean(d.account) && !d.session,
    email: Boolean(d.targets.email),
    ntfy: d.targets.ntfy ?? null,
    webpush: d.targets.webpush?.length ?? 0,
  };
}

// ---- the client's address and transport ----

type Peer = { address: string; secure: boolean };

function isLoopback(address: string): boolean {
  return address === '::1' || /^(::ffff:)?127\./i.test(address);
}

/**
 * Who is asking and whether the connection is private. The relay serves plain HTTP itself, so
 * only loopback (a browser on this machine, or a TLS proxy on it) counts as secure; the
 * forwarded headers of a proxy elsewhere are not trusted (server.trustProxy, later). Without a
 * socket (app.request in tests) the caller is unknown and treated as remote.
 */
function peerOf(c: Context<{ Bindings: HttpBindings }>): Peer {
  const socket = (c.env as HttpBindings | undefined)?.incoming?.socket;
  const address = socket?.remoteAddress ?? 'unknown';
  return { address, secure: (socket as TLSSocket | undefined)?.encrypted === true || isLoopback(address) };
}

function labelFromUserAgent(ua: string | undefined): string {
  if (!ua) return 'browser';
  const browser = /Edg\//.test(ua)
    ? 'Edge'
    : /Firefox\//.test(ua)
      ? 'Firefox'
      : /Chrom(e|ium)\//.test(ua)
        ? 'Chrome'
        : /Safari\//.test(ua)
          ? 'Safari'
          : 'browser';
  const os = /Android/.test(ua)
    ? 'Android'
    : /iPhone|iPad|iPod/.test(ua)
      ? 'iOS'
      : /Mac OS X/.test(ua)
        ? 'macOS'
        : /Windows/.test(ua)
          ? 'Windows'
          : /Linux/.test(ua)
            ? 'Linux'
            : '';
  return os ? `${browser} on ${os}` : browser;
}

/** An ntfy topic URL: https://host[:port]/topic (ntfy topics are [-_A-Za-z0-9]{1,64}). */
async function checkNtfyTopic(raw: string, allowPrivate: boolean): Promise<{ ok: true; url: string } | { ok: false; reason: string }> {
  const checked = await checkEndpoint(raw, allowPrivate);
  if (!checked.ok) return checked;
  const u = checked.url;
  if (u.search || u.hash) return { ok: false, reason: 'it must not have a query or fragment' };
  if (!/^\/[-_A-Za-z0-9]{1,64}$/.test(u.pathname)) return { ok: false, reason: 'it must be the server and one topic, like https://ntfy.sh/my-topic' };
  return { ok: true, url: u.href };
}

// ---- the Mattermost API, the one seam to the outside ----

type Account = { id: string; username: string; email?: string };
type Called = { reached: true; status: number; body: unknown; headers: Headers } | { reached: false; status: 0; error: string };

function mattermostClient(base: string) {
  const agent = `push-relay/${VERSION.version}`;

  async function call(method: string, path: string, opts: { json?: unknown; bearer?: string } = {}): Promise<Called> {
    try {
      const res = await fetch(`${base}${path}`, {
        method,
        headers: {
          'User-Agent': agent,
          Accept: 'application/json',
          ...(opts.json !== undefined ? { 'Content-Type': 'application/json' } : {}),
          ...(opts.bearer ? { Authorization: `Bearer ${opts.bearer}` } : {}),
        },
        body: opts.json !== undefined ? JSON.stringify(opts.json) : undefined,
        // A redirect would send the password elsewhere: never followed.
        redirect: 'manual',
        signal: AbortSignal.timeout(MATTERMOST_TIMEOUT_MS),
      });
      const text = await res.text();
      let body: unknown = text;
      try {
        body = text ? JSON.parse(text) : undefined;
      } catch {
        /* not JSON: kept as text for the message */
      }
      return { reached: true, status: res.status, body, headers: res.headers };
    } catch (err) {
      const e = err as Error & { cause?: { code?: string; message?: string } };
      return { reached: false, status: 0, error: e.name === 'TimeoutError' ? `no answer within ${MATTERMOST_TIMEOUT_MS / 1000} s` : (e.cause?.code ?? e.cause?.message ?? e.message) };
    }
  }

  const unreachable = (detail: string): Failure => ({
    status: 502,
    error: 'mattermost_unreachable',
    message: `The relay could not reach Mattermost (${detail}). Try again later, or tell the administrator.`,
  });
  /** A Mattermost AppError body: {id, message, detailed_error, status_code}. */
  const appError = (body: unknown) => {
    const b = body && typeof body === 'object' ? (body as Record<string, unknown>) : {};
    return { id: typeof b.id === 'string' ? b.id : '', message: typeof b.message === 'string' ? b.message : '' };
  };
  const unexpected = (r: Called): Failure => {
    if (!r.reached) return unreachable(r.error);
    if (r.status === 429) return { status: 429, error: 'mattermost_rate_limited', message: 'Mattermost is refusing sign-ins for a moment (its own rate limit). Wait a minute and try again.' };
    const e = appError(r.body);
    return { status: 502, error: 'mattermost_error', message: `Mattermost answered HTTP ${r.status}${e.message ? `: ${e.message}` : ''}.` };
  };
  const accountOf = (body: unknown): Account | undefined => {
    const b = body && typeof body === 'object' ? (body as Record<string, unknown>) : {};
    if (typeof b.id !== 'string' || typeof b.username !== 'string') return undefined;
    return { id: b.id, username: b.username, ...(typeof b.email === 'string' && b.email ? { email: b.email } : {}) };
  };

  return {
    /** POST /api/v4/users/login: the user JSON, and the session token in the `Token` header (app/login.go DoLogin). */
    async login(
      loginId: string,
      password: string,
      mfaToken: string | undefined,
      deviceId: string,
    ): Promise<{ ok: true; account: Account; sessionToken: string } | { ok: false; failure: Failure }> {
      const r = await call('POST', '/api/v4/users/login', {
        json: { login_id: loginId, password, device_id: deviceId, ...(mfaToken ? { token: mfaToken } : {}) },
      });
      if (r.reached && r.status === 200) {
        const sessionToken = r.headers.get('token');
        const account = accountOf(r.body);
        if (!sessionToken || !account) {
          return { ok: false, failure: { status: 502, error: 'mattermost_error', message: 'Mattermost signed in but sent no session token. Is mattermost.url the Mattermost server itself?' } };
        }
        return { ok: true, account, sessionToken };
      }
      if (r.reached) {
        const { id } = appError(r.body);
        if (id === MFA_REQUIRED_ID) {
          return { ok: false, failure: { status: 401, error: 'mfa_required', message: 'Enter the code from your authenticator app.' } };
        }
        const known = LOGIN_ERRORS[id];
        if (known) return { ok: false, failure: known };
      }
      return { ok: false, failure: unexpected(r) };
    },
    /** GET /api/v4/users/me: who the token belongs to; a call that also counts as activity. */
    async me(bearer: string): Promise<{ ok: true; account: Account } | { ok: false; status: number; failure: Failure }> {
      const r = await call('GET', '/api/v4/users/me', { bearer });
      const account = r.reached && r.status === 200 ? accountOf(r.body) : undefined;
      if (account) return { ok: true, account };
      return { ok: false, status: r.status, failure: unexpected(r) };
    },
    /** PUT /api/v4/users/sessions/device: attaches the device id to the session the token authenticates. */
    async attachDevice(bearer: string, deviceId: string): Promise<{ ok: true } | { ok: false; failure: Failure }> {
      const r = await call('PUT', '/api/v4/users/sessions/device', { bearer, json: { device_id: deviceId } });
      if (r.status === 200) return { ok: true };
      if (r.status === 401) return { ok: false, failure: PAT_REFUSED };
      return { ok: false, failure: unexpected(r) };
    },
    /** POST /api/v4/users/logout: revokes the session the token authenticates (api4/user.go Logout). */
    async logout(bearer: string): Promise<boolean> {
      const r = await call('POST', '/api/v4/users/logout', { bearer });
      // 401: the session had already ended; either way it carries the device id no more.
      return r.status === 200 || r.status === 401;
    },
  };
}
