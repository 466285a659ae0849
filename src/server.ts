// The HTTP face: Mattermost's two calls plus the operator's endpoints.
//
// Mattermost posts JSON with no Content-Type (§1.1), never retries (§0.5) and only reads a
// 200 reply whose values are all strings (§3.1): every path below ends in such a reply,
// including bad input and bugs, so the server's log always says what went wrong.
//
// Three ways in, one `serve()`: the two API calls as Mattermost sends them are read off the
// socket by src/http.ts (`App.routes`); node:http serves whatever that declines
// (`App.listener`: the API calls directly, the rest through Hono), and Hono serves the
// operator endpoints and the API through `app.request`. Why not Hono for everything:
// @hono/node-server builds a WHATWG Request, a body stream and an AbortSignal per request
// once a middleware reads the body, and node:http builds its own objects before that; on our
// 2-core machines those alone cost more than the rest of a notification (bench/README.md).
import { timingSafeEqual } from 'node:crypto';
import type { IncomingMessage, RequestListener, ServerResponse } from 'node:http';
import { getRequestListener } from '@hono/node-server';
import { Hono } from 'hono';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import { fastNotification, parseBody, PushAckSchema, PushNotificationSchema, shortToken, type PushResponse } from './contract.js';
import { replyFor, type Dispatcher } from './dispatch.js';
import type { Reply, Route } from './http.js';
import type { Metrics } from './metrics.js';
import type { Router } from './route.js';
import { VERSION } from './version.js';
import type { Sink } from '../sinks/types.js';

export type AppDeps = {
  config: Config;
  sinks: readonly Sink[];
  router: Router;
  dispatcher: Dispatcher;
  metrics: Metrics;
  logger: Logger;
  /** The pairing page and its API (src/pairing.ts), mounted at `/`. */
  pairing?: Hono<any>; // eslint-disable-line @typescript-eslint/no-explicit-any -- its own Bindings
};

type Endpoint = 'send_push' | 'ack';
/** What an API call answers: an HTTP status (200 but for 401/413) and a contract body. */
type Answer = { status: 200 | 401 | 413; body: PushResponse | string; headers?: Record<string, string> };

export type App = Hono & {
  inFlight(): number;
  /** The API calls as src/http.ts serves them, by path. */
  routes: ReadonlyMap<string, Route>;
  /** The node:http listener: the API calls directly, everything else through Hono. */
  listener: RequestListener;
};

