// A local Mattermost for the pairing tests: the four API calls the relay makes, with their real
// request and response shapes, read from Mattermost's source (server 00ba58f5):
//
//   POST /api/v4/users/login          api4/user.go login -> app/login.go DoLogin: the sanitized
//                                     user JSON, the session token in the `Token` header; errors
//                                     are AppError JSON {id, message, detailed_error, request_id,
//                                     status_code}. Every error outside an allow-list is masked as
//                                     api.user.login.invalid_credentials_email_username (401);
//                                     MFA: no or malformed code -> mfa.validate_token.authenticate
//                                     .app_error (400, from mfa.ValidateToken), wrong code ->
//                                     api.user.check_user_mfa.bad_code.app_error (401). The
//                                     password is checked before the code (authenticateUser).
//   POST /api/v4/users/logout         APIHandler (no session needed): revokes the session the
//                                     token names, answers {"status":"OK"} either way.
//   GET  /api/v4/users/me             a session or a personal access token; 401 otherwise.
//   PUT  /api/v4/users/sessions/device  handleDeviceProps -> attachDeviceId: sets the device id
//                                     on the session the token authenticates; a personal access
//                                     token gets a session of its own (createSessionForUserAccessToken).
//
// It records every request as received, so a test can assert what Mattermost saw (the
// password, the device id) and, elsewhere, that the relay kept none of it.
import { randomBytes } from 'node:crypto';
import { createServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll } from 'vitest';

export type FakeUser = {
  id?: string;
  username: string;
  email: string;
  password: string;
  /** The code the account's authenticator shows (MFA on when set). */
  mfaCode?: string;
  /** Personal access tokens of this user. */
  accessTokens?: string[];
};

export type Received = { method: string; path: string; headers: IncomingHttpHeaders; text: string; json: Record<string, unknown> | undefined };

export type FakeSession = { token: string; userId: string; deviceId: string; kind: 'login' | 'access_token'; revoked: boolean };

export type MattermostFake = {
  url: string;
  received: Received[];
  sessions: FakeSession[];
  /** Requests to one path. */
  calls(path: string): Received[];
  /** Ends a session as Mattermost would (expired, revoked by an admin): its token then gets 401. */
  expire(token: string): void;
  /** Holds every answer back by `ms` (a slow server). */
  delay(ms: number): void;
  close(): Promise<void>;
};

const fakes = new Set<MattermostFake>();

/** Mattermost's ids: 26 lowercase alphanumerics (model.NewId). */
const newId = () => {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789';
  return Array.from(randomBytes(26), (b) => alphabet[b % alphabet.length]).join('');
};

