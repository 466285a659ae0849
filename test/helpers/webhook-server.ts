// Local HTTP servers standing in for the webhook sink's peers, on 127.0.0.1 and a random port:
// - `startWebhookServer`: any endpoint; the test decides each answer (status, headers, delay);
// - `startNtfyServer`: checks a publish the way ntfy documents it (docs.ntfy.sh/publish: JSON
//   to the root URL with topic, title, message, tags, priority 1-5, click; or the body to
//   /<topic> with Title / Tags / Priority / Click headers; access tokens as Bearer) and
//   answers like ntfy (200 with the message as JSON, 400 / 401 with ntfy's error JSON);
// - `startGotifyServer`: checks POST /message the way gotify documents it (gotify.net/docs/pushmsg,
//   /docs/msgextras: the application token as X-Gotify-Key, ?token= or Bearer; JSON title,
//   message (required), priority, extras) and answers like gotify.
// Each keeps what it accepted: what the phone would show.
import { createServer, type IncomingHttpHeaders, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { afterAll } from 'vitest';
import { until } from './wait.js';

export type Recorded = { method: string; url: string; headers: IncomingHttpHeaders; body: string; at: number };
export type Answer = { status: number; headers?: Record<string, string>; body?: string; delayMs?: number };

export type Peer<M = never> = {
  url: string;
  port: number;
  requests: Recorded[];
  /** What the service accepted and would show (ntfy / gotify). */
  messages: M[];
  waitForRequests(count: number, timeoutMs?: number): Promise<Recorded[]>;
  close(): Promise<void>;
};

const servers = new Set<Server>();

async function serve<M>(handle: (r: Recorded, index: number, messages: M[]) => Answer | Promise<Answer>, tls?: { key: Buffer; cert: Buffer }): Promise<Peer<M>> {
  const requests: Recorded[] = [];
  const messages: M[] = [];
  const listener = (req: IncomingMessage, res: ServerResponse) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', async () => {
      const r: Recorded = { method: req.method ?? '', url: req.url ?? '', headers: req.headers, body: Buffer.concat(chunks).toString('utf8'), at: Date.now() };
      requests.push(r);
      const a = await handle(r, requests.length, messages);
      if (a.delayMs) await new Promise((ok) => setTimeout(ok, a.delayMs));
      if (res.destroyed) return;
      res.writeHead(a.status, { 'Content-Type': 'application/json', ...a.headers });
      res.end(a.body ?? '');
    });
  };
  const server: Server = tls ? createHttpsServer(tls, listener) : createServer(listener);
  servers.add(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `${tls ? 'https' : 'http'}://127.0.0.1:${port}`,
    port,
    requests,
    messages,
    async waitForRequests(count, timeoutMs = 5000) {
      await until(`${count} request(s) at the endpoint (have ${requests.length})`, () => requests.length >= count, { timeoutMs, intervalMs: 20 });
      return requests;
    },
    close: () =>
      new Promise<void>((resolve) => {
        servers.delete(server);
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** Any endpoint: `answer` decides each reply (default 200 `{}`); HTTPS with `tls`. */
export function startWebhookServer(
  answer: (r: Recorded, index: number) => Answer | Promise<Answer> = () => ({ status: 200, body: '{}' }),
  tls?: { key: Buffer; cert: Buffer },
): Promise<Peer> {
  return serve((r, i) => answer(r, i), tls);
}

export type NtfyMessage = { topic: string; title?: string; message: string; priority?: number; tags?: string[]; click?: string; auth?: string };

const ntfyError = (http: number, code: number, error: string): Answer => ({ status: http, body: JSON.stringify({ code, http, error }) });
const TOPIC = /^[-_A-Za-z0-9]{1,64}$/; // ntfy's topic names

export function startNtfyServer({ token }: { token?: string } = {}): Promise<Peer<NtfyMessage>> {
  return serve<NtfyMessage>((r, _i, messages) => {
    if (r.method !== 'POST' && r.method !== 'PUT') return ntfyError(405, 40501, 'method not allowed');
    if (token !== undefined && r.headers.authorization !== `Bearer ${token}`) return ntfyError(401, 40101, 'unauthorized');
    const path = r.url.split('?')[0] as string;
    let m: NtfyMessage;
    if (path === '/') {
      let j: Record<string, unknown>;
      try {
        j = JSON.parse(r.body) as Record<string, unknown>;
      } catch {
        return ntfyError(400, 40017, 'invalid request: request body must be message JSON');
      }
      if (typeof j.topic !== 'string' || !TOPIC.test(j.topic)) return ntfyError(400, 40009, 'invalid request: topic invalid');
      if (j.message !== undefined && typeof j.message !== 'string') return ntfyError(400, 40017, 'invalid request: message must be a string');
      if (j.title !== undefined && typeof j.title !== 'string') return ntfyError(400, 40017, 'invalid request: title must be a string');
      if (j.priority !== undefined && !(Number.isInteger(j.priority) && (j.priority as number) >= 1 && (j.priority as number) <= 5)) {
        return ntfyError(400, 40007, 'invalid request: priority invalid');
      }
      if (j.tags !== undefined && !(Array.isArray(j.tags) && j.tags.every((t) => typeof t === 'string'))) return ntfyError(400, 40017, 'invalid request: tags must be strings');
      if (j.click !== undefined && !(typeof j.click === 'string' && /^https?:\/\//.test(j.click))) return ntfyError(400, 40013, 'invalid request: click URL invalid');
      m = { ...(j as NtfyMessage), message: (j.message as string | undefined) || 'triggered' };
    } else {
      const topic = decodeURIComponent(path.slice(1));
      if (!TOPIC.test(topic)) return ntfyError(404, 40401, 'page not found');
      const h = (a: string, b: string) => (r.headers[a] ?? r.headers[b]) as string | undefined;
      m = {
        topic,
        message: r.body || 'triggered',
        title: h('x-title', 'title'),
        priority: h('x-priority', 'priority') ? Number(h('x-priority', 'priority')) : undefined,
        tags: h('x-tags', 'tags')?.split(','),
        click: h('x-click', 'click'),
      };
    }
    messages.push({ ...m, auth: r.headers.authorization });
    return { status: 200, body: JSON.stringify({ id: `m${messages.length}`, time: Math.floor(Date.now() / 1000), event: 'message', ...m }) };
  });
}

export type GotifyMessage = { title?: string; message: string; priority?: number; extras?: Record<string, unknown> };

export function startGotifyServer({ appToken }: { appToken: string }): Promise<Peer<GotifyMessage>> {
  const unauthorized: Answer = {
    status: 401,
    body: JSON.stringify({ error: 'Unauthorized', errorCode: 401, errorDescription: 'you need to provide a valid access token or user credentials to access this api' }),
  };
  const bad = (d: string): Answer => ({ status: 400, body: JSON.stringify({ error: 'Bad Request', errorCode: 400, errorDescription: d }) });
  return serve<GotifyMessage>((r, _i, messages) => {
    const [path, query = ''] = r.url.split('?') as [string, string?];
    if (path !== '/message' || r.method !== 'POST') return { status: 404, body: JSON.stringify({ error: 'Not Found', errorCode: 404, errorDescription: 'page not found' }) };
    const key = r.headers['x-gotify-key'] ?? new URLSearchParams(query).get('token') ?? r.headers.authorization?.replace(/^Bearer /, '');
    if (key !== appToken) return unauthorized;
    let j: Record<string, unknown>;
    try {
      j = JSON.parse(r.body) as Record<string, unknown>;
    } catch {
      return bad('invalid JSON');
    }
    if (typeof j.message !== 'string' || j.message === '') return bad("Field 'message' is required");
    if (j.title !== undefined && typeof j.title !== 'string') return bad("Field 'title' must be a string");
    if (j.priority !== undefined && !Number.isInteger(j.priority)) return bad("Field 'priority' must be an integer");
    if (j.extras !== undefined && (typeof j.extras !== 'object' || j.extras === null || Array.isArray(j.extras))) return bad("Field 'extras' must be an object");
    const m = j as GotifyMessage;
    messages.push(m);
    return { status: 200, body: JSON.stringify({ id: messages.length, appid: 1, date: new Date().toISOString(), ...m }) };
  });
}

afterAll(async () => {
  await Promise.all(
    [...servers].map(
      (s) =>
        new Promise<void>((resolve) => {
          s.closeAllConnections();
          s.close(() => resolve());
        }),
    ),
  );
  servers.clear();
});