export function createApp({ config, sinks, router, dispatcher, metrics, logger, pairing }: AppDeps): App {
  const base = config.server.basePath;
  const limit = config.server.bodyLimit;
  const paths = new Map<string, Endpoint>([
    [`${base}/api/v1/send_push`, 'send_push'],
    [`${base}/api/v1/ack`, 'ack'],
  ]);
  const authorized = config.server.auth ? basicAuth(config.server.auth) : () => true;
  let inFlight = 0;
  let seq = 0;

  const pid = process.pid.toString(36);
  /** Parses, routes and delivers; a promise only while sinks are at work. */
  function sendPush(text: string, ua: string | undefined): PushResponse | Promise<PushResponse> {
    const id = ++seq;
    const req = () => `${pid}-${id.toString(36)}`;
    const parsed = parseBody(PushNotificationSchema, text, fastNotification);
    if (!parsed.ok) {
      metrics.invalid('send_push', 'invalid_payload');
      metrics.reply('FAIL');
      logger.warn({ req: req(), error: parsed.error, ua }, 'rejected an invalid send_push payload');
      return { status: 'FAIL', error: parsed.error };
    }
    const n = parsed.value;
    metrics.received(n.type);
    let child: Logger | undefined;
    const log = () =>
      (child ??= logger.child({ req: req(), ack_id: n.ack_id, platform: n.platform, type: n.type, device: shortToken(n.device_id) }));
    return dispatcher.deliver(n, router(n), log).then((deliveries) => {
      const answer = replyFor(deliveries);
      metrics.reply(answer.status);
      if (answer.status !== 'OK') log().warn({ status: answer.status, error: answer.error }, 'answered Mattermost with a failure');
      else if (logger.isLevelEnabled('debug')) log().debug({ sinks: deliveries.map((d) => `${d.sink.name}:${d.result.kind}`) }, 'notification handled');
      return answer;
    });
  }

  function ack(text: string): PushResponse {
    const parsed = parseBody(PushAckSchema, text);
    if (!parsed.ok) {
      metrics.invalid('ack', 'invalid_payload');
      logger.warn({ error: parsed.error }, 'rejected an invalid ack payload');
      return { status: 'FAIL', error: parsed.error };
    }
    metrics.ack();
    logger.debug({ ack_id: parsed.value.id, type: parsed.value.type, platform: parsed.value.platform }, 'ack');
    return { status: 'OK' };
  }

  const tooLarge = (endpoint: Endpoint): Answer => {
    metrics.invalid(endpoint, 'too_large');
    logger.warn({ endpoint, limit }, `rejected a body over server.bodyLimit (${limit} bytes)`);
    return { status: 413, body: { status: 'FAIL', error: `request body larger than ${limit} bytes` } };
  };
  const UNAUTHORIZED: Answer = {
    status: 401,
    body: "unauthorized: put user:password in Mattermost's push notification server URL",
    headers: { 'WWW-Authenticate': 'Basic realm="push-relay"' },
  };

  const internalError = (err: unknown, endpoint: Endpoint): Answer => {
    logger.error({ err, endpoint }, 'bug: request handler failed');
    // Still a contract reply: Mattermost logs the text, and we keep serving.
    return { status: 200, body: { status: 'FAIL', error: `internal error: ${(err as Error).message}` } };
  };
  const ok200 = (body: PushResponse): Answer => ({ status: 200, body });
  const settled = (answer: Answer) => {
    inFlight--;
    return answer;
  };

  /**
   * One API call with its body in hand (undefined: over the limit). Never rejects: bad input
   * and bugs alike end in a contract answer. Chained by hand, not async: see dispatch.ts.
   */
  function serve(endpoint: Endpoint, authorization: string | undefined, ua: string | undefined, text: string | undefined): Promise<Answer> {
    inFlight++;
    let answer: Answer | Promise<Answer>;
    try {
      if (!authorized(authorization)) {
        logger.warn({ endpoint }, 'rejected a request without valid credentials (server.auth)');
        answer = UNAUTHORIZED;
      } else if (text === undefined) answer = tooLarge(endpoint);
      else if (endpoint === 'ack') answer = ok200(ack(text));
      else {
        const reply = sendPush(text, ua);
        answer = reply instanceof Promise ? reply.then(ok200) : ok200(reply);
      }
    } catch (err) {
      answer = internalError(err, endpoint);
    }
    if (!(answer instanceof Promise)) return Promise.resolve(settled(answer));
    return answer.then(settled, (err) => settled(internalError(err, endpoint)));
  }

  /** The same, for callers that read the body themselves (only once the caller is authorized). */
  async function api(
    endpoint: Endpoint,
    authorization: string | undefined,
    ua: string | undefined,
    readBody: () => Promise<string | undefined>,
  ): Promise<Answer> {
    if (!authorized(authorization)) return serve(endpoint, authorization, ua, '');
    let text: string | undefined;
    inFlight++; // reading the body counts too: shutdown waits for it
    try {
      text = await readBody();
    } catch (err) {
      return internalError(err, endpoint);
    } finally {
      inFlight--;
    }
    return serve(endpoint, authorization, ua, text);
  }

  // ---- Hono: operator endpoints, and the API for app.request ----

  const app = new Hono();
  for (const [path, endpoint] of paths) {
    app.post(path, async (c) => {
      const declared = Number(c.req.header('content-length') ?? NaN);
      const answer = await api(endpoint, c.req.header('authorization'), c.req.header('user-agent'), async () => {
        if (declared > limit) return undefined;
        const buf = await c.req.arrayBuffer();
        return buf.byteLength > limit ? undefined : new TextDecoder().decode(buf);
      });
      if (typeof answer.body === 'string') return c.text(answer.body, answer.status, answer.headers);
      return c.json(answer.body, answer.status);
    });
    app.all(path, (c) => c.text('method not allowed: use POST', 405, { Allow: 'POST' }));
  }
  if (pairing) app.route('/', pairing); else app.get('/', (c) => c.html('<html><body>push-relay: a Mattermost push notification relay</body></html>'));
  app.get('/version', (c) => c.json(VERSION));
  app.get('/healthz', (c) => c.json({ status: 'ok' }));
  app.get('/readyz', (c) => {
    const states = Object.fromEntries(sinks.map((s) => [s.name, s.state()]));
    const ready = Object.values(states).every((s) => s.ready);
    return c.json({ status: ready ? 'ready' : 'not ready', sinks: states }, ready ? 200 : 503);
  });
  app.get('/metrics', async (c) => c.body(await metrics.registry.metrics(), 200, { 'Content-Type': metrics.registry.contentType }));
  app.notFound((c) => c.text(`not found: ${c.req.method} ${c.req.path}`, 404));
  app.onError((err, c) => {
    logger.error({ err, path: c.req.path }, 'bug: request handler failed');
    return c.json({ status: 'FAIL', error: `internal error: ${err.message}` }, 500);
  });

  // ---- node:http: the API calls without the Request/stream/AbortSignal per call ----

  const hono = getRequestListener(app.fetch);
  const listener: RequestListener = (req, res) => {
    const endpoint = req.method === 'POST' ? paths.get(req.url ?? '') : undefined;
    if (!endpoint) return void hono(req, res);
    void api(endpoint, req.headers.authorization, req.headers['user-agent'], () => readLimited(req, limit)).then((answer) =>
      send(res, answer),
    );
  };

  const routes = new Map<string, Route>(
    [...paths].map(([path, endpoint]) => [
      path,
      (body, authorization, ua) => serve(endpoint, authorization, ua, body).then(toReply),
    ]),
  );

  return Object.assign(app, { inFlight: () => inFlight, routes, listener });
}