export async function startMattermostFake(users: FakeUser[]): Promise<MattermostFake> {
  const accounts = users.map((u) => ({ ...u, id: u.id ?? newId() }));
  const received: Received[] = [];
  const sessions: FakeSession[] = [];
  let delayMs = 0;

  const appError = (id: string, status: number, message = id) =>
    JSON.stringify({ id, message, detailed_error: '', request_id: newId(), status_code: status });
  /** model.User as Sanitize({}) leaves it for its own login: no password, auth data or MFA secret. */
  const userJson = (u: (typeof accounts)[number]) =>
    JSON.stringify({
      id: u.id,
      create_at: 1_700_000_000_000,
      update_at: 1_700_000_000_000,
      delete_at: 0,
      username: u.username,
      auth_data: '',
      auth_service: '',
      email: u.email,
      email_verified: true,
      nickname: '',
      first_name: '',
      last_name: '',
      position: '',
      roles: 'system_user',
      notify_props: {},
      last_password_update: 1_700_000_000_000,
      locale: 'en',
      timezone: { automaticTimezone: '', manualTimezone: '', useAutomaticTimezone: 'true' },
      mfa_active: Boolean(u.mfaCode),
      disable_welcome_email: false,
    });

  function sessionFor(headers: IncomingHttpHeaders): FakeSession | undefined {
    const m = /^Bearer (\S+)$/i.exec(headers.authorization ?? '');
    if (!m) return undefined;
    const token = m[1] as string;
    const live = sessions.find((s) => s.token === token && !s.revoked);
    if (live) return live;
    if (sessions.some((s) => s.token === token)) return undefined; // expired or revoked
    const owner = accounts.find((u) => u.accessTokens?.includes(token));
    if (!owner) return undefined;
    const s: FakeSession = { token, userId: owner.id, deviceId: '', kind: 'access_token', revoked: false };
    sessions.push(s);
    return s;
  }

  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      let json: Record<string, unknown> | undefined;
      try {
        const v = JSON.parse(text) as unknown;
        if (v && typeof v === 'object' && !Array.isArray(v)) json = v as Record<string, unknown>;
      } catch {
        /* not JSON */
      }
      const path = (req.url ?? '/').split('?')[0] as string;
      received.push({ method: req.method ?? '', path, headers: req.headers, text, json });
      // model.MapFromJSON: only string values count; anything else reads as "".
      const prop = (k: string) => (typeof json?.[k] === 'string' ? (json[k] as string) : '');
      const send = (status: number, body: string, headers: Record<string, string> = {}) =>
        setTimeout(() => {
          res.writeHead(status, { 'Content-Type': 'application/json', ...headers });
          res.end(body);
        }, delayMs);

      if (req.method === 'POST' && path === '/api/v4/users/login') {
        const password = prop('password');
        if (!password) return send(400, appError('api.user.login.blank_pwd.app_error', 400));
        const loginId = prop('login_id').toLowerCase();
        const user = accounts.find((u) => u.username.toLowerCase() === loginId || u.email.toLowerCase() === loginId);
        if (!user || user.password !== password) return send(401, appError('api.user.login.invalid_credentials_email_username', 401));
        if (user.mfaCode) {
          const code = prop('token').trim();
          if (!/^\d{6}$/.test(code)) return send(400, appError('mfa.validate_token.authenticate.app_error', 400));
          if (code !== user.mfaCode) return send(401, appError('api.user.check_user_mfa.bad_code.app_error', 401));
        }
        const token = newId();
        sessions.push({ token, userId: user.id, deviceId: prop('device_id'), kind: 'login', revoked: false });
        return send(200, userJson(user), { Token: token });
      }
      if (req.method === 'POST' && path === '/api/v4/users/logout') {
        const s = sessionFor(req.headers);
        if (s) s.revoked = true;
        return send(200, JSON.stringify({ status: 'OK' }));
      }
      if (req.method === 'GET' && path === '/api/v4/users/me') {
        const s = sessionFor(req.headers);
        const user = s && accounts.find((u) => u.id === s.userId);
        if (!user) return send(401, appError('api.context.session_expired.app_error', 401, 'Invalid or expired session, please login again.'));
        return send(200, userJson(user));
      }
      if (req.method === 'PUT' && path === '/api/v4/users/sessions/device') {
        const s = sessionFor(req.headers);
        if (!s) return send(401, appError('api.context.session_expired.app_error', 401, 'Invalid or expired session, please login again.'));
        const deviceId = prop('device_id');
        if (deviceId) s.deviceId = deviceId;
        return send(200, JSON.stringify({ status: 'OK' }));
      }
      return send(404, appError('api.context.404.app_error', 404, 'Sorry, we could not find the page.'));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;

  const fake: MattermostFake = {
    url,
    received,
    sessions,
    calls: (p) => received.filter((r) => r.path === p),
    expire(token) {
      for (const s of sessions) if (s.token === token) s.revoked = true;
    },
    delay(ms) {
      delayMs = ms;
    },
    close: () =>
      new Promise<void>((resolve) => {
        fakes.delete(fake);
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
  fakes.add(fake);
  return fake;
}

afterAll(async () => {
  await Promise.all([...fakes].map((f) => f.close()));
});