/** The body as UTF-8 text, or undefined once it passes `limit` bytes (declared or sent). */
function readLimited(req: IncomingMessage, limit: number): Promise<string | undefined> {
  return new Promise((resolve, reject) => {
    const declared = Number(req.headers['content-length'] ?? NaN);
    if (declared > limit) {
      // Answer now; drain what the client still sends so it reads our 413 rather than a reset.
      req.resume();
      return resolve(undefined);
    }
    const chunks: Buffer[] = [];
    let size = 0;
    let over = false;
    req.on('data', (chunk: Buffer) => {
      if (over) return;
      size += chunk.length;
      if (size > limit) {
        over = true;
        chunks.length = 0;
        return resolve(undefined);
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      if (!over) resolve((chunks.length === 1 ? (chunks[0] as Buffer) : Buffer.concat(chunks, size)).toString('utf8'));
    });
    req.on('error', reject);
  });
}

const OK_REPLY: Reply = { status: 200, type: 'application/json', body: JSON.stringify({ status: 'OK' } satisfies PushResponse) };

function toReply(answer: Answer): Reply {
  const body = answer.body;
  if (typeof body === 'string') return { status: answer.status, type: 'text/plain; charset=UTF-8', body, headers: answer.headers };
  if (answer.status === 200 && body.status === 'OK' && body.error === undefined) return OK_REPLY;
  return { status: answer.status, type: 'application/json', body: JSON.stringify(body), headers: answer.headers };
}

function send(res: ServerResponse, answer: Answer) {
  const reply = toReply(answer);
  res.writeHead(reply.status, { 'Content-Type': reply.type, 'Content-Length': Buffer.byteLength(reply.body), ...reply.headers });
  res.end(reply.body);
}

/**
 * Mattermost sends `Authorization: Basic` when its push server URL carries userinfo
 * (`https://user:pass@relay/`, contract §1.1): that is the one credential it can present.
 */
function basicAuth(auth: { username: string; password: string }): (header: string | undefined) => boolean {
  const expected = Buffer.from(`Basic ${Buffer.from(`${auth.username}:${auth.password}`).toString('base64')}`);
  return (header) => {
    const got = Buffer.from(header ?? '');
    return got.length === expected.length && timingSafeEqual(got, expected);
  };
}
